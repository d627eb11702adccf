"""One decode step for several answers at once: each one's next token, in one forward.

On a CPU a decode step costs about one read of every weight, whatever the number of rows
it multiplies: B answers stepped together pay for one read, not B. The projections and
MLPs run on [B, 1, hidden]; attention runs per answer over a view of its own linked cache
(no padding, no copy), through the kernel a lone decode step uses, so each answer's
attention is its lone step's, bit for bit, and its logits differ at most by the matrix
products' rounding for B rows instead of one.

A step's cost is not always linear in its rows: a CPU's fp32 GEMM streams each weight once
for up to 3 rows and repacks it, reading it twice, from 4 on (measured on 2 cores: 89, 112,
206 ms for 1, 3, 4 answers). `measure_step_ms` times each batch size once on the machine
at hand and `rows_per_step` picks, for B answers in flight, the number to step at once that
makes the most tokens per second; the scheduler steps them in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .cache import PositionalKVCache
from .forward import run_layers
from .rescale import ATTENTION_NAME, AttentionRescale


@dataclass
class DecodeBatch:
    """The caches of one batched step and the position each writes; the decoder layers see it
    as their cache (`update`), the attention as `epic_batch` (`visible`)."""

    caches: list[PositionalKVCache]
    positions: list[int]

    @classmethod
    def after(cls, caches: Sequence[PositionalKVCache]) -> DecodeBatch:
        """One more token after everything each cache holds (its capacity checked)."""
        positions = []
        for cache in caches:
            at = cache.positions_after(1)
            cache.begin(at, int(at[0]) + 1)
            positions.append(int(at[0]))
        return cls(list(caches), positions)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: object):
        """Write row b's fresh K/V ([B, kv_heads, 1, head_dim]) at its own cache's position."""
        for b, (cache, at) in enumerate(zip(self.caches, self.positions, strict=True)):
            cache.keys[layer_idx, 0, :, at] = key_states[b, :, 0]
            cache.values[layer_idx, 0, :, at] = value_states[b, :, 0]
            cache.linked[layer_idx, at] = False
        return key_states, value_states

    def visible(
        self, layer: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[AttentionRescale, torch.Tensor] | None]]:
        """Per answer: (keys, values) it attends over at `layer`, each [1, kv_heads, length, head_dim],
        and its attention rescaling (None: plain attention)."""
        for cache in self.caches:
            rescale = (cache.rescale, cache.linked) if cache.rescale is not None else None
            yield cache.keys[layer, :, :, : cache.length], cache.values[layer, :, :, : cache.length], rescale


@torch.inference_mode()
def decode_step(model: nn.Module, caches: Sequence[PositionalKVCache], token_ids: Sequence[int]) -> torch.Tensor:
    """Run token_ids[b] after everything caches[b] holds, for every b at once; the next-token
    logits of each: [B, vocab] float32. A model whose attention is not the engine's own (loaded
    with eager or flash attention) steps its answers one by one instead."""
    if len(caches) != len(token_ids):
        raise ValueError(f"{len(caches)} caches but {len(token_ids)} token ids")
    if model.config._attn_implementation != ATTENTION_NAME:
        return torch.stack([_lone_step(model, cache, token) for cache, token in zip(caches, token_ids, strict=True)])
    inner, device = model.model, model.device
    batch = DecodeBatch.after(caches)
    hidden = inner.embed_tokens(torch.tensor(token_ids, dtype=torch.int64, device=device)[:, None])  # [B, 1, hidden]
    pos = torch.tensor(batch.positions, dtype=torch.int64, device=device)[:, None]  # [B, 1]
    cos, sin = inner.rotary_emb(hidden, pos)  # each [B, 1, head_dim]
    for layer in inner.layers:
        hidden = layer(
            hidden, attention_mask=None, position_ids=pos, cache=batch, position_embeddings=(cos, sin), epic_batch=batch
        )
    return model.lm_head(inner.norm(hidden))[:, 0].float().cpu()


@torch.inference_mode()
def measure_step_ms(
    model: nn.Module,
    new_cache: Callable[[int], PositionalKVCache],
    max_batch: int,
    context: int = 256,
    repeats: int = 3,
) -> list[float]:
    """Milliseconds of one decode step of 1..max_batch answers over zero-filled caches of
    `context` tokens (the fastest of `repeats`): [max_batch]."""
    caches = [new_cache(context + 1).zeroed(context) for _ in range(max_batch)]
    step_ms = []
    for rows in range(1, max_batch + 1):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_step(model, caches[:rows], [0] * rows)
            times.append(1000 * (time.perf_counter() - start))
            for cache in caches[:rows]:
                cache.length = context  # the next step writes the same slot again
        step_ms.append(min(times))
    return step_ms


def rows_per_step(step_ms: Sequence[float]) -> list[int]:
    """For b answers in flight (index b, 0..len(step_ms)), how many to step at once: the k <= b
    with the most tokens per second, k / step_ms[k - 1] (ties: the larger k)."""
    rows, best = [0], 1
    for k in range(1, len(step_ms) + 1):
        if k / step_ms[k - 1] >= best / step_ms[best - 1]:
            best = k
        rows.append(best)
    return rows


def _lone_step(model: nn.Module, cache: PositionalKVCache, token: int) -> torch.Tensor:
    positions = cache.positions_after(1)
    ids = torch.tensor([token], dtype=torch.int64)
    return run_layers(model, cache, ids, positions, int(positions[0]) + 1).logits
