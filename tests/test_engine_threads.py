"""The engine under concurrent callers: its own lock, never held across a yield; APE chosen once;
the memory tier and the chunk registry safe under concurrent readers and writers (tiny models)."""

from __future__ import annotations

import threading

import pytest
import torch

from epic_rag import KVStore
from epic_rag.kv import ChunkKV
from epic_rag.rescale import ATTENTION_NAME
from epic_rag.store import MemoryBackend

from .conftest import tiny_engine

CHUNKS = ["Chunk about apples and pears.", "Chunk about trains.", "Chunk about the sea.", "Chunk about owls."]
QUESTIONS = ["what fruit?", "which vehicle?", "where is water?", "what bird?"]
SPECS = ["attnlink:3", "guided:4+ape:0.8:0.9", "cacheblend:0.3", "reuse+ape:0.5:1"]


def run_threads(targets: list) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread never finished: the engine stayed locked"


def test_an_abandoned_stream_does_not_keep_the_engine_locked():
    engine = tiny_engine()
    alone = engine.generate(QUESTIONS[1], CHUNKS[1:3], max_new_tokens=6).token_ids
    stream = engine.stream(QUESTIONS[0], CHUNKS[:2], max_new_tokens=20, temperature=0.0)
    assert next(iter(stream)) != ""  # the first delta: then its caller walks away mid-answer
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.result
    got: list[list[int]] = []
    run_threads([lambda: got.append(engine.generate(QUESTIONS[1], CHUNKS[1:3], max_new_tokens=6).token_ids)])
    assert got == [alone]
    assert engine.lock.acquire(blocking=False)  # free between tokens, the abandoned stream holds nothing
    engine.lock.release()


def test_an_abandoned_llm_stream_leaves_other_calls_free():
    from epic_rag.integrations.llama_index import EpicLLM

    llm = EpicLLM(tiny_engine(), max_new_tokens=12)
    alone = llm.complete("hello there").text
    abandoned = llm.stream_complete("tell me more")
    assert next(abandoned).delta != ""  # mid-answer; never iterated again, never closed
    got: list[str] = []
    run_threads([lambda: got.append(llm.complete("hello there").text)])
    assert got == [alone]


def test_interleaved_streams_in_threads_answer_exactly_as_alone():
    engine = tiny_engine("qwen2")
    ids = engine.add_chunks(CHUNKS)
    jobs = [(q, [ids[i], ids[(i + 1) % 4]], spec) for i, (q, spec) in enumerate(zip(QUESTIONS, SPECS, strict=True))]
    solo = [engine.generate(q, c, policy=p, max_new_tokens=8).token_ids for q, c, p in jobs]
    out: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(jobs))

    def answer(i: int) -> None:
        q, c, p = jobs[i]
        stream = engine.stream(q, c, policy=p, max_new_tokens=8)
        barrier.wait()  # every stream starts before any finishes: their tokens interleave
        out[i] = stream.finish().token_ids

    run_threads([lambda i=i: answer(i) for i in range(len(jobs))])
    assert [out[i] for i in range(len(jobs))] == solo
    assert engine.model.config._attn_implementation == ATTENTION_NAME  # chosen once at load, never toggled


def test_attention_is_chosen_at_load_and_plain_calls_equal_sdpa():
    engine = tiny_engine()
    assert engine.model.config._attn_implementation == ATTENTION_NAME
    reference = tiny_engine(store=KVStore()).model  # the same seed: the same weights
    reference.config._attn_implementation = "sdpa"
    layout = engine.layout(QUESTIONS[0], CHUNKS)
    with torch.no_grad():
        ours = engine.model(input_ids=layout.ids[None]).logits
        plain = reference(input_ids=layout.ids[None]).logits
    assert torch.equal(ours, plain)


def test_eager_models_keep_their_attention_and_refuse_ape_clearly():
    engine = tiny_engine(attn_implementation="eager")
    assert engine.model.config._attn_implementation == "eager"
    ids = engine.add_chunks(CHUNKS[:2])
    try:
        engine.generate(QUESTIONS[0], ids, policy="attnlink:2+ape", max_new_tokens=2)
    except ValueError as err:
        assert "sdpa" in str(err) and "+ape" in str(err)
    else:
        raise AssertionError("an +ape policy ran on an eager model")


def entry(i: int, n: int = 8) -> ChunkKV:
    g = torch.Generator().manual_seed(i)
    kv = torch.randn(2, 2, n, 4, generator=g)  # [layers, kv_heads, tokens, head_dim]
    return ChunkKV(torch.arange(n) + i, kv, kv.clone())


def test_memory_tier_under_concurrent_readers_and_writers_keeps_its_books():
    size = entry(0).nbytes
    tier = MemoryBackend(budget_bytes=5 * size)
    entries = [entry(i) for i in range(12)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for step in range(400):
                i = (offset + step) % len(entries)
                tier.put(f"k{i}", entries[i], "fp")
                found = tier.get(f"k{(i + 3) % len(entries)}")
                assert found is None or found[0] is entries[(i + 3) % len(entries)]
        except BaseException as err:  # handed to the main thread's assert below
            errors.append(err)

    run_threads([lambda o=o: work(o) for o in range(4)])
    assert errors == []
    stats = tier.stats()
    assert stats.entries == len(list(tier.keys())) <= 5
    assert stats.bytes == stats.entries * size  # the byte count matches what is held
    assert stats.hits + stats.misses == 4 * 400


def test_registry_resolves_ids_from_many_threads_without_the_prompt_builder():
    engine = tiny_engine()
    ids = engine.add_chunks(CHUNKS)
    fresh = tiny_engine(store=engine.store)  # a new process would know the chunks only from the store
    assert not hasattr(fresh.prompt, "remember")  # the registry lives beside the store, not in the prompt
    resolved: list[list[torch.Tensor]] = []

    def resolve() -> None:
        resolved.append([fresh.chunks.resolve(i)[0] for i in ids])

    run_threads([resolve for _ in range(4)])
    expected = [engine.chunk_token_ids(c) for c in CHUNKS]
    assert len(resolved) == 4
    assert all(all(torch.equal(a, b) for a, b in zip(r, expected, strict=True)) for r in resolved)


def test_the_engine_counts_chunks_and_the_prompt_head_apart():
    engine = tiny_engine()
    ids = engine.add_chunks(CHUNKS[:3])
    first = engine.prefill(engine.layout(QUESTIONS[0], ids, system="Be brief."), "attnlink:2").stats
    again = engine.prefill(engine.layout(QUESTIONS[1], ids, system="Be brief."), "attnlink:2").stats
    full = engine.prefill(engine.layout(QUESTIONS[1], ids, system="Be brief."), "full").stats
    assert (first.prefix, first.chunk_hits, first.chunk_misses, first.store_hits, first.store_misses) == (
        "computed",
        3,
        0,
        3,
        1,
    )
    assert (again.prefix, again.chunk_hits, again.chunk_misses) == ("cached", 3, 0)
    assert (full.prefix, full.chunk_hits, full.chunk_misses, full.store_hits) == ("recomputed", 0, 0, 0)
    engine.store.delete(ids[1].removeprefix("kv:"))
    lost = engine.prefill(engine.layout(QUESTIONS[1], ids, system="Be brief."), "reuse").stats
    assert (lost.prefix, lost.chunk_hits, lost.chunk_misses) == ("cached", 2, 1)
