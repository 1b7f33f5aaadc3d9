"""What the workers run: each task gets its opened subject and the shared
start instant, and returns plain numbers for the parent to judge."""

from __future__ import annotations

import time
from typing import Any

from bench.pools import PoolSubject
from bench.subjects import Subject

# Reading the clock after every try would add its own cost to the cheapest
# subjects; a batch of 32 tries between reads overshoots the slowest subject
# (Redis, about 0.2 ms a try here) by a few milliseconds, which the measured
# elapsed time absorbs.
_BATCH = range(32)


def spin(subject: Subject, go_s: float, *, duration_s: float) -> dict[str, Any]:
    """Non-blocking tries as fast as one process can make them."""
    try_once = subject.try_once
    clock = time.monotonic
    end_s = go_s + duration_s
    calls = admitted = 0
    start_s = now_s = clock()
    while now_s < end_s:
        for _ in _BATCH:
            if try_once(1):
                admitted += 1
        calls += len(_BATCH)
        now_s = clock()
    return {
        "go_s": go_s,
        "start_s": start_s,
        "end_s": now_s,
        "calls": calls,
        "admitted": admitted,
    }


def hammer(
    subject: Subject, go_s: float, *, duration_s: float, bin_s: float
) -> dict[str, Any]:
    """Tries of one unit each, counting admissions in bins of ``bin_s``."""
    try_once = subject.try_once
    clock = time.monotonic
    end_s = go_s + duration_s
    bins = [0] * (int(duration_s / bin_s) + 2)
    last_bin = len(bins) - 1
    calls = admitted = 0
    while True:
        ok = try_once(1)
        now_s = clock()
        calls += 1
        if ok:
            admitted += 1
            bins[min(int((now_s - go_s) / bin_s), last_bin)] += 1
        if now_s >= end_s:
            break
    return {
        "go_s": go_s,
        "end_s": now_s,
        "calls": calls,
        "admitted": admitted,
        "bins": bins,
    }


def wait_samples(
    subject: Subject,
    go_s: float,
    *,
    n: int,
    samples: int,
    min_samples: int,
    budget_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Empty the limiter, block for ``n`` units, compare with the ideal wake.

    Only the blocking call is timed for CPU: the emptying before it is the
    bench's doing, not the waiter's.
    """
    lateness_s: list[float] = []
    cpu_s = wall_s = 0.0
    timeouts = 0
    stop_s = go_s + budget_s
    for index in range(samples):
        if index >= min_samples and time.monotonic() > stop_s:
            break
        ideal_s = subject.prime_wait(n)
        cpu_before_s = time.process_time()
        before_s = time.monotonic()
        ok = subject.wait(n, timeout_s)
        after_s = time.monotonic()
        cpu_s += time.process_time() - cpu_before_s
        wall_s += after_s - before_s
        if ok:
            lateness_s.append(after_s - ideal_s)
        else:
            timeouts += 1
    return {
        "lateness_s": lateness_s,
        "timeouts": timeouts,
        "cpu_s": cpu_s,
        "wall_s": wall_s,
    }


def cycle_pool(
    subject: PoolSubject, go_s: float, *, duration_s: float, stream: str
) -> dict[str, Any]:
    cycle = subject.cycle
    clock = time.monotonic
    end_s = go_s + duration_s
    calls = refused = 0
    start_s = now_s = clock()
    while now_s < end_s:
        for _ in range(8):
            if not cycle(stream):
                refused += 1
        calls += 8
        now_s = clock()
    return {"start_s": start_s, "end_s": now_s, "calls": calls, "refused": refused}
