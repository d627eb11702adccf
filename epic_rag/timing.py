"""Time to first token as a function of what a prefill does, measured on the running machine.

Every prefill the engine runs is one observation: tokens recomputed n, prompt length L,
segments linked m, seconds. A least-squares fit of

    seconds ≈ a + b·n + c·n·L + d·m

(fixed cost; per-token projections and MLP; attention of the computed tokens over the
context; loading and linking each stored segment) predicts what a selection will cost
before it runs. Until enough prefills have been seen, the model measures a few timed
forwards of its own (`measure`, given by the engine); no constant is tuned to one CPU.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import torch

Measure = Callable[[int, int], float]  # (tokens computed, context length) -> seconds of one forward
MIN_OBSERVATIONS = 4


def _features(n: float, length: float, linked: float) -> list[float]:
    return [1.0, n, n * length / 1000.0, linked]


class TimeModel:
    """Seconds a prefill takes, predicted from (recomputed, length, linked) by a non-negative fit."""

    def __init__(self, measure: Measure | None = None, window: int = 64) -> None:
        self._measure = measure
        self._rows: deque[tuple[list[float], float]] = deque(maxlen=window)  # recent (features, seconds)
        self._coef: list[float] | None = None
        self._lock = threading.Lock()

    def observe(self, recomputed: int, length: int, linked: int, seconds: float) -> None:
        """Add one prefill's measurement; the fit is redone on the next prediction."""
        with self._lock:
            self._rows.append((_features(recomputed, length, linked), float(seconds)))
            self._coef = None

    @property
    def observations(self) -> int:
        return len(self._rows)

    def predict(self, recomputed: int, length: int, linked: int) -> float:
        """Predicted seconds of a prefill recomputing `recomputed` of `length` tokens, linking `linked` segments."""
        coef = self._fitted(length)
        return sum(c * x for c, x in zip(coef, _features(recomputed, length, linked), strict=True))

    def _fitted(self, length: int) -> list[float]:
        if len(self._rows) < MIN_OBSERVATIONS and self._measure is not None:
            self._warm_up(length)
        with self._lock:
            if self._coef is None:
                if len(self._rows) < 2:
                    raise RuntimeError("the time model has no measurements yet: run a prefill or give it `measure`")
                self._coef = _nonnegative_fit(list(self._rows))
            return self._coef

    def _warm_up(self, length: int) -> None:
        """Four short timed forwards: few and more tokens over the full context, and over a quarter
        of it, so per-token and attention costs part; 392 tokens at most in all, never a full prefill."""
        length = max(length, 32)
        for n, context in ((8, length), (64, length), (256, length), (64, length // 4)):
            n = max(1, min(n, context))
            self.observe(n, context, 0, self._measure(n, context))


def _nonnegative_fit(rows: list[tuple[list[float], float]]) -> list[float]:
    """Least squares with every coefficient >= 0: refit without a feature whose weight came out
    negative (a handful of features: the active set settles in a few rounds)."""
    x = torch.tensor([r[0] for r in rows], dtype=torch.float64)  # [rows, features]
    y = torch.tensor([r[1] for r in rows], dtype=torch.float64)  # [rows]
    active = [j for j in range(x.shape[1]) if bool(x[:, j].any())]  # a feature never seen says nothing
    while active:
        cols = x[:, active]
        scale = cols.abs().amax(dim=0)  # columns of very different magnitude
        # SVD-based: stable when the features are (nearly) dependent, as a few warm-up shapes can be
        scaled = torch.linalg.lstsq(cols / scale, y[:, None], driver="gelsd").solution[:, 0]
        solution = scaled / scale
        tolerance = 1e-9 * float(y.abs().max().clamp_min(1e-12))  # round-off is not a negative cost
        negative = [a for a, w in zip(active, scaled.tolist(), strict=True) if w < -tolerance]
        solution = solution.clamp_min(0.0)
        if not negative:
            coef = [0.0] * x.shape[1]
            for a, w in zip(active, solution.tolist(), strict=True):
                coef[a] = w
            return coef
        active.remove(negative[0])
    return [0.0] * x.shape[1]
