"""The side channel from the postprocessor to the LLM, safe across threads and asyncio tasks.

The synthesizer hands the LLM one prompt string, so the LLM cannot see where the
retrieved chunks sit in it. The postprocessor, which knows them, puts a `Handoff` in
a context variable: each thread has its own context, and each asyncio task a copy of
its creator's, so concurrent queries never see each other's chunks. The LLM reads it
and appends the stats of every call it makes for the query.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

from llama_index.core.schema import BaseNode, MetadataMode

from epic_rag import EpicEngine


@dataclass
class CallReport:
    """What one LLM call reused: the engine's stats plus how many handed chunks it found."""

    chunks_handed: int
    chunks_matched: int
    tokens_total: int
    tokens_reused: int
    tokens_recomputed: int
    store_hits: int
    store_misses: int
    ttft_s: float
    policy: str

    @property
    def chunks_unmatched(self) -> int:
        return self.chunks_handed - self.chunks_matched


@dataclass
class Handoff:
    """One query's retrieved chunks (in prompt order) and what happened to them."""

    chunks: list[str]  # LLM-mode texts, stripped as the synthesizer strips them
    query: str | None = None
    hits: int = 0  # chunks whose KV was already in the store
    misses: int = 0  # chunks computed by the postprocessor
    calls: list[CallReport] = field(default_factory=list)

    @property
    def first_call(self) -> CallReport | None:
        return self.calls[0] if self.calls else None


_current: ContextVar[Handoff | None] = ContextVar("epic_rag_handoff", default=None)
_locks: weakref.WeakKeyDictionary[EpicEngine, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def current_handoff() -> Handoff | None:
    """The handoff of this thread or task's current query, if a postprocessor made one."""
    return _current.get()


def set_handoff(handoff: Handoff | None) -> None:
    _current.set(handoff)


def engine_lock(engine: EpicEngine) -> threading.Lock:
    """One lock per engine: its KV store and model run one query at a time."""
    with _locks_guard:
        lock = _locks.get(engine)
        if lock is None:
            lock = _locks[engine] = threading.Lock()
        return lock


def llm_text(node: BaseNode) -> str:
    """A node's text exactly as the synthesizer puts it into the prompt (LLM metadata mode, stripped)."""
    return node.get_content(metadata_mode=MetadataMode.LLM).strip()
