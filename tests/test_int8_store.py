"""int8 storage of chunk KV: error bound, codec round trip, true bytes, engine answers, sizes."""

from __future__ import annotations

import argparse
import json
import struct
from types import SimpleNamespace

import pytest
import torch
from epic_rag_bench.accuracy import _settings, add_arguments
from epic_rag_bench.scaling import storage_costs

from epic_rag import ChunkKV, KVStore
from epic_rag.store import DamagedEntry, entry_key, resolve_dtype
from epic_rag.store.codec import decode, encode
from epic_rag.store.keys import kv_bytes_per_token

from .conftest import tiny_engine

FP = "f" * 64
CHUNKS = ["first chunk of text here, with some more words.", "second chunk, a bit longer than the first one is."]


def make_entry(n: int = 40, head_dim: int = 8, seed: int = 0) -> ChunkKV:
    """Random K/V with two outlier key channels and one all-zero value token."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 2, n, head_dim, generator=g)  # [layers, kv_heads, n, head_dim]
    keys[..., 1] *= 20  # outlier channels, as real keys have
    keys[..., -1] += 5
    values = torch.randn(3, 2, n, head_dim, generator=g)
    values[:, :, 3] = 0  # an all-zero slice must not divide by zero
    return ChunkKV(torch.randint(0, 100, (n,), generator=g), keys, values)


def test_quantize_dequantize_error_is_at_most_half_a_step():
    entry = make_entry()
    q = entry.to(torch.int8)
    assert q.quantized and q.keys.dtype == q.values.dtype == torch.int8
    assert q.key_scale.shape == (3, 2, 1, 8) and q.value_scale.shape == (3, 2, 40, 1)  # per channel, per token
    back = q.to(torch.float32)
    assert not back.quantized and back.key_scale is None
    slack = 1 + 1e-5  # fp32 rounding in x / scale and q * scale
    assert ((back.keys - entry.keys).abs() <= q.key_scale / 2 * slack).all()
    assert ((back.values - entry.values).abs() <= q.value_scale / 2 * slack).all()
    assert torch.equal(back.values[:, :, 3], entry.values[:, :, 3])  # zeros stay exact
    head = q.head(10)  # a prefix keeps the key scales and slices the value scales
    assert head.quantized and head.value_scale.shape == (3, 2, 10, 1)
    assert torch.equal(head.to(torch.float32).keys, back.keys[:, :, :10])
    assert torch.equal(head.to(torch.float32).values, back.values[:, :, :10])


def test_inconsistent_int8_entry_is_refused():
    q = make_entry().to(torch.int8)
    with pytest.raises(ValueError, match="scales"):
        ChunkKV(q.token_ids, q.keys, q.values)  # int8 without scales
    with pytest.raises(ValueError, match="scales"):
        ChunkKV(q.token_ids, q.keys.float(), q.values.float(), None, q.key_scale, q.value_scale)


def test_disk_round_trip_is_exact_and_key_ignores_dtype(tmp_path):
    entry = make_entry()
    key = KVStore(tmp_path, dtype="int8", fingerprint=FP).put(entry)
    assert key == entry_key(FP, entry.token_ids) == KVStore(fingerprint=FP).put(entry)
    got = KVStore(tmp_path, fingerprint=FP).get(key)  # empty memory tier: read from the file
    want = entry.to(torch.int8)
    for name in ("token_ids", "keys", "values", "key_scale", "value_scale"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert _header(encode(want, FP))["__metadata__"]["format"] == "2"
    assert _header(encode(entry, FP))["__metadata__"]["format"] == "1"  # float entries: as before int8


@pytest.mark.parametrize("tensor", ["keys", "value_scale"])
def test_damaged_int8_entry_is_detected(tmp_path, tensor):
    key = KVStore(tmp_path, dtype="int8", fingerprint=FP).put(make_entry())
    [path] = list(tmp_path.rglob("*.safetensors"))
    blob = bytearray(path.read_bytes())
    decode(bytes(blob), key)  # intact: reads
    start, end = _header(blob)[tensor]["data_offsets"]
    blob[_data_start(blob) + (start + end) // 2] ^= 0x40  # one bit inside that tensor's bytes
    with pytest.raises(DamagedEntry, match="checksum"):
        decode(bytes(blob), key)
    path.write_bytes(bytes(blob))
    store = KVStore(tmp_path, fingerprint=FP)
    assert store.get(key) is None and store.stats().corrupted == 1


def test_memory_tier_holds_a_quarter_plus_scales():
    n, head_dim = 256, 64
    entry = make_entry(n=n, head_dim=head_dim)
    full, small = KVStore(fingerprint=FP), KVStore(dtype="int8", fingerprint=FP)
    full.put(entry)
    small.put(entry)
    config = SimpleNamespace(num_hidden_layers=3, num_key_value_heads=2, head_dim=head_dim)
    ids = 8 * n  # int64 token ids
    assert full.stats().memory_bytes == kv_bytes_per_token(config, "fp32") * n + ids
    assert small.stats().memory_bytes == kv_bytes_per_token(config, "int8", chunk_tokens=n) * n + ids
    kv_ratio = (small.stats().memory_bytes - ids) / (full.stats().memory_bytes - ids)
    assert kv_ratio == pytest.approx(0.25 * (1 + 4 / (2 * head_dim) * (1 + head_dim / n)))  # 0.26: scales add 4%


def test_engine_links_int8_entries_close_to_fp32():
    engines = {dtype: tiny_engine(store=KVStore(dtype=dtype)) for dtype in ("fp32", "bf16", "int8")}
    for policy in ("reuse", "attnlink:4"):
        logits = {dtype: e.prefill_logits("q?", CHUNKS, policy=policy) for dtype, e in engines.items()}
        int8_error = (logits["int8"] - logits["fp32"]).abs().max()
        bf16_error = (logits["bf16"] - logits["fp32"]).abs().max()
        # Per element int8 is off by at most absmax/254 of its channel or token, bf16 by |x|/512:
        # for roughly Gaussian K/V (absmax ~3 sigma, typical |x| ~0.8 sigma) int8 is ~7x bf16's
        # error per element, which attention averages; measured ~3x. Above 8x something is wrong.
        assert 0 < int8_error < 8 * bf16_error, (policy, int8_error, bf16_error)
        assert logits["int8"].argmax() == logits["fp32"].argmax()
    int8 = engines["int8"]
    keys = list(int8.store.keys())
    assert len(keys) == 3 and all(int8.store.get(key).quantized for key in keys)  # prefix (bos) + 2 chunks
    again = int8.prefill_logits("q?", CHUNKS, policy="attnlink:4")  # store hits: the same stored form
    assert torch.equal(again, logits["int8"])
    answers = {d: e.generate("q?", CHUNKS, policy="attnlink:4", max_new_tokens=8).token_ids for d, e in engines.items()}
    assert answers["int8"] == answers["fp32"]  # an error ~3x bf16's leaves every greedy choice as it was


def test_storage_costs_report_int8(tmp_path):
    engine = tiny_engine()
    rows = {r["dtype"]: r for r in storage_costs(engine, CHUNKS[1])}
    n = engine.chunk_token_ids(CHUNKS[1]).numel()
    want = kv_bytes_per_token(engine.model.config, "int8", chunk_tokens=n) + 8  # + the int64 token id
    assert rows["int8"]["memory_bytes_per_token"] == pytest.approx(want)
    assert rows["int8"]["disk_bytes_per_token"] > rows["int8"]["memory_bytes_per_token"]  # + header


def test_resolve_dtype_knows_int8():
    assert resolve_dtype("int8") is torch.int8
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int4")


def test_bytes_per_token_of_builtin_models():
    qwen = SimpleNamespace(num_hidden_layers=24, num_key_value_heads=2, hidden_size=896, num_attention_heads=14)
    smol = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, hidden_size=576, num_attention_heads=9)
    per_dtype = {name: [kv_bytes_per_token(c, name) for c in (qwen, smol)] for name in ("fp32", "bf16", "fp16", "int8")}
    assert per_dtype == {
        "fp32": [24576, 46080],
        "bf16": [12288, 23040],
        "fp16": [12288, 23040],
        "int8": [6144 + 240, 11520 + 450],  # + fp32 scales: (1 + 64/256) * 4 bytes per layer and kv head
    }
    assert kv_bytes_per_token(qwen, "int8", chunk_tokens=64) == 6144 + 384


def test_accuracy_bench_takes_a_store_dtype():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "x.jsonl", "--store-dtype", "int8"])
    assert args.store_dtype == "int8" and _settings(args, "x.jsonl")["store_dtype"] == "int8"
    plain = parser.parse_args(["--data", "x.jsonl"])
    assert "store_dtype" not in _settings(plain, "x.jsonl")  # older result folders still resume


def _header(blob: bytes | bytearray) -> dict:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length])


def _data_start(blob: bytes | bytearray) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]
