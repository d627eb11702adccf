"""EpicKVPrecompute: the indexing hook that stores each node's chunk KV.

It caches each node's text exactly as the synthesizer will put it into the prompt
(LLM metadata mode, stripped). The KV store stays the source of truth: if an
ingestion cache skips this step, the postprocessor computes the missing entries at
query time, so a skip costs time once and never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from epic_rag import EpicEngine

from .handoff import engine_lock, llm_text


class EpicKVPrecompute(TransformComponent):
    """Precompute and store the KV of every node (nodes pass through unchanged)."""

    show_progress: bool = Field(default=True, description="show a progress bar")

    _engine: EpicEngine = PrivateAttr()

    def __init__(self, engine: EpicEngine, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "EpicKVPrecompute"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        texts = [t for t in (llm_text(n) for n in nodes) if t]
        with engine_lock(self._engine):
            self._engine.add_chunks(texts, progress=self.show_progress and len(texts) > 0)
        return nodes
