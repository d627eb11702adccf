"""Chunk KV and the RoPE re-rotation that moves cached keys to new positions.

Keys are stored exactly as the model produced them for the chunk alone, i.e. with
RoPE already applied at positions 0..n-1 ("base position 0"). RoPE rotates each
pair of key dimensions by ``position * inv_freq``, and rotations compose, so moving
the whole chunk to global offset p is one more rotation by ``p * inv_freq``, the
same angle for every token of the chunk. Values carry no position and are copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """Per-layer K/V of one token sequence, keys at base position 0.

    Compiled alone by default; with `context_ids` it was compiled after those tokens (its
    document predecessor) and keeps only its own K/V, rotated back to base position 0."""

    token_ids: torch.Tensor  # [n] int64
    keys: torch.Tensor  # [layers, kv_heads, n, head_dim], RoPE applied at positions 0..n-1
    values: torch.Tensor  # [layers, kv_heads, n, head_dim]
    context_ids: torch.Tensor | None = None  # [m] int64: what the tokens attended to before them

    def __post_init__(self) -> None:
        n = self.token_ids.numel()
        if self.keys.shape != self.values.shape or self.keys.dim() != 4 or self.keys.shape[2] != n:
            raise ValueError(
                f"inconsistent ChunkKV: {n} ids, keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
            )

    def __len__(self) -> int:
        return self.token_ids.numel()

    @property
    def nbytes(self) -> int:
        tensors = (self.token_ids, self.keys, self.values, self.context_ids)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def head(self, n: int) -> ChunkKV:
        """The entry of the first `n` tokens (causal: their K/V do not depend on later tokens)."""
        if n == len(self):
            return self
        return ChunkKV(self.token_ids[:n], self.keys[:, :, :n], self.values[:, :, :n], self.context_ids)

    def covering(self, token_ids: torch.Tensor, key: str | None = None) -> ChunkKV:
        """The leading part of this entry that holds `token_ids` (all of it, or its first tokens);
        an error when the entry does not begin with them (a mismatched store entry)."""
        n = token_ids.numel()
        if len(self) < n or not torch.equal(self.token_ids[:n], token_ids):
            raise ValueError(f"the stored entry {key} does not begin with the tokens it is linked for")
        return self.head(n)

    def to(self, dtype: torch.dtype) -> ChunkKV:
        """The same entry with K/V in `dtype` (ids stay int64)."""
        if self.keys.dtype == dtype:
            return self
        return ChunkKV(self.token_ids, self.keys.to(dtype), self.values.to(dtype), self.context_ids)


def rotation_angles(inv_freq: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``offset * inv_freq``, computed in float64: each [head_dim // 2]."""
    angles = offset * inv_freq.double()
    return angles.cos(), angles.sin()


def rotate_keys_into(dst: torch.Tensor, keys: torch.Tensor, inv_freq: torch.Tensor, offset: int) -> torch.Tensor:
    """Write `keys` rotated by ``offset`` positions into `dst` (same shape [..., head_dim]).

    Uses the half-split pairing of the HF Llama/Qwen2/Mistral rotary code: dimension i
    pairs with i + head_dim/2. Works on any batch of layers and heads at once.
    """
    if offset == 0:
        return dst.copy_(keys)
    cos, sin = (t.to(dst.dtype) for t in rotation_angles(inv_freq, offset))
    half = keys.shape[-1] // 2
    k1, k2 = keys[..., :half], keys[..., half:]
    d1, d2 = dst[..., :half], dst[..., half:]
    torch.mul(k1, cos, out=d1)
    d1.addcmul_(k2, sin, value=-1.0)
    torch.mul(k2, cos, out=d2)
    d2.addcmul_(k1, sin)
    return dst


def rotate_keys(keys: torch.Tensor, inv_freq: torch.Tensor, offset: int) -> torch.Tensor:
    """`keys` ([..., head_dim]) rotated by ``offset`` positions, as a new tensor."""
    return rotate_keys_into(torch.empty_like(keys), keys, inv_freq, offset)
