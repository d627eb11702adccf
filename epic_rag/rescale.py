"""APE-style attention rescaling for linked chunk tokens (arXiv 2502.05431).

Linked chunk K/V were computed without the rest of the prompt, so the tokens computed
at query time tend to over- or under-weight them. Rescaling splits each computed
token's attention into the linked keys (context, c) and all others (o) and mixes them as

    p_c = softmax(q·K_cᵀ / (√d·T)),  lse_c = logsumexp(q·K_cᵀ / (√d·T))
    p_o = softmax(q·K_oᵀ / √d),      lse_o = logsumexp(q·K_oᵀ / √d)
    out = w_c·p_c·V_c + w_o·p_o·V_o,  (w_c, w_o) = softmax(S·T·lse_c, lse_o)

computed here as one softmax whose context logits are q·K_cᵀ/(√d·T) + (S·T − 1)·lse_c.
T = S = 1 leaves attention unchanged. The engine installs this function once, at load
(`install_rescaled_attention`); without rescaling it is SDPA. Which slots are linked is tracked per layer by the
positional cache (a recomputed slot holds fresh K/V and is no longer context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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

    One pass: the temperature is folded into the linked keys, and one product of the
    unnormalised weights with [V_c | V_o | 1_c | 1_o] gives both partial outputs and both
    partition sums. Falls back to SDPA where nothing linked is visible at this layer."""
    linked = None
    if epic_rescale is not None:
        rescale, linked_slots = epic_rescale
        linked = linked_slots[module.layer_idx, : key.shape[2]]  # [L] bool
    if linked is None or not bool(linked.any()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    T, S = rescale.temperature, rescale.scale
    b, heads, s, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    g = heads // kv_heads  # query heads per KV head, adjacent (as repeat_kv pairs them)
    scaling = d**-0.5 if scaling is None else scaling
    is_context = linked.to(torch.float32)[:, None]  # [L, 1]
    keys = key.float() * torch.where(is_context > 0, 1.0 / T, 1.0)  # [1, kv_heads, L, d]
    q = query.float().reshape(b, kv_heads, g * s, d) * scaling
    logits = (q @ keys.transpose(-1, -2)).view(b, kv_heads, g, s, n)  # [1, kv_heads, G, S, L]
    if attention_mask is not None:
        logits += attention_mask.float()[:, :, None]
    elif s > 1:  # causal, the queries being the last S positions
        logits.masked_fill_(torch.ones(s, n, dtype=torch.bool, device=logits.device).triu(n - s + 1), float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)  # [1, kv_heads, G, S, 1]
    # masked logits would underflow exp (slowly, on CPU): from -80 they add e^-80 per key, far below fp32 precision
    weights = (logits - top).clamp_min_(-80.0).exp_().view(b, kv_heads, g * s, n)
    v = value.float()
    ones = is_context.expand(b, kv_heads, n, 1)
    parts = weights @ torch.cat([v * ones, v * (1 - ones), ones, 1 - ones], dim=-1)  # [1, kv_heads, G*S, 2d+2]
    out_c, out_o, sum_c, sum_o = parts.split([d, d, 1, 1], dim=-1)
    top = top.view(b, kv_heads, g * s, 1)
    lse = torch.cat([S * T * (sum_c.log() + top), sum_o.log() + top], dim=-1)  # no context visible: -inf
    share = lse.softmax(dim=-1)  # [1, kv_heads, G*S, 2]
    tiny = torch.finfo(torch.float32).tiny
    out = share[..., :1] * out_c / sum_c.clamp_min(tiny) + share[..., 1:] * out_o / sum_o.clamp_min(tiny)
    out = out.view(b, kv_heads, g, s, d).reshape(b, heads, s, d)
    return out.transpose(1, 2).contiguous().to(value.dtype), None  # [1, S, heads, d]


def epic_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    epic_batch=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention the engine installs: `rescaled_attention`, or for a batched decode step
    (`epic_batch`, a `DecodeBatch`: query [B, heads, 1, d]) each row over its own cache's view,
    as that row's lone step would attend; [B, 1, heads, d]."""
    if epic_batch is None:
        return rescaled_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows = [
        rescaled_attention(module, query[b : b + 1], keys, values, None, dropout, scaling, rescale, **kwargs)[0]
        for b, (keys, values, rescale) in enumerate(epic_batch.visible(module.layer_idx))
    ]
    return torch.cat(rows), None


AttentionInterface.register(ATTENTION_NAME, epic_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # plain calls are SDPA: so are their masks


def install_rescaled_attention(model: torch.nn.Module) -> bool:
    """Route the model's attention through `rescaled_attention` for good, once, at load.

    A call without `epic_rescale` is plain SDPA, so only linked-key rescaling (APE) changes
    anything; no per-call switch of the shared config, which would race between threads.
    Only over SDPA: a model loaded with another implementation keeps it (eager returns attention
    weights, flash attention has its own kernels) and cannot run +ape policies; returns False."""
    config = model.config
    if config._attn_implementation == ATTENTION_NAME:
        return True
    if config._attn_implementation != "sdpa":
        return False
    config._attn_implementation = ATTENTION_NAME
    return True
