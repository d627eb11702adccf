"""Entry keys and storage dtypes: the names every tier agrees on.

A key is a content address: sha256 over the model fingerprint then the token ids as
int64 bytes. User text never appears in it, and two models never share a key for
the same tokens. The byte layout must not change, or existing stores stop resolving.
"""

from __future__ import annotations

import hashlib
import string

import torch

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_HEX = frozenset(string.hexdigits.lower())


def entry_key(model_fingerprint: str, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None) -> str:
    """Content address (64 lowercase hex digits) of a token sequence's KV under one model;
    with `context_ids`, of its KV compiled after those tokens (a different entry)."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update(token_ids.to(torch.int64).contiguous().cpu().numpy().tobytes())  # [n] int64
    if context_ids is not None and context_ids.numel():
        digest.update(b"|compiled after|")
        digest.update(context_ids.to(torch.int64).contiguous().cpu().numpy().tobytes())  # [m] int64
    return digest.hexdigest()


def is_entry_key(key: str) -> bool:
    """True when `key` has the shape of an `entry_key` (safe to use as a file name)."""
    return isinstance(key, str) and len(key) == 64 and set(key) <= _HEX


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' / 'bf16' / 'fp16' / a torch dtype / None (keep the model's) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}") from None
