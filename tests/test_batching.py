"""Continuous batching: one batched decode step equals each answer's own step (oracle), and
answers run through the scheduler together are the answers each gets alone (tiny models),
a cancelled one leaving the others as they were; a long prefill is cut in pieces so the
streams beside it keep going (SmolLM2, token timestamps)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from epic_rag.batch_decode import decode_step, rows_per_step
from epic_rag.cache import PositionalKVCache
from epic_rag.forward import Cancelled
from epic_rag.sampling import SamplingParams
from epic_rag.scheduler import Scheduler

from .conftest import CharTokenizer, tiny_engine, tiny_model

CHUNKS = ["Chunk about apples and pears. " * 3, "Chunk about trains and rails. " * 4, "Chunk about the open sea. " * 2]
POLICIES = ["attnlink:3", "full", "reuse+ape:0.6:1.2", "cacheblend:0.3", "guided:4", "attnlink:2+shift", "prefix"]


def copy_cache(cache: PositionalKVCache) -> PositionalKVCache:
    twin = PositionalKVCache(1, 1, 1, 1, cache.keys.dtype)
    twin.keys, twin.values, twin.linked = cache.keys.clone(), cache.values.clone(), cache.linked.clone()
    twin.rescale, twin.shift, twin.length = cache.rescale, cache.shift, cache.length
    return twin


def prefilled(engine, n: int, policies: list[str] = POLICIES):
    """n prompts of different lengths, each prefilled under its own policy (with room to decode)."""
    ids = engine.add_chunks(CHUNKS)
    out = []
    for i in range(n):
        layout = engine.layout(f"question {i}: " + "why " * i, [ids[(i + j) % 3] for j in range(1 + i % 3)])
        out.append(engine.prefill(layout, policies[i % len(policies)], extra_capacity=4))
    return out


def test_a_batched_decode_step_equals_each_answers_own_step(family):
    engine = tiny_engine(family)
    pres = prefilled(engine, 5)
    assert len({p.cache.length for p in pres}) > 1 and any(p.cache.rescale is not None for p in pres)
    tokens = [int(p.logits.argmax()) for p in pres]
    alone = [copy_cache(p.cache) for p in pres]
    together = [copy_cache(p.cache) for p in pres]
    for _ in range(3):  # three steps: each row's logits and written K/V equal its lone step's
        expected = torch.stack([engine.extend(_Prefilled(c), [t])[-1] for c, t in zip(alone, tokens, strict=True)])
        got = decode_step(engine.model, together, tokens)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-5
        for a, b in zip(alone, together, strict=True):
            assert a.length == b.length
            assert (a.keys[:, :, :, : a.length] - b.keys[:, :, :, : b.length]).abs().max() < 1e-5
            assert torch.equal(a.linked, b.linked)
        tokens = [int(row.argmax()) for row in got]


def test_one_row_is_the_lone_step_bit_for_bit():
    engine = tiny_engine("qwen2")
    (pre,) = prefilled(engine, 1)
    token = int(pre.logits.argmax())
    alone, together = copy_cache(pre.cache), copy_cache(pre.cache)
    assert torch.equal(decode_step(engine.model, [together], [token])[0], engine.extend(_Prefilled(alone), [token])[-1])


def test_eager_attention_steps_each_answer_alone():
    from epic_rag import EpicEngine

    engine = EpicEngine(tiny_model("llama", attn_implementation="eager"), CharTokenizer())
    pres = prefilled(engine, 3, ["attnlink:3", "full", "cacheblend:0.3"])  # APE needs the engine's attention
    tokens = [int(p.logits.argmax()) for p in pres]
    expected = [engine.extend(_Prefilled(copy_cache(p.cache)), [t])[-1] for p, t in zip(pres, tokens, strict=True)]
    got = decode_step(engine.model, [copy_cache(p.cache) for p in pres], tokens)
    assert torch.equal(got, torch.stack(expected))


def test_a_full_cache_is_refused_before_any_row_is_written():
    engine = tiny_engine()
    pres = prefilled(engine, 2)
    full = pres[1].cache
    full.length = full.capacity
    with pytest.raises(ValueError, match="overflow the cache"):
        decode_step(engine.model, [pres[0].cache, full], [1, 2])
    with pytest.raises(ValueError, match="2 caches but 1 token ids"):
        decode_step(engine.model, [pres[0].cache, full], [1])


class _Prefilled:
    """What `EpicEngine.extend` reads of a prefill: its cache."""

    def __init__(self, cache: PositionalKVCache) -> None:
        self.cache = cache


# ---- the scheduler ------------------------------------------------------------------------
REQUESTS = [  # (question, chunk indices, policy, max_new_tokens, sampling)
    (f"question {i} about {['fruit', 'trains', 'sea'][i % 3]}?", [i % 3, (i + 1) % 3], POLICIES[i % 7], 4 + 5 * i, {})
    for i in range(7)
] + [("a sampled question?", [2, 0], "attnlink:2", 30, {"temperature": 0.8, "top_p": 0.9, "seed": 7})]


def run_all(engine, ids, streamed: bool) -> list:
    """Every request on its own thread at once; streamed ones consumed delta by delta."""
    out: list = [None] * len(REQUESTS)

    def one(i: int) -> None:
        question, chunks, policy, n, sampling = REQUESTS[i]
        stream = engine.stream(question, [ids[c] for c in chunks], policy=policy, max_new_tokens=n, **sampling)
        text = "".join(stream) if streamed or i % 2 else stream.finish().text
        out[i] = (text, stream.result.token_ids, stream.result.finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.mark.parametrize("max_batch", [3, 8])
def test_answers_decoded_together_are_the_answers_alone(max_batch):
    engine = tiny_engine("qwen2")
    ids = engine.add_chunks(CHUNKS)
    alone = run_all(engine, ids, streamed=True)  # no scheduler yet: each answer alone, under the engine lock
    assert len({len(a[1]) for a in alone}) > 3  # answers of many lengths
    scheduler = engine.start_batching(max_batch=max_batch, piece_s=0.001)
    try:
        together = run_all(engine, ids, streamed=False)
        assert together == alone
        assert scheduler.steps > 0 and scheduler.tokens_stepped > scheduler.steps  # steps really ran several answers
        assert scheduler.batch_size == 0 and scheduler.kv_bytes_in_flight == 0  # every answer left
    finally:
        engine.stop_batching()
    assert engine.scheduler is None and engine.generate(*_args(ids, 0)).token_ids == alone[0][1]


def _args(ids, i: int) -> tuple:
    question, chunks, policy, n, _ = REQUESTS[i]
    return question, [ids[c] for c in chunks], None, policy


def test_step_sizes_follow_the_measured_costs():
    # this machine's step costs for 1..8 answers (bench decode-batch, 5 and 7 interpolated)
    assert rows_per_step([89, 100, 112, 206, 219, 232, 252, 273]) == [0, 1, 2, 3, 3, 3, 3, 7, 8]
    assert rows_per_step([10.0] * 4) == [0, 1, 2, 3, 4]  # a GPU: every answer in every step
    engine = tiny_engine("qwen2")
    start = time.perf_counter()
    scheduler = engine.start_batching(max_batch=3)
    took_ms = 1000 * (time.perf_counter() - start)
    try:
        assert len(scheduler.step_ms) == 3
        assert 3 * sum(scheduler.step_ms) <= took_ms  # each size's fastest of its 3 timed steps, all within the start
        assert scheduler.step_rows == rows_per_step(scheduler.step_ms)
    finally:
        engine.stop_batching()


def test_answers_taking_turns_are_the_answers_alone():
    """Costs where 2 answers step faster than 3 or 4: each step runs 2 of the 4 in flight, in
    turn, and every answer is still the one it is alone."""
    engine = tiny_engine("qwen2")
    ids = engine.add_chunks(CHUNKS)
    requests = [(f"turn {i}?", [ids[i % 3]], 20 + 3 * i) for i in range(4)]
    alone = [engine.generate(q, c, policy="attnlink:3", max_new_tokens=n).token_ids for q, c, n in requests]
    engine.scheduler = Scheduler(engine.model, engine.lock, engine.stop_token_ids, 4, 0.001, [1.0, 1.0, 10.0, 10.0])
    try:
        together: list = [None] * 4

        def one(i: int) -> None:
            question, chunks, n = requests[i]
            together[i] = engine.generate(question, chunks, policy="attnlink:3", max_new_tokens=n).token_ids

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert together == alone
        scheduler = engine.scheduler
        assert scheduler.step_rows == [0, 1, 2, 2, 2]
        assert scheduler.tokens_stepped <= 2 * scheduler.steps  # no step ran more than 2
        assert scheduler.tokens_stepped > scheduler.steps  # and steps ran 2 at a time
    finally:
        engine.stop_batching()


def test_a_cancelled_answer_leaves_the_others_unchanged():
    engine = tiny_engine("llama")
    ids = engine.add_chunks(CHUNKS)
    alone = [engine.generate(*_args(ids, i), max_new_tokens=40).token_ids for i in range(3)]
    engine.start_batching(max_batch=4, piece_s=0.001)
    try:
        cancel = threading.Event()
        victim = engine.stream_layout(engine.layout("a long one?", [ids[1]]), "attnlink:3", cancel, max_new_tokens=200)
        deltas = iter(victim)
        next(deltas)  # decoding in the batch now
        results: list = [None] * 3

        def one(i: int) -> None:
            results[i] = engine.generate(*_args(ids, i), max_new_tokens=40).token_ids

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        cancel.set()
        with pytest.raises(Cancelled):
            for _ in deltas:
                pass
        for t in threads:
            t.join(timeout=60)
        assert results == alone
        assert engine.scheduler.batch_size == 0
    finally:
        engine.stop_batching()


def test_a_reader_that_stops_leaves_the_batch_and_errors_reach_their_reader():
    engine = tiny_engine("mistral")
    ids = engine.add_chunks(CHUNKS)
    alone = engine.generate("next?", [ids[1]], max_new_tokens=5).token_ids
    scheduler = engine.start_batching(max_batch=2, piece_s=0.001)
    try:
        stream = engine.stream("keep going?", [ids[0]], policy="attnlink:3", max_new_tokens=500)
        next(iter(stream))
        stream.close()  # its reader walks away mid-answer
        assert engine.generate("next?", [ids[1]], max_new_tokens=5).token_ids == alone  # the batch is free
        assert scheduler.batch_size == 0
        too_long = "x" * engine.max_context
        with pytest.raises(ValueError, match="exceeds the model's context"):
            engine.generate(too_long, [ids[0]])
    finally:
        engine.stop_batching()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(scheduler.answer(lambda: None, SamplingParams(), None, 0))


@pytest.mark.slow
def test_a_long_prefill_does_not_stall_the_streams_beside_it(smollm2):
    """While a long full prefill runs, the answer streaming beside it gets a token at least about
    every piece (plus the layer it ends in and one step), not once the prefill is over."""
    piece_s = 0.15
    long_text = " ".join(f"Line {i}: the harbour logs {i * 7} boats and {i % 13} storms." for i in range(LOG_LINES))
    smollm2.start_batching(max_batch=4, piece_s=piece_s)
    try:
        streaming = iter(smollm2.stream("Count from 1 to 200, one number per line.", [], max_new_tokens=600))
        next(streaming)
        window: list[float] = []
        box: list = []

        def long_prefill() -> None:
            window.append(time.perf_counter())
            box.append(smollm2.generate("What do the logs say?", [long_text], policy="full", max_new_tokens=1))
            window.append(time.perf_counter())

        thread = threading.Thread(target=long_prefill)
        thread.start()
        stamps = []
        for _ in streaming:
            stamps.append(time.perf_counter())
            if len(window) == 2:
                break
        thread.join(timeout=120)
        assert len(window) == 2, "the stream ended before the long prefill did"
    finally:
        smollm2.stop_batching()
    (long,) = box
    start, end = window
    times = [start, *(t for t in stamps if start < t < end), end]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    layer_s = (long.stats.recompute_s - long.stats.paused_s) / smollm2.n_layers
    bound = 2 * (piece_s + layer_s) + 0.5  # generous: a piece, the layer it ends in, one step, a busy machine
    assert long.stats.tokens_recomputed > 2000 and long.stats.paused_s > 0
    assert long.ttft_s > 3 * bound  # long enough to stall a stream several times over
    assert len(times) > 6 and max(gaps) < bound, (max(gaps), bound, long.ttft_s)


LOG_LINES = 150
