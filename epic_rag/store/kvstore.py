"""The usual store: a memory LRU over an optional safetensors directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .backend import KVBackend
from .disk import DiskBackend
from .memory import MemoryBackend
from .tiered import TieredStore


class KVStore(TieredStore):
    """A `MemoryBackend` of `memory_budget` bytes, over a `DiskBackend` when `directory` is given."""

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_budget: int = 2 << 30,
        dtype: str | torch.dtype | None = None,
        fingerprint: str | None = None,
    ) -> None:
        backends: list[KVBackend] = [MemoryBackend(memory_budget)]
        if directory is not None:
            backends.append(DiskBackend(directory))
        super().__init__(backends, dtype=dtype, fingerprint=fingerprint)
