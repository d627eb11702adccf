"""Recompute policies: which positions run through the model at query time.

A policy owns its whole selection, in up to three steps the engine calls in order:
`select(layout)` names the positions to recompute before anything is linked (segments it
selects entirely are never loaded); `refine(layout, positions, probe)` may add positions
once the linked cache exists, after looking at the model through `probe`; and
`layer_hook(layout)` may narrow the positions mid-forward, after one layer. A new
policy is a new small class; the engine has no branch for any of them. Any policy can
also correct the K/V of the chunk tokens it reuses by what recomputing their chunk's head
changed (`policy+shift:w`), and rescale the attention paid to them (`policy+ape:T:S`). Before
selecting, every policy is handed the engine's measured time model (`with_timing`); only
a policy that spends a time budget uses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from .forward import LayerHook, LayerState, query_attention
from .layout import PromptLayout
from .policy_spec import parse_spec
from .rescale import AttentionRescale
from .shift import OffsetCorrection
from .timing import TimeModel


class Probe:
    """Runs positions of the prompt through the layers over the linked cache (no logits).

    Given to `refine`: the pass writes K/V at the positions it runs, so a policy probes
    only positions it then recomputes (the question always is)."""

    def __init__(self, n_layers: int, run: Callable[[torch.Tensor, LayerHook], None]) -> None:
        self.n_layers = n_layers
        self._run = run

    def __call__(self, positions: torch.Tensor, hook: LayerHook) -> None:
        self._run(positions, hook)


class RecomputePolicy(ABC):
    """Chooses the positions to recompute; the last position is always among them."""

    rescale: AttentionRescale | None = None  # applied to attention over the reused chunk tokens
    shift: OffsetCorrection | None = None  # applied to the reused chunk tokens' K/V, layer by layer

    @abstractmethod
    def select(self, layout: PromptLayout) -> torch.Tensor:
        """Sorted int64 positions to run through the layers."""

    def refine(self, layout: PromptLayout, positions: torch.Tensor, probe: Probe) -> torch.Tensor:
        """Positions to recompute once the cache is linked: `positions` plus any added ones."""
        return positions

    def layer_hook(self, layout: PromptLayout) -> LayerHook | None:
        """A hook that narrows the positions mid-forward, or None."""
        return None

    def with_timing(self, timing: TimeModel) -> RecomputePolicy:
        """This policy with the engine's time model at hand (most policies ignore it)."""
        return self

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


def chunk_heads(layout: PromptLayout, k: int) -> torch.Tensor:
    """The first `k` positions of every chunk that no longer starts at position 0."""
    heads = [torch.arange(c.start, c.start + min(k, c.token_ids.numel())) for c in layout.chunks if c.start > 0]
    return torch.cat(heads) if heads else torch.empty(0, dtype=torch.int64)


def with_question(layout: PromptLayout, positions: torch.Tensor) -> torch.Tensor:
    """`positions` plus every computed position (question, text between chunks), sorted."""
    return torch.cat([positions, layout.computed_positions()]).unique(sorted=True)


class FullRecompute(RecomputePolicy):
    """Ordinary prefill of the whole prompt: the accuracy reference."""

    spec = "full"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return torch.arange(layout.length)


class FullReuse(RecomputePolicy):
    """Naive reuse: link every cached segment, compute only the question."""

    spec = "reuse"

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return layout.computed_positions()


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
        return with_question(layout, chunk_heads(layout, self.k))


class _ValueDeviation(LayerHook):
    """CacheBlend's check: after one layer, keep the chunk tokens whose values moved most."""

    def __init__(self, layer: int, ratio: float, layout: PromptLayout) -> None:
        self.layers, self.ratio, self.layout = (layer,), ratio, layout

    def before(self, state: LayerState) -> None:
        where = state.positions.to(state.cache.values.device)
        self.cached = state.cache.values[state.layer, 0][:, where].clone()  # [kv_heads, S, head_dim]

    def after(self, state: LayerState) -> torch.Tensor:
        fresh = state.cache.values[state.layer, 0][:, state.positions.to(state.cache.values.device)]
        deviation = (fresh.float() - self.cached.float()).pow(2).sum(dim=(0, 2)).cpu()  # [S]
        keep = torch.isin(state.positions, self.layout.computed_positions())
        candidates = (~keep).nonzero().squeeze(1)
        n_keep = int(round(self.ratio * candidates.numel()))
        if n_keep:
            keep[candidates[deviation[candidates].topk(n_keep).indices]] = True
        return keep


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

    def layer_hook(self, layout: PromptLayout) -> LayerHook:
        return _ValueDeviation(self.check_layer, self.ratio, layout)


class _QuestionAttention(LayerHook):
    """Sums, per key position, the attention the probed tokens pay it at some layers;
    ends the probe after the last of them."""

    def __init__(self, layers: Sequence[int], length: int) -> None:
        self.layers = tuple(sorted(layers))
        self.scores = torch.zeros(length)  # [length]

    def before(self, state: LayerState) -> None:
        self.layer_input = state.hidden

    def after(self, state: LayerState) -> torch.Tensor | None:
        probs = query_attention(state, self.layer_input)  # [heads, S, length]
        self.scores[: state.length] += probs.sum(dim=(0, 1)).cpu() / probs.shape[0]
        if state.layer == self.layers[-1]:
            return torch.zeros(state.positions.numel(), dtype=torch.bool)
        return None


class QueryGuided(RecomputePolicy):
    """Query-guided selection at AttnLink(k)'s cost: run the question over the linked cache,
    score each chunk token by the attention the question pays it at `layers` (negative
    counts from the last), and recompute the first `sinks` tokens of every displaced
    chunk plus the best-scored tokens, up to the number AttnLink(k) recomputes."""

    def __init__(self, k: int = 16, sinks: int = 4, layers: Sequence[int] | str = (-1,)) -> None:
        if k < 0 or sinks < 0:
            raise ValueError(f"guided needs k >= 0 and sinks >= 0, got k={k}, sinks={sinks}")
        if not layers:
            raise ValueError("guided needs at least one scoring layer")
        self.k, self.sinks = int(k), int(sinks)
        self.layers: tuple[int, ...] | str = "all" if layers == "all" else tuple(int(i) for i in layers)

    @property
    def spec(self) -> str:
        parts = [f"guided:{self.k}"]
        if self.sinks != 4 or self.layers != (-1,):
            parts.append(str(self.sinks))
        if self.layers != (-1,):
            parts.append(self.layers if self.layers == "all" else "+".join(str(i) for i in self.layers))
        return ":".join(parts)

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return with_question(layout, chunk_heads(layout, self.sinks))

    def refine(self, layout: PromptLayout, positions: torch.Tensor, probe: Probe) -> torch.Tensor:
        extra = AttnLink(self.k).select(layout).numel() - positions.numel()
        if extra <= 0 or not layout.chunks:
            return positions
        every = range(probe.n_layers)  # "all": the question's attention averaged over every layer (ProphetKV)
        layers = sorted({i % probe.n_layers for i in (every if self.layers == "all" else self.layers)})
        hook = _QuestionAttention(layers, layout.length)
        probe(layout.computed_positions(), hook)
        in_chunks = torch.zeros(layout.length, dtype=torch.bool)
        for c in layout.chunks:
            in_chunks[c.start : c.end] = True
        in_chunks[positions] = False
        candidates = in_chunks.nonzero().squeeze(1)
        top = hook.scores[candidates].topk(min(extra, candidates.numel())).indices
        return torch.cat([positions, candidates[top]]).sort().values


class _Adjusted(RecomputePolicy):
    """Another policy's selection, with something done to the chunk tokens it leaves reused."""

    def __init__(self, inner: RecomputePolicy) -> None:
        self.inner, self.rescale, self.shift = inner, inner.rescale, inner.shift

    def select(self, layout: PromptLayout) -> torch.Tensor:
        return self.inner.select(layout)

    def refine(self, layout: PromptLayout, positions: torch.Tensor, probe: Probe) -> torch.Tensor:
        return self.inner.refine(layout, positions, probe)

    def layer_hook(self, layout: PromptLayout) -> LayerHook | None:
        return self.inner.layer_hook(layout)

    def with_timing(self, timing: TimeModel) -> RecomputePolicy:
        inner = self.inner.with_timing(timing)
        return self if inner is self.inner else self.around(inner)

    @abstractmethod
    def around(self, inner: RecomputePolicy) -> RecomputePolicy:
        """The same adjustment around another inner policy."""


class Rescaled(_Adjusted):
    """Another policy's selection, with APE attention rescaling on what stays reused."""

    def __init__(self, inner: RecomputePolicy, rescale: AttentionRescale) -> None:
        super().__init__(inner.inner if isinstance(inner, Rescaled) else inner)
        self.rescale = rescale

    @property
    def spec(self) -> str:
        return f"{self.inner.spec}+{self.rescale.spec}"

    def around(self, inner: RecomputePolicy) -> RecomputePolicy:
        return Rescaled(inner, self.rescale)


class Shifted(_Adjusted):
    """Another policy's selection, with the KV offset correction on what stays reused."""

    def __init__(self, inner: RecomputePolicy, shift: OffsetCorrection) -> None:
        super().__init__(inner.inner if isinstance(inner, Shifted) else inner)
        self.shift = shift

    @property
    def spec(self) -> str:
        return f"{self.inner.spec}+{self.shift.spec}"

    def around(self, inner: RecomputePolicy) -> RecomputePolicy:
        return Shifted(inner, self.shift)


class TtftBudget(RecomputePolicy):
    """Spend a time-to-first-token target as well as it goes: full recompute (exact) when the
    time model says it fits, else AttnLink(k) with the largest k that fits, the question always.

    The target is `seconds`, or `multiple` times the predicted reuse floor (question only).
    Predictions come from the engine's own measured prefills (`timing`), never a constant."""

    def __init__(self, seconds: float | None = None, multiple: float | None = None, timing: TimeModel | None = None):
        if (seconds is None) == (multiple is None):
            raise ValueError("budget takes either seconds or a multiple of the reuse floor")
        self.seconds, self.multiple, self.timing = seconds, multiple, timing

    @property
    def spec(self) -> str:
        return f"budget:{self.seconds:g}" if self.seconds is not None else f"budget:{self.multiple:g}x"

    def with_timing(self, timing: TimeModel) -> RecomputePolicy:
        return TtftBudget(self.seconds, self.multiple, timing)

    def target(self, layout: PromptLayout) -> float:
        """The seconds this prompt may take."""
        if self.seconds is not None:
            return self.seconds
        return self.multiple * self._predict(FullReuse().select(layout).numel(), layout)

    def select(self, layout: PromptLayout) -> torch.Tensor:
        target = self.target(layout)
        if self._predict(layout.length, layout, linked=0) <= target:
            return torch.arange(layout.length)
        longest = max((c.token_ids.numel() for c in layout.chunks), default=0)
        lo, hi = 0, longest  # the largest k whose AttnLink(k) fits; k = 0 (reuse) when none does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._predict(AttnLink(mid).select(layout).numel(), layout) <= target:
                lo = mid
            else:
                hi = mid - 1
        return AttnLink(lo).select(layout)

    def _predict(self, recomputed: int, layout: PromptLayout, linked: int | None = None) -> float:
        if self.timing is None:
            raise ValueError("a budget policy needs the engine's time model: run it through an EpicEngine")
        segments = sum(1 for s in layout.segments if s.key is not None) if linked is None else linked
        return self.timing.predict(recomputed, layout.length, segments)


def parse_policy(spec: str | RecomputePolicy) -> RecomputePolicy:
    """A policy from its spec (see `policy_spec.parse_spec` for the grammar), or the policy itself."""
    if isinstance(spec, RecomputePolicy):
        return spec
    parsed = parse_spec(spec)
    try:
        base = _BUILDERS[parsed.name](*parsed.args)
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from None
    if parsed.shift is not None:
        base = Shifted(base, OffsetCorrection(parsed.shift))
    return Rescaled(base, AttentionRescale(*parsed.rescale)) if parsed.rescale else base


_BUILDERS: dict[str, Callable[..., RecomputePolicy]] = {
    "full": FullRecompute,
    "reuse": FullReuse,
    "prefix": PrefixOnly,
    "attnlink": AttnLink,
    "cacheblend": CacheBlend,
    "guided": QueryGuided,
    "budget": TtftBudget,
}
