"""An opened index that follows its folder, for long-running processes such as `epic-rag serve`.

Every build or update of an index writes its manifest last, with the next generation.
`LiveIndex.current()` looks at the manifest file (one `stat` when nothing changed) and,
when the generation moved on, reopens the index over the same engine, so the model stays
loaded and the KV tiers keep their entries. Answers already running keep the app they
started with; the next one gets the new index. A manifest that cannot be read or an index
that cannot be reopened (another model, a half-copied folder) is logged and the app in
use goes on answering.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .index import RagApp
from .manifest import MANIFEST, IndexManifest, read_manifest

logger = logging.getLogger(__name__)

Reopen = Callable[[IndexManifest], RagApp]  # the index's new manifest -> the app opened on it


class LiveIndex:
    """The current `RagApp` of an index folder, reopened when its manifest's generation changes."""

    def __init__(self, app: RagApp, reopen: Reopen) -> None:
        if app.index_dir is None:
            raise ValueError("a live index needs an app opened from an index folder")
        self._path = Path(app.index_dir) / MANIFEST
        self._app, self._reopen = app, reopen
        self._generation = read_manifest(app.index_dir).generation
        self._stamp = self._stat()
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """The generation of the index answering now."""
        return self._generation

    def current(self) -> RagApp:
        """The app to answer the next request with (reopened first if the index was updated)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return self._app
            self._stamp = stamp
            try:
                manifest = read_manifest(self._path.parent)
                if manifest.generation != self._generation:
                    self._app = self._reopen(manifest)
                    logger.info("index %s: now answering from generation %d", self._path.parent, manifest.generation)
                    self._generation = manifest.generation
            except Exception as err:  # any failure to reopen (files, a server, another model) keeps the old app
                logger.error("index %s changed but cannot be reopened (%s); still answering from generation %d",
                             self._path.parent, err, self._generation)  # fmt: skip
            return self._app

    def _stat(self) -> tuple[int, int, int] | None:
        """What changes when the manifest is replaced: inode, size, modification time."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns
