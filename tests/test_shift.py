"""The KV offset correction (+shift): exact at its limits, and the arithmetic checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from epic_rag import FullRecompute, parse_policy
from epic_rag.shift import ChunkShifter, OffsetCorrection

from .conftest import tiny_engine

CHUNKS = ["Apples and pears grow in the orchard by the river.", "Trains leave at nine.", "The sea is cold in May."]
QUESTION = "When do trains leave?"


def rotate_by_hand(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of one [d] vector at `position`, pair by pair (dimension i with i + d/2)."""
    half = x.shape[-1] // 2
    out = x.clone().double()
    for i in range(half):
        angle = position * float(inv_freq[i])
        a, b = float(x[i]), float(x[i + half])
        out[i], out[i + half] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def test_the_correction_moves_reused_slots_by_the_mean_unrotated_offset():
    g = torch.Generator().manual_seed(0)
    heads, capacity, d = 2, 12, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    keys, values = torch.randn(1, heads, capacity, d, generator=g), torch.randn(1, heads, capacity, d, generator=g)
    linked = torch.ones(capacity, dtype=torch.bool)
    written = torch.tensor([4, 5, 10])  # 4, 5: the head of the chunk at 4..9; 10: the question
    fresh_k, fresh_v = torch.randn(1, heads, 3, d, generator=g), torch.randn(1, heads, 3, d, generator=g)
    before_k, before_v = keys.clone(), values.clone()
    ChunkShifter(OffsetCorrection(0.5), [(4, 10)], inv_freq.float()).apply(
        keys, values, linked, written, fresh_k, fresh_v
    )
    for h in range(heads):
        unrotated = [rotate_by_hand(fresh_k[0, h, i] - before_k[0, h, p], -p, inv_freq) for i, p in enumerate((4, 5))]
        mean_k = (unrotated[0] + unrotated[1]) / 2
        mean_v = ((fresh_v[0, h, :2] - before_v[0, h, 4:6]).double()).mean(dim=0)
        for j in range(6, 10):  # the chunk's reused tokens
            expected = before_k[0, h, j].double() + 0.5 * rotate_by_hand(mean_k, j, inv_freq)
            assert torch.allclose(keys[0, h, j].double(), expected, atol=1e-5)
            assert torch.allclose(values[0, h, j].double(), before_v[0, h, j].double() + 0.5 * mean_v, atol=1e-6)
    untouched = [0, 1, 2, 3, 4, 5, 10, 11]  # before the chunk, its recomputed head, after it
    assert torch.equal(keys[0][:, untouched], before_k[0][:, untouched])
    assert torch.equal(values[0][:, untouched], before_v[0][:, untouched])


def test_weight_zero_is_the_inner_policy_exactly():
    engine = tiny_engine("qwen2")
    layout = engine.layout(QUESTION, engine.add_chunks(CHUNKS))
    for inner in ("attnlink:3", "guided:4:1", "cacheblend:0.3"):
        plain = engine.prefill(layout, inner)
        assert torch.equal(engine.prefill(layout, f"{inner}+shift:0").logits, plain.logits)


def test_every_token_recomputed_equals_full_prefill():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, engine.add_chunks(CHUNKS))
    full = engine.prefill(layout, FullRecompute()).logits
    assert torch.equal(engine.prefill(layout, "full+shift").logits, full)
    everything = engine.prefill(layout, "cacheblend:1+shift:1")  # every chunk token linked, then all recomputed
    assert torch.allclose(everything.logits, full, atol=1e-5)


@pytest.mark.parametrize("inner", ["attnlink:3", "guided:4:1"])
def test_the_correction_changes_what_stays_reused_and_nothing_in_the_store(inner):
    engine = tiny_engine("qwen2")
    ids = engine.add_chunks(CHUNKS)
    layout = engine.layout(QUESTION, ids)
    stored = {i: engine.store.get(i.removeprefix("kv:")).keys.clone() for i in ids}
    plain, shifted = engine.prefill(layout, inner), engine.prefill(layout, f"{inner}+shift")
    assert torch.equal(plain.recomputed, shifted.recomputed)  # the same selection
    assert not torch.equal(plain.logits, shifted.logits)
    assert all(torch.equal(engine.store.get(i.removeprefix("kv:")).keys, k) for i, k in stored.items())
    assert parse_policy(f"{inner}+shift").spec == f"{inner}+shift:1"
