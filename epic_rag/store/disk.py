"""The persistent tier: one safetensors file per entry under a directory.

Files live at ``directory/key[:2]/key.safetensors``; keys are checked to be 64
lowercase hex digits, so no caller text ever reaches a path. A file is written to a
temporary name in the same folder and renamed over the target, so a reader sees a
whole entry or none. A file that fails `codec.decode` is deleted, counted and logged,
and the lookup is a miss: the caller recomputes and rewrites it.

With a byte `budget`, every read touches its file's modification time, and a write that
takes the folder over the budget deletes the least recently used files first (never the
one just written), each counted as an eviction.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ..kv import ChunkKV
from .backend import BackendStats, KVBackend
from .codec import decode_read, encode
from .keys import is_entry_key

SUFFIX = ".safetensors"


class DiskBackend(KVBackend):
    """Entries as checksummed safetensors files under `directory` (created if missing)."""

    name = "disk"
    persistent = True

    def __init__(self, directory: str | Path, budget: int | None = None) -> None:
        if budget is not None and budget <= 0:
            raise ValueError(f"a disk budget must be a positive number of bytes, got {budget}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self._stats = BackendStats(self.name)
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        """The file of `key`; ValueError unless `key` looks like an `entry_key`."""
        if not is_entry_key(key):
            raise ValueError(f"not a KV store key: {key!r} (expected 64 lowercase hex digits)")
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> tuple[ChunkKV, str] | None:
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            blob = None
        found = decode_read(blob, key, self._stats, lambda: path.unlink(missing_ok=True), str(path))
        if found is not None and self.budget is not None:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: the entry read is still whole
                os.utime(path)  # the last access, for LRU eviction
        return found

    def put(self, key: str, entry: ChunkKV, fingerprint: str) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = encode(entry, fingerprint)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.budget is not None:
            self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used files until the folder fits the budget (`keep` stays)."""
        with self._lock:
            files = []
            for path in self._files():
                with contextlib.suppress(FileNotFoundError):  # another process evicted it first
                    st = path.stat()
                    files.append((st.st_mtime_ns, st.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files, key=lambda f: f[0]):
                if total <= self.budget:
                    break
                if path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                self._stats.evictions += 1

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def size_of(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return 0

    def keys(self) -> Iterator[str]:
        return (path.stem for path in self._files())

    def counters(self) -> BackendStats:
        return replace(self._stats)

    def stats(self) -> BackendStats:
        sizes = [path.stat().st_size for path in self._files()]
        return replace(self._stats, bytes=sum(sizes), entries=len(sizes))

    def _files(self) -> Iterator[Path]:
        """Entry files (temporary and foreign files skipped)."""
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            if is_entry_key(path.stem) and path.parent.name == path.stem[:2]:
                yield path
