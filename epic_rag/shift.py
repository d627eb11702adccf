"""KV offset correction: move what stays reused by what recomputing its chunk's head changed.

A linked chunk's K/V were computed without the text before it. At every layer, the
tokens of a displaced chunk that are recomputed show how far the fresh K/V lie from the
linked ones; their mean difference (keys compared before RoPE, so differences at different
positions are comparable) is added, times `weight`, to the chunk's tokens that stay reused,
before that layer's attention reads them:

    δK = mean_i R(−p_i)·(K_fresh[p_i] − K_linked[p_i]),   K[j] += w·R(p_j)·δK
    δV = mean_i (V_fresh[p_i] − V_linked[p_i]),            V[j] += w·δV

over recomputed positions p_i and reused positions p_j of the same chunk. Weight 0, or a
chunk with nothing reused, changes nothing. The cache calls `apply` from `update`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv import rotate_keys


@dataclass(frozen=True)
class OffsetCorrection:
    """Weight `weight` on the mean fresh-minus-linked K/V of each displaced chunk's recomputed tokens."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"the offset correction needs weight >= 0, got {self.weight}")

    @property
    def spec(self) -> str:
        return f"shift:{self.weight:g}"


class ChunkShifter:
    """Applies one `OffsetCorrection` to the displaced chunks `spans` ([(start, end)]) of one prompt."""

    def __init__(self, correction: OffsetCorrection, spans: list[tuple[int, int]], inv_freq: torch.Tensor) -> None:
        self.weight = correction.weight
        self.spans = [(s, e) for s, e in spans if s > 0]
        self.inv_freq = inv_freq

    def apply(
        self,
        keys: torch.Tensor,  # [1, kv_heads, capacity, d] this layer's cache, linked K/V still in place
        values: torch.Tensor,
        linked: torch.Tensor,  # [capacity] bool: slots holding reused K/V at this layer
        written: torch.Tensor,  # [S] int64 positions being written, on the cache's device
        fresh_keys: torch.Tensor,  # [1, kv_heads, S, d]
        fresh_values: torch.Tensor,
    ) -> None:
        """Add each chunk's mean offset to its reused slots; call before the fresh K/V overwrite the cache."""
        if self.weight == 0:
            return
        for start, end in self.spans:
            inside = (written >= start) & (written < end)
            if not bool(inside.any()):
                continue
            recomputed = written[inside]
            reused = torch.arange(start, end, device=written.device)
            reused = reused[linked[start:end] & ~torch.isin(reused, recomputed)]
            if reused.numel() == 0:
                continue
            was_linked = linked[recomputed]
            if not bool(was_linked.any()):
                continue  # these slots hold fresh K/V already: there is no linked baseline to compare with
            recomputed, columns = recomputed[was_linked], inside.nonzero().squeeze(1)[was_linked]
            key_delta = fresh_keys[0][:, columns].float() - keys[0][:, recomputed].float()  # [kv_heads, r, d]
            unrotated = rotate_keys(key_delta, self.inv_freq, -recomputed.cpu()[:, None])
            mean_key = unrotated.mean(dim=1, keepdim=True).expand(-1, reused.numel(), -1)  # [kv_heads, u, d]
            shift_k = rotate_keys(mean_key.contiguous(), self.inv_freq, reused.cpu()[:, None])
            shift_v = (fresh_values[0][:, columns].float() - values[0][:, recomputed].float()).mean(dim=1, keepdim=True)
            keys[0][:, reused] += (self.weight * shift_k).to(keys.dtype)
            values[0][:, reused] += (self.weight * shift_v).to(values.dtype)
