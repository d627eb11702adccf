"""Keeping an index in step with its documents: only what was added, changed or removed is processed.

The manifest keeps each document's LlamaIndex hash (text and metadata). An update compares
the documents it is given with those hashes; new and changed documents are split,
embedded and compiled as a full build does them, and unchanged ones keep their nodes,
vectors and chunk KV untouched. FAISS files are written to a fresh folder and swapped in,
so an interrupted update leaves the previous index answering; a Chroma collection gets
the new nodes before the replaced ones leave it. KV entries that only replaced or removed
nodes referenced leave the index's kv/ folder at the end; a shared Redis tier is never
touched (its TTL ages unused entries out). With similar-chunk compile every node's
neighbours are chosen again among the updated nodes, and a node whose context changed is
compiled again (its entry is keyed by that context, so an unchanged one is found as it was).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epic_rag.integrations.llama_index.handoff import KV_KEY, store_keys
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.schema import BaseNode, MetadataMode

from epic_rag import EpicEngine
from epic_rag.prompt import PromptBuilder
from epic_rag.store.disk import DiskBackend

from .manifest import IndexManifest


@dataclass
class DocumentChanges:
    """What differs between the documents an index holds and the ones it is given."""

    added: list[Document] = field(default_factory=list)
    changed: list[Document] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # document ids
    unchanged: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, known: dict[str, str], documents: Sequence[Document], complete: bool) -> DocumentChanges:
        """Sort `documents` against `known` (id -> hash); with `complete` they are the whole
        corpus, so a known id missing from them was removed."""
        changes = cls()
        given = {d.id_ for d in documents}
        for doc in documents:
            if doc.id_ not in known:
                changes.added.append(doc)
            elif known[doc.id_] != doc.hash:
                changes.changed.append(doc)
            else:
                changes.unchanged.append(doc.id_)
        if complete:
            changes.removed = sorted(set(known) - given)
        else:
            changes.unchanged.extend(sorted(set(known) - given))
        return changes

    @property
    def stale(self) -> set[str]:
        """Ids whose nodes leave the index: changed and removed documents."""
        return {d.id_ for d in self.changed} | set(self.removed)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass
class UpdateReport:
    """What an update did: documents by kind, chunk KV compiled or found, KV files deleted."""

    added: int
    changed: int
    removed: int
    unchanged: int
    compiled: int = 0  # chunk KV entries computed because the store lacked them
    reused: int = 0  # entries the store already held (an unchanged chunk inside a changed document)
    kv_deleted: int = 0  # entry files no node references any more, deleted from the index's kv/
    bytes_freed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line, e.g. "2 added, 1 changed, 1 removed, 40 unchanged; 9 chunks compiled, 0 reused"."""
        return (
            f"{self.added} added, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged; "
            f"{self.compiled} chunks compiled, {self.reused} reused"
        )


def referenced_keys(prompt: PromptBuilder, nodes: Iterable[BaseNode]) -> set[str]:
    """The KV store keys `nodes` use (see `store_keys`)."""
    return set().union(*(store_keys(prompt, node) for node in nodes))


class NodeTable(ABC):
    """The nodes and vectors of an opened index, read and replaced as an update needs them."""

    rewrites_all: bool = False  # `replace` needs every kept node with its vector

    def __init__(self, index: VectorStoreIndex) -> None:
        self.index = index

    @abstractmethod
    def nodes(self, with_embeddings: bool = False) -> list[BaseNode]:
        """Every node of the index (with its vector when asked)."""

    @abstractmethod
    def replace(self, keep: list[BaseNode], add: list[BaseNode], drop_ids: set[str], embed: Any) -> VectorStoreIndex:
        """The index holding `keep` (unchanged nodes) and `add` (new or compiled again), without `drop_ids`."""


class FaissTable(NodeTable):
    """FAISS files plus the docstore: the update is written whole into a new store, then swapped in."""

    rewrites_all = True

    def __init__(
        self, index: VectorStoreIndex, storage_dir: Path, faiss_store: Any, hashes: dict[str, str], steps: list[Any]
    ) -> None:
        """`hashes`: every document's hash after the update (document id -> `Document.hash`); `steps`:
        the transformations the new index's own `insert` runs (as `open_index` gives an index)."""
        super().__init__(index)
        self.storage_dir, self.faiss_store, self.hashes, self.steps = storage_dir, faiss_store, hashes, steps

    def nodes(self, with_embeddings: bool = False) -> list[BaseNode]:
        position_of = {node_id: int(pos) for pos, node_id in self.index.index_struct.nodes_dict.items()}
        nodes = self.index.docstore.get_nodes(list(position_of))
        if with_embeddings:
            flat = self.index.vector_store.client  # the faiss index: row i is the vector stored at position i
            rows = flat.reconstruct_n(0, flat.ntotal)  # [n, dim] float32
            for node in nodes:
                node.embedding = rows[position_of[node.node_id]].tolist()
        return nodes

    def replace(self, keep: list[BaseNode], add: list[BaseNode], drop_ids: set[str], embed: Any) -> VectorStoreIndex:
        from .index import persist_atomically

        storage = StorageContext.from_defaults(vector_store=self.faiss_store(embed))
        index = VectorStoreIndex(
            nodes=keep + add, storage_context=storage, embed_model=embed, transformations=self.steps
        )
        storage.docstore.set_document_hashes(self.hashes)  # as `from_documents` leaves them, for LlamaIndex's refresh
        persist_atomically(storage, self.storage_dir)
        return index


class ChromaTable(NodeTable):
    """A Chroma collection, changed in place: new nodes go in before replaced ones leave."""

    def nodes(self, with_embeddings: bool = False) -> list[BaseNode]:
        return chroma_nodes(self.index.vector_store, with_embeddings)

    def replace(self, keep: list[BaseNode], add: list[BaseNode], drop_ids: set[str], embed: Any) -> VectorStoreIndex:
        store = self.index.vector_store
        if add:
            store.delete_nodes([n.node_id for n in add])  # a kept node compiled again replaces its old row
            store.add(add)
        leaving = sorted(drop_ids - {n.node_id for n in add})
        for start in range(0, len(leaving), 1000):
            store.delete_nodes(leaving[start : start + 1000])
        return self.index


def chroma_nodes(store: Any, with_embeddings: bool = False) -> list[BaseNode]:
    """Every node of a `ChromaVectorStore`'s collection (with its vector when asked)."""
    from llama_index.core.vector_stores.utils import metadata_dict_to_node

    include = ["documents", "metadatas"] + (["embeddings"] if with_embeddings else [])
    got = store.client.get(include=include)  # `client` is the Chroma collection
    nodes = []
    for i, (text, metadata) in enumerate(zip(got["documents"], got["metadatas"], strict=True)):
        node = metadata_dict_to_node(metadata, text=text)
        if with_embeddings:
            node.embedding = [float(x) for x in got["embeddings"][i]]
        nodes.append(node)
    return nodes


def apply_changes(
    engine: EpicEngine,
    table: NodeTable,
    changes: DocumentChanges,
    transformations: list[Any],
    embed: Any,
    similar: bool,
    show_progress: bool = False,
) -> tuple[VectorStoreIndex, UpdateReport, int]:
    """Split, embed and compile the added and changed documents with `transformations` (the
    KVSplit parser, then the precompute hook), keep every other node, write the result through
    `table` and delete the KV files only replaced nodes used. Returns (the updated index, the
    report, the node count). `similar`: the hook picks each node's neighbours among all nodes,
    so every node passes through it and only those whose context changed are compiled."""
    start = time.perf_counter()
    before = engine.store.stats()
    current = table.nodes(with_embeddings=similar or table.rewrites_all)
    stale = changes.stale
    keep = [n for n in current if n.ref_doc_id not in stale]
    leaving = [n for n in current if n.ref_doc_id in stale]
    parser, precompute = transformations
    fresh = list(parser(changes.added + changes.changed, show_progress=show_progress))
    _embed(fresh, embed, show_progress)
    old_keys = {n.node_id: n.metadata.get(KV_KEY) for n in keep}
    if similar:
        precompute(keep + fresh)
        recompiled = [n for n in keep if n.metadata.get(KV_KEY) != old_keys[n.node_id]]
    else:
        precompute(fresh)
        recompiled = []
    after = engine.store.stats()
    again = {n.node_id for n in recompiled}
    index = table.replace(
        [n for n in keep if n.node_id not in again], recompiled + fresh, {n.node_id for n in leaving}, embed
    )
    live = referenced_keys(engine.prompt, keep + fresh)
    gone = {k for k in referenced_keys(engine.prompt, leaving) | {old_keys[n] for n in again} if k}
    deleted, freed = engine.store.forget(sorted(gone - live))
    report = UpdateReport(
        added=len(changes.added),
        changed=len(changes.changed),
        removed=len(changes.removed),
        unchanged=len(changes.unchanged),
        compiled=after.misses - before.misses,
        reused=after.hits - before.hits,
        kv_deleted=deleted,
        bytes_freed=freed,
        seconds=time.perf_counter() - start,
    )
    return index, report, len(keep) + len(fresh)


def _embed(nodes: list[BaseNode], embed: Any, show_progress: bool) -> None:
    """Give each node its vector (the one the index would compute: EMBED metadata mode)."""
    missing = [n for n in nodes if n.embedding is None]
    texts = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in missing]
    for node, vector in zip(missing, embed.get_text_embedding_batch(texts, show_progress=show_progress), strict=True):
        node.embedding = vector


def updated_hashes(manifest: IndexManifest, changes: DocumentChanges) -> dict[str, str]:
    """Every document's hash once `changes` are applied."""
    hashes = {k: v for k, v in manifest.document_hashes.items() if k not in changes.removed}
    return hashes | {d.id_: d.hash for d in changes.added + changes.changed}


def updated_manifest(
    manifest: IndexManifest, changes: DocumentChanges, nodes: int, digest: str | None
) -> IndexManifest:
    """`manifest` after `changes`: document hashes, counts, the folder digest and the next generation."""
    hashes = updated_hashes(manifest, changes)
    return manifest.model_copy(
        update={
            "document_hashes": hashes,
            "documents": len(hashes),
            "nodes": nodes,
            "documents_digest": digest,
            "generation": manifest.generation + 1,
        }
    )


def prune_index(index_dir: str | Path, manifest: IndexManifest) -> tuple[int, int, int]:
    """Delete every entry file in the index's kv/ folder that no node of the index references
    (prompt heads too: the next question that needs one stores it again after a short prefill).
    Reads the nodes and the tokenizer only, not the model. Returns (deleted, bytes freed, kept)."""
    from epic_rag.model import load_tokenizer

    index_dir = Path(index_dir)
    if manifest.vector_store:
        from .vector_stores import chroma_vector_store

        nodes = chroma_nodes(chroma_vector_store(manifest.vector_store))
    else:
        from llama_index.core.storage.docstore import SimpleDocumentStore

        nodes = list(SimpleDocumentStore.from_persist_dir(str(index_dir / "storage")).docs.values())
    live = referenced_keys(PromptBuilder(load_tokenizer(manifest.model), manifest.fingerprint), nodes)
    disk = DiskBackend(index_dir / "kv")
    deleted = freed = kept = 0
    for key in list(disk.keys()):
        if key in live:
            kept += 1
            continue
        size = disk.size_of(key)
        if disk.delete(key):
            deleted, freed = deleted + 1, freed + size
    return deleted, freed, kept
