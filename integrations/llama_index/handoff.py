"""The side channel from the postprocessor to the LLM, safe across threads and asyncio tasks.

The synthesizer hands the LLM one prompt string, so the LLM cannot see where the
retrieved chunks sit in it. The postprocessor, which knows them, puts a `Handoff` in
a context variable: each thread has its own context, and each asyncio task a copy of
its creator's, so concurrent queries never see each other's chunks. The LLM reads it
and appends the stats of every call it makes for the query.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from llama_index.core.schema import BaseNode, MetadataMode

from epic_rag.prompt import PromptBuilder


@dataclass
class CallReport:
    """What one LLM call reused: the engine's stats plus how many handed chunks it found."""

    chunks_handed: int
    chunks_matched: int
    tokens_total: int
    tokens_reused: int
    tokens_recomputed: int
    store_hits: int  # segments (prefix, chunks) linked from the store
    store_misses: int  # segments whose KV had to be computed for this call
    ttft_s: float
    policy: str
    tokens_generated: int = 0
    finish_reason: str = ""  # "stop", "eos", "length", or "cancelled" when the caller stopped it
    decode_s: float = 0.0
    chunk_hits: int = 0  # chunk segments among store_hits / store_misses (the rest is the prompt head)
    chunk_misses: int = 0
    prefix: str = "none"  # the prompt head: "cached", "computed", "recomputed" or "none" (see PrefillStats)

    @property
    def chunks_unmatched(self) -> int:
        return self.chunks_handed - self.chunks_matched


@dataclass
class Handoff:
    """One query's retrieved chunks (in prompt order) and what happened to them."""

    chunks: list[str]  # LLM-mode texts, stripped as the synthesizer strips them
    keys: list[str | None] = field(default_factory=list)  # each chunk's store key, from its node (or None)
    query: str | None = None
    calls: list[CallReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.keys and len(self.keys) != len(self.chunks):
            raise ValueError(f"{len(self.keys)} store keys for {len(self.chunks)} chunks")
        self.keys = self.keys or [None] * len(self.chunks)

    @property
    def hits(self) -> int:
        """Segments linked from the store, over every LLM call of the query."""
        return sum(c.store_hits for c in self.calls)

    @property
    def misses(self) -> int:
        """Segments whose KV was computed because the store lacked it, over every call."""
        return sum(c.store_misses for c in self.calls)

    @property
    def first_call(self) -> CallReport | None:
        return self.calls[0] if self.calls else None


KV_KEY = "epic_rag_kv_key"  # node metadata: the store key of the node's chunk KV (hidden from LLM and embedder)
CONTEXT_KEY = "epic_rag_compiled_after"  # node metadata: ids of the nodes its KV was compiled after (hidden too)

_current: ContextVar[Handoff | None] = ContextVar("epic_rag_handoff", default=None)


def current_handoff() -> Handoff | None:
    """The handoff of this thread or task's current query, if a postprocessor made one."""
    return _current.get()


def set_handoff(handoff: Handoff | None) -> None:
    _current.set(handoff)


def node_key(node: BaseNode) -> str | None:
    """The chunk KV store key `EpicKVPrecompute` recorded on a node, if any."""
    return node.metadata.get(KV_KEY)


def store_keys(prompt: PromptBuilder, node: BaseNode) -> set[str]:
    """The KV store keys a node uses: its recorded entry, and its chunk's plain entry (what linked
    compile starts from, and what a node without a recorded key is found by). `prompt` (the
    engine's `PromptBuilder`) is all it takes: the tokenizer and the fingerprint, not the model."""
    text = llm_text(node)
    keys = {prompt.key_of(prompt.chunk_token_ids(text))} if text else set()
    return keys | ({node.metadata[KV_KEY]} if node.metadata.get(KV_KEY) else set())


def llm_text(node: BaseNode) -> str:
    """A node's text exactly as the synthesizer puts it into the prompt (LLM metadata mode, stripped)."""
    return node.get_content(metadata_mode=MetadataMode.LLM).strip()
