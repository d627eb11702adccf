"""Prompt layout: the one place that assigns global positions to segments.

A RAG prompt is ``[prefix][chunk_1]..[chunk_n][question]``. The prefix is the
system prompt (plus any chat-template text before the chunks), cached as an exact
prefix; chunks are cached alone from position 0 and linked; the question segment
(question plus the template text after it) is always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Kind(str, Enum):
    PREFIX = "prefix"
    CHUNK = "chunk"
    QUESTION = "question"


@dataclass(frozen=True)
class Segment:
    kind: Kind
    start: int  # global position of the first token
    token_ids: torch.Tensor  # [n] int64
    key: str | None = None  # KV store key of prefix/chunk segments

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
        if question.numel() == 0:
            raise ValueError("the question is empty: there is nothing to answer")
        segments, start = [], 0
        parts = [(Kind.PREFIX, prefix, prefix_key)] + [(Kind.CHUNK, ids, key) for ids, key in chunks]
        for kind, ids, key in parts + [(Kind.QUESTION, question, None)]:
            if ids.numel() == 0 and kind is not Kind.CHUNK:
                continue
            if ids.numel() == 0:
                raise ValueError(f"chunk {len(segments)} is empty; drop empty chunks before linking")
            segments.append(Segment(kind, start, ids.to(torch.int64), key))
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

    @property
    def question(self) -> Segment:
        return self.segments[-1]

    @property
    def prefix_end(self) -> int:
        return self.prefix.end if self.prefix is not None else 0
