"""What a query returns: its prefill stats, the prefilled cache, the generated answer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import PositionalKVCache


@dataclass
class PrefillStats:
    """What one query reused, recomputed, and where its time-to-first-token went.

    This is the one place a query's store hits and misses are counted: a segment whose
    KV had to be computed (absent, damaged, evicted, another model's) is a miss."""

    policy: str
    tokens_total: int = 0
    tokens_reused: int = 0  # positions whose K/V came from the store, never recomputed
    tokens_recomputed: int = 0  # positions that ran through the last layer
    tokens_probed: int = 0  # positions a policy ran through the model to choose (e.g. QueryGuided's question pass)
    chunks: int = 0
    store_hits: int = 0
    store_misses: int = 0  # segments computed on the spot because the store lacked them
    chunk_hits: int = 0  # of those, chunk segments (the rest is the prompt head)
    chunk_misses: int = 0
    prefix: str = "none"  # the prompt head: "cached" (a hit), "computed" (a miss), "recomputed" (not linked), "none"
    kv_load_s: float = 0.0
    compile_s: float = 0.0  # time spent computing missing segments
    link_s: float = 0.0
    recompute_s: float = 0.0
    first_decode_s: float = 0.0  # choosing the first token from the logits
    paused_s: float = 0.0  # within ttft_s: other answers' decode steps run between this prefill's pieces
    ttft_s: float = 0.0

    @property
    def recomputed_fraction(self) -> float:
        return self.tokens_recomputed / self.tokens_total if self.tokens_total else 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string), "eos" or "length"
    stats: PrefillStats
    decode_s: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.stats.ttft_s


@dataclass
class PrefillResult:
    """A prompt prefilled under one policy: the cache to decode from and the next-token logits."""

    cache: PositionalKVCache
    logits: torch.Tensor  # [vocab] next-token logits, float32
    stats: PrefillStats = field(repr=False)
    recomputed: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64), repr=False)
    # [tokens_recomputed] the positions whose K/V went through every layer


class TokenStream:
    """Iterates over text deltas as they are generated; `.result` holds the Generation after."""

    def __init__(self, deltas: Iterator[str], box: list) -> None:
        self._deltas, self._box = deltas, box

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def close(self) -> None:
        """Stop generating now (the caller lost interest); `.result` stays unset."""
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()

    def finish(self) -> Generation:
        """Generate to the end and return the Generation."""
        for _ in self._deltas:
            pass
        return self.result

    @property
    def result(self) -> Generation:
        if not self._box:
            raise RuntimeError("the stream has not finished; iterate over it first")
        return self._box[0]
