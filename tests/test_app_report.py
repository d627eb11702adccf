"""The stats line: linked chunks and the cached prompt head counted apart, from the segment counts
each LLM call reports (the head is one segment more than the chunks when a call links it)."""

from __future__ import annotations

import pytest
from epic_rag.app.report import format_report, reuse_of
from epic_rag.integrations.llama_index.handoff import CallReport, Handoff
from llama_index.core.schema import NodeWithScore, TextNode


def call(matched: int, hits: int, misses: int, policy: str = "attnlink:16", handed: int = 3) -> CallReport:
    """A call's report as EpicLLM fills it (only the counts the line reads matter here)."""
    return CallReport(
        chunks_handed=handed,
        chunks_matched=matched,
        tokens_total=600,
        tokens_reused=490,
        tokens_recomputed=110,
        store_hits=hits,
        store_misses=misses,
        ttft_s=0.25,
        policy=policy,
    )


@pytest.mark.parametrize(
    ("report", "line"),
    [
        # the case that read "cache hits: 4" beside "chunks linked: 3": three chunks and the head, all hits
        (call(3, 4, 0), "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"),
        (call(3, 3, 1), "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed"),  # a head's first use
        (call(3, 0, 4), "chunks: 3 linked (0 hits, 3 misses) | prompt head: computed"),  # an emptied store
        (call(2, 2, 0), "chunks: 2 linked (2 hits, 0 misses) | prompt head: recomputed"),  # the question heads it
        (call(3, 0, 0, "full"), "chunks: 3 found, recomputed | prompt head: recomputed"),
        (call(3, 1, 0, "prefix"), "chunks: 3 found, recomputed | prompt head: cached"),
        (call(3, 4, 0, "attnlink:16+ape:0.9:0.9"), "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"),
        (call(0, 0, 0, handed=3), "chunks: 0 linked (0 hits, 0 misses) | prompt head: recomputed"),  # none found
    ],
)
def test_one_call_counts_chunks_and_the_prompt_head_apart(report, line):
    assert reuse_of([report]).line() == line


def test_several_calls_add_up_and_a_condense_call_links_nothing():
    refine = [call(1, 2, 0), call(1, 1, 1), call(1, 2, 0)]  # three refine calls, one chunk each; the second head new
    assert reuse_of(refine).line() == "chunks: 3 linked (3 hits, 0 misses) | prompt heads: 2 cached, 1 computed"
    condense = call(0, 0, 0, handed=0)  # the follow-up rewritten before retrieval: no chunks, no head
    assert reuse_of([condense, call(3, 4, 0)]).line() == "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"


def test_the_report_names_the_sources_and_totals_every_call():
    nodes = [
        NodeWithScore(node=TextNode(text="It runs 19 months.", metadata={"file_name": "skylark_s3.md"}), score=0.5),
        NodeWithScore(node=TextNode(text="Batteries: two years.", metadata={"file_name": "support.md"}), score=0.43),
    ]
    handoff = Handoff(chunks=["a", "b"], calls=[call(2, 3, 0, handed=2)])
    condense = call(0, 0, 0, handed=0)
    assert format_report(nodes, handoff, before=[condense]).splitlines() == [
        "sources: skylark_s3.md (0.50), support.md (0.43)",
        "ttft: 0.25 s | chunks: 2 linked (2 hits, 0 misses) | prompt head: cached | recomputed tokens: 220 of 1200 | "
        "policy: attnlink:16 | llm calls: 2",
    ]
    assert format_report([], None) == "sources: (none)"
