"""Torn updates: stop every multi-write update between each pair of its writes.

A holder killed inside the lock leaves whatever it had written so far; the
next process takes the lock over and runs the segment's repair. These tests
enumerate every such moment of every update (the tripwire raises just before
write number n, for every n), run the repair on what is left, and check that
the invariants hold and that no one gains from the torn write: no tokens
appear, no live waiter is served early, loses its place or falls out of the
queue, and no stream's limiter runs faster than its share of the pool.

The arithmetic runs on a fake clock; the three classes run in this process,
with the lock released by hand where the tripwire left it taken.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from shmrate import (
    BandwidthManager,
    ConnectionLimiter,
    TokenBucket,
    WaitTimeout,
    _bucket,
)
from shmrate._bucket import Ticket
from shmrate._layout import (
    B_GEN,
    B_QGEN,
    B_QHEAD,
    B_QTAIL,
    B_RATE,
    B_TOKENS,
    BUCKET,
    BUCKET_WORDS,
    MT,
    S_LIVE,
    S_VALUE,
    STREAM_WORDS,
)
from tests.invariants import bucket_row_problems, problems
from tests.tripwire import TrappedView, Tripped, Tripwire, trap

MS = 1_000_000
T0 = 10_000 * MS


# -- the arithmetic of one row, on a fake clock ---------------------------------


def new_row() -> memoryview:
    return memoryview(np.zeros(1, dtype=BUCKET)).cast("B").cast("q")


def served(row: Any, t: Ticket) -> bool:
    return bool(_bucket.served(row, t))


def outstanding(row: Any) -> int:
    return int(row[B_QTAIL] - row[B_QHEAD])


Operation = tuple[str, Callable[[Any], object], "Ticket | None", int]


class RowState:
    """A bucket row, the fake time and the tickets of live waiters."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.row = new_row()
        self.now = T0
        _bucket.init_row(self.row, rnd.choice([0, 500, 1000, 5000]), T0, 1)
        self.tickets: list[Ticket] = []

    def evolve(self) -> None:
        """One random valid step, as the processes sharing the row would take."""
        rnd, row = self.rnd, self.row
        self.now += rnd.choice([0, MS // 2, 3 * MS, 40 * MS, 300 * MS])
        choice = rnd.random()
        if choice < 0.45:
            t = _bucket.reserve(row, rnd.randint(1, 1024), self.now)
            if t is not None:
                self.tickets.append(t)
        elif choice < 0.6 and self.tickets:
            t = self.tickets.pop(rnd.randrange(len(self.tickets)))
            _bucket.refill(row, self.now)
            _bucket.cancel(row, t)
        elif choice < 0.7:
            _bucket.set_rate(row, rnd.choice([0, 200, 1000, 3000]), self.now)
        else:
            _bucket.refill(row, self.now)
        # Served waiters collect their tokens and leave, most of them at once.
        self.tickets = [
            t for t in self.tickets if not served(row, t) or rnd.random() < 0.2
        ]

    def operations(self) -> list[Operation]:
        """Updates to tear: what, the update, the ticket of the dying waiter
        and the latest time the update reads (when the repair runs)."""
        rnd, now = self.rnd, self.now
        later = now + rnd.choice([MS // 3, 2 * MS, 50 * MS, 2000 * MS])
        rate, n = rnd.choice([0, 900]), rnd.randint(1, 1024)
        ops: list[Operation] = [
            ("refill", lambda r: _bucket.refill(r, later), None, later),
            ("set_rate", lambda r: _bucket.set_rate(r, rate, later), None, later),
            ("reserve", lambda r: _bucket.reserve(r, n, now), None, now),
            ("init_row", lambda r: _bucket.init_row(r, 700, now, 9), None, now),
        ]
        for t in self.tickets:

            def cancel(r: Any, t: Ticket = t) -> None:
                _bucket.refill(r, later)
                _bucket.cancel(r, t)

            ops.append(("cancel", cancel, t, later))
        return ops


def tear(row: memoryview, op: Callable[[Any], object], at: int | None) -> int:
    """Run ``op`` on ``row``, stopped just before write ``at``; writes made."""
    wire = Tripwire()
    wire.arm(at)
    with contextlib.suppress(Tripped):
        op(TrappedView(row, wire))
    return wire.count


def check_torn_row(
    before: bytes,
    complete: bytes,
    refilled: int,
    torn: memoryview,
    live: list[Ticket],
    now: int,
) -> list[str]:
    """What a repaired torn row got wrong, against its state before and after.

    ``refilled`` is the most tokens the row may hold: time elapsed may have
    been credited before the holder died.
    """
    b = memoryview(before).cast("q")
    c = memoryview(complete).cast("q")
    out = bucket_row_problems(torn, "row", now)
    if torn[B_TOKENS] > max(b[B_TOKENS], c[B_TOKENS], refilled):
        out.append(f"tokens grew to {torn[B_TOKENS]} mt")
    for t in live:
        if served(b, t):
            continue
        if served(torn, t):
            if not served(c, t):
                out.append(f"waiter {t} served early")
        elif torn[B_QGEN] != t.q_gen or t.end_mt > torn[B_QTAIL]:
            out.append(f"waiter {t} fell out of the queue")
        elif t.end_mt - torn[B_QHEAD] > t.end_mt - b[B_QHEAD]:
            out.append(f"waiter {t} lost its place")
    return out


def copy_of(data: bytes) -> memoryview:
    row = new_row()
    row[:] = memoryview(data).cast("q")
    return row


@pytest.mark.parametrize("seed", range(40))
def test_a_row_torn_between_any_two_writes_is_repaired_without_gain(
    seed: int,
) -> None:
    rnd = random.Random(seed)
    state = RowState(rnd)
    checked = 0
    for _ in range(25):
        state.evolve()
        for what, op, dying, now in state.operations():
            before = state.row.tobytes()
            row = copy_of(before)
            _bucket.refill(row, now)
            refilled = row[B_TOKENS]
            row = copy_of(before)
            writes = tear(row, op, None)
            complete = row.tobytes()
            live = [t for t in state.tickets if t is not dying]
            most_queued = outstanding(copy_of(before)) + 1024 * MT

            def repair(r: Any, now: int = now) -> None:
                _bucket.repair_row(r, now)

            for at in range(writes):
                row = copy_of(before)
                tear(row, op, at)
                torn = row.tobytes()
                # The repair may die too; whatever it leaves, a second mends.
                for repair_at in range(tear(copy_of(torn), repair, None) + 1):
                    row = copy_of(torn)
                    tear(row, repair, repair_at)
                    repair(row)
                    if what == "init_row":  # a fresh row: no waiters, no tokens owed
                        wrong = bucket_row_problems(row, "row", now)
                    else:
                        wrong = check_torn_row(
                            before, complete, refilled, row, live, now
                        )
                    if outstanding(row) > most_queued:
                        wrong.append("the queue grew beyond a new wait")
                    assert not wrong, (what, at, repair_at, wrong)
                    checked += 1
    assert checked > 100


def test_a_drained_queue_torn_mid_restart_keeps_its_waiters_served() -> None:
    # The exact case the write order exists for: a refill pays the last
    # waiter and restarts the queue at 0 under a new generation.
    row = new_row()
    _bucket.init_row(row, 1000, T0, 1)
    row[B_TOKENS] = 0
    t = _bucket.reserve(row, 100, T0)
    assert t is not None
    before = row.tobytes()
    writes = tear(row, lambda r: _bucket.refill(r, T0 + 200 * MS), None)
    for at in range(writes):
        row[:] = memoryview(before).cast("q")
        tear(row, lambda r: _bucket.refill(r, T0 + 200 * MS), at)
        _bucket.repair_row(row, T0 + 200 * MS)
        assert not bucket_row_problems(row, "row")
        assert served(row, t) or (row[B_QTAIL] >= t.end_mt and row[B_QGEN] == t.q_gen)


# -- the three classes, torn in this process ------------------------------------


def snapshot(obj: Any) -> tuple[bytes, Any]:
    private = copy.deepcopy(getattr(obj, "_mine", None))
    return bytes(obj._seg._mm), private


def restore(obj: Any, saved: tuple[bytes, Any]) -> None:
    obj._seg._mm[:] = saved[0]
    if saved[1] is not None:
        obj._mine = copy.deepcopy(saved[1])
    if isinstance(obj, BandwidthManager):
        obj._limiters.clear()


def run_torn(
    obj: Any, wire: Tripwire, op: Callable[[], object], at: int | None
) -> None:
    """Run ``op`` with the tripwire armed at ``at``; leave the lock free."""
    wire.arm(at)
    try:
        op()
    except (Tripped, WaitTimeout):
        pass
    finally:
        wire.disarm()
    if obj._seg.sem.value == 0:  # died where nothing releases: as a dead holder
        obj._seg.lock.release()


def repaired_problems(obj: Any) -> list[str]:
    with obj._seg.locked() as words:
        obj._seg.lock.repair(words)
        return problems(obj)


def tear_everywhere(
    obj: Any, wire: Tripwire, what: str, op: Callable[[], object]
) -> int:
    saved = snapshot(obj)
    run_torn(obj, wire, op, None)
    writes = wire.count
    for at in range(writes):
        restore(obj, saved)
        run_torn(obj, wire, op, at)
        wrong = repaired_problems(obj)
        if isinstance(obj, BandwidthManager):
            wrong += faster_than_share(obj)
        assert not wrong, (what, at, writes, wrong)
    restore(obj, saved)
    run_torn(obj, wire, op, None)
    return writes


def faster_than_share(m: BandwidthManager) -> list[str]:
    """Streams whose limiter runs above the share the pool accounts for."""
    out = []
    rows, buckets = m._table.rows, m._buckets
    for r in range(m.max_streams):
        if rows[r * STREAM_WORDS + S_LIVE] != 1:
            continue
        rate = buckets[r * BUCKET_WORDS + B_RATE]
        share = rows[r * STREAM_WORDS + S_VALUE]
        if rate > share:
            out.append(f"stream row {r} runs at {rate} B/s on a share of {share}")
    return out


def test_connection_updates_torn_anywhere_are_repaired() -> None:
    rnd = random.Random(4)
    wire = Tripwire()
    with ConnectionLimiter(3, 8) as c:
        trap(c, wire)
        streams = [f"s{i}" for i in range(5)]
        torn_ops = 0
        for _ in range(60):
            s = rnd.choice(streams)
            if rnd.random() < 0.6:
                torn_ops += tear_everywhere(
                    c, wire, "try_acquire", partial(c.try_acquire, s)
                )
            else:
                torn_ops += tear_everywhere(c, wire, "release", partial(c.release, s))
        assert torn_ops > 300
        for s in streams:
            while c.get_count(s):
                c.release(s)
        assert c.get_total() == 0 and c.streams() == {}


def test_bandwidth_updates_torn_anywhere_are_repaired() -> None:
    rnd = random.Random(5)
    wire = Tripwire()
    with BandwidthManager(10_000, max_streams=6) as m:
        trap(m, wire)
        streams = [f"s{i}" for i in range(5)]
        torn_ops = 0
        for _ in range(60):
            s = rnd.choice(streams)
            share = rnd.choice([0, 500, 2000, 4000])
            if rnd.random() < 0.65:
                torn_ops += tear_everywhere(
                    m, wire, "allocate", partial(m.allocate_bandwidth, s, share)
                )
            else:
                torn_ops += tear_everywhere(
                    m, wire, "release", partial(m.release_bandwidth, s)
                )
        assert torn_ops > 300
        for s in streams:
            m.release_bandwidth(s)
        assert m.get_available_bandwidth() == 10_000
        with m._seg.locked():
            assert all(m._buckets[r * BUCKET_WORDS + B_GEN] == 0 for r in range(6))


def test_bucket_updates_torn_anywhere_are_repaired() -> None:
    rnd = random.Random(6)
    wire = Tripwire()
    with TokenBucket(2000) as b:
        trap(b, wire)
        torn_ops = 0
        for _ in range(60):
            n = rnd.randint(1, 1000)
            choice = rnd.random()
            if choice < 0.4:
                torn_ops += tear_everywhere(b, wire, "allow", partial(b.allow, n))
            elif choice < 0.7:
                torn_ops += tear_everywhere(
                    b, wire, "allow_n", partial(b.allow_n, n, timeout=0.001)
                )
            else:
                rate = rnd.choice([0, 1000, 5000])
                torn_ops += tear_everywhere(
                    b, wire, "set_rate", partial(b.set_rate, rate)
                )
        assert torn_ops > 200
