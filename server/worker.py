"""Requests run one at a time on one thread, from a bounded queue.

On a small CPU two prompts computed at once slow each other far more than they gain
(measured on 2 cores: AttnLink(16) 0.94 s alone, 7.9 s beside other busy processes), so
the server never runs them on top of each other: the engine's own torch threads use the
cores and requests wait their turn. A full queue is refused at once, never buffered.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """Every waiting slot is taken."""


@dataclass
class Job:
    """One request: `run` does the work and returns its result, `finish(result, error)` gets it.

    Setting `cancel` before the job starts skips it; while it runs, `run` is expected to stop early."""

    run: Callable[[threading.Event], Any]
    finish: Callable[[Any, BaseException | None], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineWorker:
    """One thread running submitted jobs in order; at most `max_waiting` wait behind the running one."""

    def __init__(self, max_waiting: int = 16, name: str = "epic-rag-engine") -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_waiting)
        self._running = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        with self._lock:
            return self._jobs.qsize() + self._running

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting") from None

    def close(self) -> None:
        """Finish the running job, then stop (jobs still waiting are cancelled)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.finish(None, RuntimeError("the server is shutting down"))
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                job.finish(None, None)
                continue
            with self._lock:
                self._running = 1
            try:
                result, error = job.run(job.cancel), None
            except Exception as err:  # handed to the request that caused it; the worker goes on
                result, error = None, err
            finally:
                with self._lock:
                    self._running = 0
            job.finish(result, error)
