"""APE-style attention rescaling for linked chunk tokens (arXiv 2502.05431).

Linked chunk K/V were computed without the rest of the prompt, so the tokens computed
at query time tend to over- or under-weight them. Rescaling splits each computed
token's attention into the linked keys (context, c) and all others (o) and mixes them as

    p_c = softmax(q·K_cᵀ / (√d·T)),  lse_c = logsumexp(q·K_cᵀ / (√d·T))
    p_o = softmax(q·K_oᵀ / √d),      lse_o = logsumexp(q·K_oᵀ / √d)
    out = w_c·p_c·V_c + w_o·p_o·V_o,  (w_c, w_o) = softmax(S·T·lse_c, lse_o)

computed here as one softmax whose context logits are q·K_cᵀ/(√d·T) + (S·T − 1)·lse_c.
T = S = 1 leaves attention unchanged. Which slots are linked is tracked per layer by the
positional cache (a recomputed slot holds fresh K/V and is no longer context).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTENTION_NAME = "epic_rescaled"


@dataclass(frozen=True)
class AttentionRescale:
    """Temperature T on the logits of linked chunk keys and scale S on their share."""

    temperature: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.scale > 0):
            raise ValueError(f"attention rescaling needs T > 0 and S > 0, got T={self.temperature}, S={self.scale}")

    @property
    def spec(self) -> str:
        return f"ape:{self.temperature:g}:{self.scale:g}"


def rescaled_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, S, d]
    key: torch.Tensor,  # [1, kv_heads, L, d]
    value: torch.Tensor,  # [1, kv_heads, L, d]
    attention_mask: torch.Tensor | None,  # additive [1, 1, S, L], or None for plain causal
    dropout: float = 0.0,
    scaling: float | None = None,
    epic_rescale: tuple[AttentionRescale, torch.Tensor] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with linked keys rescaled; `epic_rescale` = (rescale, linked [layers, capacity] bool).

    Falls back to SDPA where nothing linked is visible at this layer."""
    linked = None
    if epic_rescale is not None:
        rescale, linked_slots = epic_rescale
        linked = linked_slots[module.layer_idx, : key.shape[2]]
    if linked is None or not bool(linked.any()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (query.float() @ key.float().transpose(-1, -2)) * scaling  # [1, heads, S, L]
    if attention_mask is not None:
        logits = logits + attention_mask.float()
    elif query.shape[2] > 1:  # causal, the queries being the last S positions
        s, n = query.shape[2], key.shape[2]
        future = torch.ones(s, n, dtype=torch.bool, device=logits.device).triu(n - s + 1)
        logits = logits.masked_fill(future, float("-inf"))
    T, S = rescale.temperature, rescale.scale
    context = logits[..., linked] / T  # [1, heads, S, C]
    lse = context.logsumexp(dim=-1, keepdim=True)  # [1, heads, S, 1]
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows that see no context
    logits[..., linked] = context + (S * T - 1.0) * lse
    probs = logits.softmax(dim=-1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), None  # [1, S, heads, d]


AttentionInterface.register(ATTENTION_NAME, rescaled_attention)


@contextmanager
def attention_rescaled(model: torch.nn.Module):
    """Route the model's attention through `rescaled_attention` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
