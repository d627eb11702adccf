"""Which tokens each chunk id stands for: the chunks this process has seen, backed by the store.

A chunk reaches the engine as text or as an id ('kv:<store key>'). The registry turns
either into (token ids, store key): ids noted when the chunk was compiled or first seen,
else the store's entry for the key. It also remembers what an entry was compiled after
(neighbour or similar-chunk compile), so an entry lost from every tier is compiled again
the same way.
Safe under concurrent callers: every read and write of its tables holds one lock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import torch

from ..kv import CompileContext
from .tiered import TieredStore

CHUNK_ID = re.compile(r"^kv:([0-9a-f]{64})$")

TokenizeChunk = Callable[[str], torch.Tensor]  # chunk text -> [n] ids it is cached with
KeyOf = Callable[[torch.Tensor, "CompileContext | None"], str]  # (ids, compiled after) -> store key


class UnknownChunkError(KeyError):
    """A chunk id that is not in the KV store."""

    def __str__(self) -> str:
        return str(self.args[0])


class ChunkRegistry:
    """Store key -> the chunk's token ids and compile context, for one model's store."""

    def __init__(self, store: TieredStore, tokenize_chunk: TokenizeChunk, key_of: KeyOf) -> None:
        self._store = store
        self._tokenize_chunk = tokenize_chunk
        self._key_of = key_of
        self._ids: dict[str, torch.Tensor] = {}  # store key -> chunk ids seen in this process
        self._contexts: dict[str, CompileContext] = {}  # store key -> what its chunk was compiled after
        self._lock = threading.Lock()

    def remember(self, key: str, token_ids: torch.Tensor, context: CompileContext | None = None) -> None:
        """Note the ids of a stored chunk (and what it was compiled after)."""
        with self._lock:
            self._ids[key] = token_ids
            if context is not None:
                self._contexts[key] = context

    def context_of(self, key: str | None) -> CompileContext | None:
        """What the chunk stored under `key` was compiled after, when known (None: alone)."""
        if key is None:
            return None
        with self._lock:
            return self._contexts.get(key)

    def ids_of(self, key: str) -> torch.Tensor | None:
        """The chunk ids noted under `key`, else those of the store's entry (then noted), else None."""
        with self._lock:
            ids = self._ids.get(key)
        if ids is not None:
            return ids
        entry = self._store.get(key)
        if entry is None:
            return None
        self.remember(key, entry.token_ids, entry.context)
        return entry.token_ids

    def known_chunk(self, text: str, key: str | None = None) -> tuple[torch.Tensor, str]:
        """(ids, store key) of a chunk text: the ids noted under `key` when there are any; else
        the text tokenized once under `key` when the store's entry for `key` holds these tokens
        (an entry compiled after other text), or under its own plain key."""
        if key is not None:
            with self._lock:
                ids = self._ids.get(key)
            if ids is not None:
                return ids, key
        ids = self._tokenize_chunk(text)
        plain = self._key_of(ids, None)
        if key is not None and key != plain:
            entry = self._store.get(key)
            if entry is not None and torch.equal(entry.token_ids, ids):
                self.remember(key, ids, entry.context)
                return ids, key
        self.remember(plain, ids)
        return ids, plain

    def resolve(self, chunk: str) -> tuple[torch.Tensor, str]:
        """Chunk text or chunk id ('kv:<key>') -> (token ids, store key)."""
        match = CHUNK_ID.match(chunk)
        if match is None:
            return self.known_chunk(chunk)
        key = match.group(1)
        ids = self.ids_of(key)
        if ids is None:
            raise UnknownChunkError(
                f"unknown chunk {chunk[:19]}...: it is not in the KV store of this model "
                "(another model, another store folder, or a damaged entry); pass its text or add it again "
                "with engine.add_chunks([text])"
            )
        return ids, key
