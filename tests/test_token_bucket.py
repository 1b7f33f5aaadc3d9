"""TokenBucket's public behaviour, in one process and across processes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle
import time

import pytest

import shmrate
from shmrate import TokenBucket
from tests import workers

FORK = mp.get_context("fork")


def test_a_bucket_starts_full_and_reports_its_shape(name: str) -> None:
    with TokenBucket(2000, name=name) as b:
        assert (b.rate(), b.capacity(), b.tokens()) == (2000, 2000, 2000)
        assert TokenBucket(10).capacity() == 1024


def test_results_are_plain_python_types() -> None:
    with TokenBucket(1000) as b:
        for value in (b.allow(), b.rate(), b.tokens(), b.capacity()):
            assert type(value) in (bool, int)
        assert all(type(v) is int for v in b.stats().values())


def test_allow_takes_all_or_nothing() -> None:
    with TokenBucket(0) as b:
        assert b.allow(1000)
        assert not b.allow(25)
        assert b.tokens() == 24
        assert b.allow(24)
        assert not b.allow()
        assert b.allow(0)


def test_allow_above_capacity_is_false_and_allow_n_raises_at_once() -> None:
    with TokenBucket(100) as b:
        assert not b.allow(1025)
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="capacity 1024"):
            b.allow_n(1025)
        assert time.monotonic() - t0 < 0.1
        assert b.tokens() == 1024


def test_token_bucket_is_a_rate_limiter() -> None:
    with TokenBucket(1) as b:
        assert isinstance(b, shmrate.RateLimiter)


def test_allow_n_sleeps_until_its_tokens_are_there() -> None:
    with TokenBucket(2000) as b:
        assert b.allow(2000)
        t0 = time.monotonic()
        b.allow_n(1000)  # 0.5 s at 2000/s
        waited = time.monotonic() - t0
        assert 0.4 < waited < 1.5
        assert b.tokens() < 100
        assert b.stats()["waits"] == 1


def test_a_timeout_that_cannot_be_met_fails_at_once_and_takes_nothing() -> None:
    with TokenBucket(1000) as b:
        assert b.allow(1000)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            b.allow_n(500, timeout=0.1)  # needs about 0.48 s
        assert time.monotonic() - t0 < 0.05
        with pytest.raises(shmrate.WaitTimeout):
            b.allow_n(100, timeout=0)
        time.sleep(0.05)
        assert b.tokens() >= 50  # refills went to the bucket, not a dead wait


def test_a_wait_that_can_be_met_within_the_timeout_succeeds() -> None:
    with TokenBucket(1000) as b:
        assert b.allow(1024)
        b.allow_n(100, timeout=1.0)


def test_a_cancelled_async_wait_takes_nothing() -> None:
    async def scenario(b: TokenBucket) -> None:
        task = asyncio.create_task(b.allow_n_async(800))
        await asyncio.sleep(0.2)  # 200 of its 800 tokens have been paid
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with TokenBucket(1000) as b:
        assert b.allow(1024)
        asyncio.run(scenario(b))
        # What the wait had been paid is back in the bucket.
        assert 190 <= b.tokens() <= 400


def test_async_wait_is_granted() -> None:
    async def scenario(b: TokenBucket) -> float:
        t0 = time.monotonic()
        await b.allow_n_async(300, timeout=2)
        return time.monotonic() - t0

    with TokenBucket(1000) as b:
        assert b.allow(1024)
        assert 0.2 < asyncio.run(scenario(b)) < 1.2


def test_set_rate_from_another_process_is_honoured_during_a_wait(name: str) -> None:
    with TokenBucket(10, name=name) as b:
        assert b.allow(1024)
        p = FORK.Process(target=workers.set_rate_later, args=(name, 0.2, 5000))
        p.start()
        t0 = time.monotonic()
        b.allow_n(500)  # 50 s at 10/s; 0.1 s once the rate is 5000/s
        waited = time.monotonic() - t0
        p.join()
        assert 0.15 < waited < 1.5


def test_set_rate_to_zero_makes_a_waiter_time_out() -> None:
    with TokenBucket(1000) as b:
        assert b.allow(1024)
        b.set_rate(0)
        with pytest.raises(TimeoutError):
            b.allow_n(1, timeout=5)
        assert b.tokens() == 0


def test_a_large_wait_is_not_starved_by_small_allows_elsewhere(name: str) -> None:
    with TokenBucket(2000, name=name) as b:
        assert b.allow(2000)
        with FORK.Pool(2) as pool:
            hammering = pool.starmap_async(workers.small_allows, [(name, 2.5)] * 2)
            time.sleep(0.1)
            t0 = time.monotonic()
            b.allow_n(1500)  # 0.75 s of refill at 2000/s
            waited = time.monotonic() - t0
            hammering.get()
        assert waited < 1.6


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)],
)
def test_bad_amounts_are_refused_and_change_nothing(bad: object, error: type) -> None:
    with TokenBucket(1000) as b:
        for call in (b.allow, b.allow_n, b.set_rate):
            with pytest.raises(error):
                call(bad)  # type: ignore[operator]
        with pytest.raises(error):
            TokenBucket(bad)  # type: ignore[arg-type]
        assert (b.tokens(), b.rate()) == (1024, 1000)


def test_bad_timeouts_and_rates_are_refused() -> None:
    with TokenBucket(1000) as b:
        with pytest.raises(ValueError):
            b.allow_n(1, timeout=-1)
        with pytest.raises(TypeError):
            b.allow_n(1, timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at most"):
            b.set_rate(10**18)
        assert b.tokens() == 1024


def test_numpy_integers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    with TokenBucket(1000) as b:
        assert b.allow(np.int64(24))
        assert b.tokens() == 1000


def test_use_after_close_is_a_clear_error_and_close_is_idempotent() -> None:
    b = TokenBucket(1000)
    b.close()
    b.close()
    for call in (b.allow, b.tokens, b.rate):
        with pytest.raises(shmrate.ClosedError):
            call()
    assert "closed" in repr(b)
    b.unlink()
    b.unlink()


def test_a_named_bucket_pickles_as_its_name(name: str) -> None:
    with TokenBucket(1000, name=name) as b:
        data = pickle.dumps(b)
        assert len(data) < 200
        with pickle.loads(data) as again:
            assert again.allow(24)
        assert b.tokens() == 1000
