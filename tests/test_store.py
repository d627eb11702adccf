"""KV store: exact round trips, damaged files, other models, the memory budget."""

from __future__ import annotations

import pytest
import torch

from epic_rag import ChunkKV, KVStore
from epic_rag.store import entry_key

from .conftest import tiny_engine

FP = "f" * 64


def make_entry(n: int = 7, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(
        torch.randint(0, 100, (n,), generator=g),
        torch.randn(3, 2, n, 8, generator=g),
        torch.randn(3, 2, n, 8, generator=g),
    )


def test_round_trip_exact_from_disk(tmp_path):
    entry = make_entry()
    key = KVStore(tmp_path).put(FP, entry)
    fresh = KVStore(tmp_path)  # empty memory tier: must read the file
    got = fresh.get(key, FP)
    assert torch.equal(got.token_ids, entry.token_ids)
    assert torch.equal(got.keys, entry.keys) and torch.equal(got.values, entry.values)
    assert fresh.stats().disk_reads == 1 and fresh.stats().hits == 1


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_storage_dtype(tmp_path, dtype, torch_dtype):
    entry = make_entry()
    key = KVStore(tmp_path, dtype=dtype).put(FP, entry)
    got = KVStore(tmp_path).get(key, FP)
    assert got.keys.dtype == torch_dtype
    assert torch.equal(got.keys, entry.keys.to(torch_dtype))


def test_paths_are_hashes_not_text(tmp_path):
    key = KVStore(tmp_path).put(FP, make_entry())
    [path] = list(tmp_path.rglob("*.safetensors"))
    assert path.name == f"{key}.safetensors" and key == entry_key(FP, make_entry().token_ids)
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_file_is_dropped_not_used(tmp_path, damage):
    key = KVStore(tmp_path).put(FP, make_entry(n=50))
    [path] = list(tmp_path.rglob("*.safetensors"))
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-10] ^= 0xFF  # inside the tensor data: the checksum catches it
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(blob))
    store = KVStore(tmp_path)
    assert store.get(key, FP) is None
    assert store.stats().corrupted == 1 and store.stats().misses == 1
    assert not path.exists()


def test_entry_under_another_key_or_model_is_a_miss(tmp_path):
    store = KVStore(tmp_path)
    key = store.put(FP, make_entry(seed=1))
    other_key = entry_key(FP, make_entry(seed=2).token_ids)
    src = next(tmp_path.rglob("*.safetensors"))
    dst = tmp_path / other_key[:2] / f"{other_key}.safetensors"
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(src.read_bytes())
    fresh = KVStore(tmp_path)
    assert fresh.get(other_key, FP) is None  # file content does not match its name
    assert fresh.get(key, "0" * 64) is None  # same key asked for by another model
    assert fresh.get(key, FP) is not None


def test_memory_budget_and_evict(tmp_path):
    entries = [make_entry(n=20, seed=s) for s in range(5)]
    size = entries[0].nbytes
    store = KVStore(tmp_path, memory_budget=2 * size)
    keys = [store.put(FP, e) for e in entries]
    s = store.stats()
    assert s.memory_bytes <= 2 * size and s.memory_entries == 2 and s.evictions == 3
    assert s.disk_entries == 5  # evicted from memory, never lost
    assert store.get(keys[0], FP) is not None and store.stats().disk_reads == 1
    assert store.evict(keys[0]) and not store.contains(keys[0]) and store.get(keys[0], FP) is None


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


def test_other_model_never_reads_these_entries(tmp_path):
    a = tiny_engine(store=KVStore(tmp_path), seed=0)
    b = tiny_engine(store=KVStore(tmp_path), seed=1)
    assert a.fingerprint != b.fingerprint
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
    entry = next(iter(half.store._memory.values()))[1]
    assert entry.keys.dtype == torch.bfloat16
    assert 0 < (a - b).abs().max() < 0.05
