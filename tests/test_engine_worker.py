"""The server's request queue: jobs in order on a fixed set of runners, a bounded wait, cancellation."""

from __future__ import annotations

import threading

import pytest
from epic_rag.server.worker import EngineWorker, Job, QueueFull


def test_jobs_run_one_at_a_time_in_order_and_a_full_queue_refuses():
    worker = EngineWorker(max_waiting=2)
    gate, started = threading.Event(), threading.Event()
    order, results, running, peak = [], {}, [0], [0]
    done = threading.Semaphore(0)

    def job(name: str) -> Job:
        def run(cancel: threading.Event) -> str:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.set()
            gate.wait(10)
            order.append(name)
            running[0] -= 1
            return name

        def finish(result, error) -> None:
            results[name] = (result, error)
            done.release()

        return Job(run=run, finish=finish)

    worker.submit(job("a"))
    assert started.wait(10)  # "a" runs; two more may wait
    worker.submit(job("b"))
    skipped = job("c")
    worker.submit(skipped)
    assert worker.depth == 3
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        worker.submit(job("d"))
    skipped.cancel.set()  # its client left before it started
    gate.set()
    for _ in range(3):
        assert done.acquire(timeout=10)
    assert order == ["a", "b"] and peak[0] == 1
    assert results == {"a": ("a", None), "b": ("b", None), "c": (None, None)}
    worker.close()


def test_an_error_goes_to_its_request_and_the_worker_goes_on():
    worker = EngineWorker(max_waiting=4)
    box, done = [], threading.Semaphore(0)

    def finish(result, error) -> None:
        box.append((result, error))
        done.release()

    worker.submit(Job(run=lambda cancel: 1 / 0, finish=finish))
    worker.submit(Job(run=lambda cancel: "fine", finish=finish))
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    assert isinstance(box[0][1], ZeroDivisionError) and box[1] == ("fine", None)
    worker.close()


def test_close_finishes_the_running_job_and_refuses_the_waiting_ones():
    worker = EngineWorker(max_waiting=2)
    gate, started = threading.Event(), threading.Event()
    results: dict[str, tuple] = {}

    def run(cancel: threading.Event) -> str:
        started.set()
        gate.wait(10)
        return "finished"

    def finish_as(name: str):
        return lambda result, error: results.__setitem__(name, (result, error))

    worker.submit(Job(run=run, finish=finish_as("running")))
    assert started.wait(10)
    waiting = Job(run=lambda cancel: "never", finish=finish_as("waiting"))
    worker.submit(waiting)
    closer = threading.Thread(target=worker.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close waits for the running job
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and worker.depth == 0
    assert results["running"] == ("finished", None)
    result, error = results["waiting"]
    assert result is None and str(error) == "the server is shutting down" and waiting.cancel.is_set()


def test_runners_take_jobs_side_by_side_and_the_queue_still_bounds_the_rest():
    """With 2 runners, two jobs run at once (the batching scheduler decodes them together); two more
    wait, a fifth beyond the queue is refused, and depth counts the running ones."""
    worker = EngineWorker(max_waiting=2, runners=2)
    both_running, release = threading.Barrier(3), threading.Event()
    finished = threading.Semaphore(0)

    def run(cancel: threading.Event) -> str:
        both_running.wait(10)
        release.wait(10)
        return "done"

    def finish(result, error) -> None:
        finished.release()

    worker.submit(Job(run=run, finish=finish))
    worker.submit(Job(run=run, finish=finish))
    both_running.wait(10)  # raises BrokenBarrierError unless the two run at the same time
    worker.submit(Job(run=lambda cancel: "third", finish=finish))
    worker.submit(Job(run=lambda cancel: "fourth", finish=finish))
    assert worker.depth == 4
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        worker.submit(Job(run=lambda cancel: "fifth", finish=finish))
    release.set()
    for _ in range(4):
        assert finished.acquire(timeout=10)
    worker.close()
    assert worker.depth == 0
    with pytest.raises(ValueError, match="runners must be at least 1, got 0"):
        EngineWorker(runners=0)
