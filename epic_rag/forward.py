"""The selective forward: run some token ids at given positions through the decoder layers.

The tokens attend causally to everything the positional cache holds below `length`
(linked chunks, earlier recomputed tokens) and write their fresh K/V into it at every
layer. A `LayerHook` sees the state around one layer and may narrow the positions still
being computed (CacheBlend) or stop the pass (a scoring probe); this is the one place
where a policy looks inside the model.

Between layers a pass reaches a `checkpoint`: inside `cancellable(event)`, a set event
stops the next layer from starting (`Cancelled`), so a caller that went away costs at most
one layer of a long prefill; inside `interleaved(run)`, other work runs there (the
batching scheduler steps the answers already streaming), so a long prefill is cut in pieces.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import PositionalKVCache
from .rescale import ATTENTION_NAME


class Cancelled(RuntimeError):
    """A forward pass stopped between layers because its caller asked (its client went away)."""


_cancel: ContextVar[threading.Event | None] = ContextVar("epic_rag_cancel", default=None)


@contextmanager
def cancellable(event: threading.Event | None) -> Iterator[None]:
    """Forward passes run inside this block stop before their next layer once `event` is set."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


@dataclass
class Interleave:
    """Work run at every checkpoint of the passes inside `interleaved`; `paused_s` sums its time."""

    run: Callable[[], None]
    paused_s: float = 0.0


_interleave: ContextVar[Interleave | None] = ContextVar("epic_rag_interleave", default=None)


@contextmanager
def interleaved(run: Callable[[], None]) -> Iterator[Interleave]:
    """Forward passes inside this block call `run()` between their layers (it decides whether
    anything is due); it runs outside the block's cancellation and interleaving."""
    state = Interleave(run)
    token = _interleave.set(state)
    try:
        yield state
    finally:
        _interleave.reset(token)


def paused_seconds() -> float:
    """Seconds the current `interleaved` block has spent in its work so far (0 outside one)."""
    state = _interleave.get()
    return 0.0 if state is None else state.paused_s


def checkpoint() -> None:
    """A point between two steps of a pass: raise `Cancelled` if its caller asked, else run the
    interleaved work, if any."""
    cancel = _cancel.get()
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by its caller")
    state = _interleave.get()
    if state is None:
        return
    start = time.perf_counter()
    no_interleave, no_cancel = _interleave.set(None), _cancel.set(None)
    try:
        state.run()
    finally:
        _cancel.reset(no_cancel)
        _interleave.reset(no_interleave)
        state.paused_s += time.perf_counter() - start


@dataclass
class LayerState:
    """What a hook sees around decoder layer `layer`."""

    layer: int
    module: nn.Module  # the decoder layer
    hidden: torch.Tensor  # [1, S, hidden]: the layer's input (before) or output (after)
    positions: torch.Tensor  # [S] int64 global positions being computed, on the CPU
    cos: torch.Tensor  # [1, S, head_dim] RoPE at `positions`
    sin: torch.Tensor
    cache: PositionalKVCache
    length: int  # keys at positions < length are visible


class LayerHook:
    """Runs around some layers of a selective forward; subclasses override what they need."""

    layers: tuple[int, ...] = ()  # 0-based indices of the layers it runs around

    def before(self, state: LayerState) -> None:
        """Called with the layer's input, before it runs."""

    def after(self, state: LayerState) -> torch.Tensor | None:
        """Called with the layer's output: a [S] bool mask of positions to keep computing, or
        None to keep them all. Keeping none ends the pass (no logits)."""
        return None


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [vocab] for the last position, [S, vocab] for all of them; float32
    positions: torch.Tensor  # the positions that reached the last layer


def attention_mask(model: nn.Module, positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """Additive mask [1, 1, S, length]: a query sees keys at its own position or before.

    None where the attention kernel's own causal mask is the same thing (one new token,
    or the whole sequence under SDPA)."""
    n = positions.numel()
    at_end = int(positions[-1]) == length - 1 and int(positions[0]) == length - n
    if at_end and (n == 1 or (n == length and model.config._attn_implementation in ("sdpa", ATTENTION_NAME))):
        return None
    device, dtype = model.device, model.dtype
    allowed = torch.arange(length, device=device)[None, :] <= positions.to(device)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def run_layers(
    model: nn.Module,
    cache: PositionalKVCache,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    length: int,
    hook: LayerHook | None = None,
    logits: str | None = "last",
    progress: bool = False,
) -> ForwardOutput:
    """Run `token_ids` ([S]) at `positions` ([S], sorted) against the first `length` cache slots.

    `logits`: "last" (next-token logits of the last position), "all" (every position) or
    None (fill the cache only). `progress` shows a bar over the layers (long prefills)."""
    inner = model.model
    device = model.device
    cache.begin(positions, length)
    hidden = inner.embed_tokens(token_ids.to(device)[None])  # [1, S, hidden]
    pos = positions.to(device)[None]  # [1, S]
    cos, sin = inner.rotary_emb(hidden, pos)  # each [1, S, head_dim]
    mask = attention_mask(model, positions, length)
    rescaling = cache.rescale is not None and bool(cache.linked[:, :length].any())
    extra = {"epic_rescale": (cache.rescale, cache.linked)} if rescaling else {}
    if rescaling and model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"APE rescaling (+ape) needs the model loaded with sdpa attention, not "
            f"{model.config._attn_implementation!r}; pick a policy without +ape"
        )
    layers = tqdm(inner.layers, desc=f"prefill of {positions.numel()} tokens", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        try:
            checkpoint()
        except Cancelled:
            raise Cancelled(f"cancelled before layer {i} of {len(inner.layers)}") from None
        hooked = hook is not None and i in hook.layers
        if hooked:
            hook.before(LayerState(i, layer, hidden, positions, cos, sin, cache, length))
        hidden = layer(
            hidden, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=(cos, sin), **extra
        )
        if not hooked:
            continue
        keep = hook.after(LayerState(i, layer, hidden, positions, cos, sin, cache, length))
        if keep is None:
            continue
        positions = positions[keep]
        if positions.numel() == 0:
            return ForwardOutput(None, positions)
        keep = keep.to(device)
        hidden, pos, cos, sin = hidden[:, keep], pos[:, keep], cos[:, keep], sin[:, keep]
        mask = attention_mask(model, positions, length)
        cache.begin(positions, length)
    if logits is None:
        return ForwardOutput(None, positions)
    out = model.lm_head(inner.norm(hidden if logits == "all" else hidden[:, -1:]))[0].float().cpu()
    return ForwardOutput(out if logits == "all" else out[-1], positions)


def query_attention(state: LayerState, layer_input: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the computed tokens over the visible keys at this layer:
    [heads, S, length] float32. Call from `after`, with the hidden states `before` saw
    ([1, S, hidden]): the queries are rebuilt exactly as the layer built them."""
    attn = state.module.self_attn
    normed = state.module.input_layernorm(layer_input)
    q = attn.q_proj(normed).view(1, normed.shape[1], -1, attn.head_dim).transpose(1, 2)  # [1, heads, S, d]
    cos, sin = state.cos[:, None], state.sin[:, None]  # [1, 1, S, d]
    half = q.shape[-1] // 2
    q = q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin
    keys = state.cache.keys[state.layer, 0, :, : state.length]  # [kv_heads, length, d]
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[0], dim=0)  # [heads, length, d]
    scores = (q[0].float() @ keys.float().transpose(1, 2)) * attn.scaling  # [heads, S, length]
    visible = torch.arange(state.length, device=scores.device)[None, :] <= state.positions.to(scores.device)[:, None]
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
