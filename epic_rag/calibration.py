"""Measure recompute policies on the user's own chunks, with no labels: a per-model accuracy gate.

Each sample is a question and the chunks retrieval returned for it. Full recompute
answers it greedily; every candidate policy then prefills the same prompt from the
same cache and is compared with it: KL of the first-token distribution, mean KL along
full recompute's answer (teacher forced), and whether its own greedy answer is the
same. The recommended policy is the one closest to full recompute (lowest
teacher-forced KL) among those at most `max_slowdown` times slower than AttnLink(16).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .agreement import against_reference, greedy_decode
from .policies import parse_policy
from .policy_spec import CANDIDATES

REFERENCE = "full"
SPEED_REFERENCE = "attnlink:16"


@dataclass
class Sample:
    question: str
    chunks: list[str]  # texts or chunk ids, in the order retrieval returned them


@dataclass
class PolicyScore:
    """How one policy did over all samples, against full recompute."""

    policy: str
    kl_first: float  # mean KL of the first-token distribution
    kl_teacher_forced: float  # mean over samples of the mean KL along full recompute's answer
    agree: float  # fraction of samples whose greedy answer equals full recompute's
    ttft_s: float  # median prefill time
    recomputed: float  # mean fraction of prompt tokens recomputed
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _compare(engine, layout, policy, reference: dict, max_new: int) -> dict:
    pre = engine.prefill(layout, policy, extra_capacity=max_new + 1)
    ids, kl_first, kl_tf = against_reference(engine, pre, layout.length, max_new, reference)
    return {
        "kl_first": kl_first,
        "kl_tf": kl_tf,
        "agree": float(ids == reference["ids"]),
        "ttft_s": pre.stats.ttft_s,
        "recomputed": pre.stats.recomputed_fraction,
    }


def calibrate(
    engine,
    samples: Sequence[Sample],
    candidates: Sequence[str] = CANDIDATES,
    system: str | None = None,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> list[PolicyScore]:
    """Score every candidate policy on every sample against full recompute."""
    if not samples:
        raise ValueError("calibration needs at least one sample (question and chunks)")
    specs = [parse_policy(c).spec for c in candidates]
    rows: dict[str, list[dict]] = {s: [] for s in specs}
    for sample in tqdm(samples, desc="calibrating", unit="sample", disable=not progress):
        layout = engine.layout(sample.question, sample.chunks, system)
        engine.prefill(layout, "reuse")  # every chunk in the store, kernels warm: no policy pays for it
        full = engine.prefill(layout, REFERENCE, extra_capacity=max_new_tokens + 1)
        ids, steps = greedy_decode(engine, full, layout.length, max_new_tokens)
        reference = {"ids": ids, "steps": torch.stack(steps)}
        for spec in specs:
            rows[spec].append(_compare(engine, layout, spec, reference, max_new_tokens))
    return [
        PolicyScore(
            policy=spec,
            kl_first=statistics.fmean(r["kl_first"] for r in items),
            kl_teacher_forced=statistics.fmean(r["kl_tf"] for r in items),
            agree=statistics.fmean(r["agree"] for r in items),
            ttft_s=statistics.median(r["ttft_s"] for r in items),
            recomputed=statistics.fmean(r["recomputed"] for r in items),
            samples=len(items),
        )
        for spec, items in rows.items()
    ]


def recommend(scores: Sequence[PolicyScore], max_slowdown: float = 1.5) -> str:
    """The policy closest to full recompute (teacher-forced KL, then first-token KL) among
    those no more than `max_slowdown` times slower than AttnLink(16) (all, if it was not measured)."""
    speed = next((s.ttft_s for s in scores if s.policy == SPEED_REFERENCE), None)
    eligible = [s for s in scores if speed is None or s.ttft_s <= max_slowdown * speed]
    return min(eligible, key=lambda s: (s.kl_teacher_forced, s.kl_first)).policy


def format_scores(scores: Sequence[PolicyScore], recommended: str | None = None) -> str:
    """Markdown table, one row per policy; the recommended one marked."""
    lines = [
        "| policy | KL first token | KL teacher-forced | agree with full | TTFT s (median) | recomputed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        mark = " (recommended)" if s.policy == recommended else ""
        lines.append(
            f"| {s.policy}{mark} | {s.kl_first:.4f} | {s.kl_teacher_forced:.4f} | {s.agree * 100:.0f}% | "
            f"{s.ttft_s:.3f} | {s.recomputed * 100:.1f}% |"
        )
    return "\n".join(lines)
