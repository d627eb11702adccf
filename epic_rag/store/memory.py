"""The in-process tier: an LRU of ChunkKV objects under a byte budget.

Entries are kept as the tensors themselves, never encoded, so a hit costs a dict
lookup and no copy: this tier sits on the hot path of every generation. A read moves
the entry to the recent end, so reads mutate too: every operation holds one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

from ..kv import ChunkKV
from .backend import BackendStats, KVBackend


class MemoryBackend(KVBackend):
    """LRU over `budget_bytes` of entry tensors; the least recently used entries go first."""

    name = "memory"
    persistent = False

    def __init__(self, budget_bytes: int = 2 << 30) -> None:
        if budget_bytes < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, tuple[ChunkKV, str]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._stats = BackendStats(self.name)
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[ChunkKV, str] | None:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.reads += 1
            self._stats.hits += 1
            return item

    def put(self, key: str, entry: ChunkKV, fingerprint: str) -> None:
        """Keep `entry` unless it alone exceeds the budget; evict the oldest entries to fit it."""
        with self._lock:
            self._pop(key)
            if entry.nbytes > self.budget_bytes:
                return
            self._entries[key] = (entry, fingerprint)
            self._bytes += entry.nbytes
            while self._bytes > self.budget_bytes:
                self._pop(next(iter(self._entries)))
                self._stats.evictions += 1

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._pop(key)

    def _pop(self, key: str) -> bool:
        item = self._entries.pop(key, None)
        if item is None:
            return False
        self._bytes -= item[0].nbytes
        return True

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._entries))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> BackendStats:
        with self._lock:
            return replace(self._stats, bytes=self._bytes, entries=len(self._entries))
