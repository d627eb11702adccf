"""Neighbour-context compile: a chunk compiled after its document predecessor, stored at base 0."""

from __future__ import annotations

import pytest
import torch

from epic_rag import FullRecompute, FullReuse, KVStore, rotate_keys
from epic_rag.kv import CompileContext
from epic_rag.store.codec import DamagedEntry, decode, encode

from .conftest import tiny_engine

FIRST = "The Skylark buoy is sold by Tern Marine."
SECOND = "It carries a three year warranty on the hull."
QUESTION = "How long is the warranty?"


def test_entry_equals_the_chunk_keys_of_a_joint_prefill(family):
    engine = tiny_engine(family, bos=False)
    pred, ids = engine.chunk_token_ids(FIRST), engine.chunk_token_ids(SECOND)
    entry = engine.encode(ids, CompileContext(pred))
    joint = engine.encode(torch.cat([pred, ids]))
    m = pred.numel()
    assert torch.allclose(rotate_keys(entry.keys, engine.rotary.inv_freq, m), joint.keys[:, :, m:], atol=1e-5)
    assert torch.allclose(entry.values, joint.values[:, :, m:], atol=1e-5)
    assert torch.equal(entry.context_ids, pred)
    alone = engine.encode(ids)
    assert (alone.values - entry.values).abs().max() > 1e-3  # it really saw its predecessor


def test_linked_after_its_predecessor_it_equals_full_prefill(family):
    """With no system prefix the predecessor sits at 0 and the chunk right after it, where it
    was compiled: plain reuse then is exactly a full prefill."""
    engine = tiny_engine(family, bos=False)
    first, second = engine.add_chunks([FIRST, SECOND], after=[None, FIRST])
    layout = engine.layout(QUESTION, [first, second])
    reuse = engine.prefill(layout, FullReuse()).logits
    assert (reuse - engine.prefill(layout, FullRecompute()).logits).abs().max() < 1e-4
    plain = engine.layout(QUESTION, [FIRST, SECOND])  # the same tokens, chunks compiled alone
    assert (engine.prefill(plain, FullReuse()).logits - reuse).abs().max() > 1e-4


def test_neighbour_entries_are_separate_and_survive_disk(tmp_path):
    engine = tiny_engine("qwen2", store=KVStore(tmp_path))
    (alone,) = engine.add_chunks([SECOND])
    (after,) = engine.add_chunks([SECOND], after=[FIRST])
    assert alone != after and sorted(engine.store.keys()) == sorted([alone[3:], after[3:]])
    reopened = tiny_engine("qwen2", store=KVStore(tmp_path))
    entry = reopened.store.get(after[3:])
    assert torch.equal(entry.context_ids, engine.chunk_token_ids(FIRST))
    blob = encode(entry, engine.fingerprint)
    with pytest.raises(DamagedEntry, match="does not match its key"):
        decode(blob, key=alone[3:])  # the same tokens, but not the alone-compiled entry


def test_a_lost_neighbour_entry_is_compiled_again_after_its_predecessor():
    engine = tiny_engine("llama")
    first, second = engine.add_chunks([FIRST, SECOND], after=[None, FIRST])
    layout = engine.layout(QUESTION, [first, second])
    engine.prefill(layout, "attnlink:2")  # stores the prompt prefix
    kept = engine.store.get(second[3:]).values.clone()
    engine.store.delete(second[3:])
    result = engine.prefill(layout, "attnlink:2")
    assert (result.stats.store_hits, result.stats.store_misses) == (2, 1)
    assert torch.equal(engine.store.get(second[3:]).values, kept)


def test_one_predecessor_per_chunk_is_required():
    engine = tiny_engine("llama")
    with pytest.raises(ValueError, match="one per chunk"):
        engine.add_chunks([FIRST, SECOND], after=[None])


def test_the_indexing_hook_compiles_after_the_previous_node_and_a_new_process_finds_it():
    from epic_rag.integrations.llama_index import EpicKVPrecompute
    from epic_rag.integrations.llama_index.handoff import KV_KEY
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    store = KVStore()
    engine = tiny_engine("qwen2", store=store)
    first, second, other = TextNode(text=FIRST), TextNode(text=SECOND), TextNode(text="Unrelated words.")
    second.relationships[NodeRelationship.PREVIOUS] = RelatedNodeInfo(node_id=first.node_id)
    EpicKVPrecompute(engine, context="neighbour", show_progress=False)([first, second, other])
    ids = [engine.chunk_token_ids(t) for t in (FIRST, SECOND, "Unrelated words.")]
    assert first.metadata[KV_KEY] == engine.key_of(ids[0])  # a document's first node: alone
    assert second.metadata[KV_KEY] == engine.key_of(ids[1], CompileContext(ids[0]))
    assert other.metadata[KV_KEY] == engine.key_of(ids[2])

    later = tiny_engine("qwen2", store=store)  # another process: nothing remembered, same store
    found_ids, key = later.known_chunk(SECOND, second.metadata[KV_KEY])
    assert key == second.metadata[KV_KEY] and torch.equal(found_ids, ids[1])
    assert torch.equal(later.chunks.context_of(key).ids, ids[0])  # a lost entry would be compiled the same way
    fresh = tiny_engine("qwen2", store=store)  # a key whose entry holds other tokens is not taken
    assert fresh.known_chunk("Unrelated words.", second.metadata[KV_KEY])[1] == engine.key_of(ids[2])
