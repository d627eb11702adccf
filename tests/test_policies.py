"""Which positions each policy recomputes, and the policy strings."""

from __future__ import annotations

import pytest
import torch

from epic_rag import (
    AttnLink,
    CacheBlend,
    FullRecompute,
    FullReuse,
    LayerHook,
    LayerState,
    PrefixOnly,
    QueryGuided,
    RecomputePolicy,
    parse_policy,
)

from .conftest import tiny_engine

CHUNKS = ["a" * 30, "b" * 5, "c" * 25, "d" * 40]  # the second is shorter than k (plus a 2-char separator)
QUESTION = "what is here?"
TEXT_CHUNKS = ["The first chunk talks about rivers.", "A second, shorter one.", "Third chunk: mountains and lakes!"]


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


def layer_values(model, ids: torch.Tensor, start: int, layer: int) -> torch.Tensor:
    """V of `ids` at one layer, encoded alone at positions start.. by the HF model: [kv_heads, n, head_dim]."""
    positions = torch.arange(start, start + ids.numel())[None]
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=positions, use_cache=True)
    return out.past_key_values.layers[layer].values[0]


@pytest.mark.parametrize("check_layer", [1, 2])
def test_cacheblend_keeps_the_most_deviating_tokens(check_layer):
    engine = tiny_engine()
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="be brief")
    result = engine.prefill(layout, CacheBlend(0.3, check_layer))
    # Every token after the prefix ran layers 0..check_layer, so its fresh V there is full prefill's;
    # its cached V is the chunk's own, encoded alone. Their squared distance ranks the chunk tokens.
    full_v = layer_values(engine.model, layout.ids, 0, check_layer)
    deviation = torch.zeros(layout.length)
    for c in layout.chunks:
        alone = layer_values(engine.model, c.token_ids, 0, check_layer)
        deviation[c.start : c.end] = (full_v[:, c.start : c.end] - alone).pow(2).sum(dim=(0, 2))
    chunk_positions = torch.cat([c.positions() for c in layout.chunks])
    n_keep = round(0.3 * chunk_positions.numel())
    top = chunk_positions[deviation[chunk_positions].topk(n_keep).indices]
    expected = torch.cat([top, layout.question.positions()]).sort().values
    assert torch.equal(result.recomputed, expected)
    assert not torch.equal(top.sort().values, chunk_positions[:n_keep])  # not simply the first tokens


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_only_equals_full_recompute(family):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="You answer from the context.")
    prefix = engine.prefill(layout, PrefixOnly())
    assert layout.prefix_end == 1 + len("You answer from the context.\n\n")  # bos, then one token a character
    assert prefix.stats.tokens_reused == layout.prefix_end and prefix.stats.store_hits == 0
    again = engine.prefill(layout, PrefixOnly())  # the prefix now comes from the store
    assert again.stats.store_hits == 1
    full = engine.prefill(layout, FullRecompute()).logits
    assert (again.logits - full).abs().max() < 1e-4


# ---- extending from outside: policies written against the public API only ---------------------


class LastTokens(RecomputePolicy):
    """Recompute the last 8 tokens of every chunk, plus the question."""

    spec = "last8"

    def select(self, layout):
        tails = [torch.arange(max(c.start, c.end - 8), c.end) for c in layout.chunks]
        return torch.cat(tails + [layout.computed_positions()]).sort().values


class KeepQuestionAfterFirstLayer(LayerHook):
    layers = (0,)

    def __init__(self, layout) -> None:
        self.layout, self.seen = layout, []

    def after(self, state: LayerState) -> torch.Tensor:
        self.seen.append((state.layer, state.positions.clone()))
        return torch.isin(state.positions, self.layout.computed_positions())


class FirstLayerOnly(RecomputePolicy):
    """Every chunk token through layer 0 only; the question through every layer."""

    spec = "first-layer"

    def __init__(self) -> None:
        self.hooks = []

    def select(self, layout):
        return torch.arange(layout.prefix_end, layout.length)

    def layer_hook(self, layout):
        self.hooks.append(KeepQuestionAfterFirstLayer(layout))
        return self.hooks[-1]


def test_a_policy_defined_outside_runs_through_generate():
    engine = tiny_engine()
    out = engine.generate(QUESTION, TEXT_CHUNKS, system="sys", policy=LastTokens(), max_new_tokens=3)
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="sys")
    assert out.stats.policy == "last8" and len(out.token_ids) == 3
    assert out.stats.tokens_recomputed == 8 * len(layout.chunks) + layout.question.token_ids.numel()
    result = engine.prefill(layout, LastTokens())
    assert torch.equal(result.recomputed, LastTokens().select(layout))
    assert (result.logits - engine.prefill(layout, "reuse").logits).abs().max() > 1e-4


def test_a_policy_with_a_layer_hook_defined_outside():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="sys")
    policy = FirstLayerOnly()
    result = engine.prefill(layout, policy)
    [(layer, seen)] = policy.hooks[0].seen
    assert layer == 0 and torch.equal(seen, torch.arange(layout.prefix_end, layout.length))
    assert torch.equal(result.recomputed, layout.question.positions())
    # layer 0 was recomputed over the whole prompt: its K/V are full prefill's; layer 1 stays linked
    with torch.no_grad():
        full = engine.model(input_ids=layout.ids[None], use_cache=True).past_key_values.layers
    chunk = layout.chunks[1]
    span = slice(chunk.start, chunk.end)
    assert (result.cache.values[0, 0, :, span] - full[0].values[0, :, span]).abs().max() < 1e-4
    reuse = engine.prefill(layout, FullReuse()).cache
    assert torch.equal(result.cache.values[1, 0, :, span], reuse.values[1, 0, :, span])
    out = engine.generate(QUESTION, TEXT_CHUNKS, system="sys", policy=policy, max_new_tokens=2)
    assert out.token_ids[0] == int(result.logits.argmax())  # decodes from the hooked prefill
    assert out.stats.tokens_recomputed == layout.question.token_ids.numel()


# ---- query-guided selection --------------------------------------------------------------------


def test_guided_covering_every_token_equals_full_recompute(family):
    engine = tiny_engine(family)
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="You answer from the context.")
    result = engine.prefill(layout, QueryGuided(k=10_000))
    assert torch.equal(result.recomputed, torch.arange(layout.prefix_end, layout.length))
    assert (result.logits - engine.prefill(layout, FullRecompute()).logits).abs().max() < 1e-4


def question_attention(engine, layout, layer: int) -> torch.Tensor:
    """Attention the question pays each position at `layer`, from HF's eager attention over the
    linked context: [length], summed over question tokens, averaged over heads."""
    from transformers import DynamicCache

    start = layout.question.start
    linked = engine.prefill(layout, FullReuse()).cache
    past = DynamicCache()
    for i in range(engine.n_layers):
        past.update(linked.keys[i, :, :, :start].clone(), linked.values[i, :, :, :start].clone(), i)
    with torch.no_grad():
        out = engine.model(
            input_ids=layout.question.token_ids[None],
            position_ids=layout.question.positions()[None],
            cache=past,
            output_attentions=True,
        )
    return out.attentions[layer][0].sum(dim=1).mean(dim=0)  # [length]


@pytest.mark.parametrize("layers", [(-1,), (1,), (0, -1)])
def test_guided_picks_the_tokens_the_question_attends_to(layers):
    engine = tiny_engine("qwen2", attn_implementation="eager")
    layout = engine.layout(QUESTION, TEXT_CHUNKS, system="sys")
    policy = QueryGuided(k=6, sinks=2, layers=layers)
    result = engine.prefill(layout, policy)
    scores = sum(question_attention(engine, layout, i % engine.n_layers) for i in set(layers))
    sinks = torch.cat([c.positions()[:2] for c in layout.chunks])
    rest = torch.cat([c.positions()[2:] for c in layout.chunks])
    budget = engine.prefill(layout, AttnLink(6)).stats.tokens_recomputed
    n_top = budget - sinks.numel() - layout.question.token_ids.numel()
    top = rest[scores[rest].topk(n_top).indices]
    assert torch.equal(result.recomputed, torch.cat([sinks, top, layout.question.positions()]).sort().values)
    assert result.stats.tokens_recomputed == budget
    assert result.stats.tokens_probed == layout.question.token_ids.numel()  # the scoring pass, counted apart


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
        ("guided:16", QueryGuided(16)),
        ("guided:8:2", QueryGuided(8, sinks=2)),
        ("guided:16:4:-1+-2", QueryGuided(16, layers=(-1, -2))),
    ],
)
def test_parse_policy_round_trip(spec, policy):
    assert parse_policy(spec) == policy
    assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize(
    "bad", ["", "attnlink:x", "fast", "cacheblend:2", "attnlink:-1", "full:3", "guided:-2", "guided:8:2:x"]
)
def test_parse_policy_rejects_with_help(bad):
    with pytest.raises(ValueError, match="policy"):
        parse_policy(bad)


def test_recommend_prefers_the_closest_policy_within_the_time_bound():
    from epic_rag.calibration import PolicyScore, recommend

    def score(policy, kl_tf, ttft):
        return PolicyScore(policy, kl_first=kl_tf, kl_teacher_forced=kl_tf, agree=0.5, ttft_s=ttft, recomputed=0.1,
                           samples=3)  # fmt: skip

    scores = [score("attnlink:16", 0.2, 1.0), score("guided:16", 0.1, 1.4), score("cacheblend:0.15", 0.05, 4.0)]
    assert recommend(scores) == "guided:16"  # CacheBlend is closer but 4x slower than AttnLink(16)
    assert recommend(scores, max_slowdown=5) == "cacheblend:0.15"
    assert recommend([score("reuse", 0.3, 0.5), score("full", 0.0, 9.0)]) == "full"  # no AttnLink: no bound
