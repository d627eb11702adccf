"""The TTFT-budget policy and the measured time model it spends (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from epic_rag import AttnLink, FullRecompute, parse_policy
from epic_rag.policies import CacheBlend, QueryGuided, TtftBudget
from epic_rag.timing import TimeModel

from .conftest import tiny_engine

CHUNKS = ["Apples and pears grow in the orchard by the river.", "Trains leave at nine.", "The sea is cold in May."]
QUESTION = "When do trains leave?"


def linear_model(a: float, b: float, c: float, d: float) -> TimeModel:
    """A time model taught exactly by seconds = a + b·n + c·n·L/1000 + d·m."""
    model = TimeModel()
    for n, length, m in [(1, 100, 0), (50, 100, 2), (10, 400, 4), (400, 400, 0), (7, 900, 5), (300, 900, 1)]:
        model.observe(n, length, m, a + b * n + c * n * length / 1000 + d * m)
    return model


def test_the_fit_recovers_a_known_cost_model():
    model = linear_model(0.05, 0.002, 0.01, 0.003)
    assert model.predict(123, 777, 3) == pytest.approx(0.05 + 0.002 * 123 + 0.01 * 123 * 0.777 + 0.003 * 3, rel=1e-9)


def test_the_fit_keeps_every_coefficient_non_negative():
    model = TimeModel()
    for n in (1, 2, 3, 4, 5):  # time falls as tokens grow: no negative per-token cost is learnt from it
        model.observe(n, 100, 0, 1.0 - 0.01 * n)
    # the best non-negative fit of a falling time is the flat mean: no per-token cost, intercept 0.97
    assert model.predict(1000, 100, 0) == pytest.approx(0.97) and model.predict(0, 100, 0) == pytest.approx(0.97)


def test_a_cold_model_measures_forwards_of_its_own():
    calls = []

    def measure(n: int, length: int) -> float:
        calls.append((n, length))
        return 0.01 + 0.001 * n

    model = TimeModel(measure=measure)
    assert model.predict(400, 400, 0) == pytest.approx(0.01 + 0.001 * 400, rel=1e-6)  # a full prefill, extrapolated
    assert calls == [(8, 400), (64, 400), (256, 400), (64, 100)]  # short forwards only


def test_budget_chooses_the_largest_attnlink_that_fits():
    engine = tiny_engine()
    ids = engine.add_chunks(CHUNKS)
    layout = engine.layout(QUESTION, ids)
    timing = linear_model(0.0, 0.001, 0.0, 0.0)  # one millisecond a token
    floor = layout.computed_positions().numel()
    for target in [0.001 * (floor + extra) for extra in (5, 20, 50)]:
        chosen = TtftBudget(seconds=target).with_timing(timing).select(layout)
        k = max(k for k in range(0, 64) if AttnLink(k).select(layout).numel() * 0.001 <= target + 1e-12)
        assert torch.equal(chosen, AttnLink(k).select(layout))
        assert timing.predict(chosen.numel(), layout.length, 4) <= target + 1e-12  # never over its count


def test_budget_is_full_recompute_when_that_fits_and_then_exact():
    engine = tiny_engine()
    ids = engine.add_chunks(CHUNKS)
    layout = engine.layout(QUESTION, ids)
    full = engine.prefill(layout, FullRecompute())
    hits = engine.store.stats().hits
    ours = engine.prefill(layout, "budget:1000")
    assert torch.equal(ours.logits, full.logits)
    assert ours.stats.tokens_recomputed == layout.length and engine.store.stats().hits == hits  # nothing loaded


def test_a_budget_below_the_reuse_floor_reuses():
    engine = tiny_engine()
    ids = engine.add_chunks(CHUNKS)
    layout = engine.layout(QUESTION, ids)
    out = engine.prefill(layout, "budget:0.000000001")
    assert torch.equal(out.recomputed, layout.computed_positions())


def test_a_multiple_of_the_reuse_floor():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, engine.add_chunks(CHUNKS))
    timing = linear_model(0.0, 0.001, 0.0, 0.0)
    policy = parse_policy("budget:3x").with_timing(timing)
    assert policy.target(layout) == pytest.approx(3 * 0.001 * layout.computed_positions().numel())


def test_the_engine_learns_from_prefills_whose_cost_the_counts_describe():
    engine = tiny_engine()
    layout = engine.layout(QUESTION, engine.add_chunks(CHUNKS))
    for policy in ("reuse", "attnlink:4", "full", CacheBlend(0.3), QueryGuided(4, sinks=1)):
        engine.prefill(layout, policy)
    assert engine.timing.observations == 4  # CacheBlend narrows mid-forward: its counts would mislead


@pytest.mark.parametrize("spec", ["budget:2.5", "budget:3x", "guided:16:4:all", "budget:1.5x+ape:0.9:1"])
def test_new_specs_round_trip(spec):
    assert parse_policy(spec).spec == spec


def test_guided_all_layers_scores_with_every_layer():
    engine = tiny_engine("qwen2")
    layout = engine.layout(QUESTION, engine.add_chunks(CHUNKS))
    every = engine.prefill(layout, "guided:6:2:all")
    listed = engine.prefill(layout, QueryGuided(6, 2, tuple(range(engine.n_layers))))
    assert torch.equal(every.recomputed, listed.recomputed) and torch.equal(every.logits, listed.logits)
