"""EpicKVPrecompute: the indexing hook that stores each node's chunk KV.

It caches each node's text exactly as the synthesizer will put it into the prompt
(LLM metadata mode, stripped) and records its store key in the node's metadata, hidden
from the LLM and the embedder, so the query side never tokenizes it again to find its
KV. The KV store stays the source of truth: if an ingestion cache skips this step, the
LLM call computes the missing entries at query time (counted as misses), so a skip
costs time once and never correctness.

Each node is compiled alone, after the node before it in its document ("neighbour"), or
after the `n` nodes of the batch most similar to it by embedding ("similar", linked from
their own KV: FusionRAG's offline stage); the ids of the nodes it saw are kept in its
metadata, comma-separated, nearest last (flat, as every vector store accepts).

In an `IngestionPipeline` its cache key covers the model's fingerprint and the compile
mode (fields of the component), so a switch of either runs it again. Given the pipeline's
docstore, it records which entries each source document's nodes use and deletes, from the
store's own tiers, those that only replaced or removed documents' nodes used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from llama_index.core import Settings
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode, TransformComponent
from llama_index.core.storage.docstore.types import BaseDocumentStore

from epic_rag import EpicEngine
from epic_rag.compile import nearest_neighbours
from epic_rag.compile_spec import DEFAULT_SIMILAR

from .document_keys import DocumentKeys
from .handoff import CONTEXT_KEY, KV_KEY, llm_text, store_keys


class EpicKVPrecompute(TransformComponent):
    """Precompute and store the KV of every node (nodes pass through; "similar" embeds them)."""

    show_progress: bool = Field(default=True, description="show a progress bar")
    context: Literal["alone", "neighbour", "similar"] = Field(
        default="alone", description="compile each node alone, after its predecessor, or after similar nodes"
    )
    n: int = Field(default=DEFAULT_SIMILAR, ge=1, description="similar nodes each node is compiled after")
    model_fingerprint: str = Field(default="", description="the engine's model fingerprint (part of the cache key)")

    _engine: EpicEngine = PrivateAttr()
    _embed_model: BaseEmbedding | None = PrivateAttr(default=None)
    _documents: DocumentKeys | None = PrivateAttr(default=None)

    def __init__(
        self,
        engine: EpicEngine,
        embed_model: BaseEmbedding | None = None,
        docstore: BaseDocumentStore | None = None,
        **kwargs: Any,
    ) -> None:
        """`embed_model` embeds nodes that arrive without an embedding for "similar" (default:
        `Settings.embed_model`); the vectors stay on the nodes, so the index does not embed again.
        `docstore`: the ingestion pipeline's, to drop the entries of replaced and removed documents."""
        super().__init__(model_fingerprint=engine.fingerprint, **kwargs)
        self._engine = engine
        self._embed_model = embed_model
        self._documents = DocumentKeys(docstore) if docstore is not None else None

    @classmethod
    def class_name(cls) -> str:
        return "EpicKVPrecompute"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        for node in nodes:  # what we note rides in metadata that neither the LLM nor the embedder sees
            for hidden in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                hidden.extend(k for k in (KV_KEY, CONTEXT_KEY) if k not in hidden)
        keyed = [(n, t) for n, t in ((n, llm_text(n)) for n in nodes) if t]
        after = self._predecessors(keyed) if self.context == "neighbour" else None
        link_after = self._similar(keyed) if self.context == "similar" else None
        chunk_ids = self._engine.add_chunks(
            [t for _, t in keyed], progress=self.show_progress and bool(keyed), after=after, link_after=link_after
        )
        for (node, _), chunk_id in zip(keyed, chunk_ids, strict=True):
            node.metadata[KV_KEY] = chunk_id.removeprefix("kv:")
        if self._documents is not None:
            self._drop_replaced([node for node, _ in keyed])
        return nodes

    def _drop_replaced(self, nodes: list[BaseNode]) -> None:
        """Record these nodes' keys per source document; delete the keys no document uses now."""
        keys: dict[str, set[str]] = {}
        for node in nodes:
            keys.setdefault(node.ref_doc_id or node.node_id, set()).update(store_keys(self._engine.prompt, node))
        self._engine.store.forget(sorted(self._documents.replace(keys)))

    @staticmethod
    def _predecessors(keyed: list[tuple[BaseNode, str]]) -> list[str | None]:
        """Per node, the text of the node before it in its document (None for a first node, or
        when that node is not in this batch)."""
        text_of = {node.node_id: text for node, text in keyed}
        previous = [node.prev_node.node_id if node.prev_node is not None else None for node, _ in keyed]
        for (node, _), p in zip(keyed, previous, strict=True):
            if p in text_of:
                node.metadata[CONTEXT_KEY] = p
        return [text_of.get(p) if p is not None else None for p in previous]

    def _similar(self, keyed: list[tuple[BaseNode, str]]) -> list[list[str]]:
        """Per node, the texts of the `n` most similar other nodes of the batch, nearest last."""
        nodes = [node for node, _ in keyed]
        missing = [node for node in nodes if node.embedding is None]
        if missing:
            embed = self._embed_model or Settings.embed_model
            texts = [node.get_content(metadata_mode=MetadataMode.EMBED) for node in missing]
            vectors = embed.get_text_embedding_batch(texts, show_progress=self.show_progress)
            for node, vector in zip(missing, vectors, strict=True):
                node.embedding = vector
        near = nearest_neighbours(torch.tensor([node.embedding for node in nodes]), self.n) if nodes else []
        for node, picked in zip(nodes, near, strict=True):
            node.metadata[CONTEXT_KEY] = ",".join(nodes[j].node_id for j in picked)
        return [[keyed[j][1] for j in picked] for picked in near]
