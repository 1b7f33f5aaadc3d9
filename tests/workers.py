"""Functions that run in child processes (importable, so spawn can run them)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import shmrate


def allow_n_times(name: str, n: int, count: int) -> int:
    with shmrate.TokenBucket.open(name) as b:
        return sum(b.allow(n) for _ in range(count))


def use_pickled(bucket: shmrate.TokenBucket, n: int) -> tuple[bool, int]:
    ok = bucket.allow(n)
    return ok, bucket.tokens()


def create_or_open_and_take(name: str, start_at: float, n: int) -> str:
    """Create-or-open at the same moment as the others, then take ``n``."""
    while time.time() < start_at:
        pass
    b = shmrate.TokenBucket(0, name=name)
    try:
        assert b.allow(n)
        return b._seg.shm_name
    finally:
        b.close()


def hammer(name: str, start_at: float, seconds: float, q: Any) -> None:
    with shmrate.TokenBucket.open(name) as b:
        while time.time() < start_at:
            pass
        end = time.monotonic() + seconds
        got = 0
        while time.monotonic() < end:
            if b.allow():
                got += 1
        q.put(got)


def hold_lock_forever(name: str, record_holder: bool, ready: Any) -> None:
    """Take the bucket's lock and never give it back (until killed)."""
    b = shmrate.TokenBucket.open(name)
    if record_holder:
        b._seg.lock.acquire()
    else:
        # Die "between sem_wait and recording the holder": take the raw
        # semaphore only.
        b._seg.sem.acquire()
    ready.set()
    while True:
        time.sleep(1)


def timed_allow(name: str, q: Any) -> None:
    with shmrate.TokenBucket.open(name) as b:
        t0 = time.monotonic()
        b.allow()
        q.put(time.monotonic() - t0)


def set_rate_later(name: str, delay_s: float, rate: int) -> None:
    time.sleep(delay_s)
    with shmrate.TokenBucket.open(name) as b:
        b.set_rate(rate)


def small_allows(name: str, seconds: float) -> int:
    got = 0
    with shmrate.TokenBucket.open(name) as b:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            got += b.allow(1)
    return got


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
