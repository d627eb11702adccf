"""The scaling benchmark end to end on a small context with SmolLM2, plus its context cap and data folder."""

from __future__ import annotations

import json

import pytest
import torch
from epic_rag_bench.data import DATA_ENV, essay_chunks, essay_folder
from epic_rag_bench.scaling import _chunks_that_fit
from epic_rag_bench.ttft import QUESTION

from epic_rag.cli import main as cli_main

from .live_servers import RedisServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.redis
def test_scaling_writes_rows_costs_and_plot(tmp_path, smollm2, essay_folder):
    redis = RedisServer(tmp_path)
    out = tmp_path / "scaling"
    args = ["bench", "scaling", "--sizes", "512", "--methods", "full,attnlink:16", "--kv-url", redis.url,
            "--repeats", "1", "--kl-tokens", "512", "--essays", str(essay_folder), "--out", str(out)]  # fmt: skip
    try:
        assert cli_main(args) == 0
    finally:
        redis.stop()
    result = json.loads((out / "scaling.json").read_text())
    cells = {(r["chunks"], r["method"], r["kv_from"]) for r in result["rows"]}
    assert cells == {(1, "full", "none")} | {(1, "attnlink:16", s) for s in ("memory", "disk", "redis")}
    [chunk] = essay_chunks(smollm2, 1, 512, essay_folder)  # the first essay's first 512 tokens
    length = smollm2.layout(QUESTION, [chunk]).length
    for row in result["rows"]:
        assert row["tokens"] == length and row["ttft_s"] > 0 and row["peak_rss_mib"] >= row["baseline_rss_mib"]
    indexing = result["indexing"]
    assert indexing["tokens"] == smollm2.chunk_token_ids(chunk).numel()
    assert indexing["tokens_per_s"] == pytest.approx(indexing["tokens"] / indexing["seconds"])
    assert [r["tier"] for r in result["fetch"]] == ["memory", "disk", "redis"]
    assert all(r["ms_per_chunk"] > 0 for r in result["fetch"])
    assert result["kv_tier"] == redis.url  # no password to hide here
    kl = {(r["dtype"], r["method"]): r for r in result["storage_kl"]}
    assert kl[("fp32", "reuse")]["kl_vs_fp32_storage"] == 0.0
    assert 0 < kl[("bf16", "reuse")]["kl_vs_fp32_storage"] < kl[("bf16", "reuse")]["kl_vs_full"]
    layout = smollm2.layout(QUESTION, [chunk])  # fp32 reuse against full recompute, by hand
    full = torch.log_softmax(smollm2.prefill(layout, "full").logits.double(), -1)
    reuse = torch.log_softmax(smollm2.prefill(layout, "reuse").logits.double(), -1)
    by_hand = float((full.exp() * (full - reuse)).sum())
    assert kl[("fp32", "reuse")]["kl_vs_full"] == pytest.approx(by_hand, rel=1e-3, abs=1e-6)

    per_dtype = {r["dtype"]: r for r in result["kv_bytes_per_token"]}
    kv = smollm2.kv_bytes_per_token  # fp32 K and V of every layer
    assert per_dtype["fp32"]["memory_bytes_per_token"] == kv + 8  # plus the int64 token id
    assert per_dtype["bf16"]["memory_bytes_per_token"] == kv // 2 + 8
    assert all(r["disk_bytes_per_token"] > r["memory_bytes_per_token"] for r in per_dtype.values())  # + header
    assert "| storage dtype |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_the_largest_context_is_capped_at_what_the_model_takes(smollm2, essay_folder):
    chunks = essay_chunks(smollm2, 17, 512, essay_folder)
    n = _chunks_that_fit(smollm2, chunks)
    assert 12 <= n < 17
    fitted = smollm2.layout(QUESTION, chunks[:n]).length
    assert fitted < smollm2.max_context < smollm2.layout(QUESTION, chunks[: n + 1]).length + 1


def test_the_essays_folder_comes_from_the_option_or_the_environment_only(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"pass --essays DIR .* or set {DATA_ENV}"):
        essay_folder(None)
    assert essay_folder(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert essay_folder(None) == tmp_path / "haystack"
    assert essay_folder(tmp_path / "mine") == tmp_path / "mine"  # the option wins
