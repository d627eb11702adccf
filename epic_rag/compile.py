"""Index time: a chunk's KV computed from position 0, alone or after other text.

An entry compiled after a context holds only the chunk's own K/V, its keys rotated back to
base position 0, so it links like any other entry. The context is either computed in full
(its neighbour in the document) or linked from the cached KV of its segments exactly as a
query links chunks (the prompt head, then the chunks most similar to it, nearest last):
the chunk then learns to read the kind of linked context it will meet at query time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .cache import PositionalKVCache
from .forward import run_layers
from .kv import ChunkKV, CompileContext, rotate_keys


@torch.inference_mode()
def encode_chunk(
    model: nn.Module,
    cache: PositionalKVCache,
    token_ids: torch.Tensor,
    context: CompileContext | None,
    inv_freq: torch.Tensor,
    linked: Sequence[ChunkKV] = (),
) -> ChunkKV:
    """Prefill `token_ids` ([n]) after `context` (m ids, or None) into the empty `cache` (capacity
    m + n) and return the chunk's own per-layer K/V at base position 0. A linked context comes
    as `linked`, the cached entry of each of its segments in order."""
    n = token_ids.numel()
    if n == 0:
        raise ValueError("cannot encode an empty token sequence")
    m = 0 if context is None else context.ids.numel()
    if context is not None and context.linked:
        if [len(e) for e in linked] != context.spans.tolist():
            raise ValueError("a linked context needs one cached entry per span, in order")
        offset = 0
        for entry in linked:
            cache.link(entry, offset, inv_freq)
            offset += len(entry)
    elif m:
        run_layers(model, cache, context.ids, torch.arange(m), m, logits=None)
    run_layers(model, cache, token_ids, torch.arange(m, m + n), m + n, logits=None)
    entry = cache.export(token_ids, start=m)
    if m:
        entry.keys = rotate_keys(entry.keys, inv_freq, -m)
        entry.context_ids = context.ids.clone()
        entry.context_spans = None if context.spans is None else context.spans.clone()
    return entry


def chunk_contexts(
    ids: Sequence[torch.Tensor],
    ids_of: Callable[[str], torch.Tensor],
    after: Sequence[str | None] | None = None,
    link_after: Sequence[Sequence[str]] | None = None,
    head: torch.Tensor | None = None,
) -> list[CompileContext | None]:
    """What each chunk (its `ids`) is compiled after: nothing; its predecessor's text computed in
    full (`after`, None for none); or `head` ([h] ids) then the texts of `link_after`, each
    linked from its own entry. `ids_of` gives a text's chunk ids."""
    if after is not None and link_after is not None:
        raise ValueError("give after= (computed context) or link_after= (linked context), not both")
    given = after if after is not None else link_after
    if given is None:
        return [None] * len(ids)
    if len(given) != len(ids):
        raise ValueError(f"{len(given)} contexts given for {len(ids)} chunks; give one per chunk")
    if after is not None:
        return [None if a is None else CompileContext(ids_of(a)) for a in after]
    head = torch.empty(0, dtype=torch.int64) if head is None else head
    contexts: list[CompileContext | None] = []
    for texts in link_after:
        segments = ([head] if head.numel() else []) + [ids_of(t) for t in texts]
        spans = torch.tensor([s.numel() for s in segments], dtype=torch.int64)
        contexts.append(CompileContext(torch.cat(segments), spans) if segments else None)
    return contexts


def nearest_neighbours(vectors: torch.Tensor, n: int) -> list[list[int]]:
    """For each row of `vectors` ([chunks, dim]), the indices of the `n` other rows most similar
    by cosine, least similar first (so the nearest ends next to the chunk compiled after them)."""
    if n < 1:
        raise ValueError(f"the number of similar chunks must be at least 1, got {n}")
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    scores = unit @ unit.T  # [chunks, chunks]
    scores.fill_diagonal_(float("-inf"))
    k = min(n, vectors.shape[0] - 1)
    if k < 1:
        return [[] for _ in range(vectors.shape[0])]
    top = scores.topk(k, dim=1).indices  # [chunks, k], nearest first
    return [row.flip(0).tolist() for row in top]
