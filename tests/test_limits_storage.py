"""The ``limits`` storage: limits' own contract, run against memory:// and ours.

Every test marked ``contract`` runs twice, once on limits' ``MemoryStorage``
(the reference) and once on ``shmrate://``, with the same assertions.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest

limits = pytest.importorskip("limits")

from limits import parse  # noqa: E402
from limits.storage import Storage, storage_from_string  # noqa: E402
from limits.strategies import (  # noqa: E402
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

import shmrate  # noqa: E402
from shmrate.limits_storage import ShmrateStorage, UnsupportedStrategy  # noqa: E402

FORK = mp.get_context("fork")


@pytest.fixture(params=["memory", "shmrate"])
def storage(request: pytest.FixtureRequest, name: str) -> Iterator[Storage]:
    if request.param == "memory":
        s = storage_from_string("memory://")
        assert isinstance(s, Storage)
        yield s
        timer = getattr(s, "timer", None)
        if timer is not None:
            timer.cancel()
        return
    ours = storage_from_string(f"shmrate://{name}?max_keys=256")
    assert isinstance(ours, ShmrateStorage)
    yield ours
    ours.close()


# -- the storage contract ------------------------------------------------------


def test_incr_counts_and_get_reads(storage: Storage) -> None:
    assert storage.get("k") == 0
    assert storage.incr("k", 10) == 1
    assert storage.incr("k", 10) == 2
    assert storage.incr("k", 10, amount=5) == 7
    assert storage.get("k") == 7
    assert storage.get("other") == 0


def test_a_counter_expires_after_its_expiry(storage: Storage) -> None:
    t0 = time.time()
    assert storage.incr("k", 1) == 1
    assert t0 + 0.9 < storage.get_expiry("k") < time.time() + 1.1
    assert storage.incr("k", 1) == 2  # the window does not restart on each hit
    time.sleep(1.05)
    assert storage.get("k") == 0
    assert storage.incr("k", 1) == 1


def test_get_expiry_of_an_unknown_key_is_now(storage: Storage) -> None:
    assert abs(storage.get_expiry("nobody") - time.time()) < 0.5


def test_clear_forgets_one_key_and_reset_forgets_all(storage: Storage) -> None:
    for key in ("a", "b", "c"):
        storage.incr(key, 60)
    storage.clear("a")
    assert (storage.get("a"), storage.get("b")) == (0, 1)
    assert storage.reset() == 2
    assert storage.get("b") == storage.get("c") == 0
    assert storage.check() is True


def test_fixed_window_strategy(storage: Storage) -> None:
    limiter = FixedWindowRateLimiter(storage)
    item = parse("3/second")
    assert [limiter.hit(item, "ip") for _ in range(4)] == [True] * 3 + [False]
    assert not limiter.test(item, "ip")
    assert limiter.test(item, "other")
    stats = limiter.get_window_stats(item, "ip")
    assert stats.remaining == 0 and time.time() < stats.reset_time < time.time() + 1.1
    assert limiter.hit(item, "other", cost=3)
    assert not limiter.hit(item, "third", cost=4)
    limiter.clear(item, "ip")
    assert limiter.hit(item, "ip")
    time.sleep(1.05)
    assert limiter.hit(item, "other", cost=3)


def test_sliding_window_counter_strategy(storage: Storage) -> None:
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = parse("4/second")
    assert [limiter.hit(item, "ip") for _ in range(5)] == [True] * 4 + [False]
    assert limiter.get_window_stats(item, "ip").remaining == 0
    assert not limiter.test(item, "ip")
    assert not limiter.hit(item, "x", cost=5)
    limiter.clear(item, "ip")
    assert limiter.test(item, "ip")
    assert limiter.get_window_stats(item, "ip").remaining == 4


def test_sliding_window_counts_the_previous_window_by_weight(storage: Storage) -> None:
    assert isinstance(storage, limits.storage.SlidingWindowCounterSupport)
    # Start just after a 1-second window begins, so both storages see the
    # same windows.
    while time.time() % 1 > 0.1:
        time.sleep(0.01)
    for _ in range(6):
        assert storage.acquire_sliding_window_entry("k", 6, 1)
    assert not storage.acquire_sliding_window_entry("k", 6, 1)
    prev, prev_ttl, cur, cur_ttl = storage.get_sliding_window("k", 1)
    assert (prev, prev_ttl, cur) == (0, 0.0, 6) and 1.8 < cur_ttl <= 2.0
    time.sleep(1.0 - time.time() % 1 + 0.25)  # a quarter into the next window
    prev, prev_ttl, cur, cur_ttl = storage.get_sliding_window("k", 1)
    assert (prev, cur) == (6, 0) and 0.68 < prev_ttl <= 0.75
    # The weighted count is about 6 * 0.74 = 4.4 (floored: 4): room for 2.
    assert storage.acquire_sliding_window_entry("k", 6, 1)
    assert storage.acquire_sliding_window_entry("k", 6, 1)
    assert not storage.acquire_sliding_window_entry("k", 6, 1)
    storage.clear_sliding_window("k", 1)
    assert storage.get_sliding_window("k", 1)[:3] == (0, 0.0, 0)


# -- what is ours --------------------------------------------------------------


def test_the_scheme_is_registered_with_limits(name: str) -> None:
    s = storage_from_string(f"shmrate://{name}", max_keys=64)
    assert isinstance(s, ShmrateStorage)
    with s as ours:
        assert ours.stats()["max_keys"] == 64
        with ShmrateStorage(f"shmrate://{name}?max_keys=999") as again:
            assert again.stats()["max_keys"] == 64  # the first process decides


def test_moving_window_is_refused_with_a_reason(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}") as s:
        with pytest.raises(UnsupportedStrategy, match="fixed-window"):
            MovingWindowRateLimiter(s)
        assert isinstance(UnsupportedStrategy("x"), NotImplementedError)


def test_bad_uris_and_options_are_clear_errors(name: str) -> None:
    with pytest.raises(ValueError, match="shmrate://NAME"):
        ShmrateStorage("shmrate://")
    with pytest.raises(ValueError, match="unknown storage options"):
        ShmrateStorage(f"shmrate://{name}", colour="red")
    with pytest.raises(ValueError, match="max_keys"):
        ShmrateStorage(f"shmrate://{name}?max_keys=lots")
    with pytest.raises(TypeError):
        ShmrateStorage(None)
    with ShmrateStorage(f"shmrate://{name}") as s:
        with pytest.raises(TypeError):
            s.incr(5, 10)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            s.incr("k", 0)
        with pytest.raises(ValueError):
            s.incr("k", 10, amount=-1)
        assert s.get("k") == 0
    with pytest.raises(shmrate.KindMismatch):
        shmrate.TokenBucket(10, name=name)


def test_expired_counters_give_their_rows_to_new_keys(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}?max_keys=8") as s:
        for i in range(8):
            s.incr(f"old-{i}", 1)
        time.sleep(1.05)
        for i in range(8):
            assert s.incr(f"new-{i}", 60) == 1
        st = s.stats()
        assert (st["keys"], st["evictions"], st["reused"]) == (8, 0, 8)


def test_a_full_table_evicts_the_least_recently_used_counter(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}?max_keys=4") as s:
        for key in "abcd":
            s.incr(key, 60)
        s.incr("a", 60)
        s.incr("e", 60)
        assert s.stats()["evictions"] == 1
        assert [s.get(k) for k in "abcde"] == [2, 0, 1, 1, 1]


def test_results_are_plain_python_types(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}") as s:
        assert type(s.incr("k", 5)) is int and type(s.get("k")) is int
        assert type(s.get_expiry("k")) is float
        window = s.get_sliding_window("k", 5)
        assert [type(v) for v in window] == [int, float, int, float]
        assert all(type(v) is int for v in s.stats().values())


def test_it_pickles_as_its_name(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}") as s:
        s.incr("k", 60)
        data = pickle.dumps(s)
        assert len(data) < 200
        with pickle.loads(data) as again:
            assert again.get("k") == 1
    s.close()  # twice is fine


def _hit_fixed(s: ShmrateStorage, times: int, start_at: float) -> None:
    while time.time() < start_at:
        pass
    for _ in range(times):
        s.incr("shared", 60)


def _hit_sliding(name: str, attempts: int, start_at: float) -> int:
    with ShmrateStorage.open(name) as s:
        while time.time() < start_at:
            pass
        return sum(
            s.acquire_sliding_window_entry("shared", 1000, 3600)
            for _ in range(attempts)
        )


def test_processes_share_exact_counts(name: str) -> None:
    with ShmrateStorage(f"shmrate://{name}") as s:
        start_at = time.time() + 0.3
        with FORK.Pool(4) as pool:
            pool.starmap(_hit_fixed, [(s, 500, start_at)] * 4)
            assert s.get("shared") == 2000
            start_at = time.time() + 0.3
            got = pool.starmap(_hit_sliding, [(name, 400, start_at)] * 4)
        assert sum(got) == 1000
        assert s.get_sliding_window("shared", 3600)[2] == 1000


def test_flask_limiter_takes_the_uri(name: str) -> None:
    flask = pytest.importorskip("flask")
    flask_limiter = pytest.importorskip("flask_limiter")
    app = flask.Flask(__name__)
    limiter = flask_limiter.Limiter(
        flask_limiter.util.get_remote_address,
        app=app,
        storage_uri=f"shmrate://{name}",
    )

    def index() -> str:
        return "ok"

    app.route("/")(limiter.limit("2 per minute")(index))

    client = app.test_client()
    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
    storage: Any = limiter.storage
    assert isinstance(storage, ShmrateStorage)
    storage.close()
