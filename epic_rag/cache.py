"""The linked KV buffer: full-length per-layer K/V written by position.

Linked chunks fill their slots, recomputed tokens overwrite theirs at every layer
before attention, and decoding appends. The cache remembers, per layer, which slots
still hold linked (reused) K/V, which attention rescaling needs. The decoder layers of the HF model call
`update` with the fresh K/V of the tokens being run (the same duck-typed contract as
transformers' `Cache.update`), and attend over everything written so far.
"""

from __future__ import annotations

import torch

from .kv import ChunkKV, rotate_keys_into
from .rescale import AttentionRescale
from .shift import ChunkShifter


class PositionalKVCache:
    """K/V for positions 0..capacity-1 of one sequence, all layers in one tensor."""

    def __init__(
        self, n_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device="cpu"
    ) -> None:
        shape = (n_layers, 1, kv_heads, capacity, head_dim)
        # keys/values: [layers, batch=1, kv_heads, capacity, head_dim]
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.linked = torch.zeros(n_layers, capacity, dtype=torch.bool, device=device)  # slot holds reused K/V
        self.rescale: AttentionRescale | None = None  # applied to attention over linked slots
        self.shift: ChunkShifter | None = None  # corrects linked slots by their chunk's recomputed ones
        self.length = 0  # positions < length are visible to attention
        self._write: torch.Tensor | slice = slice(0, 0)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def link(self, chunk: ChunkKV, offset: int, inv_freq: torch.Tensor) -> None:
        """Place a cached chunk at global positions offset..offset+n-1, keys re-rotated
        (an int8 stored entry is dequantized here, to the cache dtype)."""
        chunk, n = chunk.to(self.keys.dtype), len(chunk)
        if offset + n > self.capacity:
            raise ValueError(f"chunk of {n} tokens at {offset} overflows a cache of {self.capacity}")
        rotate_keys_into(self.keys[:, 0, :, offset : offset + n], chunk.keys, inv_freq, offset)
        self.values[:, 0, :, offset : offset + n].copy_(chunk.values)
        self.linked[:, offset : offset + n] = True

    def zeroed(self, length: int = 0) -> PositionalKVCache:
        """Zero every slot and count the first `length` as written: a stand-in context for
        timing a forward (the time model, the scheduler's step sizes)."""
        self.keys.zero_()
        self.values.zero_()
        self.length = length
        return self

    def positions_after(self, n: int, at: int | None = None) -> torch.Tensor:
        """Positions for `n` more tokens from `at` (default: after everything written): [n] int64.
        Starting before the end drops what was written after `at` (a branch)."""
        start = self.length if at is None else at
        if not 0 < start <= self.length:
            raise ValueError(f"cannot extend at position {start}: {self.length} positions are written")
        if n == 0:
            raise ValueError("nothing to extend with: token_ids is empty")
        if start + n > self.capacity:
            raise ValueError(
                f"{n} more tokens overflow the cache ({start} used of {self.capacity}); "
                "prefill with a larger extra_capacity"
            )
        return torch.arange(start, start + n)

    def begin(self, positions: torch.Tensor, length: int) -> None:
        """Announce the positions the next forward writes and how far attention may look."""
        if length > self.capacity:
            raise ValueError(f"sequence of {length} tokens exceeds the cache capacity {self.capacity}")
        first, last = int(positions[0]), int(positions[-1])
        contiguous = last - first + 1 == positions.numel()
        self._write = slice(first, last + 1) if contiguous else positions.to(self.keys.device)
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: object):
        """Scatter fresh K/V ([1, kv_heads, S, head_dim]) and return this layer's visible K/V."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.shift is not None:  # compares with the linked K/V these writes replace: before them
            written = (
                self._write
                if torch.is_tensor(self._write)
                else torch.arange(self._write.start, self._write.stop, device=keys.device)
            )
            self.shift.apply(keys, values, self.linked[layer_idx], written, key_states, value_states)
        if isinstance(self._write, slice):
            keys[:, :, self._write] = key_states
            values[:, :, self._write] = value_states
        else:
            keys.index_copy_(2, self._write, key_states)
            values.index_copy_(2, self._write, value_states)
        self.linked[layer_idx, self._write] = False
        return keys[:, :, : self.length], values[:, :, : self.length]

    def export(self, token_ids: torch.Tensor, start: int = 0) -> ChunkKV:
        """Copy the K/V of `token_ids`, written at start.., out as a standalone ChunkKV on the CPU,
        where every store tier keeps entries (in pinned memory from CUDA, for fast copies back)."""
        end = start + token_ids.numel()
        keys, values = (t[:, 0, :, start:end].to("cpu", copy=True) for t in (self.keys, self.values))
        if self.keys.is_cuda:
            keys, values = keys.pin_memory(), values.pin_memory()
        return ChunkKV(token_ids.detach().to("cpu", copy=True), keys, values)
