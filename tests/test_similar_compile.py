"""Similar-chunk compile: a chunk compiled after the linked KV of the chunks most like it."""

from __future__ import annotations

import pytest
import torch

from epic_rag import FullRecompute, FullReuse, KVStore, rotate_keys
from epic_rag.compile import nearest_neighbours
from epic_rag.compile_spec import CompileMode
from epic_rag.kv import CompileContext
from epic_rag.layout import PromptLayout
from epic_rag.policies import RecomputePolicy
from epic_rag.store.codec import DamagedEntry, decode, encode

from .conftest import SAMPLE_DOCS, SMOLLM2, smollm2_over, tiny_engine

BUOY = "The Skylark buoy is sold by Tern Marine."
WARRANTY = "It carries a three year warranty on the hull."
PRICE = "A Skylark costs 14,500 euros before tax."
QUESTION = "How long is the warranty?"


class LastChunkAndQuestion(RecomputePolicy):
    """Recomputes the last chunk and the question over the linked rest: how a query sees it."""

    def select(self, layout: PromptLayout) -> torch.Tensor:
        last = layout.chunks[-1]
        return torch.cat([torch.arange(last.start, last.end), layout.computed_positions()])

    @property
    def spec(self) -> str:
        return "last-chunk"


def test_after_one_similar_chunk_at_position_0_reuse_equals_full_prefill(family):
    """No prompt head and one similar chunk at 0, where its alone-KV is exact: the chunk's entry
    then holds what a full prefill of the two computes, and reuse of the pair is exact."""
    engine = tiny_engine(family, bos=False)
    buoy, warranty = engine.add_chunks([BUOY, WARRANTY], link_after=[[WARRANTY], [BUOY]])
    layout = engine.layout(QUESTION, [engine.add_chunks([BUOY])[0], warranty])
    reuse = engine.prefill(layout, FullReuse()).logits
    assert (reuse - engine.prefill(layout, FullRecompute()).logits).abs().max() < 1e-4
    plain = engine.layout(QUESTION, [BUOY, WARRANTY])
    assert (engine.prefill(plain, FullReuse()).logits - reuse).abs().max() > 1e-4
    assert buoy != engine.add_chunks([BUOY])[0]  # compiled after WARRANTY: its own entry


def test_entry_equals_the_chunk_recomputed_behind_its_linked_context(family):
    """With a head and two similar chunks linked where a query would put them, the chunk's K/V
    recomputed over them equal the entry rotated to that place."""
    engine = tiny_engine(family)
    (entry_id,) = engine.add_chunks([WARRANTY], link_after=[[PRICE, BUOY]])
    layout = engine.layout(QUESTION, [PRICE, BUOY, WARRANTY])
    cache = engine.prefill(layout, LastChunkAndQuestion()).cache
    last = layout.chunks[-1]
    entry = engine.store.get(entry_id[3:])
    keys = rotate_keys(entry.keys, engine.rotary.inv_freq, last.start)
    assert torch.allclose(keys, cache.keys[:, 0, :, last.start : last.end], atol=1e-5)
    assert torch.allclose(entry.values, cache.values[:, 0, :, last.start : last.end], atol=1e-5)
    head, price, buoy = (engine.prompt.head_ids(), engine.chunk_token_ids(PRICE), engine.chunk_token_ids(BUOY))
    assert entry.context_spans.tolist() == [head.numel(), price.numel(), buoy.numel()]
    assert torch.equal(entry.context_ids, torch.cat([head, price, buoy]))


def test_linked_and_computed_contexts_of_the_same_ids_are_different_entries(tmp_path):
    engine = tiny_engine("qwen2", store=KVStore(tmp_path))
    (linked,) = engine.add_chunks([WARRANTY], link_after=[[BUOY]])
    context = engine.store.get(linked[3:]).context
    assert context.linked
    computed_key = engine.key_of(engine.chunk_token_ids(WARRANTY), CompileContext(context.ids))
    assert computed_key != linked[3:]
    entry = tiny_engine("qwen2", store=KVStore(tmp_path)).store.get(linked[3:])  # from disk, checked
    assert torch.equal(entry.context_spans, context.spans)
    with pytest.raises(DamagedEntry, match="does not match its key"):
        decode(encode(entry, engine.fingerprint), key=computed_key)


def test_a_lost_similar_entry_is_compiled_again_behind_the_same_linked_context():
    engine = tiny_engine("llama")
    (warranty,) = engine.add_chunks([WARRANTY], link_after=[[PRICE, BUOY]])
    kept = engine.store.get(warranty[3:]).values.clone()
    engine.store.delete(warranty[3:])
    result = engine.prefill(engine.layout(QUESTION, [warranty]), "attnlink:2")
    assert result.stats.chunk_misses == 1
    assert torch.equal(engine.store.get(warranty[3:]).values, kept)


def test_contexts_must_be_one_per_chunk_and_of_one_kind():
    engine = tiny_engine("llama")
    with pytest.raises(ValueError, match="one per chunk"):
        engine.add_chunks([BUOY, WARRANTY], link_after=[[PRICE]])
    with pytest.raises(ValueError, match="not both"):
        engine.add_chunks([BUOY], after=[PRICE], link_after=[[PRICE]])


def test_nearest_neighbours_exclude_the_chunk_and_end_with_the_nearest():
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.4]])
    assert nearest_neighbours(vectors, 2) == [[3, 1], [3, 0], [1, 3], [0, 1]]
    assert nearest_neighbours(vectors, 10)[2] == [0, 1, 3]  # capped at the other chunks
    assert nearest_neighbours(vectors[:1], 3) == [[]]
    with pytest.raises(ValueError, match="at least 1"):
        nearest_neighbours(vectors, 0)


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ("alone", ("alone", 0)),
        ("neighbour", ("neighbour", 0)),
        ("similar", ("similar", 5)),
        ("similar:2", ("similar", 2)),
    ],
)
def test_compile_modes_parse_and_print_back(spec, mode):
    parsed = CompileMode.parse(spec)
    assert tuple(parsed) == mode and CompileMode.parse(str(parsed)) == parsed


@pytest.mark.parametrize("spec", ["similar:0", "similar:x", "neighbour:2", "nearby"])
def test_bad_compile_modes_name_the_fix(spec):
    with pytest.raises(ValueError, match="similar"):
        CompileMode.parse(spec)


def test_the_indexing_hook_compiles_after_similar_nodes_and_a_new_process_finds_them():
    from epic_rag.integrations.llama_index import EpicKVPrecompute
    from epic_rag.integrations.llama_index.handoff import CONTEXT_KEY, KV_KEY
    from llama_index.core.schema import TextNode

    store = KVStore()
    engine = tiny_engine("qwen2", store=store)
    texts = [BUOY, WARRANTY, PRICE]
    nodes = [TextNode(text=t, embedding=v) for t, v in zip(texts, ([1.0, 0.0], [0.8, 0.6], [0.0, 1.0]), strict=True)]
    EpicKVPrecompute(engine, context="similar", n=1, show_progress=False)(nodes)
    assert [n.metadata[CONTEXT_KEY] for n in nodes] == [nodes[1].node_id, nodes[0].node_id, nodes[1].node_id]
    ids = [engine.chunk_token_ids(t) for t in texts]
    head = engine.prompt.head_ids()
    spans = torch.tensor([head.numel(), ids[0].numel()])
    assert nodes[1].metadata[KV_KEY] == engine.key_of(ids[1], CompileContext(torch.cat([head, ids[0]]), spans))
    for node in nodes:
        assert CONTEXT_KEY in node.excluded_llm_metadata_keys and CONTEXT_KEY in node.excluded_embed_metadata_keys

    later = tiny_engine("qwen2", store=store)  # another process: nothing remembered, same store
    found_ids, key = later.known_chunk(WARRANTY, nodes[1].metadata[KV_KEY])
    assert key == nodes[1].metadata[KV_KEY] and torch.equal(found_ids, ids[1])
    assert later.chunks.context_of(key).linked


@pytest.mark.slow
def test_build_index_similar_compile_embeds_once_and_records_the_mode(tmp_path, smollm2):
    """`compile="similar:2"` on the sample docs: every node's KV is its similar entry, found by
    a reopened index (all hits), and the manifest says how it was compiled."""
    from epic_rag.app.index import build_index, index_is_current, open_index, read_documents, read_manifest
    from epic_rag.integrations.llama_index.handoff import CONTEXT_KEY, KV_KEY

    engine = smollm2_over(smollm2, KVStore(tmp_path / "kv"))
    app = build_index(SAMPLE_DOCS, tmp_path, model=SMOLLM2, engine=engine, show_progress=False, compile="similar:2")
    assert read_manifest(tmp_path).compile == "similar:2"
    documents = read_documents(SAMPLE_DOCS)
    assert index_is_current(tmp_path, documents, SMOLLM2) and index_is_current(
        tmp_path, documents, SMOLLM2, "similar:2"
    )
    assert not index_is_current(tmp_path, documents, SMOLLM2, "alone")
    nodes = list(app.index.docstore.docs.values())
    for node in nodes:
        entry = engine.store.get(node.metadata[KV_KEY])
        assert entry.context.linked and len(entry.context_spans) == 3  # the head and two similar chunks
        assert len(node.metadata[CONTEXT_KEY].split(",")) == 2
    reopened = open_index(tmp_path, engine=smollm2_over(smollm2, KVStore(tmp_path / "kv")))
    response, handoff = reopened.ask("What is the warranty on a Skylark buoy?")
    call = handoff.first_call
    assert (call.chunk_hits, call.chunk_misses) == (len(response.source_nodes), 0)
