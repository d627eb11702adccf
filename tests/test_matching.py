"""Finding handed chunks in a prompt, and the postprocessor's order and keys (tiny model, no LlamaIndex run)."""

from __future__ import annotations

import pytest
import torch
from epic_rag.integrations.llama_index import EpicKVPostprocessor, current_handoff
from epic_rag.integrations.llama_index.handoff import KV_KEY, set_handoff
from epic_rag.integrations.llama_index.matching import plan_layout
from epic_rag.integrations.llama_index.precompute import EpicKVPrecompute
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from epic_rag.layout import Kind

from .conftest import tiny_engine

CHUNKS = [
    "Rivers run to the sea and carry sand with them all the way down.",
    "Mountains rise slowly, pushed up by plates that collide for ages, and wear down again in wind and rain.",
    "Lakes freeze from the top, so fish live on below the ice all winter.",
]


def prompt_of(*parts: str) -> str:
    return "Context:\n" + "".join(parts) + "---\nQuestion: what freezes?\nAnswer: "


def chunk_segments(plan):
    return [s for s in plan.layout.segments if s.kind is Kind.CHUNK]


def test_whole_chunks_are_linked_with_their_keys():
    engine = tiny_engine(bos=False)
    prompt = prompt_of(*(c + "\n\n" for c in CHUNKS))
    plan = plan_layout(engine, prompt, CHUNKS, add_special_tokens=False)
    assert (plan.chunks_handed, plan.chunks_matched) == (3, 3)
    for seg, text in zip(chunk_segments(plan), CHUNKS, strict=True):
        ids = engine.chunk_token_ids(text)
        assert torch.equal(seg.token_ids, ids) and seg.key == engine.key_of(ids)
    assert torch.equal(plan.layout.ids, engine.tokenize(prompt))  # exactly the prompt's own tokens


def test_a_truncated_chunk_links_its_leading_part():
    engine = tiny_engine(bos=False)
    cut = CHUNKS[1][:80]  # more than the 64 characters that locate a truncated chunk
    plan = plan_layout(engine, prompt_of(CHUNKS[0] + "\n\n", cut + "\n"), CHUNKS[:2], add_special_tokens=False)
    assert plan.chunks_matched == 2
    seg = chunk_segments(plan)[1]
    entry = engine.chunk_token_ids(CHUNKS[1])
    assert torch.equal(seg.token_ids, entry[:80]) and torch.equal(seg.source_ids, entry)
    assert seg.key == engine.key_of(entry)
    result = engine.prefill(plan.layout, "reuse")  # the missing entry is compiled whole, then its head linked
    assert result.stats.store_misses == 3 and engine.store.get(seg.key) is not None


def test_a_chunk_not_in_the_prompt_is_unmatched_not_guessed():
    engine = tiny_engine(bos=False)
    other = "A chunk the synthesizer dropped, which the prompt does not hold at all."
    plan = plan_layout(engine, prompt_of(CHUNKS[0] + "\n\n", CHUNKS[2] + "\n\n"), [CHUNKS[0], other, CHUNKS[2]], False)
    assert (plan.chunks_handed, plan.chunks_matched) == (3, 2)
    assert [s.key for s in chunk_segments(plan)] == [engine.key_of(engine.chunk_token_ids(c)) for c in CHUNKS[::2]]


def test_keys_from_node_metadata_are_used_without_tokenizing_again():
    engine = tiny_engine(bos=False)
    [chunk_id] = engine.add_chunks([CHUNKS[0]])
    key = chunk_id.removeprefix("kv:")
    calls = []
    tokenize = engine.prompt.tokenize
    engine.prompt.tokenize = lambda text: calls.append(text) or tokenize(text)
    ids, found = engine.prompt.known_chunk(CHUNKS[0], key)
    assert found == key and calls == [] and torch.equal(ids, engine.chunk_token_ids(CHUNKS[0]))


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
        assert engine.store.get(node.metadata[KV_KEY]) is not None
        assert node.metadata[KV_KEY] == engine.key_of(engine.chunk_token_ids(text))
