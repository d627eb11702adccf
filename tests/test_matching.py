"""Finding handed chunks in a prompt with SmolLM2's real tokenizer (whose merges across a chunk's
end are what matching handles), and the postprocessor's order and keys (tiny model, no LlamaIndex run)."""

from __future__ import annotations

import pytest
import torch
from epic_rag.integrations.llama_index import EpicKVPostprocessor, current_handoff
from epic_rag.integrations.llama_index.handoff import KV_KEY, set_handoff
from epic_rag.integrations.llama_index.matching import Plan, plan_layout
from epic_rag.integrations.llama_index.precompute import EpicKVPrecompute
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from epic_rag import EpicEngine
from epic_rag.layout import Kind, Segment
from epic_rag.model import load_tokenizer

from .conftest import SMOLLM2, tiny_engine, tiny_model

CHUNKS = [
    "Rivers run to the sea and carry sand with them all the way down.",
    'The guide shouted "Mountains rise slowly, pushed up by plates that collide for ages!',
    "Lakes freeze from the top, so fish live on below the ice all winter",
]
TAIL = "---\nQuestion: what freezes?\nAnswer: "


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's own tokenizer (offline, no weights)."""
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(vocab_size=len(tokenizer))


@pytest.fixture
def engine(model, tokenizer) -> EpicEngine:
    """A tiny random model over the real tokenizer, with an empty store."""
    return EpicEngine(model, tokenizer)


def chunk_segments(plan: Plan) -> list[Segment]:
    return [s for s in plan.layout.segments if s.kind is Kind.CHUNK]


def pieces(engine: EpicEngine, ids: torch.Tensor) -> list[str]:
    return [engine.tokenizer.decode([i]) for i in ids.tolist()]


def test_merges_across_a_chunks_end_link_all_but_the_merged_tokens(engine):
    # "\n\n" before text splits in two "\n" tokens; '!' and '"' merge into '!"'; "." after "winter"
    prompt = "Context:\n" + CHUNKS[0] + "\n\n" + CHUNKS[1] + '"\n' + CHUNKS[2] + ".\n" + TAIL
    plan = plan_layout(engine, prompt, CHUNKS, add_special_tokens=False)
    assert (plan.chunks_handed, plan.chunks_matched) == (3, 3)
    assert torch.equal(plan.layout.ids, engine.tokenize(prompt))  # exactly the prompt's own tokens
    entries = [engine.chunk_token_ids(c) for c in CHUNKS]
    assert [pieces(engine, e[-2:]) for e in entries] == [[".", "\n\n"], ["!", "\n\n"], [" winter", "\n\n"]]
    kept = [len(entries[0]) - 1, len(entries[1]) - 2, len(entries[2]) - 1]  # '!' went into the prompt's '!"'
    segments = chunk_segments(plan)
    for seg, entry, n in zip(segments, entries, kept, strict=True):
        assert torch.equal(seg.token_ids, entry[:n]) and torch.equal(seg.source_ids, entry)
        assert seg.key == engine.key_of(entry)  # the whole entry is what the store holds
    assert [engine.tokenizer.decode(s.token_ids) for s in segments] == [CHUNKS[0], CHUNKS[1][:-1], CHUNKS[2]]
    between = [pieces(engine, s.token_ids) for s in plan.layout.segments if s.kind is not Kind.CHUNK]
    rest = pieces(engine, engine.tokenize(".\n" + TAIL))
    assert between == [["Context", ":", "\n"], ["\n", "\n"], ['!"', "\n"], rest] and rest[:2] == [".", "\n"]


def test_a_truncated_chunk_links_its_leading_part(engine):
    cut = CHUNKS[1][: CHUNKS[1].index("ages") + 1]  # the synthesizer cut inside a word: "... for a"
    prompt = "Context:\n" + CHUNKS[0] + "\n\n" + cut + "\n" + TAIL
    plan = plan_layout(engine, prompt, CHUNKS[:2], add_special_tokens=False)
    assert plan.chunks_matched == 2
    seg = chunk_segments(plan)[1]
    entry = engine.chunk_token_ids(CHUNKS[1])
    assert (
        engine.tokenizer.decode(seg.token_ids)
        == 'The guide shouted "Mountains rise slowly, pushed up by plates that collide for'
    )
    assert torch.equal(seg.token_ids, entry[: seg.token_ids.numel()]) and torch.equal(seg.source_ids, entry)
    assert pieces(engine, plan.layout.ids[seg.end : seg.end + 2]) == [" a", "\n"]  # the cut word is computed
    assert seg.key == engine.key_of(entry)
    result = engine.prefill(plan.layout, "reuse")  # the missing entry is compiled whole, then its head linked
    assert result.stats.store_misses == 3  # the prompt head and both chunks
    assert torch.equal(engine.store.get(seg.key).token_ids, entry)


def test_a_short_remnant_of_a_chunk_is_not_linked(engine):
    cut = CHUNKS[1][:60]  # fewer than the 64 characters that locate a truncated chunk
    prompt = "Context:\n" + CHUNKS[0] + "\n\n" + cut + "\n" + TAIL
    plan = plan_layout(engine, prompt, CHUNKS[:2], add_special_tokens=False)
    assert [s.key for s in chunk_segments(plan)] == [engine.key_of(engine.chunk_token_ids(CHUNKS[0]))]
    assert engine.tokenizer.decode(plan.layout.segments[-1].token_ids) == "\n\n" + cut + "\n" + TAIL


def test_a_chunk_not_in_the_prompt_is_unmatched_not_guessed(engine):
    other = "A chunk the synthesizer dropped, which the prompt does not hold at all."
    prompt = "Context:\n" + CHUNKS[0] + "\n\n" + CHUNKS[2] + "\n\n" + TAIL
    plan = plan_layout(engine, prompt, [CHUNKS[0], other, CHUNKS[2]], False)
    assert (plan.chunks_handed, plan.chunks_matched) == (3, 2)
    assert [s.key for s in chunk_segments(plan)] == [engine.key_of(engine.chunk_token_ids(c)) for c in CHUNKS[::2]]


def test_a_key_noted_in_this_process_is_trusted_without_tokenizing(engine):
    [chunk_id] = engine.add_chunks([CHUNKS[0]])
    key = chunk_id.removeprefix("kv:")
    # the ids noted under the key come back even for a text that tokenizes otherwise: it was not tokenized
    ids, found = engine.known_chunk(CHUNKS[2], key)
    assert found == key and torch.equal(ids, engine.chunk_token_ids(CHUNKS[0]))
    ids, found = engine.known_chunk(CHUNKS[2])  # no key: tokenized, under its own key
    assert torch.equal(ids, engine.chunk_token_ids(CHUNKS[2])) and found == engine.key_of(ids)


def nodes() -> list[NodeWithScore]:
    """Three nodes of two documents, retrieved out of document order."""
    specs = [("doc-b", 0, CHUNKS[1], 0.5), ("doc-a", 90, CHUNKS[2], 0.9), ("doc-a", 0, CHUNKS[0], 0.7)]
    out = []
    for doc, start, text, score in specs:
        node = TextNode(text=text, start_char_idx=start, end_char_idx=start + len(text))
        node.relationships = {"1": RelatedNodeInfo(node_id=doc)}  # "1" is NodeRelationship.SOURCE
        out.append(NodeWithScore(node=node, score=score))
    return out


@pytest.mark.parametrize(
    "order, expected",
    [("retrieval", [1, 2, 0]), ("score", [2, 0, 1]), ("document", [1, 0, 2])],
)
def test_postprocessor_orders_and_hands_over_texts_and_keys(order, expected):
    engine = tiny_engine()
    set_handoff(None)
    out = EpicKVPostprocessor(engine, order=order).postprocess_nodes(nodes(), QueryBundle("what freezes?"))
    assert [n.node.get_content() for n in out] == [CHUNKS[i] for i in expected]
    handoff = current_handoff()
    assert handoff.chunks == [CHUNKS[i] for i in expected] and handoff.query == "what freezes?"
    assert handoff.keys == [engine.key_of(engine.chunk_token_ids(CHUNKS[i])) for i in expected]
    assert engine.store.stats().hits + engine.store.stats().misses == 0  # it loads no KV


def test_precompute_records_hidden_keys():
    engine = tiny_engine()
    batch = [TextNode(text=t, metadata={"file_name": f"f{i}.md"}) for i, t in enumerate(CHUNKS)]
    texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in batch]
    EpicKVPrecompute(engine, show_progress=False)(batch)
    for node, text in zip(batch, texts, strict=True):
        assert node.get_content(metadata_mode=MetadataMode.LLM) == text  # the key does not reach the prompt
        assert KV_KEY not in node.get_content(metadata_mode=MetadataMode.EMBED)
        ids = engine.chunk_token_ids(text)
        assert node.metadata[KV_KEY] == engine.key_of(ids)
        assert torch.equal(engine.store.get(node.metadata[KV_KEY]).token_ids, ids)
