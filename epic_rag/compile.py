"""Index time: a chunk's KV computed from position 0, alone or after the text it follows.

An entry compiled after a context (its neighbour in the document) holds only the chunk's
own K/V, its keys rotated back to base position 0, so it links like any other entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .cache import PositionalKVCache
from .forward import run_layers
from .kv import ChunkKV, rotate_keys


@torch.inference_mode()
def encode_chunk(
    model: nn.Module,
    cache: PositionalKVCache,
    token_ids: torch.Tensor,
    context_ids: torch.Tensor | None,
    inv_freq: torch.Tensor,
) -> ChunkKV:
    """Prefill `token_ids` ([n]) after `context_ids` ([m], or None) into the empty `cache` (capacity
    m + n) and return the chunk's own per-layer K/V at base position 0."""
    n = token_ids.numel()
    if n == 0:
        raise ValueError("cannot encode an empty token sequence")
    m = 0 if context_ids is None else context_ids.numel()
    if m:
        run_layers(model, cache, context_ids, torch.arange(m), m, logits=None)
    run_layers(model, cache, token_ids, torch.arange(m, m + n), m + n, logits=None)
    entry = cache.export(token_ids, start=m)
    if m:
        entry.keys = rotate_keys(entry.keys, inv_freq, -m)
        entry.context_ids = context_ids.clone()
    return entry


def chunk_contexts(
    texts: Sequence[str],
    ids: Sequence[torch.Tensor],
    after: Sequence[str | None] | None,
    tokenize_chunk: Callable[[str], torch.Tensor],
) -> list[torch.Tensor | None]:
    """The ids each chunk is compiled after: None (alone) or its predecessor's chunk ids,
    tokenized once when the predecessor is one of `texts` (the usual case)."""
    if after is None:
        return [None] * len(texts)
    if len(after) != len(texts):
        raise ValueError(f"after= names {len(after)} predecessors for {len(texts)} chunks; give one per chunk")
    tokenized = dict(zip(texts, ids, strict=True))
    return [None if a is None else tokenized[a] if a in tokenized else tokenize_chunk(a) for a in after]
