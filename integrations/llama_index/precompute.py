"""EpicKVPrecompute: the indexing hook that stores each node's chunk KV.

It caches each node's text exactly as the synthesizer will put it into the prompt
(LLM metadata mode, stripped) and records its store key in the node's metadata, hidden
from the LLM and the embedder, so the query side never tokenizes it again to find its
KV. The KV store stays the source of truth: if an ingestion cache skips this step, the
LLM call computes the missing entries at query time (counted as misses), so a skip
costs time once and never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from epic_rag import EpicEngine

from .handoff import KV_KEY, llm_text


class EpicKVPrecompute(TransformComponent):
    """Precompute and store the KV of every node (nodes pass through unchanged)."""

    show_progress: bool = Field(default=True, description="show a progress bar")
    neighbour_context: bool = Field(
        default=False, description="compile each node after the node before it in its document"
    )

    _engine: EpicEngine = PrivateAttr()

    def __init__(self, engine: EpicEngine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "EpicKVPrecompute"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        for node in nodes:  # the key rides along in metadata that neither the LLM nor the embedder sees
            for hidden in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                if KV_KEY not in hidden:
                    hidden.append(KV_KEY)
        keyed = [(n, t) for n, t in ((n, llm_text(n)) for n in nodes) if t]
        after = self._predecessors(keyed) if self.neighbour_context else None
        chunk_ids = self._engine.add_chunks(
            [t for _, t in keyed], progress=self.show_progress and bool(keyed), after=after
        )
        for (node, _), chunk_id in zip(keyed, chunk_ids, strict=True):
            node.metadata[KV_KEY] = chunk_id.removeprefix("kv:")
        return nodes

    @staticmethod
    def _predecessors(keyed: list[tuple[BaseNode, str]]) -> list[str | None]:
        """Per node, the text of the node before it in its document (None for a first node, or
        when that node is not in this batch)."""
        text_of = {node.node_id: text for node, text in keyed}
        previous = [node.prev_node.node_id if node.prev_node is not None else None for node, _ in keyed]
        return [text_of.get(p) if p is not None else None for p in previous]
