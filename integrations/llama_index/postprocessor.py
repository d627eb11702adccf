"""EpicKVPostprocessor: order the retrieved chunks and hand them, with their store keys, to the LLM."""

from __future__ import annotations

from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from epic_rag import EpicEngine

from .handoff import Handoff, llm_text, node_key, set_handoff

Order = Literal["retrieval", "score", "document"]


class EpicKVPostprocessor(BaseNodePostprocessor):
    """Keeps or sets the order of the retrieved nodes and puts their chunk texts, with each
    chunk's store key, in this query's handoff for `EpicLLM`. It loads no KV: the LLM call
    links what the store has and computes (and counts as misses) what it lacks."""

    order: Order = Field(
        default="retrieval",
        description="retrieval: as retrieved; score: best first; document: grouped by document, in text order",
    )

    _engine: EpicEngine = PrivateAttr()

    def __init__(self, engine: EpicEngine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "EpicKVPostprocessor"

    def _ordered(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        if self.order == "score":
            return sorted(nodes, key=lambda n: -(n.score if n.score is not None else float("-inf")))
        if self.order == "document":
            first_seen: dict[str, int] = {}
            for n in nodes:
                first_seen.setdefault(_document_of(n), len(first_seen))
            return sorted(nodes, key=lambda n: (first_seen[_document_of(n)], n.node.start_char_idx or 0))
        return list(nodes)

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        ordered, handoff = self._prepare(nodes, query_bundle)
        set_handoff(handoff)
        return ordered

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        """The handoff goes into the calling task's own context (the default runs elsewhere)."""
        ordered, handoff = self._prepare(nodes, query_bundle)
        set_handoff(handoff)
        return ordered

    def _prepare(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[list[NodeWithScore], Handoff]:
        """(ordered nodes, this query's handoff: their texts and store keys)."""
        ordered = self._ordered(nodes)
        texts, keys = [], []
        for n in ordered:
            text = llm_text(n.node)
            if text:
                texts.append(text)
                keys.append(self._engine.known_chunk(text, node_key(n.node))[1])
        query = query_bundle.query_str if query_bundle is not None else None
        return ordered, Handoff(chunks=texts, keys=keys, query=query)


def _document_of(node: NodeWithScore) -> str:
    return node.node.ref_doc_id or str(node.node.metadata.get("file_path", ""))
