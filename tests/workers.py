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


def connection_attempts(name: str, stream: str, attempts: int, start_at: float) -> int:
    """Try ``attempts`` connections at once with the others; keep what it got."""
    limiter = shmrate.ConnectionLimiter.open(name)
    while time.time() < start_at:
        pass
    got = sum(limiter.try_acquire(stream) for _ in range(attempts))
    limiter.close()
    return got


def hold_streams_until_killed(
    conn_name: str, bw_name: str, streams: list[str], ready: Any
) -> None:
    """Take connections and bandwidth for ``streams``, then wait to be killed."""
    conns = shmrate.ConnectionLimiter.open(conn_name)
    pool = shmrate.BandwidthManager.open(bw_name)
    for s in streams:
        assert conns.try_acquire(s)
        _, ok = pool.allocate_bandwidth(s, 1000)
        assert ok
    ready.set()
    while True:
        time.sleep(1)


def churn_allocations(name: str, seed: int, seconds: float) -> int:
    """Allocate, resize and release random streams; returns operations done."""
    import random

    rnd = random.Random(seed)
    pool = shmrate.BandwidthManager.open(name)
    mine = [f"w{seed}-{i}" for i in range(8)]
    end = time.monotonic() + seconds
    ops = 0
    while time.monotonic() < end:
        s = rnd.choice(mine)
        if rnd.random() < 0.6:
            pool.allocate_bandwidth(s, rnd.randrange(0, 50_000))
        else:
            pool.release_bandwidth(s)
        ops += 1
    for s in mine:
        pool.release_bandwidth(s)
    pool.close()
    return ops


def count_in_other_interpreter(name: str, stream: str) -> int:
    with shmrate.ConnectionLimiter.open(name) as c:
        return c.get_count(stream)
