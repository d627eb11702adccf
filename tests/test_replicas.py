"""Two `epic-rag serve` replicas sharing a real Redis KV tier, behind nginx running the shipped
deploy/nginx.conf, all on 127.0.0.1: B serves what A compiled, answers through nginx equal a
single process's, a replica killed mid-stream is routed around, Redis outages are survived.

Every answer is checked against the same question answered in this process, without Redis or
a server; every process the fixture starts is stopped whatever fails (an `ExitStack`)."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
from epic_rag.app.answering import ChatRequest, answer
from epic_rag.app.index import open_index
from epic_rag.server.process import ServeProcess

from .live_servers import Nginx, RedisServer, epic_server, metrics
from .test_server import MODEL, QUESTIONS, SAMPLES, epic_rag

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
POLICY = "attnlink:16"
TOKENS = 24
LAMPS = ["Alder", "Birch", "Cedar", "Dogwood", "Elm", "Fir", "Ginkgo", "Hazel", "Juniper", "Larch", "Maple", "Oak"]


def lamp_docs(folder: Path) -> None:
    """One short document per lamp: each its own chunk, so each lamp question needs new chunks."""
    for i, name in enumerate(LAMPS):
        (folder / f"{name.lower()}.md").write_text(
            f"# The {name} lamp\n\nThe {name} lamp is made in workshop {i + 3} and costs {40 + 7 * i} euros. "
            f"It weighs {300 + 25 * i} grams, its battery lasts {8 + i} hours and its warranty is {i % 3 + 1} years.\n"
        )


def lamp_question(name: str) -> str:
    return f"How much does the {name} lamp cost?"


def metric(server: ServeProcess, name: str) -> float:
    """One sample of a replica's /metrics; a labelled counter not counted yet is 0."""
    return metrics(server.url).get(name, 0.0)


SERVED = 'epic_rag_requests_total{status="200"}'
REDIS_HITS = 'epic_rag_kv_tier_hits_total{tier="redis"}'
REDIS_ERRORS = 'epic_rag_kv_tier_errors_total{tier="redis"}'


def ask(base_url: str, question: str, stream: bool = False):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    return client.chat.completions.create(
        model="docs",
        messages=[{"role": "user", "content": question}],
        max_tokens=TOKENS,
        stream=stream,
        extra_body={"policy": POLICY},
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2):
    """Redis; replica A's index built with --kv-url; replica B with a copy of A's index without
    its kv/ folder (another machine) and no local KV tiers, so every chunk it links comes from
    Redis; nginx over both; plus one plain process's answers."""
    root = tmp_path_factory.mktemp("replicas")
    with ExitStack() as running:  # each process is stopped at the end, or as soon as a later start fails
        redis = running.enter_context(RedisServer(root))
        docs = root / "documents"
        shutil.copytree(SAMPLES, docs)
        lamp_docs(docs)
        a_dir, b_dir = root / "a" / "docs", root / "b" / "docs"
        done = epic_rag("index", str(docs), "--index", str(a_dir), "--model", MODEL, "--kv-url", redis.url)
        assert done.returncode == 0, done.stderr
        assert "redis " in done.stdout, done.stdout  # the index line reports the Redis tier
        shutil.copytree(a_dir, b_dir, ignore=shutil.ignore_patterns("kv"))
        plain = open_index(a_dir, engine=smollm2, policy=POLICY)  # no Redis, no server
        questions = [*QUESTIONS[:4], lamp_question(LAMPS[0]), lamp_question(LAMPS[-1])]
        expected = {q: answer(plain, ChatRequest(q, max_tokens=TOKENS), lambda _delta: None) for q in questions}
        args = ("--kv-url", redis.url, "--threads", "1", "--model-id", "docs")
        a = running.enter_context(epic_server(a_dir, *args))
        b = running.enter_context(epic_server(b_dir, *args, "--no-local-kv", "--kv-memory-mb", "0"))  # KV: Redis only
        proxy = running.enter_context(Nginx(root, ROOT / "deploy" / "nginx.conf", [a.port, b.port]))
        yield {"redis": redis, "a": a, "b": b, "nginx": proxy, "expected": expected}


def test_replica_b_serves_what_a_compiled_from_redis(cluster):
    b, question = cluster["b"], QUESTIONS[0]
    expected = cluster["expected"][question]
    hits = metric(b, REDIS_HITS)
    reply = ask(b.url, question)
    ext = reply.model_extra["epic_rag"]
    assert reply.choices[0].message.content == expected.text
    assert (ext["tokens_prompt"], ext["tokens_reused"]) == (expected.tokens_prompt, expected.tokens_reused)
    assert ext["chunks_linked"] == expected.chunks_linked == 3
    assert ext["kv_tier_reads"] == {"memory": 0, "redis": 3}  # B keeps no KV: every chunk from Redis
    assert metric(b, REDIS_HITS) - hits == 3
    # the one miss is the prompt's head (system prompt), which indexing does not compile
    assert ext["cache_misses"] == 1 and ext["cache_hits"] == 3


def test_answers_through_nginx_equal_a_single_process(cluster):
    proxy, expected = cluster["nginx"], cluster["expected"]
    served = {name: metric(cluster[name], SERVED) for name in "ab"}
    for question in QUESTIONS[:4]:
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(proxy.url, question, stream=True))
        assert streamed == expected[question].text
    # round robin: two each
    assert {name: metric(cluster[name], SERVED) - served[name] for name in "ab"} == {"a": 2, "b": 2}


def test_redis_down_then_back_without_restarting_replicas(cluster):
    redis, b, expected = cluster["redis"], cluster["b"], cluster["expected"]
    redis.stop(save=True)  # a Redis restart that keeps its data
    errors = metric(b, REDIS_ERRORS)
    question = lamp_question(LAMPS[0])
    reply = ask(b.url, question)  # B keeps no KV itself: every segment is computed
    assert reply.choices[0].message.content == expected[question].text
    assert reply.model_extra["epic_rag"]["cache_misses"] == 4
    assert reply.model_extra["epic_rag"]["kv_tier_reads"] == {"memory": 0, "redis": 0}
    assert metric(b, REDIS_ERRORS) > errors
    assert httpx.get(f"{b.url}/health").json()["kv_tiers"] == {"memory": "up", "redis": "down"}
    redis.start()
    time.sleep(2.5)  # past B's retry interval; B is not restarted
    hits = metric(b, REDIS_HITS)
    question = lamp_question(LAMPS[-1])
    reply = ask(b.url, question)  # from Redis again, as saved before the restart
    assert reply.choices[0].message.content == expected[question].text
    ext = reply.model_extra["epic_rag"]
    assert (ext["cache_misses"], ext["cache_hits"], ext["kv_tier_reads"]) == (0, 4, {"memory": 0, "redis": 4})
    assert metric(b, REDIS_HITS) - hits == 4  # the prompt's head (stored by B's first answer) and 3 chunks
    assert httpx.get(f"{b.url}/health").json()["kv_tiers"] == {"memory": "up", "redis": "up"}


def test_killing_a_replica_mid_stream_sends_the_next_requests_to_the_other(cluster):
    a, b, proxy, expected = cluster["a"], cluster["b"], cluster["nginx"], cluster["expected"]
    for _ in range(2):  # round robin puts one of two consecutive streams on A
        stream = ask(proxy.url, QUESTIONS[1], stream=True)
        next(iter(stream))
        if httpx.get(f"{a.url}/health").json()["queue_depth"] == 1:
            a.process.kill()
            a.process.wait()
            break
        for _ in stream:
            pass
    else:
        pytest.fail("no stream reached replica A")
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # the stream on A dies with it
        for _ in stream:
            pass
    before = metric(b, SERVED)
    for question in QUESTIONS[:3]:
        assert ask(proxy.url, question).choices[0].message.content == expected[question].text
    assert metric(b, SERVED) == before + 3
