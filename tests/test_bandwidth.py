"""BandwidthManager across real processes: shares, limiters, the pool sum."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time

import pytest

import shmrate
from shmrate import BandwidthManager
from shmrate._layout import H_COUNT
from tests import workers

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")


def test_allocate_change_and_release_keep_the_pool_exact() -> None:
    with BandwidthManager(1_000_000) as pool:
        lim, ok = pool.allocate_bandwidth("cam1", 400_000)
        assert ok and lim is not None
        assert pool.get_available_bandwidth() == 600_000
        assert (lim.rate(), lim.capacity(), lim.tokens()) == (400_000,) * 3
        assert pool.allocate_bandwidth("cam2", 700_000) == (None, False)
        again, ok = pool.allocate_bandwidth("cam1", 900_000)  # grow by 500k
        assert ok and again is not None and again.rate() == 900_000
        assert lim.rate() == 900_000  # the same bucket
        assert pool.allocate_bandwidth("cam1", 1_000_001) == (None, False)
        assert pool.get_allocation("cam1") == 900_000
        pool.release_bandwidth("cam1")
        pool.release_bandwidth("cam1")
        assert pool.get_available_bandwidth() == 1_000_000
        assert type(pool.get_available_bandwidth()) is int


def test_a_new_stream_limiter_starts_full_with_capacity_at_least_1024() -> None:
    with BandwidthManager(10_000) as pool:
        lim, _ = pool.allocate_bandwidth("slow", 10)
        assert lim is not None
        assert (lim.capacity(), lim.tokens()) == (1024, 1024)
        assert isinstance(lim, shmrate.RateLimiter)


def test_every_process_gets_the_same_bucket(name: str) -> None:
    with BandwidthManager(1_000_000, name=name) as pool:
        lim, _ = pool.allocate_bandwidth("s", 0)  # rate 0: only drains
        assert lim is not None
        with SPAWN.Pool(2) as workers_pool:
            got = workers_pool.starmap(workers.use_pickled, [(lim, 300), (lim, 300)])
        assert all(ok for ok, _ in got)
        with BandwidthManager.open(name) as other:
            same = other.get_limiter("s")
            assert same is not None and same.tokens() == 1024 - 600


def test_a_released_streams_limiter_is_refused_not_reused() -> None:
    with BandwidthManager(10_000, max_streams=1) as pool:
        old, _ = pool.allocate_bandwidth("a", 1000)
        assert old is not None
        pool.release_bandwidth("a")
        new, _ = pool.allocate_bandwidth("b", 5000)  # takes the same row
        assert new is not None
        for call in (old.allow, old.tokens, old.rate):
            with pytest.raises(shmrate.StaleLimiter):
                call()
        with pytest.raises(shmrate.StaleLimiter):
            old.set_rate(1)
        assert new.tokens() == 5000 and new.rate() == 5000


def test_a_full_table_is_a_capacity_error_and_overwrites_nothing() -> None:
    with BandwidthManager(10_000, max_streams=2) as pool:
        pool.allocate_bandwidth("a", 1)
        pool.allocate_bandwidth("b", 1)
        with pytest.raises(shmrate.CapacityError):
            pool.allocate_bandwidth("c", 1)
        _, ok = pool.allocate_bandwidth("a", 5)  # re-allocating needs no row
        assert ok
        assert pool.streams() == {"a": 5, "b": 1}


def test_limiters_pace_a_stream_at_its_share() -> None:
    with BandwidthManager(100_000) as pool:
        lim, _ = pool.allocate_bandwidth("s", 20_000)
        assert lim is not None
        t0 = time.monotonic()
        lim.allow_n(20_000)  # the full bucket
        lim.allow_n(10_000)  # half a second more
        assert 0.35 < time.monotonic() - t0 < 1.5


def test_concurrent_churn_never_breaks_the_pool_sum(name: str) -> None:
    total = 200_000
    with BandwidthManager(total, name=name) as pool:
        with FORK.Pool(3) as procs:
            done = procs.starmap_async(
                workers.churn_allocations, [(name, seed, 1.5) for seed in range(3)]
            )
            checks = 0
            while not done.ready():
                with pool._seg.locked():
                    allocated = sum(
                        int(v)
                        for v in pool._table.records["value"][
                            pool._table.records["live"] == 1
                        ]
                    )
                    available = pool.total - pool._words[H_COUNT]
                assert allocated + available == total
                assert 0 <= available <= total
                checks += 1
            assert sum(done.get()) > 100
        assert checks > 10
        assert pool.get_available_bandwidth() == total
        assert pool.streams() == {}


def test_bad_input_changes_nothing() -> None:
    with BandwidthManager(10_000) as pool:
        with pytest.raises(ValueError):
            pool.allocate_bandwidth("a", -1)
        with pytest.raises(TypeError):
            pool.allocate_bandwidth("a", 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            pool.allocate_bandwidth(b"a", 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            BandwidthManager(10, max_streams=0)
        assert pool.get_available_bandwidth() == 10_000 and pool.streams() == {}


def test_pickles_and_kinds(name: str) -> None:
    with BandwidthManager(10_000, name=name) as pool:
        pool.allocate_bandwidth("a", 100)
        with pickle.loads(pickle.dumps(pool)) as again:
            assert again.get_allocation("a") == 100
        lim = pool.get_limiter("a")
        assert lim is not None
        unpickled = pickle.loads(pickle.dumps(lim))
        assert unpickled.rate() == 100
        unpickled.close()
        with pytest.raises(shmrate.KindMismatch):
            shmrate.ConnectionLimiter.open(name)
    with pytest.raises(shmrate.ClosedError):
        lim.allow()
