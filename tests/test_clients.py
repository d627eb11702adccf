"""The server as the clients people use see it, each the real library against a real server on
127.0.0.1: openai (chat and completions), LangChain's ChatOpenAI, LlamaIndex's OpenAILike as a
completion and as a chat model. Each gets the greedy answer `epic-rag ask` gives; stop strings
cut where OpenAI's rules say; the `:chat` model and `retrieval: false` skip the documents, as
Open WebUI's background tasks need; CORS, 404s, cancellation, and the KV tiers a client's own
system text never reaches."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from epic_rag.app.answering import AnswerReport, ChatRequest, answer
from epic_rag.app.index import open_index
from epic_rag.server.process import ServeProcess

from .live_servers import RedisServer, epic_server, metrics
from .test_server import QUESTIONS

pytestmark = pytest.mark.slow
ALLOWED = "http://allowed.example"
TOKENS = 24
# what Open WebUI sends its task model to title a chat (backend/open_webui/routers/tasks.py, generate_title):
# its title template rendered with the chat as one user message, not streamed, `max_completion_tokens` (1000
# there by default; 16 here, to keep the test short) and a `metadata` object naming the task
OPEN_WEBUI_TITLE = {
    "messages": [
        {
            "role": "user",
            "content": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
            '### Output:\nJSON format: { "title": "your concise title here" }\n'
            "### Chat History:\n<chat_history>\nUSER: How long does the Skylark S3 battery last?\n</chat_history>",
        }
    ],
    "stream": False,
    "max_completion_tokens": 16,
    "metadata": {"task": "title_generation", "task_body": {"messages": []}, "chat_id": None},
}


@pytest.fixture(scope="module")
def index(tmp_path_factory, sample_index) -> Path:
    path = tmp_path_factory.mktemp("clients") / "docs"
    shutil.copytree(sample_index, path)
    return path


@pytest.fixture(scope="module")
def server(index) -> Iterator[ServeProcess]:
    with epic_server(index, "--threads", "2", "--cors-origin", ALLOWED) as live:
        yield live


@pytest.fixture(scope="module")
def expected(index, smollm2):
    """`expected(question, **fields)`: the answer computed in this process, as `epic-rag ask` gives it."""
    app = open_index(index, engine=smollm2)

    def run(question: str, **fields) -> AnswerReport:
        fields.setdefault("max_tokens", TOKENS)
        return answer(app, ChatRequest(question=question, **fields), lambda _delta: None)

    return run


def test_openai_chat_and_completions_give_the_ask_answer(server, expected):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    want = expected(QUESTIONS[0]).text
    completion = client.completions.create(model="docs", prompt=QUESTIONS[0], max_tokens=TOKENS)
    assert completion.object == "text_completion" and completion.choices[0].text == want
    assert completion.usage.prompt_tokens_details.cached_tokens == completion.model_extra["epic_rag"]["tokens_reused"]
    streamed = list(client.completions.create(model="docs", prompt=QUESTIONS[0], max_tokens=TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == completion.choices[0].finish_reason
    assert {m.id for m in client.models.list()} == {"docs", "docs:chat"}
    assert client.models.retrieve("docs:chat").id == "docs:chat"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("docs:other")


def test_langchain_chat_openai_gives_the_ask_answer_streamed_or_not(server, expected):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model="docs", temperature=0, max_tokens=TOKENS, max_retries=0
    )
    want = expected(QUESTIONS[1]).text
    assert llm.invoke(QUESTIONS[1]).content == want
    assert "".join(chunk.content for chunk in llm.stream(QUESTIONS[1])) == want


@pytest.mark.parametrize("is_chat_model", [False, True])
def test_llama_index_openai_like_gives_the_ask_answer(server, expected, is_chat_model):
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model="docs", api_base=f"{server.url}/v1", api_key="unused", is_chat_model=is_chat_model,
        max_tokens=TOKENS, temperature=0, context_window=8192, max_retries=0,
    )  # fmt: skip
    want = expected(QUESTIONS[2]).text
    if is_chat_model:
        assert llm.chat([ChatMessage(role="user", content=QUESTIONS[2])]).message.content == want
    else:
        assert llm.complete(QUESTIONS[2]).text == want


def test_stop_strings_cut_where_openai_cuts(server, expected):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    full = expected(QUESTIONS[0]).text
    word = full.split()[3]  # a word inside the answer: the answer ends just before it, the stop text left out
    cut = full[: full.index(word)]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    whole = client.chat.completions.create(model="docs", messages=messages, max_tokens=TOKENS, stop=[word, "@@"])
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="docs", messages=messages, max_tokens=TOKENS, stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert expected(QUESTIONS[0], stop=(word,)).text == cut  # the engine's own rule, in this process


def test_the_chat_model_and_retrieval_false_answer_without_the_documents(server, expected):
    plain = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "docs:chat", **OPEN_WEBUI_TITLE}, timeout=300
    )
    report = plain.json()["epic_rag"]
    assert plain.status_code == 200 and report["sources"] == [] and report["chunks_linked"] == 0
    assert (
        plain.json()["choices"][0]["message"]["content"]
        == expected(OPEN_WEBUI_TITLE["messages"][0]["content"], retrieval=False, max_tokens=16).text
    )
    body = {"model": "docs", "epic_rag": {"retrieval": False}, **OPEN_WEBUI_TITLE}
    switched = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()
    assert switched["epic_rag"]["sources"] == [] and switched["choices"] == plain.json()["choices"]


def test_cors_and_openai_style_404s(server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": ALLOWED, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    refused = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    missing = httpx.get(f"{server.url}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "no route GET /v1/engines" in missing.json()["error"]["message"]


def test_a_whole_request_whose_client_leaves_is_cancelled_and_the_next_is_answered(server, expected):
    before = metrics(server.url)
    body = {
        "model": "docs",
        "messages": [{"role": "user", "content": "Write a long story about buoys. " * 60}],
        "max_tokens": 1000,
        "policy": "full",
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    question = {"model": "docs", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": TOKENS}
    answered = httpx.post(f"{server.url}/v1/chat/completions", json=question, timeout=300).json()
    assert answered["choices"][0]["message"]["content"] == expected(QUESTIONS[1]).text
    after = metrics(server.url)
    assert after["epic_rag_cancelled_total"] - before.get("epic_rag_cancelled_total", 0) == 1
    ok = 'epic_rag_requests_total{status="200"}'
    assert after[ok] - before.get(ok, 0) == 1  # only the second request was answered


@pytest.mark.redis
def test_client_system_text_never_reaches_the_disk_or_redis_tier(sample_index, tmp_path):
    index = tmp_path / "docs"
    shutil.copytree(sample_index, index)
    redis_server = RedisServer(tmp_path)
    try:
        with epic_server(index, "--threads", "2", "--kv-url", redis_server.url) as live:

            def ask(system: str | None) -> None:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": QUESTIONS[0]}
                ]
                body = {"model": "docs", "messages": messages, "max_tokens": 1}
                assert httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=300).status_code == 200

            ask(None)  # our own prompt head and the chunks: written through to every tier
            disk = sorted((index / "kv").rglob("*.safetensors"))
            keys = redis_server.client().dbsize()
            for i in range(200):
                ask(f"You are assistant number {i}; answer briefly.")
            assert sorted((index / "kv").rglob("*.safetensors")) == disk
            assert redis_server.client().dbsize() == keys
            assert metrics(live.url)['epic_rag_requests_total{status="200"}'] == 201
    finally:
        redis_server.stop()
