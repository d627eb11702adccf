"""The persistent tier: one safetensors file per entry under a directory.

Files live at ``directory/key[:2]/key.safetensors``; keys are checked to be 64
lowercase hex digits, so no caller text ever reaches a path. A file is written to a
temporary name in the same folder and renamed over the target, so a reader sees a
whole entry or none. A file that fails `codec.decode` is deleted, counted and logged,
and the lookup is a miss: the caller recomputes and rewrites it.
"""

from __future__ import annotations

import os
import tempfile
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

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stats = BackendStats(self.name)

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
        return decode_read(blob, key, self._stats, lambda: path.unlink(missing_ok=True), str(path))

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
