"""Each recovery and each reclaim logs one WARNING naming the segment and the pid.

Operators find out that a worker died holding a limit from these lines alone,
so every kind of object says it the same way, through the ``shmrate`` logger.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from shmrate import BandwidthManager, ConnectionLimiter, TokenBucket

FORK = mp.get_context("fork")

MAKERS: dict[str, Callable[[str], Any]] = {
    "TokenBucket": lambda name: TokenBucket(1000, name=name),
    "ConnectionLimiter": lambda name: ConnectionLimiter(2, 8, name=name),
    "BandwidthManager": lambda name: BandwidthManager(10_000, name=name),
}
CLASSES: dict[str, Any] = {
    "TokenBucket": TokenBucket,
    "ConnectionLimiter": ConnectionLimiter,
    "BandwidthManager": BandwidthManager,
}
USE: dict[str, Callable[[Any], object]] = {
    "TokenBucket": lambda b: b.allow(),
    "ConnectionLimiter": lambda c: c.try_acquire("after"),
    "BandwidthManager": lambda m: m.allocate_bandwidth("after", 10),
}


def _hold_lock(kind: str, name: str, ready: Any) -> None:
    obj = CLASSES[kind].open(name)
    obj._seg.lock.acquire()
    ready.set()
    signal.pause()


def _hold_streams(kind: str, name: str, streams: list[str], ready: Any) -> None:
    obj = CLASSES[kind].open(name)
    for s in streams:
        if kind == "ConnectionLimiter":
            assert obj.try_acquire(s)
        else:
            assert obj.allocate_bandwidth(s, 100)[1]
    ready.set()
    signal.pause()


def start_and_kill(target: Callable[..., None], *args: Any) -> int:
    """Run ``target`` in a forked child until it is ready, then SIGKILL it."""
    ready = FORK.Event()
    p = FORK.Process(target=target, args=(*args, ready))
    p.start()
    assert ready.wait(10)
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    return p.pid


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shmrate" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_lock_recovery_logs_one_warning_with_segment_and_pid(
    name: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with MAKERS[kind](name) as obj:
        pid = start_and_kill(_hold_lock, kind, name)
        with caplog.at_level(logging.WARNING, logger="shmrate"):
            USE[kind](obj)
        (message,) = warnings_of(caplog)
        assert f"{kind} {name!r}" in message
        assert f"pid {pid}" in message
        assert "took over the lock" in message


@pytest.mark.parametrize("kind", ["ConnectionLimiter", "BandwidthManager"])
def test_a_reclaim_logs_one_warning_per_dead_pid(
    name: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with MAKERS[kind](name) as obj:
        first = start_and_kill(_hold_streams, kind, name, ["a", "b"])
        second = start_and_kill(_hold_streams, kind, name, ["c"])
        with caplog.at_level(logging.WARNING, logger="shmrate"):
            assert obj.reap() > 0
            assert obj.reap() == 0  # nothing left: and nothing more logged
        messages = warnings_of(caplog)
        assert len(messages) == 2
        for pid, count in ((first, 2), (second, 1)):
            (message,) = [m for m in messages if f"pid {pid}," in m]
            assert f"{kind} {name!r}" in message
            assert f"reclaimed {count} " in message


def test_a_reclaim_on_refusal_logs_too(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with ConnectionLimiter(1, 1, name=name) as c:
        pid = start_and_kill(_hold_streams, "ConnectionLimiter", name, ["only"])
        with caplog.at_level(logging.WARNING, logger="shmrate"):
            assert c.try_acquire("mine")  # refused at first: the dead pid's slot
        (message,) = warnings_of(caplog)
        assert f"ConnectionLimiter {name!r}" in message and f"pid {pid}" in message
