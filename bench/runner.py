"""Start N forked workers together, run one task in each, collect the results.

Every worker first opens its subject (a Redis connection, a segment, a
Manager proxy), then waits on a barrier; only when all are ready does the
parent publish a start instant a little in the future, and every worker
sleeps until that same instant. So connection setup never counts, and all
workers begin and stop within a scheduler tick of each other.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_FORK = multiprocessing.get_context("fork")

# Generous: opening a Redis connection or a Manager proxy takes milliseconds,
# but eight forks on two busy cores can take a while to be scheduled.
_READY_TIMEOUT_S = 60.0
# Long enough for the slowest worker to be scheduled after the go signal.
_START_DELAY_S = 0.05
# How far past its budget a task may run before it counts as hung: a task
# checks the clock only between batches of tries, and a batch against a
# contended file lock or a busy Redis can take a fraction of a second.
_OVERRUN_S = 20.0

_BROKEN = "another worker failed before the start"
_HUNG = "a worker did not report in time and was killed"

Opener = Callable[[], Any]
Task = Callable[[Any, float], dict[str, Any]]


class WorkerError(RuntimeError):
    """A worker could not open its subject, or its task raised."""


class WorkerHung(WorkerError):
    """A worker did not report within its budget and was killed."""


def _worker(
    opener: Opener,
    task: Task,
    barrier: Any,
    go_event: Any,
    go_at: Any,
    conn: Connection,
) -> None:
    try:
        subject = opener()
    except BaseException as exc:
        barrier.abort()
        conn.send({"error": _describe(exc)})
        return
    try:
        barrier.wait(timeout=_READY_TIMEOUT_S)
        if not go_event.wait(timeout=_READY_TIMEOUT_S):
            raise WorkerError("the parent never gave the start signal")
        go_s: float = go_at.value
        pause_s = go_s - time.monotonic()
        if pause_s > 0:
            time.sleep(pause_s)
        result = task(subject, go_s)
        subject.close()
    except BaseException as exc:
        barrier.abort()
        result = {"error": _describe(exc)}
    conn.send(result)
    conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, threading.BrokenBarrierError):
        return _BROKEN
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_together(
    opener: Opener, task: Task, processes: int, budget_s: float
) -> list[dict[str, Any]]:
    """Run ``task(subject, go_s)`` in ``processes`` workers at once.

    ``budget_s`` is how long the task itself may take; a worker that has not
    reported by then (plus the start-up allowance) is killed and counted as a
    failure. Raises ``WorkerError`` with the first worker's error, if any.
    """
    barrier = _FORK.Barrier(processes + 1)
    go_event = _FORK.Event()
    go_at = _FORK.RawValue("d", 0.0)
    workers: list[tuple[Any, Connection]] = []
    for _ in range(processes):
        receiver, sender = _FORK.Pipe(duplex=False)
        process = _FORK.Process(
            target=_worker,
            args=(opener, task, barrier, go_event, go_at, sender),
            daemon=True,
        )
        process.start()
        sender.close()
        workers.append((process, receiver))

    try:
        barrier.wait(timeout=_READY_TIMEOUT_S)
        go_at.value = time.monotonic() + _START_DELAY_S
        go_event.set()
        deadline_s = go_at.value + budget_s + _OVERRUN_S
    except threading.BrokenBarrierError:
        # The worker that broke it reports why through its pipe.
        deadline_s = time.monotonic() + _OVERRUN_S
    results = [_collect(process, receiver, deadline_s) for process, receiver in workers]
    errors = [result["error"] for result in results if "error" in result]
    if errors:
        # The worker that failed first says why; the others only say that
        # the barrier broke under them.
        errors.sort(key=lambda error: error == _BROKEN)
        if errors[0] == _HUNG:
            raise WorkerHung(_HUNG)
        raise WorkerError(errors[0])
    return results


def _collect(process: Any, receiver: Connection, deadline_s: float) -> dict[str, Any]:
    result: dict[str, Any]
    try:
        if receiver.poll(max(0.0, deadline_s - time.monotonic())):
            result = receiver.recv()
        else:
            result = {"error": _HUNG}
    except EOFError:
        process.join(timeout=5)
        result = {"error": f"a worker died (exit code {process.exitcode})"}
    finally:
        receiver.close()
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)
    return result
