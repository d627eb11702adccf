"""Decoding from a prefilled prompt: one token loop for the engine and the benchmarks.

`TokenSampler` chooses each next token from next-token logits (greedy, or seeded
sampling); `sample_tokens` runs it one token at a time, asking `extend` for the logits
after each; `Decoding` turns chosen tokens, from there or from the batching scheduler,
into streamed text with stop tokens and stop strings, and keeps what the answer was and
why it ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from .results import Generation, PrefillResult, TokenStream
from .sampling import SamplingParams, TextAssembler, choose_token

Extend = Callable[[int], torch.Tensor]  # token id -> [vocab] next-token logits after it


class TokenSampler:
    """Chooses one answer's tokens: argmax, or draws from its own generator (seeded by `seed`,
    else at random), so an answer samples the same tokens whatever runs beside it; none of
    `stop_token_ids` before `min_new_tokens`."""

    def __init__(self, params: SamplingParams, stop_token_ids: set[int] = frozenset()) -> None:
        self.params = params
        self.banned = torch.tensor(sorted(stop_token_ids), dtype=torch.int64)
        self.chosen = 0
        self.generator = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else torch.seed()
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.chosen < self.params.min_new_tokens and self.banned.numel():
            logits = logits.index_fill(0, self.banned, float("-inf"))
        self.chosen += 1
        return choose_token(logits, self.params, self.generator)


def sample_tokens(
    logits: torch.Tensor, extend: Extend, params: SamplingParams, stop_token_ids: set[int] = frozenset()
) -> Iterator[tuple[int, torch.Tensor]]:
    """(token, the [vocab] logits it was chosen from) for up to `max_new_tokens` tokens.

    The caller stops early (at a stop token) by no longer iterating."""
    choose = TokenSampler(params, stop_token_ids)
    for step in range(params.max_new_tokens):
        token = choose(logits)
        yield token, logits
        if step < params.max_new_tokens - 1:
            logits = extend(token)


class Decoding:
    """Iterate for text deltas; afterwards `text`, `ids`, `finish_reason` ("stop" for a stop
    string, "eos" or "length"), `first_token_s` and `decode_s` say what happened."""

    def __init__(self, tokens: Iterator[int], tokenizer, stop_token_ids: set[int], params: SamplingParams) -> None:
        self._tokens = tokens
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
        try:
            for step, token in enumerate(self._tokens):
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
        finally:
            close = getattr(self._tokens, "close", None)
            if close is not None:  # whoever produces the tokens learns at once that no more are wanted
                close()
        tail = self._text.flush()
        if tail:
            yield tail
        self.decode_s = time.perf_counter() - start


def stream_answer(
    prefill: Callable[[], PrefillResult],
    tokens: Callable[[PrefillResult], Iterator[int]],
    tokenizer,
    stop_token_ids: set[int],
    params: SamplingParams,
) -> TokenStream:
    """A TokenStream of one answer: `prefill()` runs on the first `next`, then `tokens(prefilled)`
    gives the answer's tokens as they are chosen; `.result` is the Generation at the end."""
    box: list[Generation] = []

    def deltas() -> Iterator[str]:
        pre = prefill()
        decoding = Decoding(tokens(pre), tokenizer, stop_token_ids, params)
        yield from decoding
        pre.stats.first_decode_s = decoding.first_token_s
        pre.stats.ttft_s += decoding.first_token_s
        box.append(Generation(decoding.text, decoding.ids, decoding.finish_reason, pre.stats, decoding.decode_s))

    return TokenStream(deltas(), box)


def lone_tokens(
    extend: Callable[[PrefillResult, list[int]], torch.Tensor], params: SamplingParams, stop_token_ids: set[int]
) -> Callable[[PrefillResult], Iterator[int]]:
    """`stream_answer`'s tokens for an answer decoded on its own: one `extend` ([n, vocab] logits
    after the given ids) per token."""

    def tokens(pre: PrefillResult) -> Iterator[int]:
        chosen = sample_tokens(pre.logits, lambda t: extend(pre, [t])[-1], params, stop_token_ids)
        return (token for token, _ in chosen)

    return tokens
