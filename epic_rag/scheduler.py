"""Continuous batching: the answers of many callers decoded together on one compute thread.

While batching (`EpicEngine.start_batching`), the engine's answers run on the scheduler's
thread: a new answer's prefill starts as soon as the batch has room, the answers already
streaming step together, one token each per forward (`decode_step`), and an answer leaves
the batch the moment it ends (a stop token, its length, its reader stopped or cancelled).
Where a step of fewer answers makes more tokens per second (a CPU's GEMM at 4 rows costs
twice 3: `batch_decode`), each step runs that many and the answers take turns.
A prefill is cut into pieces at its layer boundaries (`forward.interleaved`): once `piece_s`
has passed since the last step, the streaming answers get their next token before the
prefill goes on, so a long prompt arriving stalls them for about one piece. Tokens are
chosen here, each answer with its own sampler, as a lone answer chooses them; readers turn
them into text on their own threads. All compute stays on one thread: on a small CPU, two
forwards at once slow each other more than they gain.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from .batch_decode import decode_step, rows_per_step
from .batch_limits import DEFAULT_MAX_BATCH, DEFAULT_PIECE_S
from .decode import TokenSampler
from .forward import Cancelled, cancellable, interleaved
from .results import PrefillResult
from .sampling import SamplingParams


class ScheduledAnswer:
    """One answer's place in the scheduler and the mailbox its reader takes tokens from.

    `prefilled()` (the reader's first call) submits it and waits for its prefill; `tokens()`
    then yields each token as it is chosen, and stopping it takes the answer out of the batch."""

    def __init__(
        self,
        scheduler: Scheduler,
        prefill: Callable[[], PrefillResult],
        params: SamplingParams,
        cancel: threading.Event | None,
        kv_bytes: int,
    ) -> None:
        self._scheduler = scheduler
        self.prefill = prefill  # run on the scheduler's thread, in a copy of the reader's context
        self.params = params
        self.cancel = cancel if cancel is not None else threading.Event()
        self.kv_bytes = kv_bytes  # its cache: prompt plus answer tokens, all layers
        self.choose = TokenSampler(params, scheduler.stop_token_ids)
        self.left = threading.Event()  # its reader wants no more tokens
        self.context: contextvars.Context | None = None
        self.result: PrefillResult | None = None
        self.next_token = 0  # the token its next step runs
        self.produced = 0
        self._mailbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    # ---- the reader's side ---------------------------------------------------------------
    def prefilled(self) -> PrefillResult:
        """Submit, wait for the prefill and return it (or raise what it raised, `Cancelled` too)."""
        self.context = contextvars.copy_context()
        self._scheduler.submit(self)
        kind, value = self._mailbox.get()
        if kind == "error":
            raise value
        return value

    def tokens(self, _prefilled: PrefillResult | None = None) -> Iterator[int]:
        """The answer's tokens as they are chosen; closing this leaves the batch at once."""
        try:
            while True:
                kind, value = self._mailbox.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            self.left.set()

    # ---- the scheduler's side ------------------------------------------------------------
    def send(self, kind: str, value: Any = None) -> None:
        self._mailbox.put((kind, value))

    @property
    def wanted(self) -> bool:
        return not (self.left.is_set() or self.cancel.is_set())

    def drop(self) -> None:
        """Leave the batch: a cancelled answer's reader gets `Cancelled`, a departed one nothing."""
        if self.cancel.is_set():
            self.send("error", Cancelled("cancelled by its caller"))
        else:
            self.send("end")


class Scheduler:
    """Runs submitted answers on its own thread, up to `max_batch` decoding together; the engine's
    lock is held for each prefill and step, never while a reader handles a token."""

    def __init__(
        self,
        model: nn.Module,
        lock: threading.RLock,
        stop_token_ids: set[int],
        max_batch: int = DEFAULT_MAX_BATCH,
        piece_s: float = DEFAULT_PIECE_S,
        step_ms: Sequence[float] | None = None,
    ) -> None:
        """`step_ms[k - 1]`: what a step of k answers costs (`measure_step_ms`), from which each
        step runs as many of the answers in flight as make the most tokens per second, the rest
        waiting their turn (`rows_per_step`); None: every step runs all of them."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if piece_s <= 0:
            raise ValueError(f"the prefill piece must be a positive time, got {piece_s} s")
        self.model, self.lock, self.stop_token_ids = model, lock, stop_token_ids
        self.max_batch, self.piece_s = max_batch, piece_s
        if step_ms is not None and len(step_ms) != max_batch:
            raise ValueError(f"step_ms needs the cost of each batch size 1..{max_batch}, got {len(step_ms)}")
        self.step_ms = list(step_ms) if step_ms is not None else None
        self.step_rows = rows_per_step(step_ms) if step_ms is not None else list(range(max_batch + 1))
        self.steps = 0  # batched decode steps run
        self.tokens_stepped = 0  # tokens they produced (over steps: the mean batch)
        self._pending: deque[ScheduledAnswer] = deque()
        self._active: list[ScheduledAnswer] = []
        self._prefilling: ScheduledAnswer | None = None
        self._last_step = time.perf_counter()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="epic-rag-scheduler", daemon=True)
        self._thread.start()

    def answer(
        self,
        prefill: Callable[[], PrefillResult],
        params: SamplingParams,
        cancel: threading.Event | None,
        kv_bytes: int,
    ) -> ScheduledAnswer:
        """An answer to run here once its reader asks for it (`prefilled`)."""
        return ScheduledAnswer(self, prefill, params, cancel, kv_bytes)

    def submit(self, answer: ScheduledAnswer) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the batching scheduler is closed; start batching again or answer alone")
            self._pending.append(answer)
            self._wake.notify()

    @property
    def batch_size(self) -> int:
        """Answers decoding now."""
        return len(self._active)

    @property
    def kv_bytes_in_flight(self) -> int:
        """Bytes of the caches of the answers decoding and the one prefilling."""
        prefilling = self._prefilling
        return sum(a.kv_bytes for a in list(self._active)) + (prefilling.kv_bytes if prefilling else 0)

    def close(self) -> None:
        """Stop after the current prefill or step; answers still in it get an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # ---- the compute thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while (answer := self._next()) is not False:
                with self.lock:
                    if answer is not None:
                        self._prefilling = answer
                        try:
                            self._prefill(answer)
                        finally:
                            self._prefilling = None
                    if self._active and (answer is None or self._due()):
                        self._step()
        finally:  # closed, or a fault of its own: no reader is left waiting, no answer is taken any more
            with self._wake:
                self._closed = True
                unfinished, self._pending, self._active = [*self._pending, *self._active], deque(), []
            for answer in unfinished:
                answer.send("error", RuntimeError("the batching scheduler stopped before this answer finished"))

    def _next(self) -> ScheduledAnswer | None | bool:
        """The answer to prefill now (None: only step), or False once closed; waits for work."""
        with self._wake:
            while True:
                for gone in [a for a in self._pending if not a.wanted]:
                    self._pending.remove(gone)
                    gone.drop()
                if self._closed:
                    return False
                if self._pending and len(self._active) < self.max_batch:
                    return self._pending.popleft()
                if self._active:
                    return None
                self._wake.wait()

    def _due(self) -> bool:
        return time.perf_counter() - self._last_step >= self.piece_s

    def _step_if_due(self) -> None:
        if self._active and self._due():
            self._step()

    def _prefill(self, answer: ScheduledAnswer) -> None:
        def run() -> PrefillResult:
            with cancellable(answer.cancel), interleaved(self._step_if_due):
                return answer.prefill()

        try:
            answer.result = answer.context.run(run)
        except Exception as err:  # the reader raises it (Cancelled, a prompt too long, ...)
            answer.send("error", err)
            return
        answer.send("prefilled", answer.result)
        token = answer.choose(answer.result.logits)
        if self._advance(answer, token):
            self._active.append(answer)
        self._deliver(answer, token)

    def _advance(self, answer: ScheduledAnswer, token: int) -> bool:
        """Take `token` as the answer's next; whether it goes on (not a stop token, not its length)."""
        answer.produced += 1
        answer.next_token = token
        return token not in self.stop_token_ids and answer.produced < answer.params.max_new_tokens

    def _deliver(self, answer: ScheduledAnswer, token: int) -> None:
        """Hand `token` to the reader, and the end with it if the answer is over (after it left the batch)."""
        answer.send("token", token)
        if answer not in self._active:
            answer.send("end")

    def _step(self) -> None:
        """One token more for the answers whose turn it is (all, unless fewer rows step faster),
        in one forward; they go to the back of the line."""
        wanted = []
        for answer in self._active:
            if answer.wanted:
                wanted.append(answer)
            else:
                answer.drop()
        self._active = wanted
        if not wanted:
            return
        rows = self.step_rows[len(wanted)]
        batch, waiting = wanted[:rows], wanted[rows:]
        try:
            logits = decode_step(self.model, [a.result.cache for a in batch], [a.next_token for a in batch])
        except Exception as err:  # every answer in the failed step gets the error, the scheduler goes on
            for answer in batch:
                answer.send("error", err)
            self._active = waiting
            return
        finally:
            self._last_step = time.perf_counter()
        self.steps += 1
        self.tokens_stepped += len(batch)
        tokens = [a.choose(row) for a, row in zip(batch, logits, strict=True)]
        self._active = waiting + [a for a, token in zip(batch, tokens, strict=True) if self._advance(a, token)]
        for answer, token in zip(batch, tokens, strict=True):
            self._deliver(answer, token)
