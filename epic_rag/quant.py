"""Symmetric absmax int8 for stored chunk KV: a quarter of fp32's bytes, plus scales.

``x ≈ q * scale`` with ``scale = absmax / 127`` and ``q = round(x / scale)`` in [-127, 127],
so every element is off by at most ``scale / 2``. What shares a scale:

- keys, one scale per channel (layer × kv_head × head_dim, over the chunk's tokens): a few
  key channels are outliers at every token, and a per-token scale would spend its 8 bits
  on them and flatten the rest;
- values, one scale per token (layer × kv_head × token): values have no such channels but
  vary from token to token, and a per-token scale stays valid for a prefix (`ChunkKV.head`).

Scales are fp32 (`SCALE_DTYPE`): 4 bytes per layer × kv_head per token for values, and
4 × head_dim bytes per layer × kv_head per chunk for keys.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float32
_QMAX = 127


def _absmax_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, scale) with x ≈ q * scale; one scale per slice along `dim` (kept, size 1)."""
    x = x.to(SCALE_DTYPE)
    scale = x.abs().amax(dim=dim, keepdim=True) / _QMAX
    tiny = torch.finfo(SCALE_DTYPE).tiny  # an all-zero slice has scale 0 and quantizes to 0
    q = (x / scale.clamp_min(tiny)).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def quantize_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [layers, kv_heads, n, head_dim] -> (int8, same shape; scale [layers, kv_heads, 1, head_dim])."""
    return _absmax_int8(keys, dim=2)


def quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [layers, kv_heads, n, head_dim] -> (int8, same shape; scale [layers, kv_heads, n, 1])."""
    return _absmax_int8(values, dim=3)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale (scale broadcast over q's shape), computed in fp32, returned in `dtype`."""
    return (q.to(SCALE_DTYPE) * scale).to(dtype)
