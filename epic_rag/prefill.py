"""Selective prefill: load the cached segments, link them, recompute what the policy selects.

Three timed steps over one prompt layout: fetch the stored KV of every segment the policy
does not fully recompute (a miss is compiled on the spot and counted), link it into the
positional cache with keys re-rotated to their global positions, then let the policy
refine its choice (probes) and run the chosen positions through every layer. Each prefill
whose cost its token counts describe (no mid-forward narrowing) is one observation of the
engine's time model, which time-budget policies predict from.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .cache import PositionalKVCache
from .forward import LayerHook, checkpoint, paused_seconds, run_layers
from .kv import ChunkKV
from .layout import COMPUTED, Kind, PromptLayout, Segment
from .policies import Probe, RecomputePolicy
from .results import PrefillResult, PrefillStats
from .shift import ChunkShifter
from .timing import Measure, TimeModel

FetchSegment = Callable[[Segment], tuple[ChunkKV, bool]]  # segment -> (its stored KV, was it a store hit)


def load_segments(
    layout: PromptLayout, skip: torch.Tensor, fetch: FetchSegment, stats: PrefillStats
) -> list[tuple[Segment, ChunkKV]]:
    """The stored KV of every cached segment not wholly in `skip` ([N] bool), counted and timed
    (the time it paused for interleaved work is in neither `compile_s` nor `kv_load_s`)."""
    start, paused, linked = time.perf_counter(), paused_seconds(), []
    for seg in layout.segments:
        if seg.kind in COMPUTED or skip[seg.start : seg.end].all():
            continue
        checkpoint()
        t0, paused_before = time.perf_counter(), paused_seconds()
        entry, hit = fetch(seg)
        linked.append((seg, entry))
        stats.store_hits += hit
        stats.store_misses += not hit
        if seg.kind is Kind.PREFIX:
            stats.prefix = "cached" if hit else "computed"
        else:
            stats.chunk_hits += hit
            stats.chunk_misses += not hit
        stats.compile_s += 0.0 if hit else time.perf_counter() - t0 - (paused_seconds() - paused_before)
    stats.kv_load_s = time.perf_counter() - start - stats.compile_s - (paused_seconds() - paused)
    if stats.prefix == "none" and layout.prefix is not None and layout.prefix.key is not None:
        stats.prefix = "recomputed"
    return linked


@torch.inference_mode()
def selective_prefill(
    model: nn.Module,
    layout: PromptLayout,
    policy: RecomputePolicy,
    cache: PositionalKVCache,
    fetch: FetchSegment,
    inv_freq: torch.Tensor,
    progress_tokens: int | None = None,
    timing: TimeModel | None = None,
) -> PrefillResult:
    """Prefill `layout` into the empty `cache` under `policy`; the next-token logits and stats.

    A prefill computing `progress_tokens` tokens or more shows a bar over the layers; `timing`
    is handed to the policy and learns this prefill's cost."""
    stats = PrefillStats(policy=policy.spec, tokens_total=layout.length, chunks=len(layout.chunks))
    start, paused = time.perf_counter(), paused_seconds()
    if timing is not None:
        policy = policy.with_timing(timing)
    positions = policy.select(layout)
    hook = policy.layer_hook(layout)
    skip = torch.zeros(layout.length, dtype=torch.bool)
    if hook is None:  # a hook may narrow to any position: then every segment is linked
        skip[positions] = True
    linked = load_segments(layout, skip, fetch, stats)

    t0 = time.perf_counter()
    cache.rescale = policy.rescale
    spans = [(c.start, c.end) for c in layout.chunks]
    cache.shift = ChunkShifter(policy.shift, spans, inv_freq) if policy.shift is not None else None
    for seg, entry in linked:
        cache.link(entry, seg.start, inv_freq)
    stats.link_s = time.perf_counter() - t0

    t0 = time.perf_counter()

    def run(chosen: torch.Tensor, **kwargs):
        return run_layers(model, cache, layout.ids[chosen], chosen, layout.length, **kwargs)

    def probe_run(probed: torch.Tensor, probe_hook: LayerHook) -> None:
        stats.tokens_probed += probed.numel()
        run(probed, hook=probe_hook, logits=None)

    positions = policy.refine(layout, positions, Probe(model.config.num_hidden_layers, probe_run))
    out = run(positions, hook=hook, progress=progress_tokens is not None and positions.numel() >= progress_tokens)
    stats.recompute_s = time.perf_counter() - t0
    cache.shift = None  # the prompt is prefilled: decoded tokens fall in no chunk
    stats.tokens_recomputed = out.positions.numel()
    stats.tokens_reused = layout.length - positions.numel()
    stats.ttft_s = time.perf_counter() - start
    stats.paused_s = paused_seconds() - paused
    if timing is not None and hook is None:  # compiling missing entries and others' decoding are not its cost
        own_s = stats.ttft_s - stats.compile_s - stats.paused_s
        timing.observe(stats.tokens_recomputed + stats.tokens_probed, layout.length, len(linked), own_s)
    return PrefillResult(cache, out.logits, stats, out.positions)


def forward_timer(model: nn.Module, new_cache: Callable[[int], PositionalKVCache]) -> Measure:
    """Seconds one forward of n tokens takes over a context of `length` (the last n positions
    of a zero-filled cache): the time model's own measurement before real prefills teach it."""

    @torch.inference_mode()
    def measure(n: int, length: int) -> float:
        cache = new_cache(length).zeroed()
        ids = torch.zeros(n, dtype=torch.int64)
        start, paused = time.perf_counter(), paused_seconds()
        run_layers(model, cache, ids, torch.arange(length - n, length), length)
        return time.perf_counter() - start - (paused_seconds() - paused)

    return measure
