"""The scaling benchmark end to end on a small context with SmolLM2, plus its context cap."""

from __future__ import annotations

import json

import pytest

from epic_rag_bench.data import essay_chunks
from epic_rag_bench.scaling import _chunks_that_fit
from epic_rag_bench.ttft import QUESTION
from epic_rag.cli import main as cli_main

from .live_servers import RedisServer

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_scaling_writes_rows_costs_and_plot(tmp_path, smollm2):
    redis = RedisServer(tmp_path)
    out = tmp_path / "scaling"
    args = ["bench", "scaling", "--sizes", "512", "--methods", "full,attnlink:16", "--kv-url", redis.url,
            "--repeats", "1", "--kl-tokens", "512", "--out", str(out)]  # fmt: skip
    try:
        assert cli_main(args) == 0
    finally:
        redis.stop()
    result = json.loads((out / "scaling.json").read_text())
    cells = {(r["chunks"], r["method"], r["kv_from"]) for r in result["rows"]}
    assert cells == {(1, "full", "none")} | {(1, "attnlink:16", s) for s in ("memory", "disk", "redis")}
    for row in result["rows"]:
        assert row["ttft_s"] > 0 and row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
    assert result["indexing"]["tokens"] > 400 and result["indexing"]["tokens_per_s"] > 0
    assert [r["tier"] for r in result["fetch"]] == ["memory", "disk", "redis"]
    assert all(r["ms_per_chunk"] > 0 for r in result["fetch"])
    assert result["kv_tier"] == redis.url  # no password to hide here
    kl = {(r["dtype"], r["method"]): r for r in result["storage_kl"]}
    assert kl[("fp32", "reuse")]["kl_vs_fp32_storage"] == 0.0
    assert 0 < kl[("bf16", "reuse")]["kl_vs_fp32_storage"] < kl[("bf16", "reuse")]["kl_vs_full"]

    per_dtype = {r["dtype"]: r for r in result["kv_bytes_per_token"]}
    kv = smollm2.kv_bytes_per_token  # fp32 K and V of every layer
    assert per_dtype["fp32"]["memory_bytes_per_token"] == kv + 8  # plus the int64 token id
    assert per_dtype["bf16"]["memory_bytes_per_token"] == kv // 2 + 8
    assert all(r["disk_bytes_per_token"] > r["memory_bytes_per_token"] for r in per_dtype.values())  # + header
    assert "| storage dtype |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC


def test_the_largest_context_is_capped_at_what_the_model_takes(smollm2):
    chunks = essay_chunks(smollm2, 17, 512)
    n = _chunks_that_fit(smollm2, chunks)
    assert 12 <= n < 17
    fitted = smollm2.layout(QUESTION, chunks[:n]).length
    assert fitted < smollm2.max_context < smollm2.layout(QUESTION, chunks[: n + 1]).length + 1
