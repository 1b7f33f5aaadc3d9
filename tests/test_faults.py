"""Fault injection: worker processes SIGKILLed at random moments, inside the lock too.

Two tests, both slow (about half a minute together on two cores) and both run
by CI:

* the lock alone, hammered: many processes enter and leave one segment's
  critical section while some die inside it and others are killed from
  outside; two processes are never inside at once, and the semaphore's value
  never exceeds 1;
* every operation of every class, on shared named objects, round after round,
  while workers die between two of their writes (a tripwire in the worker
  sends it SIGKILL just before write number n, see tests/tripwire.py) or are
  killed from outside at random moments. After each round the invariants hold
  (tests/invariants.py), no survivor waited longer than the recovery bound,
  reaping returns every connection and every byte/s to the pool, and an
  unrelated interpreter opens and uses every segment.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from shmrate import (
    BandwidthManager,
    ConnectionLimiter,
    StaleLimiter,
    TokenBucket,
    WaitTimeout,
    _owner,
)
from shmrate._layout import BUCKET_WORDS, H_REAPED, H_RECOVERIES, HEADER_BYTES, WORD
from shmrate._lock import LOCK_SLICE_S, UNRECORDED_HOLDER_S
from tests.conftest import unlink_name
from tests.invariants import problems
from tests.tripwire import Tripwire, kill_self, trap

pytestmark = pytest.mark.slow

FORK = mp.get_context("fork")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A waiter notices a dead holder that recorded itself within one lock slice,
# and one that died before recording itself once its release stamp has stood
# still for UNRECORDED_HOLDER_S (checked once a slice). Two busy cores, other
# processes dying meanwhile and the recoverer's own work get generous slack.
RECOVERY_BOUND_S = UNRECORDED_HOLDER_S + 2 * LOCK_SLICE_S
SLACK_S = 2.0

# The bucket row's spare word of a TokenBucket segment: a test-only mark of
# who is inside the critical section.
INSIDE = HEADER_BYTES // WORD + BUCKET_WORDS - 1


def quiet_logs() -> None:
    # Children report through shared counters; their warnings would only
    # reach stderr through logging's last-resort handler.
    logging.getLogger("shmrate").setLevel(logging.ERROR)


class Workers:
    """Forked workers, each with a slot of shared counters, killed at will."""

    def __init__(
        self, target: Callable[..., None], args: tuple[Any, ...], rnd: random.Random
    ) -> None:
        self.target = target
        self.args = args  # the target gets these, a seed, its slot, out, stop
        self.rnd = rnd
        self.stop = FORK.RawValue("b", 0)
        self.slots = FORK.RawArray("d", 2 * 4096)  # per worker: ops, max stall
        self.next_slot = 0
        self.live: list[mp.process.BaseProcess] = []
        self.kills = 0

    def spawn(self) -> None:
        slot = self.next_slot
        self.next_slot += 1
        p = FORK.Process(
            target=self.target,
            args=(*self.args, self.rnd.randrange(2**32), slot, self.slots, self.stop),
            daemon=True,
        )
        p.start()
        self.live.append(p)

    def replace_the_dead(self) -> None:
        for p in [p for p in self.live if not p.is_alive()]:
            p.join()
            self.live.remove(p)
            self.spawn()

    def kill_one(self) -> None:
        victim = self.rnd.choice(self.live)
        assert victim.pid is not None
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # it died by its own tripwire and was reaped already
        self.kills += 1

    def finish(self) -> None:
        self.stop.value = 1
        for p in self.live:
            p.join(20)
        wedged = [p.pid for p in self.live if p.is_alive()]
        for p in self.live:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        assert not wedged, f"workers {wedged} never finished their operation"
        self.live = []

    def ops_and_max_stall(self) -> tuple[int, float]:
        ops = sum(int(self.slots[2 * i]) for i in range(self.next_slot))
        stall = max(self.slots[2 * i + 1] for i in range(self.next_slot))
        return ops, stall


# -- the lock alone ------------------------------------------------------------


def enter_and_leave(name: str, seed: int, slot: int, out: Any, stop: Any) -> None:
    """Enter the critical section over and over; count what looks wrong.

    Inside, the semaphore must be taken (value 0) and no live process may
    have left its mark in the INSIDE word; a mark left by a dead one is what
    a holder killed inside leaves behind.
    """
    quiet_logs()
    rnd = random.Random(seed)
    b = TokenBucket.open(name)
    seg, words, me = b._seg, b._seg.words, _owner.current()
    die_after = rnd.randrange(50, 3000) if rnd.random() < 0.5 else -1
    entries = 0
    while not stop.value:
        with seg.locked():
            wrong = seg.sem.value != 0
            other = words[INSIDE]
            wrong |= other != 0 and _owner.alive(other)
            words[INSIDE] = me
            if entries == die_after:
                kill_self()  # dies holding the lock, its mark left behind
            for _ in range(rnd.choice([0, 0, 50, 500])):
                pass
            wrong |= words[INSIDE] != me
            words[INSIDE] = 0
        entries += 1
        out[2 * slot] = entries
        out[2 * slot + 1] += wrong


def test_recovery_hammered_never_lets_two_holders_in(name: str) -> None:
    rnd = random.Random(11)
    with TokenBucket(1000, name=name) as b:
        workers = Workers(enter_and_leave, (name,), rnd)
        for _ in range(6):
            workers.spawn()
        highest = 0
        end = time.monotonic() + 8.0
        next_kill = time.monotonic() + rnd.uniform(0.05, 0.4)
        while time.monotonic() < end:
            highest = max(highest, b._seg.sem.value)
            if time.monotonic() >= next_kill:
                workers.kill_one()
                next_kill = time.monotonic() + rnd.uniform(0.05, 0.4)
            workers.replace_the_dead()
            time.sleep(0.0005)
        workers.finish()
        assert b.allow(0)  # takes the lock over if the last holder died in it
        entries = sum(int(workers.slots[2 * i]) for i in range(workers.next_slot))
        wrong = sum(int(workers.slots[2 * i + 1]) for i in range(workers.next_slot))
        recoveries = int(b._seg.words[H_RECOVERIES])
        print(
            f"\n{entries} entries, {workers.kills} kills from outside, "
            f"{recoveries} recoveries, highest semaphore value {highest}"
        )
        assert wrong == 0, f"{wrong} of {entries} entries saw another holder"
        assert highest <= 1 and b._seg.sem.value == 1
        assert recoveries >= 5, f"only {recoveries} recoveries: not hammered"
        assert entries > 1000


# -- every operation of every class ------------------------------------------------

STREAMS = [f"cam-{i}" for i in range(6)]
POOL = 1_000_000


def one_operation(rnd: random.Random, objs: dict[str, Any], wire: Tripwire) -> float:
    """Run one random operation; returns the time it may take on purpose."""
    tb, cl, bm = objs["tb"], objs["cl"], objs["bm"]
    stream = rnd.choice(STREAMS)
    pick = rnd.randrange(10)
    if pick == 0:
        tb.allow(rnd.randint(1, 50))
    elif pick == 1:
        with contextlib.suppress(WaitTimeout):
            tb.allow_n(rnd.randint(1, 200), timeout=0.05)
        return 0.05
    elif pick == 2:
        tb.set_rate(rnd.randrange(20_000, 100_000))
    elif pick in (3, 4):
        cl.try_acquire(stream)
    elif pick == 5:
        cl.release(stream)
    elif pick == 6:
        bm.allocate_bandwidth(stream, rnd.randrange(0, 300_000))
    elif pick == 7:
        bm.release_bandwidth(stream)
    else:
        limiter = bm.get_limiter(stream)
        if limiter is not None:
            trap(limiter, wire, lock_points=True)
            # Stale if another worker released the stream since.
            with contextlib.suppress(StaleLimiter):
                limiter.allow(rnd.randint(1, 500))
    return 0.0


def use_everything(
    names: dict[str, str], seed: int, slot: int, out: Any, stop: Any
) -> None:
    """A worker: random operations until stopped, killed, or dead by its wire.

    Most workers die on their own after a random while: from then on each
    operation is armed to SIGKILL the worker before a random write point,
    until one operation reaches it.
    """
    quiet_logs()
    rnd = random.Random(seed)
    wire = Tripwire(kill_self)
    objs = {
        "tb": TokenBucket.open(names["tb"]),
        "cl": ConnectionLimiter.open(names["cl"]),
        "bm": BandwidthManager.open(names["bm"]),
    }
    for obj in objs.values():
        trap(obj, wire, lock_points=True)
    doomed_at = time.monotonic() + rnd.uniform(0.1, 1.0)
    doomed = rnd.random() < 0.8
    while not stop.value:
        armed = doomed and time.monotonic() >= doomed_at
        wire.arm(rnd.randrange(24) if armed else None)
        t0 = time.monotonic()
        on_purpose = one_operation(rnd, objs, wire)
        stall = time.monotonic() - t0 - on_purpose
        wire.disarm()
        out[2 * slot] += 1
        out[2 * slot + 1] = max(out[2 * slot + 1], stall)


def use_in_fresh_interpreter(names: dict[str, str]) -> str:
    code = f"""
        import shmrate
        names = {names!r}
        with shmrate.TokenBucket.open(names["tb"]) as tb:
            tb.allow(1)
            tb.set_rate(tb.rate())
        with shmrate.ConnectionLimiter.open(names["cl"]) as cl:
            assert cl.try_acquire("fresh")
            cl.release("fresh")
        with shmrate.BandwidthManager.open(names["bm"]) as bm:
            limiter, ok = bm.allocate_bandwidth("fresh", 1)
            assert ok and limiter.allow(1)
            bm.release_bandwidth("fresh")
        print("used")
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_killed_workers_never_corrupt_any_limit(name: str) -> None:
    names = {kind: f"{name}-{kind}" for kind in ("tb", "cl", "bm")}
    rnd = random.Random(12)
    try:
        with (
            TokenBucket(50_000, name=names["tb"]) as tb,
            ConnectionLimiter(3, 12, name=names["cl"]) as cl,
            BandwidthManager(POOL, name=names["bm"], max_streams=16) as bm,
        ):
            rounds, total_ops, total_kills, worst = 6, 0, 0, 0.0
            for round_no in range(rounds):
                workers = Workers(use_everything, (names,), rnd)
                for _ in range(5):
                    workers.spawn()
                end = time.monotonic() + 2.5
                while time.monotonic() < end:
                    time.sleep(rnd.uniform(0.05, 0.3))
                    workers.kill_one()
                    workers.replace_the_dead()
                workers.finish()
                ops, stall = workers.ops_and_max_stall()
                total_ops += ops
                total_kills += workers.kills
                worst = max(worst, stall)
                assert ops > 100, f"round {round_no}: only {ops} operations"
                assert stall < RECOVERY_BOUND_S + SLACK_S, (
                    f"round {round_no}: a survivor stalled {stall:.2f} s"
                )
                check_round(tb, cl, bm, round_no)
                assert use_in_fresh_interpreter(names) == "used"
            recoveries = sum(int(o._seg.words[H_RECOVERIES]) for o in (tb, cl, bm))
            # The figures, for whoever runs this with -s.
            print(
                f"\n{rounds} rounds: {total_ops} operations, {total_kills} kills "
                f"from outside, {recoveries} lock recoveries, "
                f"{int(cl._seg.words[H_REAPED])} leases and "
                f"{int(bm._seg.words[H_REAPED])} allocations reaped; "
                f"longest stall {worst:.3f} s"
            )
            assert recoveries >= rounds, "the workers hardly ever died in the lock"
    finally:
        for n in names.values():
            unlink_name(n)


def check_round(
    tb: TokenBucket, cl: ConnectionLimiter, bm: BandwidthManager, round_no: int
) -> None:
    """After the round every worker is gone: check, reap everything, check."""
    for obj in (tb, cl, bm):
        with obj._seg.locked():  # recovers first if a worker died holding it
            wrong = problems(obj)
        assert not wrong, f"round {round_no}: {obj!r}: {wrong}"
        assert obj._seg.sem.value == 1
    held = cl.get_total()
    assert sum(cl.streams().values()) == held
    assert bm.get_available_bandwidth() + sum(bm.streams().values()) == POOL
    # Every worker has exited, so everything they held comes back.
    assert cl.reap() == held
    assert cl.get_total() == 0 and cl.streams() == {}
    bm.reap()
    assert bm.get_available_bandwidth() == POOL and bm.streams() == {}
    for obj in (cl, bm):
        with obj._seg.locked():
            assert not problems(obj), f"round {round_no}: after the reap"
    assert 0 <= tb.tokens() <= tb.capacity()
