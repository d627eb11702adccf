"""Requests run on a fixed set of runner threads, from a bounded queue.

Each runner takes one request at a time: retrieval, then the answer, whose compute the
engine's batching scheduler does on its own single thread, decoding the runners' answers
together (`epic_rag.scheduler`). So there are as many runners as answers may decode at
once (`--max-batch`); one runner serves requests strictly one after another. A full queue
is refused at once, never buffered.
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
    """`runners` threads running submitted jobs in order of arrival; at most `max_waiting` wait
    behind the running ones."""

    def __init__(self, max_waiting: int = 16, runners: int = 1, name: str = "epic-rag-runner") -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        if runners < 1:
            raise ValueError(f"runners must be at least 1, got {runners}")
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_waiting)
        self._running = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(runners)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus the ones running."""
        with self._lock:
            return self._jobs.qsize() + self._running

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting") from None

    def close(self) -> None:
        """Finish the running jobs, then stop (jobs still waiting are cancelled)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.finish(None, RuntimeError("the server is shutting down"))
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                job.finish(None, None)
                continue
            with self._lock:
                self._running += 1
            try:
                result, error = job.run(job.cancel), None
            except Exception as err:  # handed to the request that caused it; the runner goes on
                result, error = None, err
            finally:
                with self._lock:
                    self._running -= 1
            job.finish(result, error)
