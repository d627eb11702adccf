"""Choosing the next token, and turning a growing list of ids into text deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when temperature is 0; otherwise temperature + nucleus (top-p) sampling. The first
    `min_new_tokens` tokens are never a stop token (stop strings still end the answer)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be from 0 to max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @classmethod
    def from_kwargs(cls, stop: str | Sequence[str] | None = None, **kwargs) -> SamplingParams:
        """Params from keyword arguments; `stop` may be one string or several."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(stop=stops, **kwargs)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token id from next-token `logits` ([vocab])."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest head of the distribution whose mass reaches top_p
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextAssembler:
    """Decodes generated ids to text, cuts at stop strings, and yields only stable text.

    Text that could still become a stop string, or that ends in an incomplete UTF-8
    character, is held back until the next token settles it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly stable text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe = min(safe, len(text[:safe]) - n)
                    break
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (call at the end)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
