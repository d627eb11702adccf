"""The lines printed after an answer: its sources, and what it reused (chunks and prompt head apart).

Shared by `epic-rag ask`, `epic-rag chat` and the example chatbot. Imports nothing heavy:
it formats the `CallReport`s the LLM left in the query's handoff, whose chunk and prompt-head
counts come from the engine's own segment counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from epic_rag.integrations.llama_index.handoff import CallReport, Handoff


@dataclass
class Reuse:
    """What one or more LLM calls linked: the chunks found in their prompts and the prompt heads.

    A prompt head (system prompt and template up to the first chunk) is "cached" when linked
    from the store, "computed" when the store lacked it (it is stored for the next query) and
    "recomputed" when the call did not link it (the policy recomputes it, or no chunk was found)."""

    chunks_linked: int = 0  # chunks found in the prompts and laid out as cached segments
    chunk_hits: int = 0
    chunk_misses: int = 0
    heads: Counter[str] = field(default_factory=Counter)  # head state -> calls

    def add(self, call: CallReport) -> None:
        """Count one call, as the engine counted its segments (chunks and the prompt head apart)."""
        if call.chunks_matched == 0:
            return  # no chunk found: the whole prompt was computed, no head segment was laid out
        self.chunks_linked += call.chunks_matched
        self.chunk_hits += call.chunk_hits
        self.chunk_misses += call.chunk_misses
        self.heads["recomputed" if call.prefix == "none" else call.prefix] += 1

    @property
    def chunks_loaded(self) -> int:
        """Chunks whose KV was linked (hit) or computed for the link (miss); the rest were recomputed."""
        return self.chunk_hits + self.chunk_misses

    def line(self) -> str:
        """``chunks: 3 linked (3 hits, 0 misses) | prompt head: cached``."""
        if self.chunks_linked and not self.chunks_loaded:
            chunks = f"chunks: {self.chunks_linked} found, recomputed"
        else:
            chunks = f"chunks: {self.chunks_linked} linked ({self.chunk_hits} hits, {self.chunk_misses} misses)"
        if not self.heads:
            head = "prompt head: recomputed"
        elif len(self.heads) == 1 and sum(self.heads.values()) == 1:
            head = f"prompt head: {next(iter(self.heads))}"
        else:
            head = "prompt heads: " + ", ".join(f"{n} {state}" for state, n in sorted(self.heads.items()))
        return f"{chunks} | {head}"


def reuse_of(calls: list[CallReport]) -> Reuse:
    """The chunks and prompt heads `calls` linked, counted apart."""
    reuse = Reuse()
    for call in calls:
        reuse.add(call)
    return reuse


def format_report(source_nodes: list[Any], handoff: Handoff | None, before: list[CallReport] | None = None) -> str:
    """The sources line and the reuse line: TTFT, chunks and prompt head, recomputed tokens.

    `before`: model calls made ahead of retrieval (condensing a follow-up), counted in the totals."""
    sources = ", ".join(
        f"{n.node.metadata.get('file_name', n.node.node_id)} ({n.score:.2f})"
        if n.score is not None
        else str(n.node.metadata.get("file_name", n.node.node_id))
        for n in source_nodes
    )
    lines = [f"sources: {sources or '(none)'}"]
    if handoff is not None and handoff.calls:
        calls = (before or []) + handoff.calls
        answer = handoff.calls[0]
        recomputed = sum(c.tokens_recomputed for c in calls)
        total = sum(c.tokens_total for c in calls)
        lines.append(
            f"ttft: {answer.ttft_s:.2f} s | {reuse_of(calls).line()} | recomputed tokens: {recomputed} of {total} | "
            f"policy: {answer.policy}" + (f" | llm calls: {len(calls)}" if len(calls) > 1 else "")
        )
    return "\n".join(lines)
