"""KVSplitNodeParser: LlamaIndex node parser over epic_rag's KVSplit."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.node_parser.interface import MetadataAwareTextSplitter

from epic_rag.chunking import BoundaryFn, EmbedFn, KVSplit, TokenCounter, count_tokens_with, fixed_size_split


class KVSplitNodeParser(MetadataAwareTextSplitter):
    """Semantic chunks bounded in the LLM's tokens; each node (metadata header and the
    engine's chunk separator included) stays within `max_tokens`. `fixed_size=True` is the
    meaning-blind baseline (chunks of `target_tokens`)."""

    target_tokens: int = Field(default=512, gt=0)
    max_tokens: int = Field(default=768, gt=0)
    min_tokens: int = Field(default=128, ge=0)
    window: int = Field(default=2, gt=0, description="sentences on each side of a gap when comparing meaning")
    semantic_weight: float = Field(default=1.0, ge=0.0)
    separator: str | None = Field(default=None, description="regex that starts each natural unit, e.g. 'Passage \\d+:'")
    fixed_size: bool = Field(default=False)
    chunk_separator: str = Field(default="\n\n", description="what the engine appends to each cached chunk")

    _count: TokenCounter = PrivateAttr()
    _splitter: KVSplit = PrivateAttr()

    def __init__(
        self,
        tokenizer: Any,
        embed: EmbedFn | str | None = "default",
        boundary_fn: BoundaryFn | None = None,
        **kwargs: Any,
    ) -> None:
        """tokenizer: the LLM's HF tokenizer (or a callable text -> token count);
        embed: sentence embedding function, "default" (all-MiniLM-L6-v2) or None (size only)."""
        super().__init__(**kwargs)
        self._count = tokenizer if _is_counter(tokenizer) else count_tokens_with(tokenizer)
        self._splitter = KVSplit(
            self._count,
            target_tokens=self.target_tokens,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            window=self.window,
            semantic_weight=self.semantic_weight,
            embed=embed,
            boundary_fn=boundary_fn,
            separator=self.separator,
        )

    @classmethod
    def from_engine(cls, engine: Any, **kwargs: Any) -> KVSplitNodeParser:
        """A parser counting in `engine`'s tokenizer, with its chunk separator."""
        return cls(engine.tokenizer, chunk_separator=engine.chunk_separator, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "KVSplitNodeParser"

    def split_text(self, text: str) -> list[str]:
        return self.split_text_metadata_aware(text, "")

    def split_text_metadata_aware(self, text: str, metadata_str: str) -> list[str]:
        header = f"{metadata_str}\n\n" if metadata_str else ""
        reserve = (self._count(header) if header else 0) + self._count(self.chunk_separator) + 1
        if self.fixed_size:
            return [c.text for c in fixed_size_split(text, self._count, max(1, self.target_tokens - reserve))]
        return [c.text for c in self._splitter.split(text, reserve=reserve)]


def _is_counter(tokenizer: Any) -> bool:
    return callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template") and not hasattr(tokenizer, "encode")
