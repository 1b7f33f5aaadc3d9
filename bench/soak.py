"""``python -m bench.soak``: SIGKILL workers at random and show that no limit breaks.

W worker processes share one TokenBucket, one ConnectionLimiter and one
BandwidthManager by name and run a random mix of every operation of the three
(``allow``, ``allow_n``, ``set_rate``, ``try_acquire``, ``release``,
``allocate_bandwidth``, ``release_bandwidth``, ``get_limiter`` and the
limiter's ``allow``), as fast as they can. A killer process forks them,
SIGKILLs one at random intervals and starts another in its place. With W
workers contending, the lock is nearly always held by one of them, so some of
the kills land inside the critical section, between two writes.

Meanwhile this process checks the invariants of the three segments about
twice a second, under each lock, as any other process would find them. The
rules are the test suite's (tests/invariants.py, which states them), so the
soak and the tests check the same thing: per-stream counts sum to the total
and equal the live leases, available plus allocations is the pool, every
bucket's tokens are within [0, capacity] and its wait queue is consistent, the
stream index and free lists hold exactly what they should.

At the end it stops the workers, checks once more, reclaims what the last
workers held (every byte/s and every connection must come back), has an
unrelated interpreter open and use every segment, and unlinks them all.

It prints operations per second, kills, lock recoveries (the header word
``recoveries``), leases reclaimed while running (``reaped``), the longest
stall of any survivor (its slowest operation, less the 10 ms an ``allow_n``
may wait on purpose) and the invariant violations, and exits 1 unless those
are 0. Run it from the repository root (it imports ``tests.invariants``).
"""

from __future__ import annotations

import argparse
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
import traceback
from collections.abc import Sequence
from typing import Any

import shmrate
from bench.measures import log
from bench.shm_tracker import ShmTracker
from shmrate import _owner
from shmrate._layout import H_HOLDER, H_REAPED, H_RECOVERIES
from shmrate._lock import LOCK_SLICE_S, UNRECORDED_HOLDER_S
from tests.invariants import problems

FORK = mp.get_context("fork")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STREAMS = [f"cam-{i}" for i in range(8)]
POOL = 1_000_000
WAIT_TIMEOUT_S = 0.01
CHECK_EVERY_S = 0.5
MAX_SLOTS = 100_000  # workers ever started, each with its own counters
# What a survivor should wait at most for one dead holder (see _lock.py).
RECOVERY_BOUND_S = UNRECORDED_HOLDER_S + 2 * LOCK_SLICE_S


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Kill shmrate workers at random; check that no limit breaks.",
    )
    parser.add_argument("--workers", type=int, default=8, help="default 8")
    parser.add_argument("--seconds", type=float, default=60.0, help="default 60")
    parser.add_argument(
        "--kill-every",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="mean time between kills, drawn uniformly from 0 to twice it "
        "(default 0.25)",
    )
    parser.add_argument("--seed", type=int, default=1, help="default 1")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show shmrate's own warnings (one per recovery and reclaim)",
    )
    return parser


class Counters:
    """Shared memory the workers, the killer and this process report through."""

    def __init__(self) -> None:
        # Per worker slot: operations done, longest stall (s), unexpected errors.
        self.slots = FORK.RawArray("d", 3 * MAX_SLOTS)
        self.started = FORK.RawValue("q", 0)
        self.kills = FORK.RawValue("q", 0)
        self.aimed = FORK.RawValue("q", 0)  # kills of a worker caught in a lock
        self.unexpected_exits = FORK.RawValue("q", 0)
        self.wedged = FORK.RawValue("q", 0)
        self.stop_killing = FORK.RawValue("b", 0)
        self.stop_working = FORK.RawValue("b", 0)

    def total(self, field: int) -> float:
        return sum(self.slots[3 * i + field] for i in range(self.started.value))

    def longest_stall(self) -> float:
        n = self.started.value
        return max((self.slots[3 * i + 1] for i in range(n)), default=0.0)


# -- the workers ------------------------------------------------------------------


# The mix: mostly the hot paths, every other operation often enough.
MIX = (
    ["allow"] * 4
    + ["allow_n", "set_rate"]
    + ["try_acquire"] * 4
    + ["release"] * 3
    + ["allocate", "allocate", "release_bandwidth", "release_bandwidth"]
    + ["limiter"] * 3
)


def _one_operation(rnd: random.Random, objs: dict[str, Any]) -> float:
    """One random operation; returns how long it may wait on purpose."""
    tb, cl, bm = objs["tb"], objs["cl"], objs["bm"]
    stream = rnd.choice(STREAMS)
    op = rnd.choice(MIX)
    if op == "allow":
        tb.allow(rnd.randint(1, 50))
    elif op == "allow_n":
        with contextlib.suppress(shmrate.WaitTimeout):
            tb.allow_n(rnd.randint(1, 200), timeout=WAIT_TIMEOUT_S)
        return WAIT_TIMEOUT_S
    elif op == "set_rate":
        tb.set_rate(rnd.randrange(20_000, 100_000))
    elif op == "try_acquire":
        cl.try_acquire(stream)
    elif op == "release":
        cl.release(stream)
    elif op == "allocate":
        bm.allocate_bandwidth(stream, rnd.randrange(0, 300_000))
    elif op == "release_bandwidth":
        bm.release_bandwidth(stream)
    else:
        limiter = bm.get_limiter(stream)
        if limiter is not None:
            # Stale if another worker released the stream since.
            with contextlib.suppress(shmrate.StaleLimiter):
                limiter.allow(rnd.randint(1, 500))
    return 0.0


def _worker(names: dict[str, str], seed: int, slot: int, counters: Counters) -> None:
    logging.getLogger("shmrate").setLevel(logging.ERROR)  # counted, not logged
    rnd = random.Random(seed)
    objs = {
        "tb": shmrate.TokenBucket.open(names["tb"]),
        "cl": shmrate.ConnectionLimiter.open(names["cl"]),
        "bm": shmrate.BandwidthManager.open(names["bm"]),
    }
    out = counters.slots
    while not counters.stop_working.value:
        t0 = time.monotonic()
        try:
            on_purpose = _one_operation(rnd, objs)
        except Exception:
            traceback.print_exc()
            out[3 * slot + 2] += 1
            continue
        stall = time.monotonic() - t0 - on_purpose
        out[3 * slot] += 1
        if stall > out[3 * slot + 1]:
            out[3 * slot + 1] = stall


def _freeze_a_holder(segments: list[Any], live: list[Any]) -> Any:
    """Stop a worker inside one of the locks; None if none was caught in 20 ms.

    A holder keeps the lock for microseconds, so one seen holding it has
    usually let go by the time a signal lands: stop it first, then look again.
    """
    pids = {p.pid: p for p in live}
    give_up = time.monotonic() + 0.02
    while time.monotonic() < give_up:
        for seg in segments:
            pid = _owner.pid_of(max(int(seg.words[H_HOLDER]), 0))
            if pid not in pids:
                continue
            os.kill(pid, signal.SIGSTOP)
            if _owner.pid_of(max(int(seg.words[H_HOLDER]), 0)) == pid:
                return pids[pid]  # stopped inside: the kill tears its update
            os.kill(pid, signal.SIGCONT)
    return None


def _killer(
    names: dict[str, str], workers: int, mean_s: float, seed: int, counters: Counters
) -> None:
    """Fork the workers; SIGKILL one at random intervals and replace it.

    Half the time the victim is a worker caught inside one of the locks: a
    random victim is seldom inside (the holder keeps the lock for
    microseconds), and those are the deaths that tear an update.
    """
    rnd = random.Random(seed)
    live: list[mp.process.BaseProcess] = []
    segments = [
        shmrate.TokenBucket.open(names["tb"])._seg,
        shmrate.ConnectionLimiter.open(names["cl"])._seg,
        shmrate.BandwidthManager.open(names["bm"])._seg,
    ]

    def start() -> None:
        slot = counters.started.value
        counters.started.value = slot + 1
        p = FORK.Process(
            target=_worker, args=(names, rnd.randrange(2**32), slot, counters)
        )
        p.start()
        live.append(p)

    for _ in range(workers):
        start()
    while not counters.stop_killing.value:
        time.sleep(rnd.uniform(0, 2 * mean_s))
        if counters.stop_killing.value:
            break
        for p in [p for p in live if not p.is_alive()]:
            counters.unexpected_exits.value += 1  # nobody else kills them
            live.remove(p)
            start()
        victim = rnd.choice(live)
        if rnd.random() < 0.5 and (held := _freeze_a_holder(segments, live)):
            victim = held
            counters.aimed.value += 1
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        counters.kills.value += 1
        live.remove(victim)
        start()
    counters.stop_working.value = 1
    for p in live:
        p.join(30)
        if p.is_alive():
            counters.wedged.value += 1
            assert p.pid is not None
            os.kill(p.pid, signal.SIGKILL)
            p.join()


# -- this process: checks, the end, the report --------------------------------------


def _check(objs: dict[str, Any], found: list[str]) -> None:
    """Check every segment under its lock; append what is wrong to ``found``."""
    for obj in objs.values():
        with obj._seg.locked():
            wrong = problems(obj)
        found += [f"{obj!r}: {w}" for w in wrong]


def _use_in_fresh_interpreter(names: dict[str, str]) -> str | None:
    """An unrelated interpreter opens and uses every segment; None if it could."""
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
        """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, *sys.path[1:]])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return None if done.returncode == 0 else done.stderr.strip()


def _finish(objs: dict[str, Any], counters: Counters, found: list[str]) -> None:
    """After the last worker: check, reclaim everything, use from outside."""
    _check(objs, found)
    cl, bm = objs["cl"], objs["bm"]
    cl.reap()
    bm.reap()
    if cl.get_total() or cl.streams():
        found.append(f"connections left after the reap: {cl.streams()}")
    if bm.get_available_bandwidth() != POOL or bm.streams():
        found.append(f"bandwidth left after the reap: {bm.streams()}")
    _check(objs, found)
    failed = _use_in_fresh_interpreter({k: o.name for k, o in objs.items()})
    if failed is not None:
        found.append(f"a fresh interpreter could not use the segments: {failed}")
    if counters.wedged.value:
        found.append(f"{counters.wedged.value} workers never finished an operation")
    if counters.unexpected_exits.value:
        found.append(f"{counters.unexpected_exits.value} workers exited on their own")
    errors = int(counters.total(2))
    if errors:
        found.append(f"{errors} operations raised unexpectedly (see stderr)")


def _report(args: argparse.Namespace, figures: dict[str, Any]) -> str:
    ops, seconds = figures["ops"], figures["seconds"]
    rows = [
        ("operations", f"{ops:,}", f"{ops / seconds:,.0f} per second"),
        (
            "kills",
            f"{figures['kills']:,}",
            f"SIGKILL at random moments; {figures['aimed']:,} of them of a "
            "worker caught inside a lock",
        ),
        (
            "lock recoveries",
            f"{figures['recoveries']:,}",
            "locks taken over from dead holders (header word recoveries)",
        ),
        (
            "leases reclaimed",
            f"{figures['reaped']:,}",
            f"{figures['reaped_leases']:,} connections and "
            f"{figures['reaped_streams']:,} allocations of dead workers "
            "while running (header word reaped)",
        ),
        (
            "longest stall",
            f"{figures['stall']:.3f} s",
            f"slowest operation of any survivor; one recovery is about "
            f"{LOCK_SLICE_S:.1f} s, or {RECOVERY_BOUND_S:.1f} s for a holder "
            "that died before recording itself",
        ),
        ("invariant checks", f"{figures['checks']:,}", "under each lock, as run"),
        ("invariant violations", f"{figures['violations']:,}", "must be 0"),
    ]
    lines = [
        f"shmrate soak: {args.workers} workers for {seconds:.0f} s, a kill every "
        f"{args.kill_every:g} s on average (seed {args.seed})",
        "",
        "| figure | value | meaning |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {value} | {meaning} |" for name, value, meaning in rows]
    lines.append("")
    lines.append(
        f"At the end: {figures['final_reaped']:,} leases and allocations of the "
        "last workers reclaimed, all of the pool and every connection back, "
        "and an unrelated interpreter used every segment."
        if not figures["violations"]
        else "FAILURE: see the violations above."
    )
    if figures["leftovers"]:
        lines.append("FAILURE: left in /dev/shm: " + ", ".join(figures["leftovers"]))
    else:
        lines.append("/dev/shm: every entry the soak created is gone")
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(
    args: argparse.Namespace,
    objs: dict[str, Any],
    killer: mp.process.BaseProcess,
    counters: Counters,
    found: list[str],
) -> dict[str, Any]:
    """Check while the killer runs; then stop it and finish. The figures."""
    started = time.monotonic()
    killer.start()
    checks, next_note = 0, started + 5
    while (now := time.monotonic()) < started + args.seconds:
        time.sleep(min(CHECK_EVERY_S, started + args.seconds - now))
        _check(objs, found)
        checks += 1
        if time.monotonic() >= next_note:
            next_note += 5
            log(
                f"{time.monotonic() - started:4.0f} s: "
                f"{int(counters.total(0)):,} operations, "
                f"{counters.kills.value} kills, {len(found)} violations"
            )
    counters.stop_killing.value = 1
    killer.join(60)
    seconds = time.monotonic() - started
    if killer.exitcode != 0:
        found.append(f"the killer process failed (exit {killer.exitcode})")
    reaped = {k: int(objs[k]._seg.words[H_REAPED]) for k in ("cl", "bm")}
    _finish(objs, counters, found)
    after = sum(int(objs[k]._seg.words[H_REAPED]) for k in reaped)
    return {
        "ops": int(counters.total(0)),
        "seconds": seconds,
        "kills": counters.kills.value,
        "aimed": counters.aimed.value,
        "recoveries": sum(int(o._seg.words[H_RECOVERIES]) for o in objs.values()),
        "reaped": sum(reaped.values()),
        "reaped_leases": reaped["cl"],
        "reaped_streams": reaped["bm"],
        "final_reaped": after - sum(reaped.values()),
        "stall": counters.longest_stall(),
        "checks": checks + 2,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1 or args.seconds <= 0 or args.kill_every <= 0:
        _parser().error("--workers, --seconds and --kill-every must be positive")
    if not args.verbose:
        logging.getLogger("shmrate").setLevel(logging.ERROR)
    # A terminated soak still stops its workers and removes its segments.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tag = f"soak-{os.getpid()}-{random.Random().randrange(16**6):06x}"
    names = {kind: f"{tag}-{kind}" for kind in ("tb", "cl", "bm")}
    tracker = ShmTracker()
    counters = Counters()
    killer = FORK.Process(
        target=_killer, args=(names, args.workers, args.kill_every, args.seed, counters)
    )
    found: list[str] = []
    objs: dict[str, Any] = {}
    try:
        with tracker.watch():
            objs["tb"] = shmrate.TokenBucket(50_000, name=names["tb"])
            objs["cl"] = shmrate.ConnectionLimiter(4, 16, name=names["cl"])
            objs["bm"] = shmrate.BandwidthManager(
                POOL, name=names["bm"], max_streams=len(STREAMS)
            )
        figures = _run(args, objs, killer, counters, found)
    finally:
        counters.stop_killing.value = 1
        if killer.pid is not None:
            killer.join(60)
        for obj in objs.values():
            obj.unlink()
            obj.close()
    figures["leftovers"] = tracker.leftovers()
    figures["violations"] = len(found) + len(figures["leftovers"])
    for problem in found[:20]:
        log(f"violation: {problem}")
    print(_report(args, figures), flush=True)
    return 1 if figures["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
