"""Prompt layout: the one place that assigns global positions to segments.

A RAG prompt is ``[prefix][chunk_1]..[chunk_n][question]``. The prefix is the
system prompt (plus any chat-template text before the chunks), cached as an exact
prefix; chunks are cached alone from position 0 and linked; the question segment
(question plus the template text after it) is always computed. Prompts written by a
framework may also hold plain text between chunks (TEXT segments, always computed),
and a chunk segment may cover only the leading tokens of its stored entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch


class Kind(StrEnum):
    PREFIX = "prefix"
    CHUNK = "chunk"
    TEXT = "text"  # computed text between chunks
    QUESTION = "question"


COMPUTED = (Kind.TEXT, Kind.QUESTION)  # kinds never linked from the store


@dataclass(frozen=True)
class Segment:
    kind: Kind
    start: int  # global position of the first token
    token_ids: torch.Tensor  # [n] int64
    key: str | None = None  # KV store key of prefix/chunk segments (a chunk may use a leading part of it)
    source_ids: torch.Tensor | None = None  # [m >= n] the whole stored entry's ids, when it links a leading part

    @property
    def end(self) -> int:
        return self.start + self.token_ids.numel()

    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.end)


@dataclass(frozen=True)
class PromptLayout:
    segments: tuple[Segment, ...]
    ids: torch.Tensor = field(repr=False)  # [N] all token ids in order

    @classmethod
    def build(
        cls,
        prefix: torch.Tensor,
        chunks: list[tuple[torch.Tensor, str | None]],
        question: torch.Tensor,
        prefix_key: str | None = None,
    ) -> PromptLayout:
        """Place prefix, chunks (ids, store key) and question one after another."""
        parts = [(Kind.PREFIX, prefix, prefix_key)] + [(Kind.CHUNK, ids, key) for ids, key in chunks]
        return cls.from_parts(parts + [(Kind.QUESTION, question, None)])

    @classmethod
    def from_parts(cls, parts: list[tuple]) -> PromptLayout:
        """Place (kind, ids, store key[, source ids]) parts in order: an optional PREFIX first,
        CHUNK and TEXT parts in any order, and a non-empty QUESTION last. Empty prefix/text
        parts are dropped. Source ids are the stored entry's when a chunk links its leading part."""
        kinds = [part[0] for part in parts]
        if not parts or kinds[-1] is not Kind.QUESTION or parts[-1][1].numel() == 0:
            raise ValueError("the question is empty: there is nothing to answer")
        if Kind.QUESTION in kinds[:-1] or Kind.PREFIX in kinds[1:]:
            raise ValueError("a layout holds one prefix (first) and one question (last)")
        segments, start = [], 0
        for kind, ids, key, *source in parts:
            if ids.numel() == 0 and kind is not Kind.CHUNK:
                continue
            if ids.numel() == 0:
                raise ValueError(f"chunk {len(segments)} is empty; drop empty chunks before linking")
            segments.append(Segment(kind, start, ids.to(torch.int64), key, source[0] if source else None))
            start += ids.numel()
        return cls(tuple(segments), torch.cat([s.token_ids for s in segments]))

    @property
    def length(self) -> int:
        return self.ids.numel()

    @property
    def chunks(self) -> list[Segment]:
        return [s for s in self.segments if s.kind is Kind.CHUNK]

    @property
    def prefix(self) -> Segment | None:
        return next((s for s in self.segments if s.kind is Kind.PREFIX), None)

    def computed_positions(self) -> torch.Tensor:
        """Positions that have no cached KV and are always computed (TEXT and QUESTION)."""
        return torch.cat([s.positions() for s in self.segments if s.kind in COMPUTED])

    @property
    def question(self) -> Segment:
        return self.segments[-1]

    @property
    def prefix_end(self) -> int:
        return self.prefix.end if self.prefix is not None else 0
