"""The lock survives a holder killed with SIGKILL, and waits survive signals."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time

import pytest

from shmrate import TokenBucket
from shmrate._layout import H_RECOVERIES
from tests import workers

FORK = mp.get_context("fork")


def start_holder(name: str, record_holder: bool) -> mp.process.BaseProcess:
    ready = FORK.Event()
    p = FORK.Process(
        target=workers.hold_lock_forever, args=(name, record_holder, ready)
    )
    p.start()
    assert ready.wait(10)
    return p


def kill(p: mp.process.BaseProcess) -> None:
    assert p.pid is not None
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)


@pytest.mark.parametrize("record_holder", [True, False], ids=["recorded", "unrecorded"])
def test_a_holder_killed_with_the_lock_stalls_the_others_about_a_second(
    name: str, record_holder: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with TokenBucket(1000, name=name) as b:
        holder = start_holder(name, record_holder)
        kill(holder)
        with caplog.at_level(logging.WARNING, logger="shmrate"):
            t0 = time.monotonic()
            assert b.allow()
            stalled = time.monotonic() - t0
        assert stalled < (0.8 if record_holder else 2.0)
        assert b._seg.words[H_RECOVERIES] == 1
        assert b._seg.sem.value == 1
        (record,) = caplog.records
        assert name in record.getMessage()
        if record_holder:
            assert f"pid {holder.pid}" in record.getMessage()


def test_a_live_holder_is_never_taken_over(name: str) -> None:
    with TokenBucket(1000, name=name) as b:
        holder = start_holder(name, record_holder=True)
        q = FORK.Queue()
        waiter = FORK.Process(target=workers.timed_allow, args=(name, q))
        waiter.start()
        time.sleep(1.5)  # several timed waits run out meanwhile
        assert waiter.is_alive()
        kill(holder)
        assert q.get(timeout=10) > 1.4
        waiter.join(10)
        assert b._seg.words[H_RECOVERIES] == 1


def test_exactly_one_of_many_waiters_recovers(name: str) -> None:
    with TokenBucket(1000, name=name) as b:
        holder = start_holder(name, record_holder=True)
        q = FORK.Queue()
        waiters = [
            FORK.Process(target=workers.timed_allow, args=(name, q)) for _ in range(6)
        ]
        for w in waiters:
            w.start()
        time.sleep(0.3)
        kill(holder)
        stalls = [q.get(timeout=10) for _ in waiters]
        for w in waiters:
            w.join(10)
        assert max(stalls) < 1.5
        assert b._seg.words[H_RECOVERIES] == 1
        # Never two holders at once: the semaphore's value is back to 1, not 2.
        assert b._seg.sem.value == 1


def test_signals_during_a_lock_wait_are_retried(name: str) -> None:
    with TokenBucket(1000, name=name) as b:
        holder = start_holder(name, record_holder=True)
        hits: list[int] = []
        old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
        try:
            pinger = FORK.Process(target=_ping, args=(os.getpid(), 1.5))
            pinger.start()
            killer = FORK.Process(target=_kill_after, args=(holder.pid, 0.5))
            killer.start()
            assert b.allow()  # waits out the holder while signals arrive
            assert b.allow(1023)
            b.allow_n(500, timeout=5)  # and sleeps through them too
            pinger.join(10)
        finally:
            signal.signal(signal.SIGUSR1, old)
        killer.join(10)
        holder.join(10)
        assert len(hits) > 10


def _ping(pid: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.01)


def _kill_after(pid: int, delay_s: float) -> None:
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)


def test_a_holder_that_dies_after_the_name_was_unlinked_is_taken_over(
    name: str,
) -> None:
    with TokenBucket(1000, name=name) as b:
        holder = start_holder(name, record_holder=True)
        b.unlink()  # the processes attached keep using the segment
        kill(holder)
        t0 = time.monotonic()
        assert b.allow()
        assert time.monotonic() - t0 < 0.8
        assert b._seg.words[H_RECOVERIES] == 1
