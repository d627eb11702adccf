"""The Redis KV tier against a real redis-server on 127.0.0.1: sharing between stores, damaged
values, outages and recovery, LRU eviction, passwords, TTL and concurrent writers."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from epic_rag import KVStore
from epic_rag.store import KVTierError, RedisBackend, TieredStore
from epic_rag.store.codec import decode

from .conftest import tiny_engine
from .live_servers import RedisServer
from .test_store import FP, OTHER_FP, assert_same, make_entry

pytestmark = pytest.mark.redis  # a real redis-server (so slow too)
CHUNKS = ["the first chunk of text.", "a second chunk, longer than the first one.", "third."]


@pytest.fixture
def server(tmp_path):
    live = RedisServer(tmp_path)
    yield live
    live.stop()


def redis_store(url: str, **kwargs) -> KVStore:
    """A store with no disk tier: memory over Redis only (what a fresh replica has)."""
    return KVStore(kv_url=url, **kwargs)


def tier(store: TieredStore) -> RedisBackend:
    return store.backends[-1]


def test_a_second_process_store_reads_what_the_first_wrote(server):
    a = tiny_engine(store=redis_store(server.url))
    first = a.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)
    b = tiny_engine(store=redis_store(server.url))  # same weights, empty memory
    again = b.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)
    assert again.stats.store_misses == 0 and again.stats.store_hits == first.stats.store_misses == 4
    assert again.token_ids == first.token_ids
    stats = b.store.stats()
    assert stats.hits_by_tier["redis"] == 4 and stats.hits_by_tier["memory"] == 0
    for key in sorted(a.store.keys()):
        assert_same(b.store.get(key), a.store.get(key))  # bit-exact through the wire
    assert b.store.stats().hits_by_tier["memory"] == 4  # Redis hits were promoted


def test_keys_are_hashes_namespaced_by_model(server):
    a = tiny_engine(store=redis_store(server.url), seed=0)
    b = tiny_engine(store=redis_store(server.url), seed=1)
    a.add_chunks(["private text that must not appear in a key"])
    names = [n.decode() for n in server.client().keys("*")]
    assert len(names) == 1 and "private" not in names[0]
    assert names[0].startswith("epic-rag:kv:") and len(names[0].split(":")[-1]) == 64
    assert list(b.store.keys()) == []  # another model's namespace is empty
    assert b.generate("q?", ["private text that must not appear in a key"], max_new_tokens=1).stats.store_hits == 0


def test_flushall_then_ask_recomputes_and_writes_back(server):
    engine = tiny_engine(store=redis_store(server.url))
    first = engine.generate("q?", CHUNKS, policy="reuse", max_new_tokens=4)
    server.client().flushall()
    engine.store.clear_memory()
    again = engine.generate("q?", CHUNKS, policy="reuse", max_new_tokens=4)
    assert again.token_ids == first.token_ids and again.stats.store_misses == 4
    assert server.client().dbsize() == 4


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_value_is_detected_deleted_and_recomputed(server, caplog, damage):
    engine = tiny_engine(store=redis_store(server.url))
    first = engine.generate("q?", CHUNKS, policy="reuse", max_new_tokens=4)
    client = server.client()
    names = client.keys("*")
    for name in names:
        blob = bytearray(client.get(name))
        if damage == "flip":
            blob[-5] ^= 0x40
        else:
            blob = blob[: len(blob) // 2]
        client.set(name, bytes(blob))
    engine.store.clear_memory()
    with caplog.at_level(logging.WARNING, logger="epic_rag.store.redis"):
        again = engine.generate("q?", CHUNKS, policy="reuse", max_new_tokens=4)
    assert again.token_ids == first.token_ids and again.stats.store_misses == 4
    assert engine.store.stats().corrupted == 4
    assert sum("deleted damaged KV entry" in r.message for r in caplog.records) == 4
    for name in names:  # the recomputed entries replaced the damaged ones
        decode(client.get(name), key=name.decode().split(":")[-1])


def test_redis_down_answers_by_computing_then_recovers_without_restart(server, caplog):
    engine = tiny_engine(store=KVStore(kv_url=server.url, memory_budget=0))  # every read goes to Redis
    tier(engine.store).retry_after_s = 0.2
    first = engine.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="epic_rag.store.redis"):
        down = engine.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)
    assert down.token_ids == first.token_ids and down.stats.store_misses == 4
    assert engine.store.stats().errors > 0 and not tier(engine.store).available
    assert sum("failed" in r.message for r in caplog.records) == 1  # once per outage, not per chunk
    server.start()  # same port, empty: the engine is not restarted
    time.sleep(0.3)
    engine.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)  # writes back what it computes
    back = engine.generate("q?", CHUNKS, policy="attnlink:2", max_new_tokens=4)
    assert back.stats.store_hits == 4 and back.token_ids == first.token_ids
    assert tier(engine.store).available and server.client().dbsize() == 4


def test_unreachable_at_start_is_an_error_only_when_required(tmp_path):
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with pytest.raises(KVTierError, match="unreachable.*start the Redis server"):
        KVStore(kv_url=url, require_kv_url=True)
    store = KVStore(kv_url=url)
    store.bind(FP)
    store.put(make_entry())  # kept in memory; Redis skipped
    assert store.stats().memory_entries == 1 and store.stats().errors >= 1


def test_lru_eviction_under_maxmemory_is_never_an_error(tmp_path):
    live = RedisServer(tmp_path, maxmemory="2mb")
    try:
        engine = tiny_engine(store=KVStore(kv_url=live.url, memory_budget=0))
        plain = tiny_engine()  # same weights, no Redis
        batches = [[f"chunk {i} number {j} " * 12 for j in range(3)] for i in range(30)]
        for i, chunks in enumerate(batches):  # ~190 KB per chunk: 90 chunks overflow 2 MB many times
            engine.add_chunks(chunks, progress=False)
            got = engine.generate(f"question {i}?", chunks, policy="full", max_new_tokens=2)
            assert got.token_ids == plain.generate(f"question {i}?", chunks, policy="full", max_new_tokens=2).token_ids
        assert live.client().info()["evicted_keys"] > 0 and engine.store.stats().errors == 0
        again = engine.generate("question 0?", batches[0], policy="reuse", max_new_tokens=3)
        assert again.stats.store_misses > 0  # evicted, so recomputed: a miss, not an error
        assert again.token_ids == plain.generate("question 0?", batches[0], policy="reuse", max_new_tokens=3).token_ids
    finally:
        live.stop()


def test_password_refused_names_the_url_without_the_password(tmp_path):
    live = RedisServer(tmp_path, password="s3cret-pass")
    try:
        wrong = live.url.replace("s3cret-pass", "guess-word")
        missing = f"redis://127.0.0.1:{live.port}/0"
        for url in (wrong, missing):
            with pytest.raises(KVTierError) as err:
                KVStore(kv_url=url)
            message = str(err.value)
            assert f"127.0.0.1:{live.port}" in message and "credentials" in message
            assert "guess-word" not in message and "s3cret-pass" not in message
        store = KVStore(kv_url=live.url)  # the right one works
        store.bind(FP)
        key = store.put(make_entry())
        assert tier(store).get(key) is not None
    finally:
        live.stop()


def test_ttl_and_bad_urls(server):
    store = KVStore(kv_url=server.url, kv_ttl_s=30)
    store.bind(FP)
    key = store.put(make_entry())
    assert 0 < server.client().ttl(tier(store).redis_key(key)) <= 30
    with pytest.raises(KVTierError, match="not a Redis URL"):
        KVStore(kv_url="http://127.0.0.1:6379")
    with pytest.raises(KVTierError, match="TTL"):
        KVStore(kv_url=server.url, kv_ttl_s=0)


def test_concurrent_writers_leave_one_sound_value(server):
    stores = [KVStore(kv_url=server.url, fingerprint=FP) for _ in range(6)]
    entry = make_entry(n=300)
    keys = []
    threads = [threading.Thread(target=lambda s=s: keys.append(s.put(entry))) for s in stores for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and server.client().dbsize() == 1
    found = tier(stores[0]).get(keys[0])
    assert found is not None and found[1] == FP
    assert_same(found[0], entry)


def test_other_models_entries_under_the_same_server_are_left_alone(server):
    mine = KVStore(kv_url=server.url, fingerprint=FP)
    theirs = KVStore(kv_url=server.url, fingerprint=OTHER_FP)
    mine.put(make_entry(seed=1))
    theirs.put(make_entry(seed=2))
    tier(mine).clear()
    assert list(tier(mine).keys()) == [] and len(list(tier(theirs).keys())) == 1
    assert torch.equal(tier(theirs).get(next(tier(theirs).keys()))[0].keys, make_entry(seed=2).keys)
