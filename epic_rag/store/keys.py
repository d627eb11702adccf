"""Entry keys and storage dtypes: the names every tier agrees on.

A key is a content address: sha256 over the model fingerprint then the token ids as
int64 bytes. User text never appears in it, and two models never share a key for
the same tokens. The byte layout must not change, or existing stores stop resolving.
"""

from __future__ import annotations

import hashlib
import string
from typing import TYPE_CHECKING

import torch

from ..quant import SCALE_DTYPE

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# int8: symmetric absmax with fp32 scales (see `epic_rag.quant`), dequantized when linked
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}

_HEX = frozenset(string.hexdigits.lower())


def entry_key(
    model_fingerprint: str,
    token_ids: torch.Tensor,
    context_ids: torch.Tensor | None = None,
    context_spans: torch.Tensor | None = None,
) -> str:
    """Content address (64 lowercase hex digits) of a token sequence's KV under one model;
    with `context_ids`, of its KV compiled after those tokens (a different entry), computed in
    full, or linked from the cached KV of the segments `context_spans` counts (another entry)."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update(_int64_bytes(token_ids))  # [n]
    if context_ids is not None and context_ids.numel():
        if context_spans is not None:
            digest.update(b"|linked after|")
            digest.update(_int64_bytes(context_spans))  # [s]
        digest.update(b"|compiled after|")
        digest.update(_int64_bytes(context_ids))  # [m]
    return digest.hexdigest()


def _int64_bytes(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).contiguous().cpu().numpy().tobytes()


def is_entry_key(key: str) -> bool:
    """True when `key` has the shape of an `entry_key` (safe to use as a file name)."""
    return isinstance(key, str) and len(key) == 64 and set(key) <= _HEX


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' / 'bf16' / 'fp16' / 'int8' / a torch dtype / None (keep the model's) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}") from None


def kv_bytes_per_token(config: PretrainedConfig, dtype: str | torch.dtype, chunk_tokens: int = 256) -> float:
    """Bytes of K and V one token takes in the store, all layers, for a HF model `config`
    (token ids and file headers not counted).

    int8 adds its fp32 scales: one per layer × kv_head for each token (values) and head_dim
    per layer × kv_head for each chunk (keys), spread here over `chunk_tokens` tokens."""
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("kv_bytes_per_token needs a storage dtype, not None")
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * layers * kv_heads * head_dim * torch_dtype.itemsize
    if torch_dtype == torch.int8:
        per_token += layers * kv_heads * SCALE_DTYPE.itemsize * (1 + head_dim / chunk_tokens)
    return per_token
