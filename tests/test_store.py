"""KV store: exact round trips, damaged files, other models, budgets, tiers and custom backends."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import save as st_save

from epic_rag import ChunkKV, KVStore
from epic_rag.store import (
    BackendStats,
    DamagedEntry,
    DiskBackend,
    KVBackend,
    MemoryBackend,
    TieredStore,
    entry_key,
)
from epic_rag.store.codec import decode, encode

from .conftest import tiny_engine

FP = "f" * 64
OTHER_FP = "0" * 64


def make_entry(n: int = 7, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randint(0, 100, (n,), generator=g),
        torch.randn(3, 2, n, 8, generator=g),  # [layers, kv_heads, n, head_dim]
        torch.randn(3, 2, n, 8, generator=g),
    )


def assert_same(got: ChunkKV, want: ChunkKV) -> None:
    assert torch.equal(got.token_ids, want.token_ids)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


class DictBackend(KVBackend):
    """A third-party tier over a plain dict: everything a new backend has to provide."""

    name = "dict"
    persistent = True

    def __init__(self) -> None:
        self.data: dict[str, tuple[ChunkKV, str]] = {}
        self.hits = 0

    def get(self, key: str) -> tuple[ChunkKV, str] | None:
        self.hits += key in self.data
        return self.data.get(key)

    def put(self, key: str, entry: ChunkKV, fingerprint: str) -> None:
        self.data[key] = (entry, fingerprint)

    def contains(self, key: str) -> bool:
        return key in self.data

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def keys(self) -> Iterator[str]:
        return iter(list(self.data))

    def stats(self) -> BackendStats:
        return BackendStats(self.name, reads=self.hits, hits=self.hits, entries=len(self.data))


# ---- keys and file format ------------------------------------------------------------------------


def test_entry_key_is_unchanged():
    # values produced by the single-class store this package replaced: existing stores must still resolve
    assert entry_key(FP, torch.arange(5)) == "50527d91ef99142cde0a5f2b70aa0d462d59e6d2b3bb58bb4e8a8f8c14ed2943"
    ids32 = torch.tensor([1, 2, 3], dtype=torch.int32)
    assert entry_key("model-a", ids32) == "8f322ed43d7769a074cf4ceee03463f7434483b1f4606314e2071a9dff2a8334"


def test_reads_the_existing_file_format():
    keys = torch.arange(6, dtype=torch.float32).reshape(1, 1, 3, 2)
    tensors = {"token_ids": torch.arange(3), "keys": keys, "values": keys + 100}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors.values())).hexdigest()
    assert digest == "b07b7c95dde7a9f0191590ca0dec39aaeec1eef03882bd3fc9bd84a6d4b4d97c"  # as the old store wrote
    blob = st_save(tensors, metadata={"format": "1", "fingerprint": FP, "sha256": digest})
    entry, fingerprint = decode(blob, key=entry_key(FP, tensors["token_ids"]))
    assert fingerprint == FP and torch.equal(entry.values, keys + 100)
    written = encode(entry, FP)
    (header_len,) = struct.unpack("<Q", written[:8])
    assert json.loads(written[8 : 8 + header_len])["__metadata__"]["sha256"] == digest


def test_codec_refuses_another_format_and_a_wrong_key():
    entry = make_entry()
    blob = encode(entry, FP).replace(b'"format":"1"', b'"format":"9"')
    with pytest.raises(DamagedEntry, match="format"):
        decode(blob)
    with pytest.raises(DamagedEntry, match="does not match its key"):
        decode(encode(entry, FP), key=entry_key(OTHER_FP, entry.token_ids))
    assert decode(encode(entry, FP), key=entry_key(FP, entry.token_ids))[1] == FP


# ---- disk tier -------------------------------------------------------------------------------------


def test_round_trip_exact_from_disk(tmp_path):
    entry = make_entry()
    key = KVStore(tmp_path, fingerprint=FP).put(entry)
    fresh = KVStore(tmp_path, fingerprint=FP)  # empty memory tier: must read the file
    assert_same(fresh.get(key), entry)
    assert fresh.stats().disk_reads == 1 and fresh.stats().hits == 1


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_storage_dtype(tmp_path, dtype, torch_dtype):
    entry = make_entry()
    store = KVStore(tmp_path, dtype=dtype, fingerprint=FP)
    key = store.put(entry)
    assert store.get(key).keys.dtype == torch_dtype  # the memory tier holds the stored form too
    got = KVStore(tmp_path, fingerprint=FP).get(key)
    assert got.keys.dtype == torch_dtype and got.token_ids.dtype == torch.int64
    assert torch.equal(got.keys, entry.keys.to(torch_dtype))
    assert key == entry_key(FP, entry.token_ids)


def test_paths_are_hashes_not_text(tmp_path):
    key = KVStore(tmp_path, fingerprint=FP).put(make_entry())
    [path] = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert path == tmp_path / key[:2] / f"{key}.safetensors" and key == entry_key(FP, make_entry().token_ids)
    with pytest.raises(ValueError, match="not a KV store key"):
        DiskBackend(tmp_path).get("../" + key[3:])
    with pytest.raises(ValueError, match="not a KV store key"):
        DiskBackend(tmp_path).put(key.upper(), make_entry(), FP)
    with pytest.raises(ValueError, match="not a KV store key"):
        DiskBackend(tmp_path).contains(key + "0")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        KVStore(tmp_path, fingerprint=FP).put(make_entry())
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("damage, reason", [("flip", "checksum"), ("truncate", "readable"), ("garbage", "readable")])
def test_damaged_file_is_dropped_not_used(tmp_path, caplog, damage, reason):
    key = KVStore(tmp_path, fingerprint=FP).put(make_entry(n=50))
    [path] = list(tmp_path.rglob("*.safetensors"))
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-10] ^= 0xFF  # inside the tensor data: the checksum catches it
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(blob))
    store = KVStore(tmp_path, fingerprint=FP)
    with caplog.at_level(logging.WARNING, logger="epic_rag.store"):
        assert store.get(key) is None
    assert store.stats().corrupted == 1 and store.stats().misses == 1 and store.stats().hits == 0
    assert not path.exists() and not store.contains(key)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and reason in record.getMessage()


def test_misnamed_file_is_damaged_but_another_models_entry_is_not(tmp_path):
    key = KVStore(tmp_path, fingerprint=FP).put(make_entry(seed=1))
    src = tmp_path / key[:2] / f"{key}.safetensors"
    misnamed = entry_key(FP, make_entry(seed=2).token_ids)
    dst = tmp_path / misnamed[:2] / f"{misnamed}.safetensors"
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(src.read_bytes())

    fresh = KVStore(tmp_path, fingerprint=FP)
    assert fresh.get(misnamed) is None and not dst.exists()  # content does not match its name
    assert fresh.stats().corrupted == 1

    other = KVStore(tmp_path, fingerprint=OTHER_FP)
    assert other.get(key) is None  # FP's entry, asked for by another model: a miss
    assert src.exists() and other.stats().corrupted == 0 and other.stats().memory_entries == 0
    assert DiskBackend(tmp_path).get(key)[1] == FP  # the tier itself returns it with its fingerprint
    assert_same(fresh.get(key), make_entry(seed=1))


# ---- memory tier and tiers -------------------------------------------------------------------------


def test_memory_budget_and_evict(tmp_path):
    entries = [make_entry(n=20, seed=s) for s in range(5)]
    size = entries[0].nbytes
    store = KVStore(tmp_path, memory_budget=2 * size, fingerprint=FP)
    keys = [store.put(e) for e in entries]
    s = store.stats()
    assert s.memory_bytes == 2 * size and s.memory_entries == 2 and s.evictions == 3
    assert set(store.backends[0].keys()) == set(keys[3:])  # the oldest went first
    assert s.disk_entries == 5 and sorted(store.keys()) == sorted(keys)  # evicted from memory, never lost
    assert_same(store.get(keys[0]), entries[0])
    assert store.stats().disk_reads == 1
    assert store.evict(keys[0]) and not store.contains(keys[0]) and store.get(keys[0]) is None
    assert not store.delete(keys[0]) and store.stats().disk_entries == 4


def test_memory_evicts_the_least_recently_used():
    entries = [make_entry(n=20, seed=s) for s in range(3)]
    store = KVStore(memory_budget=2 * entries[0].nbytes, fingerprint=FP)
    first, second = store.put(entries[0]), store.put(entries[1])
    store.get(first)  # now `second` is the least recently used
    third = store.put(entries[2])
    assert sorted(store.keys()) == sorted([first, third]) and store.stats().evictions == 1
    assert store.get(second) is None and store.stats().misses == 1  # memory only: that entry is gone


def test_entry_larger_than_the_budget_is_not_kept():
    memory = MemoryBackend(budget_bytes=1000)
    small, big = make_entry(n=1), make_entry(n=20)
    assert small.nbytes <= 1000 < big.nbytes
    memory.put("a" * 64, small, FP)
    memory.put("b" * 64, big, FP)
    assert memory.get("b" * 64) is None and memory.get("a" * 64)[0] is small  # kept as the same object
    assert memory.stats().evictions == 0 and memory.stats().bytes == small.nbytes


def test_promotion_from_a_lower_tier(tmp_path):
    store = KVStore(tmp_path, fingerprint=FP)
    key = store.put(make_entry())
    store.clear_memory()
    assert store.stats().memory_entries == 0 and store.stats().disk_entries == 1
    first = store.get(key)
    assert store.stats().memory_entries == 1 and store.stats().disk_reads == 1
    assert store.get(key) is first and store.stats().disk_reads == 1  # second hit served by memory
    assert store.stats().hits == 2 and [t.hits for t in store.stats().tiers] == [1, 1]


def test_custom_backend_plugs_in_under_memory():
    memory, lower = MemoryBackend(1 << 20), DictBackend()
    store = TieredStore([memory, lower], fingerprint=FP)
    entries = [make_entry(seed=s) for s in range(3)]
    keys = [store.put(e) for e in entries]
    assert set(lower.data) == set(keys) and all(lower.data[k][1] == FP for k in keys)  # written through
    store.clear_memory()
    assert list(memory.keys()) == [] and store.stats().disk_entries == 3  # the dict tier counts as persistent
    assert_same(store.get(keys[1]), entries[1])
    assert lower.hits == 1 and list(memory.keys()) == [keys[1]]  # promoted into the memory tier
    assert_same(store.get(keys[1]), entries[1])
    assert lower.hits == 1 and store.stats().disk_reads == 1 and store.stats().hits == 2  # served by memory
    assert store.delete(keys[1]) and keys[1] not in lower.data and keys[1] not in store
    assert sorted(store.keys()) == sorted(keys[::2])


def test_store_is_bound_to_one_model(tmp_path):
    store = KVStore(tmp_path)
    assert store.fingerprint is None and store.stats().hits == 0  # stats work unbound
    with pytest.raises(RuntimeError, match="bind"):
        store.put(make_entry())
    with pytest.raises(RuntimeError, match="bind"):
        store.get(entry_key(FP, make_entry().token_ids))
    store.bind(FP)
    store.bind(FP)  # the same model again is fine
    with pytest.raises(ValueError) as err:
        store.bind(OTHER_FP)
    assert FP in str(err.value) and OTHER_FP in str(err.value)
    assert store.fingerprint == FP and isinstance(store, TieredStore)


# ---- engine ----------------------------------------------------------------------------------------


def test_engine_recomputes_a_corrupted_entry(tmp_path):
    engine = tiny_engine(store=KVStore(tmp_path))
    chunks = ["one chunk of text.", "another chunk."]
    first = engine.generate("q?", chunks, policy="reuse", max_new_tokens=4)
    for path in tmp_path.rglob("*.safetensors"):
        blob = bytearray(path.read_bytes())
        blob[-3] ^= 0x55
        path.write_bytes(bytes(blob))
    engine.store.clear_memory()
    again = engine.generate("q?", chunks, policy="reuse", max_new_tokens=4)
    assert again.stats.store_misses == first.stats.store_misses == 3  # prefix (bos) + 2 chunks
    assert again.token_ids == first.token_ids
    assert engine.store.stats().corrupted == 3


def test_engine_of_another_model_never_reads_these_entries(tmp_path):
    a = tiny_engine(store=KVStore(tmp_path), seed=0)
    b = tiny_engine(store=KVStore(tmp_path), seed=1)
    assert a.fingerprint != b.fingerprint
    assert a.store.fingerprint == a.fingerprint and b.store.fingerprint == b.fingerprint
    chunk_ids = a.add_chunks(["shared chunk text"])
    stats = b.generate("q?", ["shared chunk text"], max_new_tokens=2).stats
    assert stats.store_misses == 2 and stats.store_hits == 0
    with pytest.raises(KeyError, match="unknown chunk"):
        b.generate("q?", chunk_ids, max_new_tokens=2)


def test_engine_links_half_precision_entries(tmp_path):
    chunks = ["first chunk of text here.", "second chunk, a bit longer than the first."]
    exact = tiny_engine(store=KVStore(tmp_path / "fp32"))
    half = tiny_engine(store=KVStore(tmp_path / "bf16", dtype="bf16"))
    a = exact.prefill_logits("q?", chunks, policy="reuse")
    b = half.prefill_logits("q?", chunks, policy="reuse")  # misses: computed, then linked as stored
    assert torch.equal(b, half.prefill_logits("q?", chunks, policy="reuse"))  # hits give the same answer
    keys = list(half.store.keys())
    assert len(keys) == 3  # prefix (bos) + 2 chunks
    assert all(half.store.get(key).keys.dtype == torch.bfloat16 for key in keys)
    assert 0 < (a - b).abs().max() < 0.05


def test_a_disk_budget_evicts_the_least_recently_used_entries(tmp_path):
    store = KVStore(tmp_path, memory_budget=0, fingerprint=FP)
    first, second, third = (store.put(make_entry(seed=s)) for s in range(3))
    size = (tmp_path / first[:2] / f"{first}.safetensors").stat().st_size
    budgeted = KVStore(tmp_path, memory_budget=0, fingerprint=FP, disk_budget=3 * size)
    for i, key in enumerate((first, second, third)):  # distinct, known access times, oldest first
        os.utime(tmp_path / key[:2] / f"{key}.safetensors", ns=(10**18 + i, 10**18 + i))
    assert_same(budgeted.get(first), make_entry(seed=0))  # read: now the most recently used
    fourth = budgeted.put(make_entry(seed=3))
    assert sorted(budgeted.keys()) == sorted([first, third, fourth])  # the least recently used went
    assert budgeted.stats().evictions == 1 and budgeted.stats().disk_bytes <= 3 * size
    with pytest.raises(ValueError, match="a disk budget must be a positive number of bytes, got 0"):
        KVStore(tmp_path, disk_budget=0)


def test_an_entry_stored_without_persist_stays_in_memory(tmp_path):
    store = KVStore(tmp_path, fingerprint=FP)
    key = store.put(make_entry(), persist=False)
    assert_same(store.get(key), make_entry())
    assert not list(tmp_path.rglob("*.safetensors"))
    assert KVStore(tmp_path, fingerprint=FP).get(key) is None  # another process never sees it
