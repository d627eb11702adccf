"""`epic-rag serve` as a live process on 127.0.0.1: the real openai client, bad requests, access,
concurrency, a client that walks away, and the web chat in Debian's headless Chromium.

Every answer the server gives is checked against the same request answered in this process by
the engine itself (greedy decoding: the text, the sources and the token counts must be equal)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from epic_rag.app.answering import AnswerReport, ChatRequest, answer
from epic_rag.app.index import open_index
from epic_rag.server.process import ServeProcess
from epic_rag_bench.serve import DEFAULT_QUESTIONS, Reply
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from .live_servers import ENV, epic_server, free_port, metrics

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "sample_docs"  # also used by test_replicas and test_vector_store
MODEL = "smollm2-135m-instruct"
KEY = "test-key-0123456789"
ARTIFACTS = Path(os.environ.get("EPIC_RAG_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
QUESTIONS = [
    "What does the Skylark S3 cost?",
    "How long is the warranty?",
    "Who founded Norrvik Instruments?",
    "What did firmware 4.2 add?",
    "How much does the S3 weigh?",
    "When does the support desk answer the phone?",
    "How long does a firmware update take?",
    "How many people work at Norrvik?",
]
SERVER_MAX_TOKENS = 256  # what the server answers with when a request does not say
Reference = Callable[..., AnswerReport]


def epic_rag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "epic_rag.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def turns(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole(role), content=content) for role, content in pairs]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, sample_index) -> Path:
    """A copy of the session's sample index: the servers write the prompt head's KV into it."""
    path = tmp_path_factory.mktemp("serve") / "docs-index"
    shutil.copytree(sample_index, path)
    return path


@pytest.fixture(scope="module")
def reference(index_dir, smollm2) -> Reference:
    """`reference(question, history=..., policy=..., ...)`: the answer computed in this process."""
    app = open_index(index_dir, engine=smollm2)

    def run(question: str, **fields) -> AnswerReport:
        fields.setdefault("max_tokens", SERVER_MAX_TOKENS)
        return answer(app, ChatRequest(question=question, **fields), lambda _delta: None)

    return run


@pytest.fixture(scope="module")
def server(index_dir) -> Iterator[ServeProcess]:
    with epic_server(index_dir, "--queue-size", "16", "--threads", "2", "--max-batch", "8") as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, question: str, max_tokens: int = 24, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="docs-index",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        extra_body=extra or None,
    )


def same_report(served: dict, expected: AnswerReport) -> None:
    """The server's `epic_rag` report says what the in-process answer's does (cache state aside)."""
    assert served["policy"] == expected.policy
    assert served["chunks_linked"] == expected.chunks_linked
    assert served["tokens_prompt"] == expected.tokens_prompt
    assert served["tokens_reused"] == expected.tokens_reused
    assert served["tokens_recomputed"] == expected.tokens_recomputed
    assert served["tokens_generated"] == expected.tokens_generated
    assert served["cache_hits"] + served["cache_misses"] == expected.cache_hits + expected.cache_misses
    assert [(s["file"], s["snippet"]) for s in served["sources"]] == [(s.file, s.snippet) for s in expected.sources]
    assert [s["score"] for s in served["sources"]] == pytest.approx([s.score for s in expected.sources], abs=1e-3)


def test_models_lists_the_index(client, server):
    assert [m.id for m in client.models.list().data] == ["docs-index", "docs-index:chat"]
    assert httpx.get(f"{server.url}/v1/models", timeout=30).json() == {
        "object": "list",
        "data": [
            {"id": "docs-index", "object": "model", "created": 0, "owned_by": "epic-rag"},
            {"id": "docs-index:chat", "object": "model", "created": 0, "owned_by": "epic-rag"},
        ],
    }


def kv_files(index_dir: Path) -> set[str]:
    return {p.name for p in (index_dir / "kv").rglob("*") if p.is_file()}


def test_answers_equal_epic_rag_ask_streamed_or_not(client, index_dir, reference):
    question = QUESTIONS[0]
    expected = reference(question, policy="attnlink:16", max_tokens=32)
    stored_before = kv_files(index_dir)
    start = time.perf_counter()
    whole = ask(client, question, max_tokens=32, policy="attnlink:16")
    waited = time.perf_counter() - start
    written = kv_files(index_dir) - stored_before  # each miss is written through to the index's kv/
    cli = epic_rag("ask", question, "--index", str(index_dir), "--policy", "attnlink:16", "--max-new-tokens", "32")
    assert cli.returncode == 0, cli.stderr
    assert whole.choices[0].message.content == expected.text
    assert expected.text.strip() == cli.stdout.split("\nsources:")[0].strip()

    def streamed_chunks(**options) -> list:
        return list(
            client.chat.completions.create(
                model="docs-index",
                messages=[{"role": "user", "content": question}],
                max_tokens=32,
                stream=True,
                extra_body={"policy": "attnlink:16"},
                **options,
            )
        )

    chunks = streamed_chunks()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != whole.id
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == expected.text
    last = chunks[-1]
    finish = "length" if expected.tokens_generated == 32 else "stop"
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason == finish
    assert [c.usage for c in chunks] == [None] * len(chunks)  # without stream_options.include_usage: no usage
    with_usage = streamed_chunks(stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in with_usage[:-1]) == expected.text
    assert [c.usage for c in with_usage[:-1]] == [None] * (len(with_usage) - 1)
    usage_chunk = with_usage[-1]  # the spec's last chunk: no choices, the usage of the whole request
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == expected.tokens_generated
    stream_usage = usage_chunk.usage
    for report, usage in ((last.model_extra["epic_rag"], stream_usage), (whole.model_extra["epic_rag"], whole.usage)):
        same_report(report, expected)
        assert report["policy"] == "attnlink:16" and report["chunks_linked"] == 3
        assert report["tokens_reused"] + report["tokens_recomputed"] == report["tokens_prompt"]
        assert (usage.prompt_tokens, usage.completion_tokens) == (expected.tokens_prompt, expected.tokens_generated)
        assert usage.total_tokens == expected.tokens_prompt + expected.tokens_generated
        assert usage.prompt_tokens_details.cached_tokens == expected.tokens_reused > 0
        assert report["cache_hits"] + report["cache_misses"] == 4  # the prompt prefix and 3 chunks
        assert report["sources"][0]["file"] == "skylark_s3.md"
    assert 0 < whole.model_extra["epic_rag"]["ttft_s"] < waited
    assert whole.model_extra["epic_rag"]["cache_misses"] == len(written)  # chunks stored at indexing: the head at most
    assert last.model_extra["epic_rag"]["cache_misses"] == 0  # the streamed request came second


def test_full_recompute_per_request_and_multi_turn(client, reference):
    full = ask(client, QUESTIONS[1], policy="full", top_k=2)
    expected = reference(QUESTIONS[1], policy="full", top_k=2, max_tokens=24)
    report = full.model_extra["epic_rag"]
    assert full.choices[0].message.content == expected.text
    same_report(report, expected)
    assert report["policy"] == "full" and len(report["sources"]) == 2
    assert report["tokens_reused"] == 0 and report["tokens_recomputed"] == report["tokens_prompt"]

    history = [("user", QUESTIONS[0]), ("assistant", "It costs 14,500 euros.")]
    follow_up = client.chat.completions.create(
        model="docs-index",
        messages=[
            *({"role": r, "content": c} for r, c in history),
            {"role": "user", "content": "And the mooring kit?"},
        ],
        max_tokens=16,
    )
    expected = reference("And the mooring kit?", history=turns(*history), max_tokens=16)
    alone = reference("And the mooring kit?", max_tokens=16)
    assert follow_up.choices[0].message.content == expected.text
    same_report(follow_up.model_extra["epic_rag"], expected)
    assert expected.tokens_prompt != alone.tokens_prompt  # the earlier turns are in the prompt


def hi(**fields) -> dict:
    """A request for the index's model saying "hi", with `fields` added or replaced."""
    return {"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], **fields}


UNSUPPORTED = "unsupported_parameter"
BAD_REQUESTS = [
    # (body, status, words in the message, the field named, the error code)
    (hi(model="nope"), 404, "does not exist", "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "Field required", "model", None),
    (hi(messages=[]), 400, "non-empty list", "messages", None),
    (hi(messages="hi"), 400, "valid array", "messages", None),
    (hi(messages=[{"role": "user", "content": "  "}]), 400, "not empty", "messages", None),
    (hi(messages=[{"role": "robot", "content": "hi"}]), 400, "role 'robot'", "messages[0].role", None),
    (hi(messages=[{"role": "user"}]), 400, "Field required", "messages[0].content", None),
    (
        hi(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "must be text",
        "messages[0].content",
        None,
    ),
    (hi(policy="magic"), 400, "unknown policy", "policy", "invalid_policy"),
    (hi(n=2), 400, "n = 1", "n", UNSUPPORTED),
    (hi(tools=[{}]), 400, "tool calls are not supported", "tools", UNSUPPORTED),
    (hi(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop sequences, got 5", "stop", None),
    (hi(stop=[""]), 400, "non-empty string", "stop", None),
    (hi(epic_rag={"retrieval": "no"}), 400, "valid boolean", "epic_rag.retrieval", None),
    (hi(presence_penalty=0.5), 400, "presence_penalty is not supported", "presence_penalty", UNSUPPORTED),
    (hi(response_format={"type": "json_object"}), 400, "text response format", "response_format", UNSUPPORTED),
    (
        hi(messages=[{"role": "user", "content": "word " * 1500}]),
        400,
        "over this server's limit",
        "messages",
        "context_length_exceeded",
    ),
    (hi(max_tokens=100_000), 400, "max_tokens must be between 1 and 1024", "max_tokens", None),
    (hi(max_tokens=True), 400, "valid integer", "max_tokens", None),
    (hi(max_tokens=8, min_tokens=9), 400, "min_tokens (9) must not exceed max_tokens (8)", "min_tokens", None),
    (hi(min_tokens=-1), 400, "greater than or equal to 0", "min_tokens", None),
    (hi(temperature=3), 400, "less than or equal to 2", "temperature", None),
    (hi(top_k=99), 400, "less than or equal to 32", "top_k", None),
    (hi(stream="yes"), 400, "valid boolean", "stream", None),
    ([hi()], 400, "must be a JSON object", None, None),
]


@pytest.mark.parametrize(("body", "status", "words", "param", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, body, status, words, param, code):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_the_openai_client_raises_on_a_refused_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, QUESTIONS[0], logprobs=True)
    assert refused.value.status_code == 400 and refused.value.param == "logprobs"
    assert refused.value.code == "unsupported_parameter"


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400 and response.json()["error"]["message"] == "the body is not valid JSON"


MIXED = [  # (question, policy, max_tokens, streamed): eight requests decoded together in one batch
    (q, ["attnlink:16", "full", "attnlink:4+ape:0.8:1", None][i % 4], 6 + 5 * i, i % 2 == 1)
    for i, q in enumerate(QUESTIONS)
]


def test_eight_clients_at_once_each_get_their_own_answer(client, server, reference):
    """Eight requests at once, of mixed policies, lengths, streamed or whole: the server decodes them
    together (its --max-batch is 8) and each gets exactly the answer it gets alone."""
    alone = [reference(q, policy=policy, max_tokens=n) for q, policy, n, _ in MIXED]
    before = metrics(server.url)

    def send(request: tuple) -> tuple[str, str, dict]:
        question, policy, n, streamed = request
        extra = {"policy": policy} if policy else None
        body = dict(model="docs-index", messages=[{"role": "user", "content": question}], max_tokens=n)
        if not streamed:
            reply = client.chat.completions.create(**body, extra_body=extra)
            return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.model_extra["epic_rag"]
        chunks = list(client.chat.completions.create(**body, extra_body=extra, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, chunks[-1].choices[0].finish_reason, chunks[-1].model_extra["epic_rag"]

    with ThreadPoolExecutor(len(MIXED)) as pool:
        replies = list(pool.map(send, MIXED))
    assert [text for text, _, _ in replies] == [report.text for report in alone]
    assert [finish for _, finish, _ in replies] == [report.finish_reason for report in alone]
    reports = [report for _, _, report in replies]
    assert [r["tokens_generated"] for r in reports] == [a.tokens_generated for a in alone]
    assert [r["policy"] for r in reports] == [a.policy for a in alone]
    after = metrics(server.url)
    assert after["epic_rag_queue_depth"] == 0
    assert after["epic_rag_batch_size"] == 0 and after["epic_rag_kv_bytes_in_flight"] == 0
    steps = after["epic_rag_decode_steps_total"] - before["epic_rag_decode_steps_total"]
    stepped = after["epic_rag_decode_step_tokens_total"] - before["epic_rag_decode_step_tokens_total"]
    chosen = sum(r["tokens_generated"] + (finish == "stop") for _, finish, r in replies)  # an end token is chosen too
    assert stepped == chosen - len(replies)  # every token after each answer's first, which its prefill gives
    assert stepped > 2 * steps  # answers really decoded together: more than two tokens per step on average
    for name, added in (
        ('epic_rag_requests_total{status="200"}', len(MIXED)),
        ("epic_rag_ttft_seconds_count", len(MIXED)),
        ("epic_rag_store_hits_total", sum(r["cache_hits"] for r in reports)),
        ("epic_rag_store_misses_total", sum(r["cache_misses"] for r in reports)),
        ("epic_rag_tokens_reused_total", sum(r["tokens_reused"] for r in reports)),
        ("epic_rag_tokens_recomputed_total", sum(r["tokens_recomputed"] for r in reports)),
    ):
        assert after[name] - before.get(name, 0) == added, name
    assert after["epic_rag_ttft_seconds_sum"] - before["epic_rag_ttft_seconds_sum"] == pytest.approx(
        sum(r["ttft_s"] for r in reports)
    )


def test_a_client_that_walks_away_frees_the_engine(client, server, reference):
    """A client hangs up mid-answer while another answer decodes beside it in the batch: the
    story stops, and the other answer is exactly what it is alone."""
    before = metrics(server.url)
    with (
        ThreadPoolExecutor(1) as pool,
        httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={
                "model": "docs-index",
                "messages": [{"role": "user", "content": "Write a long story about buoys."}],
                "max_tokens": 1000,
                "stream": True,
            },
            timeout=60,
        ) as response,
    ):
        tokens, beside = 0, None
        for line in response.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                tokens += 1
                beside = beside or pool.submit(ask, client, QUESTIONS[5], 40)  # joins the batch
            if tokens == 40:
                break  # the story is well under way, the other answer decoding beside it: hang up
    assert beside.result().choices[0].message.content == reference(QUESTIONS[5], max_tokens=40).text
    answered = ask(client, QUESTIONS[2], max_tokens=8)
    assert answered.choices[0].message.content == reference(QUESTIONS[2], max_tokens=8).text
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health == {
        "status": "ok",
        "model": "docs-index",
        "queue_depth": 0,
        "kv_tiers": {"memory": "up", "disk": "up"},
        "index_generation": 1,
    }
    after = metrics(server.url)
    assert after["epic_rag_cancelled_total"] - before.get("epic_rag_cancelled_total", 0) == 1  # the story stopped
    ok = 'epic_rag_requests_total{status="200"}'
    assert after[ok] - before.get(ok, 0) == 2  # the story never finished: only the other two count as answered


def test_binding_beyond_loopback_needs_a_key(index_dir):
    done = epic_rag("serve", "--index", str(index_dir), "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2 and "without an API key" in done.stderr and "--api-key" in done.stderr


def test_api_key_and_queue_limit(index_dir, reference):
    with epic_server(index_dir, "--api-key", KEY, "--queue-size", "1", "--max-batch", "2", "--threads", "2") as server:
        body = {"model": "docs-index", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 48}
        url = f"{server.url}/v1/chat/completions"
        missing = httpx.post(url, json=body, timeout=60)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        assert (wrong.json()["error"]["type"], wrong.json()["error"]["code"]) == (
            "authentication_error",
            "invalid_api_key",
        )
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=30).json()["data"][0]["id"] == "docs-index"

        barrier = threading.Barrier(5)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(url, json=body, headers=auth, timeout=300)

        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(post, range(5)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}
        expected = reference(QUESTIONS[0], max_tokens=48).text
        assert [r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200] == [
            expected
        ] * statuses.count(200)
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "5" and "busy" in busy.json()["error"]["message"]
        assert busy.json()["error"]["code"] == "queue_full"
        counted = metrics(server.url)
        assert counted['epic_rag_requests_total{status="401"}'] == 3
        assert counted['epic_rag_requests_total{status="503"}'] == statuses.count(503)
        assert counted['epic_rag_requests_total{status="200"}'] == statuses.count(200)
        assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"


@pytest.mark.browser
def test_web_chat_in_headless_chromium(server, reference):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("EPIC_RAG_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server.url, wait_until="networkidle")
            assert page.locator("#model-id").inner_text() == "docs-index"
            page.fill("#question", QUESTIONS[0])
            page.click("#send")
            page.wait_for_selector(".answer .stats", timeout=120_000)
            first = page.locator(".answer .text").first.text_content()
            expected = reference(QUESTIONS[0])
            assert first == expected.text
            stats = page.locator(".answer .stats").first.inner_text()
            assert f"reused {expected.tokens_reused} of {expected.tokens_prompt} tokens" in stats
            assert f"policy {expected.policy}" in stats
            page.locator("details.sources summary").first.click()
            assert [f.text_content() for f in page.locator("details.sources .file").all()] == [
                s.file for s in expected.sources
            ]

            page.check("#compare")
            page.fill("#question", QUESTIONS[1])
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.answers.compare .stats').length === 2", timeout=120_000)
            cards = page.locator(".answers.compare .answer")
            assert cards.count() == 2
            history = turns(("user", QUESTIONS[0]), ("assistant", first))
            for card, policy in zip((cards.nth(0), cards.nth(1)), (None, "full"), strict=True):
                expected = reference(QUESTIONS[1], history=history, policy=policy)
                assert card.locator(".text").text_content() == expected.text
                stats = card.locator(".stats").inner_text()
                assert f"policy {expected.policy}" in stats
                assert f"reused {expected.tokens_reused} of {expected.tokens_prompt} tokens" in stats
            assert expected.policy == "full" and expected.tokens_reused == 0
            page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

            page.click("#reset")
            assert page.locator(".answer").count() == 0
            assert json.loads(page.evaluate("JSON.stringify(state.history)")) == []
        finally:
            browser.close()


def test_bench_serve_starts_its_own_server_and_writes_results(index_dir, tmp_path, reference):
    out = tmp_path / "serve-bench"
    done = epic_rag(
        "bench", "serve", "--index", str(index_dir), "--policies", "attnlink:16", "--clients", "1,2",
        "--requests", "2", "--max-tokens", "4", "--top-k", "3", "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["policy"], r["clients"], r["ok"]) for r in rows] == [("attnlink:16", 1, 2), ("attnlink:16", 2, 2)]
    assert [r["mismatched"] for r in rows] == [0, 0]  # greedy: concurrency changes no answer
    prompts = [reference(q, policy="attnlink:16", max_tokens=4).tokens_prompt for q in DEFAULT_QUESTIONS[:2]]
    assert [r["prompt_tokens_mean"] for r in rows] == [sum(prompts) / 2] * 2
    assert all(0 < r["ttft_p50"] <= r["latency_p50"] for r in rows)  # the first token comes before the last
    assert [r["answer_tokens_mean"] for r in rows] == [4.0, 4.0]  # min_tokens: every answer is --max-tokens long
    rate = Reply("q", "text", 200, ttft_s=0.5, latency_s=2.0, server_ttft_s=0.4, tokens_prompt=9, tokens_generated=4)
    assert rate.tokens_per_s == 2.0  # the 3 tokens after the first, over the 1.5 s after it
    assert replace(rate, tokens_generated=1).tokens_per_s == 0.0
    table = (out / "results.md").read_text().splitlines()
    assert [line.split(" | ")[:4] for line in table if line.startswith("| attnlink:16 ")] == [
        ["| attnlink:16", "1", "2/2", "0"],
        ["| attnlink:16", "2", "2/2", "0"],
    ]
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
