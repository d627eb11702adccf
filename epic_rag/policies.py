"""Recompute policies: which positions run through the model at query time.

Every policy answers one question, `select(layout)`: the sorted global positions
whose K/V are recomputed (the rest come linked from the cache). CacheBlend also
narrows its selection once, at its check layer, from the deviation of fresh values
against cached ones. A new policy is a new small class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .layout import PromptLayout


class RecomputePolicy(ABC):
    """Chooses the positions to recompute; the last position is always among them."""

    check_layer: int | None = None  # layer after which `narrow` is called (None: never)

    @abstractmethod
    def select(self, layout: PromptLayout) -> torch.Tensor:
        """Sorted int64 positions to run through the layers."""

    def narrow(self, layout: PromptLayout, positions: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        """Boolean mask over `positions` to keep after the check layer ([S] deviation per token)."""
        return torch.ones_like(positions, dtype=torch.bool)

    @property
    @abstractmethod
    def spec(self) -> str:
        """The string `parse_policy` turns back into this policy."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecomputePolicy) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def _question_positions(layout: PromptLayout) -> torch.Tensor:
    """The question and any text between chunks: positions with no cached KV."""
    return layout.computed_positions()


class FullRecompute(RecomputePolicy):
    """Ordinary prefill of the whole prompt: the accuracy reference."""

    spec = "full"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return torch.arange(layout.length)


class FullReuse(RecomputePolicy):
    """Naive reuse: link every cached segment, compute only the question."""

    spec = "reuse"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return _question_positions(layout)


class PrefixOnly(RecomputePolicy):
    """Prefix caching: reuse the exact system prefix, compute everything after it."""

    spec = "prefix"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return torch.arange(layout.prefix_end, layout.length)


class AttnLink(RecomputePolicy):
    """EPIC's AttnLink / LegoLink-k: recompute the first k tokens of every chunk that
    no longer starts at position 0 (its attention sink), plus the question."""

    def __init__(self, k: int = 16) -> None:
        if k < 0:
            raise ValueError(f"AttnLink needs k >= 0, got {k}")
        self.k = int(k)

    @property
    def spec(self) -> str:
        return f"attnlink:{self.k}"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        heads = [
            torch.arange(c.start, c.start + min(self.k, c.token_ids.numel())) for c in layout.chunks if c.start > 0
        ]
        return torch.cat(heads + [_question_positions(layout)]).sort().values


class CacheBlend(RecomputePolicy):
    """CacheBlend-r: recompute every chunk and question token up to `check_layer`, then
    keep only the `ratio` of chunk tokens whose values deviate most (and the question)."""

    def __init__(self, ratio: float = 0.15, check_layer: int = 1) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"CacheBlend ratio must be in [0, 1], got {ratio}")
        self.ratio, self.check_layer = float(ratio), int(check_layer)

    @property
    def spec(self) -> str:
        suffix = f":{self.check_layer}" if self.check_layer != 1 else ""
        return f"cacheblend:{self.ratio:g}{suffix}"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return torch.arange(layout.prefix_end, layout.length)

    def narrow(self, layout: PromptLayout, positions: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        keep = torch.isin(positions, layout.computed_positions())
        candidates = (~keep).nonzero().squeeze(1)
        n_keep = int(round(self.ratio * candidates.numel()))
        if n_keep:
            top = deviation[candidates].topk(n_keep).indices
            keep[candidates[top]] = True
        return keep


def parse_policy(spec: str | RecomputePolicy) -> RecomputePolicy:
    """'full' | 'reuse' | 'prefix' | 'attnlink[:k]' | 'cacheblend[:ratio[:check_layer]]' -> policy."""
    if isinstance(spec, RecomputePolicy):
        return spec
    name, *args = [p.strip() for p in str(spec).strip().lower().split(":")]
    try:
        if name in ("full", "fullrecompute", "full_recompute") and not args:
            return FullRecompute()
        if name in ("reuse", "fullreuse", "full_reuse", "naive") and not args:
            return FullReuse()
        if name in ("prefix", "prefixonly", "prefix_only") and not args:
            return PrefixOnly()
        if name in ("attnlink", "legolink") and len(args) <= 1:
            return AttnLink(int(args[0]) if args else 16)
        if name == "cacheblend" and len(args) <= 2:
            return CacheBlend(float(args[0]) if args else 0.15, int(args[1]) if len(args) > 1 else 1)
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from None
    raise ValueError(
        f"unknown policy {spec!r}; use one of: full, reuse, prefix, attnlink:K (e.g. attnlink:16), "
        "cacheblend:R (e.g. cacheblend:0.15)"
    )
