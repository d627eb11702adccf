"""The stats line: linked chunks and the cached prompt head counted apart, as the engine counted
each call's segments (chunk hits and misses, and the prompt head's state)."""

from __future__ import annotations

import pytest
from epic_rag.app.report import format_report, reuse_of
from epic_rag.integrations.llama_index.handoff import CallReport, Handoff
from llama_index.core.schema import NodeWithScore, TextNode


def call(
    matched: int, hits: int, misses: int, prefix: str = "cached", policy: str = "attnlink:16", handed: int = 3
) -> CallReport:
    """A call's report as EpicLLM fills it from the engine's stats: `hits`/`misses` are chunk segments."""
    head_hit, head_miss = prefix == "cached", prefix == "computed"
    return CallReport(
        chunks_handed=handed,
        chunks_matched=matched,
        tokens_total=600,
        tokens_reused=490,
        tokens_recomputed=110,
        store_hits=hits + head_hit,
        store_misses=misses + head_miss,
        ttft_s=0.25,
        policy=policy,
        chunk_hits=hits,
        chunk_misses=misses,
        prefix=prefix,
    )


@pytest.mark.parametrize(
    ("report", "line"),
    [
        # the case that read "cache hits: 4" beside "chunks linked: 3": three chunks and the head, all hits
        (call(3, 3, 0), "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"),
        (call(3, 3, 0, "computed"), "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed"),  # first use
        (call(3, 0, 3, "computed"), "chunks: 3 linked (0 hits, 3 misses) | prompt head: computed"),  # emptied store
        (call(2, 2, 0, "none"), "chunks: 2 linked (2 hits, 0 misses) | prompt head: recomputed"),  # question first
        (call(3, 0, 0, "recomputed", "full"), "chunks: 3 found, recomputed | prompt head: recomputed"),
        (call(3, 0, 0, "cached", "prefix"), "chunks: 3 found, recomputed | prompt head: cached"),
        (call(3, 3, 0, "cached", "budget:2"), "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"),
        (call(3, 0, 0, "recomputed", "budget:99"), "chunks: 3 found, recomputed | prompt head: recomputed"),
        (call(0, 0, 0, "none", handed=3), "chunks: 0 linked (0 hits, 0 misses) | prompt head: recomputed"),
    ],
)
def test_one_call_counts_chunks_and_the_prompt_head_apart(report, line):
    assert reuse_of([report]).line() == line


def test_several_calls_add_up_and_a_condense_call_links_nothing():
    refine = [call(1, 1, 0), call(1, 1, 0, "computed"), call(1, 1, 0)]  # three refine calls; the second head new
    assert reuse_of(refine).line() == "chunks: 3 linked (3 hits, 0 misses) | prompt heads: 2 cached, 1 computed"
    condense = call(0, 0, 0, "none", handed=0)  # the follow-up rewritten before retrieval: no chunks, no head
    assert reuse_of([condense, call(3, 3, 0)]).line() == "chunks: 3 linked (3 hits, 0 misses) | prompt head: cached"


def test_the_report_names_the_sources_and_totals_every_call():
    nodes = [
        NodeWithScore(node=TextNode(text="It runs 19 months.", metadata={"file_name": "skylark_s3.md"}), score=0.5),
        NodeWithScore(node=TextNode(text="Batteries: two years.", metadata={"file_name": "support.md"}), score=0.43),
    ]
    handoff = Handoff(chunks=["a", "b"], calls=[call(2, 2, 0, handed=2)])
    condense = call(0, 0, 0, "none", handed=0)
    assert format_report(nodes, handoff, before=[condense]).splitlines() == [
        "sources: skylark_s3.md (0.50), support.md (0.43)",
        "ttft: 0.25 s | chunks: 2 linked (2 hits, 0 misses) | prompt head: cached | recomputed tokens: 220 of 1200 | "
        "policy: attnlink:16 | llm calls: 2",
    ]
    assert format_report([], None) == "sources: (none)"
