"""Chunk KV and the RoPE re-rotation that moves cached keys to new positions.

Keys are stored exactly as the model produced them for the chunk alone, i.e. with
RoPE already applied at positions 0..n-1 ("base position 0"). RoPE rotates each
pair of key dimensions by ``position * inv_freq``, and rotations compose, so moving
the whole chunk to global offset p is one more rotation by ``p * inv_freq``, the
same angle for every token of the chunk. Values carry no position and are copied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .quant import dequantize, quantize_keys, quantize_values


@dataclass(frozen=True)
class CompileContext:
    """What a chunk attended to before its own tokens when it was compiled.

    `ids` ([m] int64) were computed in full before it (neighbour compile) when `spans` is None;
    otherwise they were linked from their own cached KV, one segment per span ([s] int64 token
    counts: the prompt head, then the similar chunks, nearest last), as a query links chunks."""

    ids: torch.Tensor
    spans: torch.Tensor | None = None

    @property
    def linked(self) -> bool:
        return self.spans is not None

    def segments(self) -> list[torch.Tensor]:
        """The linked segments' ids, in order (the whole context when it was computed)."""
        if self.spans is None:
            return [self.ids]
        return list(torch.split(self.ids, self.spans.tolist()))


@dataclass
class ChunkKV:
    """Per-layer K/V of one token sequence, keys at base position 0.

    Compiled alone by default; with `context_ids` it was compiled after those tokens (computed,
    or linked from their own entries when `context_spans` is set, see `CompileContext`) and
    keeps only its own K/V, rotated back to base position 0.
    Stored as int8 (`to(torch.int8)`, see `quant`) keys and values come with their scales;
    `to` a float dtype gives K/V to link."""

    token_ids: torch.Tensor  # [n] int64
    keys: torch.Tensor  # [layers, kv_heads, n, head_dim], RoPE applied at positions 0..n-1
    values: torch.Tensor  # [layers, kv_heads, n, head_dim]
    context_ids: torch.Tensor | None = None  # [m] int64: what the tokens attended to before them
    key_scale: torch.Tensor | None = None  # [layers, kv_heads, 1, head_dim] fp32, only with int8 K/V
    value_scale: torch.Tensor | None = None  # [layers, kv_heads, n, 1] fp32, only with int8 K/V
    context_spans: torch.Tensor | None = None  # [s] int64: the context's linked segments (None: computed)

    def __post_init__(self) -> None:
        n = self.token_ids.numel()
        if self.keys.shape != self.values.shape or self.keys.dim() != 4 or self.keys.shape[2] != n:
            raise ValueError(
                f"inconsistent ChunkKV: {n} ids, keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
            )
        layers, heads, _, head_dim = self.keys.shape
        want = ((layers, heads, 1, head_dim), (layers, heads, n, 1)) if self.quantized else (None, None)
        got = tuple(None if s is None else tuple(s.shape) for s in (self.key_scale, self.value_scale))
        if (self.values.dtype == torch.int8) != self.quantized or got != want:
            raise ValueError(
                f"inconsistent ChunkKV: {self.keys.dtype} keys, {self.values.dtype} values, scales {got}; "
                f"int8 K/V need scales {want}, others none"
            )

    @property
    def context(self) -> CompileContext | None:
        """What the chunk was compiled after (None: alone)."""
        if self.context_ids is None:
            return None
        return CompileContext(self.context_ids, self.context_spans)

    def __len__(self) -> int:
        return self.token_ids.numel()

    @property
    def quantized(self) -> bool:
        """True when K/V are int8 with scales (a stored form: `to` a float dtype before linking)."""
        return self.keys.dtype == torch.int8

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: ids, K/V and, for int8, the scales."""
        tensors = (self.token_ids, self.keys, self.values, self.context_ids, self.key_scale, self.value_scale)
        tensors += (self.context_spans,)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def head(self, n: int) -> ChunkKV:
        """The entry of the first `n` tokens (causal: their K/V do not depend on later tokens).
        An int8 entry keeps its per-channel key scales: they still bound the kept tokens."""
        if n == len(self):
            return self
        value_scale = None if self.value_scale is None else self.value_scale[:, :, :n]
        return replace(
            self,
            token_ids=self.token_ids[:n],
            keys=self.keys[:, :, :n],
            values=self.values[:, :, :n],
            value_scale=value_scale,
        )

    def covering(self, token_ids: torch.Tensor, key: str | None = None) -> ChunkKV:
        """The leading part of this entry that holds `token_ids` (all of it, or its first tokens);
        an error when the entry does not begin with them (a mismatched store entry)."""
        n = token_ids.numel()
        if len(self) < n or not torch.equal(self.token_ids[:n], token_ids):
            raise ValueError(f"the stored entry {key} does not begin with the tokens it is linked for")
        return self.head(n)

    def to(self, dtype: torch.dtype) -> ChunkKV:
        """The same entry with K/V in `dtype` (ids stay int64): torch.int8 quantizes (keys per
        channel, values per token, see `quant`), a float dtype dequantizes an int8 entry."""
        if self.keys.dtype == dtype:
            return self
        if dtype == torch.int8:
            (keys, key_scale), (values, value_scale) = quantize_keys(self.keys), quantize_values(self.values)
            return replace(self, keys=keys, values=values, key_scale=key_scale, value_scale=value_scale)
        if self.quantized:
            keys = dequantize(self.keys, self.key_scale, dtype)
            values = dequantize(self.values, self.value_scale, dtype)
            return replace(self, keys=keys, values=values, key_scale=None, value_scale=None)
        return replace(self, keys=self.keys.to(dtype), values=self.values.to(dtype))


def rotation_angles(
    inv_freq: torch.Tensor, offset: int | torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``offset * inv_freq``, made on `device` in float64 (float32 on MPS, which
    has none): each [head_dim // 2], or [n, head_dim // 2] for offsets given per token as an
    [n, 1] tensor."""
    device = torch.device(device)
    wide = torch.float32 if device.type == "mps" else torch.float64
    if torch.is_tensor(offset):
        offset = offset.to(device=device, dtype=wide)
    angles = offset * inv_freq.detach().to(device=device, dtype=wide)
    return angles.cos(), angles.sin()


def rotate_keys_into(
    dst: torch.Tensor, keys: torch.Tensor, inv_freq: torch.Tensor, offset: int | torch.Tensor
) -> torch.Tensor:
    """Write `keys` rotated by ``offset`` positions into `dst` (same shape [..., head_dim]); an
    [n, 1] tensor of offsets rotates keys [..., n, head_dim] token by token.

    Uses the half-split pairing of the HF Llama/Qwen2/Mistral rotary code: dimension i
    pairs with i + head_dim/2. Works on any batch of layers and heads at once.
    """
    if isinstance(offset, int) and offset == 0:
        return dst.copy_(keys)
    keys = keys.to(dst.device)  # a stored entry comes from the CPU: moved once, here
    cos, sin = (t.to(dst.dtype) for t in rotation_angles(inv_freq, offset, dst.device))
    half = keys.shape[-1] // 2
    k1, k2 = keys[..., :half], keys[..., half:]
    d1, d2 = dst[..., :half], dst[..., half:]
    torch.mul(k1, cos, out=d1)
    d1.addcmul_(k2, sin, value=-1.0)
    torch.mul(k2, cos, out=d2)
    d2.addcmul_(k1, sin)
    return dst


def rotate_keys(keys: torch.Tensor, inv_freq: torch.Tensor, offset: int | torch.Tensor) -> torch.Tensor:
    """`keys` ([..., head_dim]) rotated by ``offset`` positions, as a new tensor."""
    return rotate_keys_into(torch.empty_like(keys), keys, inv_freq, offset)
