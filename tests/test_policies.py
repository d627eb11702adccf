"""Which positions each policy recomputes, and the policy strings."""

from __future__ import annotations

import pytest

from epic_rag import AttnLink, CacheBlend, FullRecompute, FullReuse, PrefixOnly, parse_policy

from .conftest import tiny_engine

CHUNKS = ["a" * 30, "b" * 5, "c" * 25, "d" * 40]  # the second is shorter than k (plus a 2-char separator)
QUESTION = "what is here?"


@pytest.mark.parametrize("k", [1, 2, 16])
def test_attnlink_counts_with_system(k):
    engine = tiny_engine(bos=False)
    layout = engine.layout(QUESTION, CHUNKS, system="be brief")
    stats = engine.prefill(layout, AttnLink(k)).stats
    expected = sum(min(k, c.token_ids.numel()) for c in layout.chunks) + layout.question.token_ids.numel()
    assert stats.tokens_recomputed == expected
    if k == 2:
        assert expected == k * len(CHUNKS) + layout.question.token_ids.numel()


@pytest.mark.parametrize("k", [1, 2, 16])
def test_attnlink_counts_without_system(k):
    engine = tiny_engine(bos=False)
    layout = engine.layout(QUESTION, CHUNKS)
    assert layout.prefix is None and layout.chunks[0].start == 0
    stats = engine.prefill(layout, AttnLink(k)).stats
    expected = sum(min(k, c.token_ids.numel()) for c in layout.chunks[1:]) + layout.question.token_ids.numel()
    assert stats.tokens_recomputed == expected
    assert stats.tokens_reused == layout.length - expected


def test_other_policies_counts():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, CHUNKS, system="be brief")
    q = layout.question.token_ids.numel()
    chunk_tokens = sum(c.token_ids.numel() for c in layout.chunks)
    assert engine.prefill(layout, FullRecompute()).stats.tokens_recomputed == layout.length
    assert engine.prefill(layout, FullReuse()).stats.tokens_recomputed == q
    assert engine.prefill(layout, PrefixOnly()).stats.tokens_recomputed == layout.length - layout.prefix_end
    blend = engine.prefill(layout, CacheBlend(0.15)).stats
    assert blend.tokens_recomputed == round(0.15 * chunk_tokens) + q


def test_cacheblend_keeps_the_most_deviating_tokens():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, CHUNKS, system="be brief")
    assert engine.prefill(layout, CacheBlend(1.0)).stats.tokens_recomputed == layout.length - layout.prefix_end
    full = engine.prefill(layout, FullRecompute()).logits
    assert (engine.prefill(layout, CacheBlend(1.0)).logits - full).abs().max() < 1e-4


@pytest.mark.parametrize(
    "spec, policy",
    [
        ("full", FullRecompute()),
        ("reuse", FullReuse()),
        ("prefix", PrefixOnly()),
        ("attnlink:16", AttnLink(16)),
        ("attnlink:2", AttnLink(2)),
        ("cacheblend:0.15", CacheBlend(0.15)),
        ("cacheblend:0.3:2", CacheBlend(0.3, check_layer=2)),
    ],
)
def test_parse_policy_round_trip(spec, policy):
    assert parse_policy(spec) == policy
    assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize("bad", ["", "attnlink:x", "fast", "cacheblend:2", "attnlink:-1", "full:3"])
def test_parse_policy_rejects_with_help(bad):
    with pytest.raises(ValueError, match="policy"):
        parse_policy(bad)
