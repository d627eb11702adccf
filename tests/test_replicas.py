"""Two `epic-rag serve` replicas sharing a real Redis KV tier, behind nginx running the shipped
deploy/nginx.conf, all on 127.0.0.1: B serves what A compiled, answers through nginx equal a
single process's, a replica killed mid-stream is routed around, Redis outages are survived."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from epic_rag.app.index import open_index
from epic_rag.server.process import ServeProcess

from .live_servers import Nginx, RedisServer, epic_server
from .test_server import MODEL, QUESTIONS, SAMPLES, epic_rag

pytestmark = pytest.mark.slow
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


def metric(server: ServeProcess, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    family = name.removesuffix("_total")
    assert f"# TYPE {family}" in text, f"{family} is not exported by /metrics"
    found = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0  # a labelled counter appears once counted


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
    redis = RedisServer(root)
    docs = root / "documents"
    shutil.copytree(SAMPLES, docs)
    lamp_docs(docs)
    a_dir, b_dir = root / "a" / "docs", root / "b" / "docs"
    done = epic_rag("index", str(docs), "--index", str(a_dir), "--model", MODEL, "--kv-url", redis.url)
    assert done.returncode == 0, done.stderr
    assert "redis " in done.stdout, done.stdout  # the index line reports the Redis tier
    shutil.copytree(a_dir, b_dir, ignore=shutil.ignore_patterns("kv"))
    plain = open_index(a_dir, engine=smollm2, policy=POLICY, max_new_tokens=TOKENS)  # no Redis, no server
    expected = {q: str(plain.query_engine().query(q)).strip() for q in QUESTIONS[:4]}
    args = ("--kv-url", redis.url, "--threads", "1", "--model-id", "docs")
    a = epic_server(a_dir, *args)
    b = epic_server(b_dir, *args, "--no-local-kv", "--kv-memory-mb", "0")  # every chunk from Redis
    proxy = Nginx(root, ROOT / "deploy" / "nginx.conf", [a.port, b.port])
    yield {"redis": redis, "a": a, "b": b, "nginx": proxy, "expected": expected}
    for server in (proxy, a, b, redis):
        server.stop()


def test_replica_b_serves_what_a_compiled_from_redis(cluster):
    b, question = cluster["b"], QUESTIONS[0]
    answer = ask(b.url, question)
    ext = answer.model_extra["epic_rag"]
    assert answer.choices[0].message.content.strip() == cluster["expected"][question]
    assert ext["chunks_linked"] == 3 and ext["kv_tier_reads"]["redis"] >= 3
    assert metric(b, "epic_rag_kv_tier_hits_total", '{tier="redis"}') >= 3  # every chunk, none compiled
    # the one miss is the prompt's head (system prompt), which indexing does not compile
    assert ext["cache_misses"] == 1 and ext["cache_hits"] == 3


def test_answers_through_nginx_equal_a_single_process(cluster):
    proxy, expected = cluster["nginx"], cluster["expected"]
    served = {name: metric(cluster[name], "epic_rag_requests_total", '{status="200"}') for name in "ab"}
    for question in QUESTIONS[:4]:
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(proxy.url, question, stream=True))
        assert streamed.strip() == expected[question]
    for name in "ab":  # round robin: both replicas answered
        assert metric(cluster[name], "epic_rag_requests_total", '{status="200"}') > served[name]


def test_redis_down_then_back_without_restarting_replicas(cluster):
    redis, b = cluster["redis"], cluster["b"]
    redis.stop(save=True)  # a Redis restart that keeps its data
    errors = metric(b, "epic_rag_kv_tier_errors_total", '{tier="redis"}')
    answer = ask(b.url, lamp_question(LAMPS[0]))  # B keeps no KV itself: every segment is computed
    assert answer.choices[0].message.content.strip()
    assert answer.model_extra["epic_rag"]["cache_misses"] == 4
    assert metric(b, "epic_rag_kv_tier_errors_total", '{tier="redis"}') > errors
    assert httpx.get(f"{b.url}/health").json()["kv_tiers"]["redis"] == "down"
    redis.start()
    time.sleep(2.5)  # past B's retry interval; B is not restarted
    hits = metric(b, "epic_rag_kv_tier_hits_total", '{tier="redis"}')
    answer = ask(b.url, lamp_question(LAMPS[-1]))  # from Redis again, as saved before the restart
    assert answer.model_extra["epic_rag"]["cache_misses"] == 0
    assert metric(b, "epic_rag_kv_tier_hits_total", '{tier="redis"}') > hits
    assert httpx.get(f"{b.url}/health").json()["kv_tiers"]["redis"] == "up"


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
    before = metric(b, "epic_rag_requests_total", '{status="200"}')
    for question in QUESTIONS[:3]:
        assert ask(proxy.url, question).choices[0].message.content.strip() == expected[question]
    assert metric(b, "epic_rag_requests_total", '{status="200"}') == before + 3
