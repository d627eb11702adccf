"""The usual store: a memory LRU over an optional safetensors directory and an optional Redis tier."""

from __future__ import annotations

from pathlib import Path

import torch

from .backend import KVBackend
from .disk import DiskBackend
from .memory import MemoryBackend
from .tiered import TieredStore


class KVStore(TieredStore):
    """A `MemoryBackend` of `memory_budget` bytes, over a `DiskBackend` when `directory` is given
    (at most `disk_budget` bytes when given, least recently used entries deleted first), over a
    shared `RedisBackend` when `kv_url` is given (entries expire `kv_ttl_s` after last use).

    With `require_kv_url` an unreachable Redis is an error (indexing); otherwise the store
    works without it until it answers (serving)."""

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_budget: int = 2 << 30,
        dtype: str | torch.dtype | None = None,
        fingerprint: str | None = None,
        kv_url: str | None = None,
        kv_ttl_s: int | None = None,
        require_kv_url: bool = False,
        disk_budget: int | None = None,
    ) -> None:
        backends: list[KVBackend] = [MemoryBackend(memory_budget)]
        if directory is not None:
            backends.append(DiskBackend(directory, budget=disk_budget))
        if kv_url is not None:
            from .redis import RedisBackend

            backends.append(RedisBackend(kv_url, ttl_s=kv_ttl_s, require=require_kv_url))
        super().__init__(backends, dtype=dtype, fingerprint=fingerprint)
