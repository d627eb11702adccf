"""KV store: an in-memory LRU with a byte budget in front of a safetensors directory.

Entries are content-addressed: the key is a hash of the model fingerprint and the
token ids, so user text never appears in a path and another model's entry can never
be served. Each file carries a sha256 of its tensor bytes in the safetensors
metadata and is written to a temporary file then renamed, so a reader sees a whole
entry or none. A file that fails to parse, fails its checksum or does not match its
key is deleted and reported as a miss; the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .kv import ChunkKV

FORMAT_VERSION = "1"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def entry_key(model_fingerprint: str, token_ids: torch.Tensor) -> str:
    """Content address of a token sequence's KV under one model."""
    digest = hashlib.sha256(model_fingerprint.encode())
    digest.update(token_ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _checksum(entry: ChunkKV) -> str:
    digest = hashlib.sha256()
    for tensor in (entry.token_ids, entry.keys, entry.values):
        digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' / 'bf16' / 'fp16' / a torch dtype / None (keep the model's) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown storage dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}") from None


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    disk_reads: int = 0
    corrupted: int = 0
    evictions: int = 0
    memory_bytes: int = 0
    memory_entries: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0


class KVStore:
    """get / put / contains / evict over memory (LRU, `memory_budget` bytes) and an optional directory."""

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_budget: int = 2 << 30,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.memory_budget = int(memory_budget)
        self.dtype = resolve_dtype(dtype)
        self._memory: OrderedDict[str, tuple[str, ChunkKV]] = OrderedDict()  # key -> (fingerprint, entry)
        self._memory_bytes = 0
        self._stats = StoreStats()

    # ---- paths -------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a KV store key: {key!r} (expected 64 hex digits)")
        return self.directory / key[:2] / f"{key}.safetensors"

    # ---- public API --------------------------------------------------------------------------
    def put(self, model_fingerprint: str, entry: ChunkKV) -> str:
        """Store `entry` (converted to the storage dtype); returns its key."""
        key = entry_key(model_fingerprint, entry.token_ids)
        entry = self.stored_form(entry)
        if self.directory is not None:
            self._write(key, model_fingerprint, entry)
        self._remember(key, model_fingerprint, entry)
        return key

    def stored_form(self, entry: ChunkKV) -> ChunkKV:
        """`entry` as the store keeps and returns it (in the storage dtype)."""
        return entry.to(self.dtype) if self.dtype is not None else entry

    def get(self, key: str, model_fingerprint: str) -> ChunkKV | None:
        """The entry for `key` if present, intact and made by this model; else None (a miss)."""
        cached = self._memory.get(key)
        if cached is not None and cached[0] == model_fingerprint:
            self._memory.move_to_end(key)
            self._stats.hits += 1
            return cached[1]
        entry = self._read(key, model_fingerprint) if self.directory is not None else None
        if entry is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._remember(key, model_fingerprint, entry)
        return entry

    def contains(self, key: str) -> bool:
        """True when an entry for `key` is held in memory or on disk (not validated here)."""
        return key in self._memory or (self.directory is not None and self._path(key).is_file())

    __contains__ = contains

    def evict(self, key: str) -> bool:
        """Remove `key` from memory and disk; True if anything was removed."""
        removed = self._forget(key)
        if self.directory is not None:
            path = self._path(key)
            if path.is_file():
                path.unlink()
                removed = True
        return removed

    def clear_memory(self) -> None:
        """Drop the memory tier (the directory keeps every entry)."""
        self._memory.clear()
        self._memory_bytes = 0

    def stats(self) -> StoreStats:
        """Counters plus current memory and disk usage."""
        s = StoreStats(**vars(self._stats))
        s.memory_bytes, s.memory_entries = self._memory_bytes, len(self._memory)
        if self.directory is not None:
            files = list(self.directory.glob("*/*.safetensors"))
            s.disk_entries, s.disk_bytes = len(files), sum(f.stat().st_size for f in files)
        return s

    # ---- memory tier -------------------------------------------------------------------------
    def _remember(self, key: str, model_fingerprint: str, entry: ChunkKV) -> None:
        self._forget(key)
        if entry.nbytes > self.memory_budget:
            return
        self._memory[key] = (model_fingerprint, entry)
        self._memory_bytes += entry.nbytes
        while self._memory_bytes > self.memory_budget:
            oldest = next(iter(self._memory))
            self._forget(oldest)
            self._stats.evictions += 1

    def _forget(self, key: str) -> bool:
        item = self._memory.pop(key, None)
        if item is None:
            return False
        self._memory_bytes -= item[1].nbytes
        return True

    # ---- disk tier ---------------------------------------------------------------------------
    def _write(self, key: str, model_fingerprint: str, entry: ChunkKV) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": FORMAT_VERSION,
            "fingerprint": model_fingerprint,
            "sha256": _checksum(entry),
        }
        tensors = {
            "token_ids": entry.token_ids.contiguous(),
            "keys": entry.keys.contiguous(),
            "values": entry.values.contiguous(),
        }
        blob = st_save(tensors, metadata=metadata)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, key: str, model_fingerprint: str) -> ChunkKV | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        self._stats.disk_reads += 1
        entry, fingerprint = _parse(blob)
        if entry is None or entry_key(fingerprint, entry.token_ids) != key:
            self._stats.corrupted += 1  # damaged, or not the entry its name says: recompute it
            path.unlink(missing_ok=True)
            return None
        if fingerprint != model_fingerprint:
            return None  # a sound entry of another model: a miss, left in place
        return entry


def _parse(blob: bytes) -> tuple[ChunkKV | None, str]:
    """(entry, fingerprint) of one file; entry is None when the file is damaged."""
    try:
        tensors = st_load(blob)
        metadata = _metadata(blob)
        entry = ChunkKV(tensors["token_ids"], tensors["keys"], tensors["values"])
    except (SafetensorError, ValueError, KeyError, RuntimeError, struct.error):
        return None, ""
    if metadata.get("format") != FORMAT_VERSION or metadata.get("sha256") != _checksum(entry):
        return None, ""
    return entry, metadata.get("fingerprint", "")


def _metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors byte string."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    return header.get("__metadata__", {}) or {}
