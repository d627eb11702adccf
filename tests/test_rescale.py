"""APE attention rescaling: the formula, the identity at T = S = 1, and where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from epic_rag import AttentionRescale, AttnLink, CacheBlend, FullRecompute, Rescaled, parse_policy
from epic_rag.rescale import ATTENTION_NAME, rescaled_attention

from .conftest import tiny_engine

CHUNKS = ["The first chunk talks about rivers.", "A second, shorter one.", "Third chunk: mountains and lakes!"]
QUESTION = "what is here?"


def ape_mix(q, k, v, linked, visible, T, S):
    """APE written as two separate softmaxes mixed by their log-partition functions
    (one query row at a time, one head): the reference for the fused form."""
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.T) * scale  # [L]
    ctx = linked & visible
    other = ~linked & visible
    lse_c = torch.logsumexp(logits[ctx] / T, 0)
    lse_o = torch.logsumexp(logits[other], 0)
    out_c = torch.softmax(logits[ctx] / T, 0) @ v[ctx]
    out_o = torch.softmax(logits[other], 0) @ v[other]
    w = torch.softmax(torch.stack([S * T * lse_c, lse_o]), 0)
    return w[0] * out_c + w[1] * out_o


@pytest.mark.parametrize("T, S", [(0.9, 0.9), (0.7, 1.2), (1.0, 1.0)])
def test_fused_rescaling_equals_the_two_softmax_mix(T, S):
    torch.manual_seed(0)
    heads, kv_heads, length, d = 4, 2, 12, 8
    positions = torch.tensor([3, 7, 10, 11])  # the computed rows, sorted
    q = torch.randn(1, heads, positions.numel(), d)
    k, v = torch.randn(1, kv_heads, length, d), torch.randn(1, kv_heads, length, d)
    linked = torch.zeros(1, length, dtype=torch.bool)
    linked[0, 1:7] = True
    linked[0, 3] = False  # a recomputed slot inside a chunk is not context
    visible = torch.arange(length)[None, :] <= positions[:, None]  # [S, L]
    mask = torch.zeros(1, 1, positions.numel(), length).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = nn.Module()
    module.layer_idx = 0
    out, _ = rescaled_attention(module, q, k, v, mask, epic_rescale=(AttentionRescale(T, S), linked))
    for h in range(heads):
        for row in range(positions.numel()):
            expected = ape_mix(q[0, h, row], k[0, h // 2], v[0, h // 2], linked[0], visible[row], T, S)
            assert torch.allclose(out[0, row, h], expected, atol=1e-5)


def test_rescaling_with_t_and_s_one_is_the_identity(family):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, CHUNKS, system="You answer from the context.")
    plain = engine.prefill(layout, AttnLink(2), extra_capacity=6)
    same = engine.prefill(layout, "attnlink:2+ape:1:1", extra_capacity=6)
    other = engine.prefill(layout, "attnlink:2+ape:0.5:0.9", extra_capacity=6)
    assert (same.logits - plain.logits).abs().max() < 1e-5
    assert (other.logits - plain.logits).abs().max() > 1e-3  # the rescaled path really ran
    tokens = [5, 9, 17]  # decoding attends over the linked slots too
    assert (engine.extend(same, tokens) - engine.extend(plain, tokens)).abs().max() < 1e-5
    assert (engine.extend(other, tokens) - engine.extend(plain, tokens)).abs().max() > 1e-3


def test_rescaling_leaves_full_recompute_and_the_store_alone():
    engine = tiny_engine("qwen2")
    ids = engine.add_chunks(CHUNKS)
    layout = engine.layout(QUESTION, ids)
    full = engine.prefill(layout, FullRecompute()).logits
    assert torch.equal(engine.prefill(layout, "full+ape:0.5:0.5").logits, full)  # nothing linked
    before = {i: engine.store.get(i.removeprefix("kv:")).keys.clone() for i in ids}
    engine.generate(QUESTION, ids, policy="guided:4+ape:0.8:0.9", max_new_tokens=4)
    engine.generate(QUESTION, ids, policy="cacheblend:0.3+ape:0.8:0.9", max_new_tokens=4)
    for i, keys in before.items():
        assert torch.equal(engine.store.get(i.removeprefix("kv:")).keys, keys)
    assert engine.model.config._attn_implementation == ATTENTION_NAME  # installed once at load, never toggled


@pytest.mark.parametrize("inner", [AttnLink(3), CacheBlend(0.3)])
def test_rescaled_policy_keeps_the_inner_selection(inner):
    """(CacheBlend's check layer sees only fresh values: every chunk token is recomputed there.
    A guided probe does run under the rescaling, so its scores may differ.)"""
    engine = tiny_engine("llama")
    layout = engine.layout(QUESTION, CHUNKS, system="sys")
    rescaled = engine.prefill(layout, Rescaled(inner, AttentionRescale(0.8, 0.9)))
    plain = engine.prefill(layout, inner)
    assert torch.equal(rescaled.recomputed, plain.recomputed)
    assert (rescaled.logits - plain.logits).abs().max() > 1e-4


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("attnlink:16+ape:0.8:1.1", "attnlink:16+ape:0.8:1.1"),
        ("guided:16:4:-1+-2+ape:0.9", "guided:16:4:-1+-2+ape:0.9:1"),
        ("cacheblend:0.15+ape:1:1", "cacheblend:0.15+ape:1:1"),
    ],
)
def test_rescaled_spec_round_trip(spec, expected):
    policy = parse_policy(spec)
    assert policy.spec == expected
    assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize("bad", ["attnlink:16+apex", "attnlink:16+ape:0", "attnlink:16+ape:1:1:1", "fast+ape"])
def test_bad_rescaling_is_refused_with_help(bad):
    with pytest.raises(ValueError, match="policy"):
        parse_policy(bad)


def test_bare_ape_takes_the_swept_defaults():
    from epic_rag.policy_spec import DEFAULT_RESCALE

    assert parse_policy("attnlink:16+ape").rescale == AttentionRescale(*DEFAULT_RESCALE)
