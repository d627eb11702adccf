"""EpicKVPostprocessor: make sure retrieved chunks are cached, order them, hand them to the LLM."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from epic_rag import EpicEngine

from .handoff import Handoff, engine_lock, llm_text, set_handoff

Order = Literal["retrieval", "score", "document"]


class EpicKVPostprocessor(BaseNodePostprocessor):
    """Computes the KV of retrieved nodes missing from the store, keeps or sets their order,
    and puts the ordered chunk texts in this query's handoff. `hits`/`misses` count all queries;
    `current_handoff()` has this query's counts."""

    order: Order = Field(
        default="retrieval",
        description="retrieval: as retrieved; score: best first; document: grouped by document, in text order",
    )

    _engine: EpicEngine = PrivateAttr()
    _count_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _hits: int = PrivateAttr(default=0)
    _misses: int = PrivateAttr(default=0)

    def __init__(self, engine: EpicEngine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "EpicKVPostprocessor"

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

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
        """Compute in a worker thread, but set the handoff in the calling task's own context."""
        ordered, handoff = await asyncio.to_thread(self._prepare, nodes, query_bundle)
        set_handoff(handoff)
        return ordered

    def _prepare(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None
    ) -> tuple[list[NodeWithScore], Handoff]:
        """(ordered nodes, this query's handoff), with every missing chunk KV computed and stored."""
        ordered = self._ordered(nodes)
        texts = [t for t in (llm_text(n.node) for n in ordered) if t]
        engine, hits, misses = self._engine, 0, 0
        with engine_lock(engine):
            for text in texts:
                key = engine.key_of(engine.chunk_token_ids(text))
                if engine.store.get(key, engine.fingerprint) is not None:
                    hits += 1
                else:
                    engine.add_chunks([text], progress=False)
                    misses += 1
        with self._count_lock:
            self._hits += hits
            self._misses += misses
        query = query_bundle.query_str if query_bundle is not None else None
        return ordered, Handoff(chunks=texts, query=query, hits=hits, misses=misses)


def _document_of(node: NodeWithScore) -> str:
    return node.node.ref_doc_id or str(node.node.metadata.get("file_path", ""))
