"""stats(): exact counters across processes, as plain ints."""

from __future__ import annotations

import multiprocessing as mp

import shmrate
from tests import workers

FORK = mp.get_context("fork")


def test_bucket_counters_are_exact_across_processes(name: str) -> None:
    with shmrate.TokenBucket(0, name=name) as b, FORK.Pool(4) as pool:
        admitted = sum(pool.starmap(workers.allow_n_times, [(name, 3, 100)] * 4))
        s = b.stats()
        assert admitted == 1024 // 3
        assert s["allowed_calls"] == admitted
        assert s["allowed_units"] == 3 * admitted
        assert s["refused_calls"] == 400 - admitted
        assert s["refused_units"] == 3 * (400 - admitted)
        assert (s["tokens"], s["capacity"], s["rate"]) == (1024 % 3, 1024, 0)
        assert all(type(v) is int for v in s.values())


def test_stream_objects_count_per_stream() -> None:
    with shmrate.ConnectionLimiter(1, 5) as c, shmrate.BandwidthManager(100) as bw:
        assert c.try_acquire("a") and not c.try_acquire("a")
        s = c.stats()
        assert (s["allowed"], s["refused"], s["total"]) == (1, 1, 1)
        assert s["streams"] == {"a": {"count": 1, "allowed": 1, "refused": 1}}
        lim, _ = bw.allocate_bandwidth("v", 60)
        assert bw.allocate_bandwidth("w", 60) == (None, False)
        assert lim is not None and lim.allow(1000) and not lim.allow(1000)
        s = bw.stats()
        assert (s["allowed"], s["refused"], s["available"]) == (1, 1, 40)
        v = s["streams"]["v"]
        assert (v["allocation"], v["allowed_units"], v["refused_units"]) == (
            60,
            1000,
            1000,
        )
