"""Generation, streaming, chunk ids and input errors (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from epic_rag import AttnLink, EpicEngine, FullRecompute, KVStore, UnknownChunkError, parse_policy
from epic_rag.policies import FullReuse

from .conftest import CharTokenizer, tiny_engine

CHUNKS = ["Chunk about apples and pears.", "Chunk about trains.", "Chunk about the sea."]


def test_greedy_is_deterministic_and_matches_full_prefill_logits():
    engine = tiny_engine()
    a = engine.generate("what?", CHUNKS, policy=FullRecompute(), max_new_tokens=6)
    b = engine.generate("what?", CHUNKS, policy=FullRecompute(), max_new_tokens=6)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6 and a.finish_reason == "length"
    layout = engine.layout("what?", CHUNKS)
    with torch.no_grad():
        first = int(engine.model(input_ids=layout.ids[None]).logits[0, -1].argmax())
    assert a.token_ids[0] == first


def test_decoding_matches_hf_greedy_continuation():
    engine = tiny_engine()
    layout = engine.layout("what?", CHUNKS)
    ours = engine.generate_layout(layout, FullRecompute(), max_new_tokens=8).token_ids
    with torch.no_grad():
        ids = layout.ids[None]
        for _ in range(8):
            ids = torch.cat([ids, engine.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = ids[0, layout.length :].tolist()
    assert ours and ours == expected[: len(ours)]
    assert len(ours) == 8 or expected[len(ours)] in engine.stop_token_ids  # stopped only at an end token


def test_sampling_is_seeded():
    engine = tiny_engine()
    kw = {"max_new_tokens": 10, "temperature": 1.5, "top_p": 0.9}
    a = engine.generate("q", CHUNKS, seed=3, **kw).token_ids
    assert a == engine.generate("q", CHUNKS, seed=3, **kw).token_ids
    others = {tuple(engine.generate("q", CHUNKS, seed=s, **kw).token_ids) for s in range(4, 9)}
    assert len(others | {tuple(a)}) > 1


def test_min_new_tokens_holds_back_the_end_tokens():
    from epic_rag.decode import TokenSampler
    from epic_rag.sampling import SamplingParams

    logits = torch.tensor([0.0, 5.0, 1.0, 4.0])  # the end tokens 1 and 3 are the likeliest
    choose = TokenSampler(SamplingParams(max_new_tokens=4, min_new_tokens=2), {1, 3})
    assert [choose(logits) for _ in range(3)] == [2, 2, 1]
    assert logits.tolist() == [0.0, 5.0, 1.0, 4.0]  # the caller's logits are left as they were
    with pytest.raises(ValueError, match="min_new_tokens must be from 0 to max_new_tokens \\(2\\), got 3"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3)


def test_stream_deltas_join_to_text_and_stop_strings_cut():
    engine = tiny_engine()
    full = engine.generate("q", CHUNKS, max_new_tokens=12)
    stream = engine.stream("q", CHUNKS, max_new_tokens=12)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == full.text
    stop = full.text[4:6]
    cut = engine.generate("q", CHUNKS, max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert stop not in "".join(engine.stream("q", CHUNKS, max_new_tokens=12, stop=stop))


def test_stats_count_tokens_and_every_computed_entry_as_a_miss():
    engine = tiny_engine()
    layout = engine.layout("q", CHUNKS)
    first = engine.generate("q", CHUNKS, policy=AttnLink(4), max_new_tokens=2).stats
    # no system prompt: the first chunk starts right after the bos prefix, so every chunk is displaced
    recomputed = 4 * len(CHUNKS) + layout.question.token_ids.numel()
    assert (first.tokens_recomputed, first.tokens_reused) == (recomputed, layout.length - recomputed)
    assert (first.store_hits, first.store_misses) == (0, 4)  # bos prefix + 3 chunks, first seen
    assert first.compile_s > 0 and first.ttft_s >= first.kv_load_s + first.compile_s + first.link_s
    again = engine.generate("q", CHUNKS, policy=AttnLink(4), max_new_tokens=2).stats
    assert (again.store_hits, again.store_misses, again.compile_s) == (4, 0, 0.0)
    assert engine.store.delete(layout.chunks[1].key)  # evicted: computed again, so a miss
    evicted = engine.generate("q", CHUNKS, policy=AttnLink(4), max_new_tokens=2).stats
    assert (evicted.store_hits, evicted.store_misses) == (3, 1)


def test_chunk_ids_from_add_chunks(tmp_path):
    engine = tiny_engine(store=KVStore(tmp_path))
    ids = engine.add_chunks(CHUNKS)
    assert ids == [f"kv:{engine.key_of(engine.chunk_token_ids(c))}" for c in CHUNKS]  # the store keys
    by_id = engine.generate("q", ids[::-1], policy=FullReuse(), max_new_tokens=3)
    by_text = engine.generate("q", CHUNKS[::-1], policy=FullReuse(), max_new_tokens=3)
    assert by_id.token_ids == by_text.token_ids and by_id.stats.store_misses == 1  # only the prefix
    reopened = tiny_engine(store=KVStore(tmp_path))  # a new process: ids resolve through the store
    assert reopened.generate("q", ids[::-1], policy=FullReuse(), max_new_tokens=3).token_ids == by_id.token_ids
    with pytest.raises(UnknownChunkError, match="unknown chunk"):
        engine.generate("q", ["kv:" + "0" * 64], max_new_tokens=1)


def test_bad_input_errors():
    engine = tiny_engine(max_position_embeddings=64)
    with pytest.raises(ValueError, match="empty chunk"):
        engine.generate("q", ["fine", "  "])
    with pytest.raises(ValueError, match="question is empty"):
        engine.generate("", CHUNKS)
    with pytest.raises(ValueError, match=r"exceeds the model's context of 64 tokens"):
        engine.generate("q", CHUNKS, max_new_tokens=16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate("q", CHUNKS[:1], max_new_tokens=0)


def test_no_chat_template_and_no_bos_layout():
    engine = tiny_engine(bos=False)
    layout = engine.layout("q", CHUNKS, system="sys")
    assert [s.kind.value for s in layout.segments] == ["prefix", "chunk", "chunk", "chunk", "question"]
    assert layout.chunks[0].start == layout.prefix.end


def test_extend_scores_a_continuation_like_decoding():
    engine = tiny_engine()
    layout = engine.layout("what?", CHUNKS)
    out = engine.generate_layout(layout, FullRecompute(), max_new_tokens=5)
    pre = engine.prefill(layout, FullRecompute(), extra_capacity=5)
    logits = engine.extend(pre, out.token_ids[:-1])  # teacher forcing the greedy answer
    assert logits.argmax(-1).tolist() == out.token_ids[1:]
    with torch.no_grad():
        ids = torch.cat([layout.ids, torch.tensor(out.token_ids[:-1])])[None]
        reference = engine.model(input_ids=ids).logits[0, layout.length - 1 :]
    assert (torch.cat([pre.logits[None], logits]) - reference).abs().max() < 1e-4
    again = engine.extend(pre, out.token_ids[:2], at=layout.length)  # branch again from the prompt
    assert torch.allclose(again, logits[:2], atol=1e-5)
    with pytest.raises(ValueError, match="cannot extend"):
        engine.extend(pre, [5], at=layout.length + 50)


def test_the_default_policy_answers_calls_that_name_none():
    from epic_rag import DEFAULT_POLICY
    from epic_rag.offline import OFFLINE_MODELS, builtin_policy

    assert tiny_engine().generate("q", CHUNKS, max_new_tokens=1).stats.policy == DEFAULT_POLICY
    engine = EpicEngine(tiny_engine().model, CharTokenizer(), default_policy="reuse")
    assert engine.generate("q", CHUNKS, max_new_tokens=1).stats.policy == "reuse"
    assert engine.prefill(engine.layout("q", CHUNKS), "full").stats.policy == "full"  # a named one wins
    for name, entry in OFFLINE_MODELS.items():
        assert builtin_policy(name) == entry.policy and parse_policy(entry.policy).spec == entry.policy
    assert builtin_policy("some/hub-model") is None


def test_a_long_prefill_shows_progress_over_the_layers(capsys):
    engine = tiny_engine("llama")
    layout = engine.layout("what is here?", ["The first chunk talks about rivers."])
    engine.prefill(layout, "full")
    assert "prefill of" not in capsys.readouterr().err  # no bar unless asked for
    engine.progress_tokens = layout.length
    engine.prefill(layout, "full")
    err = capsys.readouterr().err
    assert f"prefill of {layout.length} tokens" in err and f"{engine.n_layers}/{engine.n_layers}" in err


def test_a_cancelled_prefill_stops_before_its_next_layer():
    """What frees a server's slot within one layer: the event set while layer 0 runs, and layer 1
    never starts; the stream raises `Cancelled` and nothing half-computed is stored."""
    import threading

    from epic_rag.forward import Cancelled

    engine = tiny_engine()
    cancel, ran = threading.Event(), []
    layers = engine.model.model.layers
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: (ran.append(i), cancel.set())) for i, layer in enumerate(layers)
    ]
    try:
        stream = engine.stream_layout(
            engine.layout("why?", ["a chunk of text"]), "full", cancel=cancel, max_new_tokens=4
        )
        with pytest.raises(Cancelled, match=f"cancelled before layer 1 of {len(layers)}"):
            next(iter(stream))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0] and not list(engine.store.keys())
    layout = engine.layout("why?", ["a chunk of text"])  # the engine answers on, exactly as a fresh one does
    assert torch.equal(engine.prefill(layout, "full").logits, tiny_engine().prefill(layout, "full").logits)
