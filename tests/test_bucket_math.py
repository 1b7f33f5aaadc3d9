"""The token-bucket arithmetic, driven by a fake clock (no processes, no sleeps)."""

from __future__ import annotations

import numpy as np

from shmrate import _bucket
from shmrate._layout import B_LAST, B_QHEAD, B_QTAIL, B_TOKENS, BUCKET, MT

MS = 1_000_000
T0 = 10_000 * MS


def make_row(rate: int) -> memoryview:
    buf = np.zeros(1, dtype=BUCKET)
    row = memoryview(buf).cast("B").cast("q")
    _bucket.init_row(row, rate, T0, gen=1)
    return row


def tokens(row: memoryview) -> float:
    return row[B_TOKENS] / MT


def drain(row: memoryview, now: int) -> None:
    _bucket.refill(row, now)
    row[B_TOKENS] = 0


def test_starts_full_with_capacity_max_rate_1024() -> None:
    assert tokens(make_row(100)) == 1024
    assert tokens(make_row(5000)) == 5000


def test_less_than_a_millisecond_adds_nothing_and_the_time_is_not_lost() -> None:
    row = make_row(1000)
    drain(row, T0)
    _bucket.refill(row, T0 + 600_000)
    assert tokens(row) == 0
    _bucket.refill(row, T0 + 1_200_000)
    assert tokens(row) == 1  # the first 0.6 ms was kept
    assert row[B_LAST] == T0 + MS
    _bucket.refill(row, T0 + 2_000_000)
    assert tokens(row) == 2


def test_fractional_rates_are_exact_over_whole_milliseconds() -> None:
    row = make_row(500)  # half a token per millisecond
    drain(row, T0)
    _bucket.refill(row, T0 + 3 * MS)
    assert tokens(row) == 1.5
    _bucket.refill(row, T0 + 1000 * MS)
    assert tokens(row) == 500


def test_refill_never_exceeds_capacity() -> None:
    row = make_row(2000)
    _bucket.refill(row, T0 + 3600 * 1000 * MS)
    assert tokens(row) == 2000


def test_set_rate_credits_the_old_rate_then_clamps() -> None:
    row = make_row(10_000)
    drain(row, T0)
    _bucket.set_rate(row, 1000, T0 + 500 * MS)  # 500 ms at 10,000/s = 5,000
    assert tokens(row) == 1024  # clamped to the new capacity
    drain(row, T0 + 500 * MS)
    _bucket.set_rate(row, 100, T0 + 600 * MS)  # 100 ms at 1000/s
    assert tokens(row) == 100
    _bucket.refill(row, T0 + 700 * MS)  # 100 ms at 100/s
    assert tokens(row) == 110


def test_rate_zero_only_drains() -> None:
    row = make_row(1000)
    _bucket.set_rate(row, 0, T0)
    assert tokens(row) == 1024
    row[B_TOKENS] -= 24 * MT
    _bucket.refill(row, T0 + 10_000 * MS)
    assert tokens(row) == 1000


def test_a_queued_wait_is_paid_before_the_bucket_and_wakes_on_time() -> None:
    row = make_row(1000)
    row[B_TOKENS] = 100 * MT
    ticket = _bucket.reserve(row, 300, T0)
    assert ticket is not None
    assert tokens(row) == 0  # the 100 on hand went to the wait
    assert _bucket.wake_ns(row, ticket) == T0 + 200 * MS
    _bucket.refill(row, T0 + 199 * MS)
    assert not _bucket.served(row, ticket)
    _bucket.refill(row, T0 + 200 * MS)
    assert _bucket.served(row, ticket)
    assert tokens(row) == 0
    _bucket.refill(row, T0 + 210 * MS)
    assert tokens(row) == 10


def test_waiters_are_served_first_come_first_served() -> None:
    row = make_row(1000)
    drain(row, T0)
    first = _bucket.reserve(row, 500, T0)
    second = _bucket.reserve(row, 10, T0)
    assert first is not None and second is not None
    _bucket.refill(row, T0 + 500 * MS)
    assert _bucket.served(row, first) and not _bucket.served(row, second)
    _bucket.refill(row, T0 + 510 * MS)
    assert _bucket.served(row, second)


def test_cancelling_the_last_wait_gives_back_what_it_was_paid() -> None:
    row = make_row(1000)
    row[B_TOKENS] = 40 * MT
    ticket = _bucket.reserve(row, 100, T0)
    assert ticket is not None
    _bucket.refill(row, T0 + 30 * MS)
    _bucket.cancel(row, ticket)
    assert tokens(row) == 70
    assert row[B_QHEAD] == row[B_QTAIL] == 0


def test_cancelling_an_unpaid_wait_behind_another_shortens_the_queue() -> None:
    row = make_row(1000)
    drain(row, T0)
    first = _bucket.reserve(row, 100, T0)
    second = _bucket.reserve(row, 100, T0)
    assert first is not None and second is not None
    _bucket.cancel(row, second)
    _bucket.refill(row, T0 + 150 * MS)
    assert _bucket.served(row, first)
    assert tokens(row) == 50


def test_cancelling_a_served_wait_hands_its_tokens_on() -> None:
    row = make_row(1000)
    drain(row, T0)
    ticket = _bucket.reserve(row, 10, T0)
    assert ticket is not None
    _bucket.refill(row, T0 + 10 * MS)
    _bucket.cancel(row, ticket)
    assert tokens(row) == 10


def test_repair_clamps_a_torn_row() -> None:
    row = make_row(1000)
    row[B_TOKENS] = 10**9 * MT
    row[B_QHEAD] = 50
    row[B_QTAIL] = 10
    row[B_LAST] = T0 + 10**12
    fixed = _bucket.repair_row(row, T0)
    assert tokens(row) == 1024
    assert row[B_QHEAD] == row[B_QTAIL] == 0
    assert row[B_LAST] == T0
    assert len(fixed) == 3
