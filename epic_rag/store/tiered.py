"""Tiers stacked fastest first, bound to one model.

Reads go top-down and a hit in a lower tier is copied into every tier above it, so
the next read of that entry is served by the fastest tier. Writes go to every tier,
slowest first, so an entry is durable before it is fast. The store is bound to one
model fingerprint: keys are computed with it, and an entry made by another model is
a miss wherever it is found (and left there for its own model). Safe under concurrent
callers: each tier guards its own state and the store's counters have a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import chain

import torch

from ..kv import ChunkKV
from .backend import BackendStats, KVBackend
from .keys import entry_key, resolve_dtype

_reads_here: ContextVar[dict[str, int] | None] = ContextVar("epic_rag_tier_reads", default=None)


@dataclass
class StoreStats:
    """Store-level counters plus usage summed over volatile (memory) and persistent (disk) tiers."""

    hits: int = 0  # get() calls that returned an entry
    misses: int = 0  # get() calls that returned None
    disk_reads: int = 0  # entries fetched from persistent tiers
    corrupted: int = 0  # damaged entries deleted, all tiers
    errors: int = 0  # tier operations that failed or were skipped because a tier was unreachable
    evictions: int = 0  # entries dropped for a budget, all tiers
    memory_bytes: int = 0
    memory_entries: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0
    tiers: list[BackendStats] = field(default_factory=list)  # one per tier, fastest first
    hits_by_tier: dict[str, int] = field(default_factory=dict)  # tier name -> store hits it served


class TieredStore:
    """get / put / contains / delete over `backends` (fastest first), in the storage `dtype`."""

    def __init__(
        self,
        backends: Sequence[KVBackend],
        dtype: str | torch.dtype | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if not backends:
            raise ValueError("a TieredStore needs at least one backend")
        self._backends = tuple(backends)
        self.dtype = resolve_dtype(dtype)
        self._fingerprint: str | None = None
        self._hits = 0
        self._misses = 0
        self._hits_by_tier = dict.fromkeys((b.name for b in self._backends), 0)
        self._counters = threading.Lock()
        if fingerprint is not None:
            self.bind(fingerprint)

    @property
    def backends(self) -> tuple[KVBackend, ...]:
        """The tiers, fastest first."""
        return self._backends

    @property
    def fingerprint(self) -> str | None:
        """The model this store serves, or None before `bind`."""
        return self._fingerprint

    def bind(self, fingerprint: str) -> None:
        """Serve the model `fingerprint` from now on; a store serves one model for its whole life."""
        if not fingerprint:
            raise ValueError("a model fingerprint must be a non-empty string")
        if self._fingerprint is not None and self._fingerprint != fingerprint:
            raise ValueError(
                f"this KV store is bound to model {self._fingerprint!r}, so it cannot serve model {fingerprint!r}; "
                "give each model its own store object"
            )
        if self._fingerprint is None:
            for backend in self._backends:
                backend.bind(fingerprint)
        self._fingerprint = fingerprint

    def get(self, key: str) -> ChunkKV | None:
        """The bound model's entry for `key` from the fastest tier holding it, or None (a miss)."""
        fingerprint = self._bound()
        for depth, backend in enumerate(self._backends):
            found = backend.get(key)
            if found is None or found[1] != fingerprint:
                continue
            entry = found[0]
            for upper in self._backends[:depth]:
                upper.put(key, entry, fingerprint)
            with self._counters:
                self._hits += 1
                self._hits_by_tier[backend.name] += 1
            if (here := _reads_here.get()) is not None:
                here[backend.name] = here.get(backend.name, 0) + 1
            return entry
        with self._counters:
            self._misses += 1
        return None

    def put(self, entry: ChunkKV, persist: bool = True) -> str:
        """Store `entry` (in the storage dtype) in every tier, or only in the memory ones unless
        `persist` (what no disk or shared tier may keep: a client's own text); returns its key."""
        fingerprint = self._bound()
        entry = self.stored_form(entry)
        key = entry_key(fingerprint, entry.token_ids, entry.context_ids, entry.context_spans)
        for backend in reversed(self._backends):
            if persist or not backend.persistent:
                backend.put(key, entry, fingerprint)
        return key

    def stored_form(self, entry: ChunkKV) -> ChunkKV:
        """`entry` as the store keeps and returns it (in the storage dtype)."""
        return entry.to(self.dtype) if self.dtype is not None else entry

    def contains(self, key: str) -> bool:
        """True when some tier holds `key` (not validated: `get` may still miss)."""
        return any(backend.contains(key) for backend in self._backends)

    __contains__ = contains

    def delete(self, key: str) -> bool:
        """Remove `key` from every tier; True if any tier held it."""
        removed = [backend.delete(key) for backend in self._backends]
        return any(removed)

    evict = delete

    def forget(self, keys: Iterable[str]) -> tuple[int, int]:
        """Delete `keys` from the tiers this store owns (memory, disk), never from a shared one
        (Redis: other indexes may use them; its TTL or eviction ages them out). Returns (entries
        deleted from a persistent tier, bytes they held there)."""
        owned = [backend for backend in self._backends if not backend.shared]
        entries = freed = 0
        for key in keys:
            for backend in owned:
                size = backend.size_of(key) if backend.persistent else 0
                if backend.delete(key) and backend.persistent:
                    entries, freed = entries + 1, freed + size
        return entries, freed

    def keys(self) -> Iterator[str]:
        """Every key held by some tier, once each."""
        seen: set[str] = set()
        for key in chain.from_iterable(backend.keys() for backend in self._backends):
            if key not in seen:
                seen.add(key)
                yield key

    def clear_memory(self) -> None:
        """Empty the non-persistent tiers (persistent ones keep every entry)."""
        for backend in self._backends:
            if not backend.persistent:
                backend.clear()

    def stats(self) -> StoreStats:
        """Store hits and misses, tier counters summed, usage split into memory and disk."""
        tiers = [backend.stats() for backend in self._backends]
        volatile = [t for b, t in zip(self._backends, tiers, strict=True) if not b.persistent]
        durable = [t for b, t in zip(self._backends, tiers, strict=True) if b.persistent]
        return StoreStats(
            hits=self._hits,
            misses=self._misses,
            disk_reads=sum(t.reads for t in durable),
            corrupted=sum(t.corrupted for t in tiers),
            errors=sum(t.errors for t in tiers),
            evictions=sum(t.evictions for t in tiers),
            memory_bytes=sum(t.bytes for t in volatile),
            memory_entries=sum(t.entries for t in volatile),
            disk_bytes=sum(t.bytes for t in durable),
            disk_entries=sum(t.entries for t in durable),
            tiers=tiers,
            hits_by_tier=self.hits_by_tier(),
        )

    @contextmanager
    def counting_reads(self) -> Iterator[dict[str, int]]:
        """Tier name -> store hits served inside this block, and in work run in a copy of its
        context (the batching scheduler prefills a request so): one request's reads while others'
        run beside it."""
        reads = dict.fromkeys((b.name for b in self._backends), 0)
        token = _reads_here.set(reads)
        try:
            yield reads
        finally:
            _reads_here.reset(token)

    def hits_by_tier(self) -> dict[str, int]:
        """Tier name -> store hits that tier served (cheap: no tier is asked for its usage)."""
        with self._counters:
            return dict(self._hits_by_tier)

    def _bound(self) -> str:
        if self._fingerprint is None:
            raise RuntimeError("this KV store is not bound to a model: call store.bind(fingerprint) first")
        return self._fingerprint
