// The web chat: streams answers from /v1/chat/completions and shows what each one reused.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], busy: false, key: localStorage.getItem("epic-rag-key") || "" };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) { $("key-bar").hidden = false; $("model-id").textContent = "(API key needed)"; return; }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-id").textContent = state.model;
}

function answerCard(label, kind) {
  const card = element("section", `answer ${kind}`);
  card.append(element("div", "label", label));
  const text = element("div", "text pending");
  card.append(text);
  return { card, text };
}

function chip(name, value) {
  const c = element("span", "chip");
  c.append(element("strong", "", `${name} `), document.createTextNode(value));
  return c;
}

function showReport(card, report) {
  const stats = element("div", "stats");
  const total = report.tokens_prompt || 0;
  stats.append(
    chip("TTFT", `${report.ttft_s.toFixed(2)} s`),
    chip("reused", `${report.tokens_reused} of ${total} tokens`),
    chip("recomputed", `${report.tokens_recomputed}`),
    chip("cache", `${report.cache_hits} hits, ${report.cache_misses} misses`),
    chip("policy", report.policy),
  );
  card.append(stats);
  if (report.sources && report.sources.length) {
    const details = element("details", "sources");
    details.append(element("summary", "", `${report.sources.length} sources`));
    for (const s of report.sources) {
      const item = element("div", "source");
      item.append(element("span", "file", s.file));
      if (s.score !== null) item.append(element("span", "score", s.score.toFixed(2)));
      item.append(element("div", "snippet", s.snippet));
      details.append(item);
    }
    card.append(details);
  }
}

// One streamed completion into `view`; returns the answer text.
async function stream(messages, policy, view) {
  const body = { model: state.model, messages, stream: true };
  if (policy) body.policy = policy;
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
    if (response.status === 401) $("key-bar").hidden = false;
    throw new Error(error.error.message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data:")) continue;
      const data = event.slice(5).trim();
      if (data === "[DONE]") return answer;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices[0].delta.content || "";
      answer += delta;
      view.text.textContent = answer;
      if (chunk.epic_rag) {
        view.text.classList.remove("pending");
        showReport(view.card, chunk.epic_rag);
      }
    }
  }
  return answer;
}

async function ask(question) {
  $("empty")?.remove();
  const conversation = $("conversation");
  conversation.append(element("div", "turn-user", question));
  const compare = $("compare").checked;
  const policy = $("policy").value;
  const answers = element("div", compare ? "answers compare" : "answers");
  const main = answerCard(policy || "server default policy", "main");
  answers.append(main.card);
  const full = compare ? answerCard("full recompute", "full") : null;
  if (full) answers.append(full.card);
  conversation.append(answers);
  answers.scrollIntoView({ behavior: "smooth", block: "end" });
  const messages = [...state.history, { role: "user", content: question }];
  try {
    const text = await stream(messages, policy, main);
    if (full) await stream(messages, "full", full);
    state.history = [...messages, { role: "assistant", content: text }];
  } catch (err) {
    for (const view of [main, full]) {
      if (view && view.text.classList.contains("pending")) {
        view.text.classList.remove("pending");
        view.text.classList.add("error");
        view.text.textContent = err.message;
      }
    }
  }
}

$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("question").value = "";
  try { await ask(question); } finally { state.busy = false; $("send").disabled = false; $("question").focus(); }
});

$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("ask").requestSubmit(); }
});

$("reset").addEventListener("click", () => {
  state.history = [];
  const conversation = $("conversation");
  conversation.replaceChildren();
  const empty = element("div", "empty");
  empty.id = "empty";
  empty.append(element("h2", "", "New conversation"), element("p", "", "Earlier turns are forgotten."));
  conversation.append(empty);
});

$("save-key").addEventListener("click", () => {
  state.key = $("api-key").value.trim();
  localStorage.setItem("epic-rag-key", state.key);
  $("key-bar").hidden = true;
  loadModel();
});

loadModel();
