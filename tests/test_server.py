"""`epic-rag serve` as a live process on 127.0.0.1: the real openai client, bad requests, access,
concurrency, a client that walks away, and the web chat in Debian's headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from epic_rag.server.process import ServeProcess

from .live_servers import ENV, epic_server, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "sample_docs"
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


def epic_rag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "epic_rag.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "docs-index"
    done = epic_rag("index", str(SAMPLES), "--index", str(path), "--model", MODEL)
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def server(index_dir) -> Iterator[ServeProcess]:
    live = epic_server(index_dir, "--queue-size", "16", "--threads", "2")
    yield live
    live.stop()


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


def test_models_lists_the_index(client):
    assert [m.id for m in client.models.list().data] == ["docs-index"]


def test_answers_equal_epic_rag_ask_streamed_or_not(client, index_dir):
    question = QUESTIONS[0]
    whole = ask(client, question, max_tokens=32, policy="attnlink:16")
    cli = epic_rag("ask", question, "--index", str(index_dir), "--policy", "attnlink:16", "--max-new-tokens", "32")
    assert cli.returncode == 0, cli.stderr
    assert whole.choices[0].message.content.strip() == cli.stdout.split("\nsources:")[0].strip()

    chunks = list(
        client.chat.completions.create(
            model="docs-index",
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            stream=True,
            extra_body={"policy": "attnlink:16"},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    for report, usage in ((last.model_extra["epic_rag"], last.usage), (whole.model_extra["epic_rag"], whole.usage)):
        assert report["policy"] == "attnlink:16" and report["chunks_linked"] == 3
        assert report["tokens_reused"] + report["tokens_recomputed"] == report["tokens_prompt"] == usage.prompt_tokens
        assert report["tokens_reused"] > report["tokens_recomputed"] > 0
        assert report["cache_hits"] + report["cache_misses"] == 4  # the prompt prefix and 3 chunks
        assert report["cache_misses"] <= 1  # chunks were stored at indexing; the prefix on its first use
        assert [s["file"] for s in report["sources"]][0] == "skylark_s3.md"
        assert all(s["snippet"] and s["score"] is not None for s in report["sources"])
        assert usage.completion_tokens >= 1 and report["ttft_s"] > 0
    assert last.model_extra["epic_rag"]["cache_misses"] == 0  # the streamed request came second


def test_full_recompute_per_request_and_multi_turn(client):
    full = ask(client, QUESTIONS[1], policy="full", top_k=2).model_extra["epic_rag"]
    assert full["policy"] == "full" and full["tokens_reused"] == 0 and len(full["sources"]) == 2
    follow_up = client.chat.completions.create(
        model="docs-index",
        messages=[
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": "It costs 14,500 euros."},
            {"role": "user", "content": "And the mooring kit?"},
        ],
        max_tokens=16,
    )
    report = follow_up.model_extra["epic_rag"]
    assert follow_up.choices[0].message.content.strip() and report["chunks_linked"] == 3
    assert report["tokens_prompt"] > full["tokens_prompt"] // 2


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": "docs-index", "messages": []}, 400, "non-empty list"),
        ({"model": "docs-index", "messages": [{"role": "user", "content": "  "}]}, 400, "not empty"),
        ({"model": "docs-index", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role 'robot'"),
        ({"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], "policy": "magic"}, 400, "policy"),
        ({"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n = 1"),
        ({"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, 400, "tool"),
        ({"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}, 400, "stop"),
        (
            {"model": "docs-index", "messages": [{"role": "user", "content": "word " * 1500}]},
            400,
            "over this server's limit",
        ),
        (
            {"model": "docs-index", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000},
            400,
            "max_tokens",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["type"]


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_eight_clients_at_once_each_get_their_own_answer(client, server):
    alone = {q: ask(client, q, max_tokens=12).choices[0].message.content for q in QUESTIONS}
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(client, q, max_tokens=12).choices[0].message.content, QUESTIONS))
    together = dict(zip(QUESTIONS, answers, strict=True))
    assert together == alone
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "epic_rag_queue_depth 0.0" in metrics and "epic_rag_ttft_seconds_count" in metrics
    assert 'epic_rag_requests_total{status="200"}' in metrics and "epic_rag_store_hits_total" in metrics


def test_a_client_that_walks_away_frees_the_engine(client, server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": "docs-index",
            "messages": [{"role": "user", "content": "Write a long story about buoys."}],
            "max_tokens": 1000,
            "stream": True,
        },
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # the first generated token arrived: hang up
    answered = ask(client, QUESTIONS[2], max_tokens=8)
    assert answered.choices[0].message.content.strip()
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["queue_depth"] == 0
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "epic_rag_cancelled_total 1.0" in metrics  # the story stopped when its client left


def test_binding_beyond_loopback_needs_a_key(index_dir):
    done = epic_rag("serve", "--index", str(index_dir), "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode != 0 and "without an API key" in done.stderr and "--api-key" in done.stderr


def test_api_key_and_queue_limit(index_dir):
    server = epic_server(index_dir, "--api-key", KEY, "--queue-size", "1", "--threads", "2")
    try:
        body = {"model": "docs-index", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 48}
        url = f"{server.url}/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=30).status_code == 200

        barrier = threading.Barrier(5)

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return httpx.post(url, json=body, headers=auth, timeout=300)

        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(post, range(5)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] and "busy" in busy.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"
    finally:
        server.stop()


def test_web_chat_in_headless_chromium(server):
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
            answer = page.locator(".answer .text").first.inner_text()
            assert answer.strip()
            assert "TTFT" in page.locator(".answer .stats").first.inner_text()
            page.locator("details.sources summary").first.click()
            assert "skylark_s3.md" in page.locator("details.sources").first.inner_text()

            page.check("#compare")
            page.fill("#question", QUESTIONS[1])
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.answers.compare .stats').length === 2", timeout=120_000)
            cards = page.locator(".answers.compare .answer")
            assert cards.count() == 2
            assert "full" in cards.nth(1).locator(".stats").inner_text()
            for i in range(2):
                assert cards.nth(i).locator(".text").inner_text().strip()
            page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

            page.click("#reset")
            assert page.locator(".answer").count() == 0
            assert json.loads(page.evaluate("JSON.stringify(state.history)")) == []
        finally:
            browser.close()


def test_bench_serve_starts_its_own_server_and_writes_results(index_dir, tmp_path):
    out = tmp_path / "serve-bench"
    done = epic_rag(
        "bench", "serve", "--index", str(index_dir), "--policies", "attnlink:16", "--clients", "1,2",
        "--requests", "2", "--max-tokens", "4", "--top-k", "3", "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["policy"], r["clients"], r["ok"]) for r in rows] == [("attnlink:16", 1, 2), ("attnlink:16", 2, 2)]
    assert all(r["mismatched"] == 0 and r["ttft_p50"] > 0 for r in rows)  # greedy: concurrency changes no answer
    assert "attnlink:16" in (out / "results.md").read_text()
    assert (out / "serve.png").stat().st_size > 0
