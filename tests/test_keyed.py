"""KeyedTokenBucket: a bucket per key, shared by every process."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import shmrate
import shmrate.keyed
from shmrate import _bucket
from shmrate._keytable import M_GEN, PAYLOAD0, Geometry, encode_key
from shmrate._layout import BUCKET_WORDS, H_COUNT, H_FREE_TOP, MT, NS_PER_MS
from shmrate.keyed import KeyedTokenBucket

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")


class FakeClock:
    """Stands in for the monotonic clock of shmrate.keyed."""

    def __init__(self) -> None:
        self.now_ns = time.monotonic_ns()

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += round(seconds * 1e9)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(shmrate.keyed, "monotonic_ns", fake)
    yield fake


def check_table(k: KeyedTokenBucket) -> None:
    """Assert the invariants written next to the table's layout."""
    table = k._table
    g = table.g
    w = k._words
    live = {}
    for row in range(g.max_keys):
        base = g.rows0 + row * g.row_words
        if w[base + M_GEN]:
            key = table.key_of(base)
            assert key not in live
            live[key] = base
            assert table.find(key, table.hash(key)) == base
    assert w[H_COUNT] == len(live)
    index = np.asarray(w[g.index0 : g.index0 + g.slots])
    assert int(np.count_nonzero(index)) == len(live)
    stacked = {int(r) for r in w[g.stack0 : g.stack0 + w[H_FREE_TOP]]}
    assert len(stacked) == w[H_FREE_TOP]
    free = {r for r in range(g.max_keys) if not w[g.rows0 + r * g.row_words]}
    assert free <= stacked


# -- one process ----------------------------------------------------------------


def test_a_new_key_has_a_full_bucket_of_the_shared_shape(name: str) -> None:
    with KeyedTokenBucket(2000, name=name) as k:
        assert (k.rate(), k.capacity(), k.tokens("a")) == (2000, 2000, 2000)
        assert k.stats()["keys"] == 0  # asking created nothing
        assert KeyedTokenBucket(10, max_keys=4).capacity() == 1024


def test_every_key_has_its_own_bucket() -> None:
    with KeyedTokenBucket(0) as k:
        assert k.allow("10.0.0.1", 1000)
        assert not k.allow("10.0.0.1", 25)
        assert k.tokens("10.0.0.1") == 24
        assert k.allow("10.0.0.2", 1024)
        assert k.tokens("10.0.0.1") == 24
        assert k.allow("10.0.0.1", 0)
        assert k.stats()["keys"] == 2


def test_results_are_plain_python_types() -> None:
    with KeyedTokenBucket(1000) as k:
        for value in (k.allow("a"), k.tokens("a"), k.rate(), k.capacity()):
            assert type(value) in (bool, int)
        assert all(type(v) is int for v in k.stats().values())


def test_above_capacity_allow_is_false_and_allow_n_raises_at_once() -> None:
    with KeyedTokenBucket(100, max_keys=4) as k:
        assert not k.allow("a", 1025)
        assert k.stats()["keys"] == 0  # a refusal of an unknown key needs no row
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="capacity 1024"):
            k.allow_n("a", 1025)
        assert time.monotonic() - t0 < 0.1
        assert k.tokens("a") == 1024


def test_refill_is_per_millisecond_and_loses_no_time(clock: FakeClock) -> None:
    with KeyedTokenBucket(1000) as k:
        assert k.allow("a", 1024)
        clock.advance(0.0009)
        assert not k.allow("a")  # under 1 ms: nothing yet
        clock.advance(0.0002)
        assert k.allow("a")  # 1.1 ms: one token; 0.1 ms stays credited
        clock.advance(0.0009)
        assert k.allow("a")  # 1.0 ms since the last whole millisecond
        assert not k.allow("a")


def test_the_inlined_refill_matches_the_bucket_arithmetic(clock: FakeClock) -> None:
    rng = random.Random(11)
    ref = memoryview(bytearray(BUCKET_WORDS * 8)).cast("q")
    with KeyedTokenBucket(1500) as k:
        _bucket.init_row(ref, 1500, clock(), 1)
        assert k.allow("key", 0)  # the key's row starts at the same instant
        for _ in range(3000):
            clock.advance(rng.choice((0, 0.0003, 0.0007, 0.001, 0.0042, 0.3)))
            n = rng.choice((0, 1, 2, 7, 150, 900))
            _bucket.refill(ref, clock())
            expected = ref[2] >= n * MT
            if expected:
                ref[2] -= n * MT
            assert k.allow("key", n) is expected
        assert k.tokens("key") == ref[2] // MT


def test_set_rate_applies_to_every_key_as_token_bucket_would(clock: FakeClock) -> None:
    rng = random.Random(5)
    with KeyedTokenBucket(3000, max_keys=64) as k:
        for i in range(40):
            k.allow(f"k{i}", rng.randrange(0, 3000))
            clock.advance(rng.choice((0.0001, 0.002, 0.05)))
        # One key with a queued waiter goes through _bucket.refill itself.
        k.allow("q", 3000)
        steps = k._wait_steps("q", 2000, None)
        next(steps)
        clock.advance(0.0734)
        g = k._table.g
        before = bytes(k._words[g.rows0 :].cast("B"))
        expected = memoryview(bytearray(before)).cast("q")
        for row in range(g.max_keys):
            base = row * g.row_words
            if expected[base + M_GEN]:
                b = expected[base + PAYLOAD0 : base + PAYLOAD0 + BUCKET_WORDS]
                _bucket.set_rate(b, 1200, clock())
        k.set_rate(1200)
        assert bytes(k._words[g.rows0 :].cast("B")) == expected.tobytes()
        assert (k.rate(), k.capacity()) == (1200, 1200)
        steps.close()


def test_a_full_bucket_gives_its_row_to_a_new_key(clock: FakeClock) -> None:
    with KeyedTokenBucket(1000, max_keys=4) as k:
        for key in "abcd":
            assert k.allow(key, 500)
        clock.advance(0.5)  # every bucket back to full
        for key in "efgh":
            assert k.allow(key, 500)
        st = k.stats()
        assert (st["keys"], st["evictions"], st["reused"]) == (4, 0, 4)
        check_table(k)


def test_a_table_full_of_busy_keys_evicts_the_least_recently_used(
    clock: FakeClock,
) -> None:
    with KeyedTokenBucket(0, max_keys=4) as k:
        for key in "abcd":
            clock.advance(0.001)
            assert k.allow(key, 10)
        clock.advance(0.001)
        assert k.allow("a", 10)  # b is now the least recently used
        clock.advance(0.001)
        assert k.allow("e", 10)
        assert k.stats()["evictions"] == 1
        assert k.tokens("a") == 1004
        assert k.tokens("b") == 1024  # forgotten: a new bucket starts full
        check_table(k)


def test_eviction_follows_use_order_exactly(clock: FakeClock) -> None:
    rng = random.Random(3)
    with KeyedTokenBucket(0, max_keys=64) as k:
        keys = [f"key-{i}" for i in range(64)]
        for key in keys:
            clock.advance(0.001)
            k.allow(key)
        order = keys[:]
        for _ in range(200):
            key = rng.choice(keys)
            clock.advance(0.001)
            k.allow(key)
            order.remove(key)
            order.append(key)
        for i in range(40):
            clock.advance(0.001)
            k.allow(f"new-{i}")
        survivors = set(order[40:]) | {f"new-{i}" for i in range(40)}
        for key in keys + [f"new-{i}" for i in range(40)]:
            # An evicted key starts again from a full bucket.
            assert (k.tokens(key) < 1024) is (key in survivors), key
        assert k.stats()["evictions"] == 40
        check_table(k)


def test_the_index_stays_consistent_through_churn(clock: FakeClock) -> None:
    rng = random.Random(1)
    with KeyedTokenBucket(50, max_keys=32) as k:
        for step in range(3000):
            key = f"client-{rng.randrange(120)}"
            k.allow(key, rng.choice((1, 300, 1024)))
            pause_s = 30 if step % 400 == 399 else rng.choice((0, 0.0005, 0.01, 0.2))
            clock.advance(pause_s)
            if step % 500 == 0:
                check_table(k)
        check_table(k)
        st = k.stats()
        assert st["evictions"] > 0 and st["reused"] > 0


def test_a_hundred_thousand_keys_fit_and_are_found() -> None:
    with KeyedTokenBucket(0, max_keys=100_000) as k:
        keys = [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]
        for key in keys:
            assert k.allow(key, 3)
        k._cache.clear()  # look every key up through the shared index
        assert all(k.allow(key, 4) for key in keys[::7])
        assert k.tokens(keys[7]) == 1017 and k.tokens(keys[8]) == 1021
        assert k.stats()["keys"] == 100_000
        assert k.stats()["evictions"] == 0


def test_long_keys_are_told_apart() -> None:
    with KeyedTokenBucket(0) as k:
        a, b = "x" * 200 + "a", "x" * 200 + "b"
        assert k.allow(a, 1024)
        assert k.tokens(b) == 1024
        assert k.tokens(a) == 0
        assert encode_key(a) != encode_key(b) and len(encode_key(a)) == 33


def test_bad_input_is_refused_before_anything_changes(name: str) -> None:
    with KeyedTokenBucket(10, name=name, max_keys=4) as k:
        with pytest.raises(TypeError, match="key must be a str"):
            k.allow(b"bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            k.allow(17)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            k.allow("a", -1)
        with pytest.raises(TypeError):
            k.tokens(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            k.set_rate(-5)
        assert k.stats()["keys"] == 0
    with pytest.raises(ValueError):
        KeyedTokenBucket(10, max_keys=0)
    with pytest.raises(TypeError):
        KeyedTokenBucket(10, max_keys=2.5)  # type: ignore[arg-type]
    with pytest.raises(shmrate.KindMismatch):
        shmrate.TokenBucket(10, name=name)


def test_close_is_idempotent_and_use_after_close_is_an_error() -> None:
    k = KeyedTokenBucket(10)
    with k:
        assert k.allow("a")
    k.close()
    with pytest.raises(shmrate.ClosedError):
        k.allow("a")
    with pytest.raises(shmrate.ClosedError):
        k.tokens("a")
    assert "closed" in repr(k)


# -- waits ----------------------------------------------------------------------


def test_allow_n_sleeps_until_the_keys_tokens_are_there() -> None:
    with KeyedTokenBucket(2000) as k:
        assert k.allow("a", 2000)
        t0 = time.monotonic()
        k.allow_n("a", 1000)  # 0.5 s at 2000/s
        assert 0.4 < time.monotonic() - t0 < 1.5
        k.allow_n("b", 2000)  # another key: at once
        assert time.monotonic() - t0 < 1.5
        assert k.stats()["waits"] == 1


def test_a_timeout_that_cannot_be_met_fails_at_once_and_takes_nothing() -> None:
    with KeyedTokenBucket(1000) as k:
        assert k.allow("a", 1000)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            k.allow_n("a", 500, timeout=0.1)
        assert time.monotonic() - t0 < 0.05
        time.sleep(0.05)
        assert k.tokens("a") >= 50


def test_a_cancelled_async_wait_takes_nothing() -> None:
    async def scenario(k: KeyedTokenBucket) -> None:
        task = asyncio.ensure_future(k.allow_n_async("a", 1000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with KeyedTokenBucket(1024) as k:
        assert k.allow("a", 1024)
        asyncio.run(scenario(k))
        time.sleep(0.1)
        assert k.tokens("a") >= 100  # refills reach the bucket again


# -- across processes -------------------------------------------------------------


def _take_all(k: KeyedTokenBucket, keys: list[str], start_at: float) -> int:
    while time.time() < start_at:
        pass
    got = 0
    for _ in range(300):
        for key in keys:
            got += k.allow(key, 7)
    return got


def test_processes_share_every_keys_bucket_exactly(name: str) -> None:
    keys = [f"user-{i}" for i in range(5)]
    with KeyedTokenBucket(0, name=name) as k, FORK.Pool(4) as pool:
        start_at = time.time() + 0.3
        got = pool.starmap(_take_all, [(k, keys, start_at)] * 4)
        # 1024 // 7 == 146 takes per key, shared by four processes
        assert sum(got) == 146 * len(keys)
        assert all(k.tokens(key) == 1024 - 146 * 7 for key in keys)


def _use_by_name(name: str, key: str) -> int:
    with KeyedTokenBucket.open(name) as k:
        assert k.allow(key, 100)
        return k.tokens(key)


def _use_pickled(k: KeyedTokenBucket, key: str) -> int:
    assert k.allow(key, 24)
    return k.tokens(key)


def test_an_unrelated_process_opens_it_by_name_or_by_pickle(name: str) -> None:
    with KeyedTokenBucket(0, name=name) as k:
        assert k.allow("a", 1)
        assert len(pickle.dumps(k)) < 200
        with SPAWN.Pool(1) as pool:
            assert pool.apply(_use_by_name, (name, "a")) == 923
            assert pool.apply(_use_pickled, (k, "a")) == 899
        assert k.tokens("a") == 899
    with pytest.raises(FileNotFoundError):
        KeyedTokenBucket.open(name + "-missing")


def _die_holding_a_broken_table(name: str, ready: Any) -> None:
    k = KeyedTokenBucket.open(name)
    k._seg.lock.acquire()
    g = k._table.g
    for i in range(g.slots):  # as if it died half-way through an index update
        k._words[g.index0 + i] = 0
    k._words[H_COUNT] = 12345
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_holder_killed_mid_update_is_repaired_from_the_rows(name: str) -> None:
    with KeyedTokenBucket(0, name=name, max_keys=16) as k:
        for i in range(10):
            assert k.allow(f"k{i}", i + 1)
        ready = FORK.Event()
        p = FORK.Process(target=_die_holding_a_broken_table, args=(name, ready))
        p.start()
        p.join(10)
        assert ready.is_set() and p.exitcode == -signal.SIGKILL
        t0 = time.monotonic()
        assert k.tokens("k3") == 1020
        assert time.monotonic() - t0 < 3
        k._cache.clear()
        assert [k.tokens(f"k{i}") for i in range(10)] == [1023 - i for i in range(10)]
        assert k.stats()["keys"] == 10
        check_table(k)
        assert k._seg.words[8] >= 1  # header word "recoveries"


def test_geometry_rounds_rows_to_cache_lines() -> None:
    g = Geometry.for_keys(100_000, BUCKET_WORDS)
    assert g.row_words % 8 == 0 and g.rows0 % 8 == 0
    assert g.slots >= 2 * g.max_keys
    assert NS_PER_MS == 1_000_000
