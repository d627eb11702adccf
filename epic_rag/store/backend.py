"""One tier of chunk KV storage, keyed by `entry_key`.

A tier only stores and returns (entry, fingerprint) pairs; choosing the model,
converting dtypes and stacking tiers is `TieredStore`'s job. That split keeps a new
tier (Redis, object storage, ...) down to these few methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..kv import ChunkKV


@dataclass
class BackendStats:
    """Counters and usage of one tier."""

    name: str
    reads: int = 0  # entries actually fetched (sound or damaged); a lookup of an absent key is not a read
    hits: int = 0  # lookups that returned an entry
    misses: int = 0  # lookups that returned None (absent, or damaged and dropped)
    corrupted: int = 0  # damaged or misnamed entries found and deleted
    evictions: int = 0  # entries dropped to honour a size budget
    errors: int = 0  # operations failed, or skipped, because the tier was unreachable
    bytes: int = 0  # bytes held now
    entries: int = 0  # entries held now


class KVBackend(ABC):
    """Storage for (ChunkKV, model fingerprint) pairs under `entry_key` keys.

    A persistent tier must validate what it reads: an entry that is damaged, or whose
    content is not what its key names (``entry_key`` of its ids and compile context differs
    from ``key``), is deleted, counted as corrupted, logged as a WARNING and reported as None.
    An entry of another model under its own correct key is sound: return it.
    """

    name: ClassVar[str] = "backend"
    persistent: ClassVar[bool] = False  # survives the process; `TieredStore.clear_memory` keeps it
    shared: ClassVar[bool] = False  # other indexes and processes may use its entries: `TieredStore.forget` keeps them

    def bind(self, fingerprint: str) -> None:  # noqa: B027 - optional hook, most tiers need nothing
        """Called once with the model the store serves (a shared tier namespaces its keys by it)."""

    @abstractmethod
    def get(self, key: str) -> tuple[ChunkKV, str] | None:
        """(entry, fingerprint of the model that made it), or None when absent or damaged."""

    @abstractmethod
    def put(self, key: str, entry: ChunkKV, fingerprint: str) -> None:
        """Store `entry` under `key`, replacing any previous one."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """True when something is stored under `key` (cheap; not validated)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove `key`; True if it was there."""

    def size_of(self, key: str) -> int:
        """Bytes `key` takes in this tier (0 when absent or not measured)."""
        return 0

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every key stored now."""

    @abstractmethod
    def stats(self) -> BackendStats:
        """Counters since creation plus current usage."""

    def counters(self) -> BackendStats:
        """Counters only, cheap enough for every metrics scrape (override when `stats` is not)."""
        return self.stats()

    def clear(self) -> None:
        """Remove every entry (override when the tier can do it faster than key by key)."""
        for key in list(self.keys()):
            self.delete(key)
