"""Decoding from a prefilled prompt: one token loop for the engine and the benchmarks.

`sample_tokens` chooses tokens one by one from next-token logits, asking `extend` for
the logits after each; `Decoding` turns that into streamed text with stop tokens and
stop strings, and keeps what the answer was and why it ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from .results import Generation, PrefillResult, TokenStream
from .sampling import SamplingParams, TextAssembler, choose_token

Extend = Callable[[int], torch.Tensor]  # token id -> [vocab] next-token logits after it


def sample_tokens(logits: torch.Tensor, extend: Extend, params: SamplingParams) -> Iterator[tuple[int, torch.Tensor]]:
    """(token, the [vocab] logits it was chosen from) for up to `max_new_tokens` tokens.

    The caller stops early (at a stop token) by no longer iterating."""
    generator = None
    if params.temperature > 0:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    for step in range(params.max_new_tokens):
        token = choose_token(logits, params, generator)
        yield token, logits
        if step < params.max_new_tokens - 1:
            logits = extend(token)


class Decoding:
    """Iterate for text deltas; afterwards `text`, `ids`, `finish_reason` ("stop" for a stop
    string, "eos" or "length"), `first_token_s` and `decode_s` say what happened."""

    def __init__(
        self, logits: torch.Tensor, extend: Extend, tokenizer, stop_token_ids: set[int], params: SamplingParams
    ) -> None:
        self._tokens = sample_tokens(logits, extend, params)
        self._text = TextAssembler(tokenizer, params.stop)
        self._stop_ids = stop_token_ids
        self.finish_reason = "length"
        self.first_token_s = 0.0
        self.decode_s = 0.0

    @property
    def text(self) -> str:
        return self._text.text

    @property
    def ids(self) -> list[int]:
        return self._text.ids

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        for step, (token, _) in enumerate(self._tokens):
            if step == 0:
                self.first_token_s = time.perf_counter() - start
                start = time.perf_counter()
            if token in self._stop_ids:
                self.finish_reason = "eos"
                break
            delta = self._text.add(token)
            if delta:
                yield delta
            if self._text.stopped:
                self.finish_reason = "stop"
                break
        tail = self._text.flush()
        if tail:
            yield tail
        self.decode_s = time.perf_counter() - start


def stream_answer(
    prefill: Callable[[], PrefillResult],
    extend: Callable[[PrefillResult, list[int]], torch.Tensor],
    tokenizer,
    stop_token_ids: set[int],
    params: SamplingParams,
) -> TokenStream:
    """A TokenStream of one answer: `prefill()` runs on the first `next`, then one `extend` per
    token ([n, vocab] logits after the given ids); `.result` is the Generation at the end."""
    box: list[Generation] = []

    def deltas() -> Iterator[str]:
        pre = prefill()
        decoding = Decoding(pre.logits, lambda token: extend(pre, [token])[-1], tokenizer, stop_token_ids, params)
        yield from decoding
        pre.stats.first_decode_s = decoding.first_token_s
        pre.stats.ttft_s += decoding.first_token_s
        box.append(Generation(decoding.text, decoding.ids, decoding.finish_reason, pre.stats, decoding.decode_s))

    return TokenStream(deltas(), box)
