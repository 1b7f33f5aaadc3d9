"""``shmrate demo``: a simulated single-host ingest appliance. Part of the
command; it prints.

The parent creates a BandwidthManager (the appliance's uplink, shared out to
camera streams) and a ConnectionLimiter (connections per stream and in total),
then forks worker processes. Each worker runs a few connection handlers on an
asyncio loop. A handler accepts a connection for a random camera if both
connection caps allow it, allocates the camera's share of the pool (or, if the
camera has one already, takes its limiter with ``get_limiter``) and pushes bytes
through the camera's limiter with ``allow_n_async`` for a few seconds, as fast
as the limiter lets it: the source always has more data than its share. Two
connections of one camera, often in two processes, push through one limiter.

Midway the parent SIGKILLs the worker that holds the most connections and
shares. Its
connections and shares stay recorded until something reclaims them: the next
refused request in any worker does so on its own (at most once a second), and
the view shows them coming back. The parent only calls ``reap()`` itself if
that has not happened within ``PARENT_REAPS_AFTER_S``.

The parent never pushes bytes; it samples ``stats()`` of both objects, exact
across all processes, and draws the view from them. Like a supervisor, it also
returns the share of a camera that has had no connection for two samples: a
share outlives its last connection when that connection died with its worker
while a live worker had made the allocation.

The view and the summary, and how their rates are measured, are in
``_cli_demo_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from ._cli_demo_report import Events, Kill, Tally, frame, held_by, intro, line, summary
from ._cli_view import Screen
from ._layout import MAX_RATE
from .bandwidth import BandwidthManager
from .connections import ConnectionLimiter
from .errors import StaleLimiter

__all__ = ["add_arguments", "run_demo"]

# A refusal reclaims dead processes' leases at most once a second per segment,
# so they are normally back within about a second of the kill; the parent
# steps in only if no refusal came to do it.
PARENT_REAPS_AFTER_S = 2.0


@dataclass(frozen=True)
class Plan:
    """The demo's numbers, from the command line."""

    workers: int
    handlers: int
    streams: int
    stream_bytes_per_second: int
    pool_bytes_per_second: int
    max_per_stream: int
    max_total: int
    duration_s: float
    kill_at_s: float | None
    chunk_bytes: int
    interval_s: float
    seed: int

    @property
    def stream_ids(self) -> list[str]:
        return [f"cam-{i + 1:02d}" for i in range(self.streams)]


def _positive(kind: type[int] | type[float], most: float = math.inf) -> Any:
    def check(text: str) -> int | float:
        value = kind(text)
        if not 0 < value <= most:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {most}, got {text}")
        return value

    check.__name__ = kind.__name__
    return check


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive(int), default=4, help="processes (4)")
    p.add_argument(
        "--handlers",
        type=_positive(int),
        default=4,
        help="connections each worker tries to serve at once (4)",
    )
    p.add_argument("--streams", type=_positive(int), default=8, help="cameras (8)")
    p.add_argument(
        "--stream-rate",
        type=_positive(int, MAX_RATE),
        default=250_000,
        metavar="BYTES_PER_S",
        help="each camera's share of the pool (250000)",
    )
    p.add_argument(
        "--pool",
        type=_positive(int, MAX_RATE),
        metavar="BYTES_PER_S",
        help="the bandwidth pool (default: 3/4 of the cameras' shares)",
    )
    p.add_argument(
        "--max-per-stream",
        type=_positive(int),
        default=2,
        help="connections per camera (2)",
    )
    p.add_argument(
        "--max-total",
        type=_positive(int),
        help="connections in total (default: 3/4 of workers x handlers)",
    )
    p.add_argument(
        "--duration", type=_positive(float), default=10.0, help="seconds (10)"
    )
    p.add_argument(
        "--kill-at",
        type=float,
        metavar="SECONDS",
        help="when to SIGKILL a worker (default: half way; 0 or less: never)",
    )
    p.add_argument(
        "--chunk", type=_positive(int), default=4096, help="bytes per push (4096)"
    )
    p.add_argument(
        "--interval", type=_positive(float), default=0.5, help="seconds a frame (0.5)"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    p.add_argument(
        "--plain",
        action="store_true",
        help="print plain lines, no escapes (default when stdout is not a terminal)",
    )


def _plan(args: argparse.Namespace) -> Plan:
    kill_at = args.duration / 2 if args.kill_at is None else args.kill_at
    pool = args.pool or args.stream_rate * max(1, args.streams * 3 // 4)
    max_total = args.max_total or max(1, args.workers * args.handlers * 3 // 4)
    return Plan(
        workers=args.workers,
        handlers=args.handlers,
        streams=args.streams,
        stream_bytes_per_second=args.stream_rate,
        pool_bytes_per_second=pool,
        max_per_stream=args.max_per_stream,
        max_total=max_total,
        duration_s=args.duration,
        kill_at_s=kill_at if 0 < kill_at < args.duration else None,
        chunk_bytes=min(args.chunk, max(args.stream_rate, 1024)),
        interval_s=args.interval,
        seed=args.seed,
    )


# -- the workers ---------------------------------------------------------------


class _PipeHandler(logging.Handler):
    """Sends a worker's shmrate log records to the parent's view."""

    def __init__(self, send: mpc.Connection) -> None:
        super().__init__(logging.WARNING)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        # If the parent is gone, nobody is watching: drop the record.
        with contextlib.suppress(OSError):
            self.send.send(f"pid {os.getpid()}: {record.getMessage()}")


def _worker(
    plan: Plan,
    conns: ConnectionLimiter,
    pool: BandwidthManager,
    index: int,
    stop_at: float,
    send: mpc.Connection,
) -> None:
    # Ctrl-C reaches the whole process group; the parent ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = logging.getLogger("shmrate")
    log.handlers = [_PipeHandler(send)]
    log.propagate = False
    try:
        rnd = random.Random(plan.seed * 1000 + index)
        asyncio.run(_serve(plan, conns, pool, rnd, stop_at))
    except BaseException as e:
        send.send(f"worker {index} (pid {os.getpid()}) failed: {e!r}")
        os._exit(1)


async def _serve(
    plan: Plan,
    conns: ConnectionLimiter,
    pool: BandwidthManager,
    rnd: random.Random,
    stop_at: float,
) -> None:
    handlers = [_handler(plan, conns, pool, rnd, stop_at) for _ in range(plan.handlers)]
    await asyncio.gather(*handlers)


async def _handler(
    plan: Plan,
    conns: ConnectionLimiter,
    pool: BandwidthManager,
    rnd: random.Random,
    stop_at: float,
) -> None:
    """Accept connections for random cameras until the demo ends."""
    ids = plan.stream_ids
    while time.monotonic() < stop_at:
        sid = rnd.choice(ids)
        if conns.try_acquire(sid):
            try:
                await _push(plan, pool, sid, rnd, stop_at)
            finally:
                conns.release(sid)
                # The last connection of a camera gives its share back. A
                # connection that arrives in between may lose the share and
                # allocate it again (StaleLimiter below): no bytes are lost.
                if conns.get_count(sid) == 0:
                    pool.release_bandwidth(sid)
        # A refused camera (or one whose session ended) calls again later.
        await asyncio.sleep(rnd.uniform(0.05, 0.25))


async def _push(
    plan: Plan, pool: BandwidthManager, sid: str, rnd: random.Random, stop_at: float
) -> None:
    """One connection's session: push bytes as fast as the camera's share allows."""
    # A camera's second connection joins the share its first one allocated,
    # which stays owned by the first one's process.
    limiter = pool.get_limiter(sid)
    ok = limiter is not None
    if limiter is None:
        limiter, ok = pool.allocate_bandwidth(sid, plan.stream_bytes_per_second)
    end = min(time.monotonic() + rnd.uniform(1.0, 3.0), stop_at)
    while ok and limiter is not None and time.monotonic() < end:
        try:
            await limiter.allow_n_async(plan.chunk_bytes)
        except StaleLimiter:
            # The share was released under us: by a sibling whose connection
            # was the last one a moment ago, or by a reap after its owner died.
            limiter, ok = pool.allocate_bandwidth(sid, plan.stream_bytes_per_second)


# -- the parent ----------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    plan = _plan(args)
    live = sys.stdout.isatty() and not args.plain
    tag = f"demo-{os.getpid()}"
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with BandwidthManager(
            plan.pool_bytes_per_second,
            name=f"{tag}-bandwidth",
            max_streams=plan.streams,
        ) as pool:
            try:
                with ConnectionLimiter(
                    plan.max_per_stream, plan.max_total, name=f"{tag}-connections"
                ) as conns:
                    try:
                        return _run(plan, pool, conns, live)
                    finally:
                        conns.unlink()
            finally:
                pool.unlink()
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def _run(
    plan: Plan, pool: BandwidthManager, conns: ConnectionLimiter, live: bool
) -> int:
    ctx = mp.get_context("fork")
    t0 = time.monotonic()
    stop_at = t0 + plan.duration_s
    events = Events(t0)
    log = logging.getLogger("shmrate")
    saved_handlers, log.handlers = log.handlers, [events]
    procs: list[Any] = []
    readers: list[mpc.Connection] = []
    for i in range(plan.workers):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker,
            args=(plan, conns, pool, i, stop_at, send),
            name=f"shmrate-demo-{i}",
            daemon=True,
        )
        p.start()
        send.close()  # the child has it; later children must not inherit it
        procs.append(p)
        readers.append(recv)
    intro(plan, pool, conns, [p.pid for p in procs])
    tally = Tally(plan, t0)
    kill: Kill | None = None
    screen = Screen(sys.stdout, live=live, full=False)
    next_print = t0
    idle: set[str] = set()
    try:
        while True:
            now = time.monotonic()
            bw, cs, holders = pool.stats(), conns.stats(), conns.holders()
            # After sampling: a worker logs a reclaim only once it is done, so
            # the numbers just read already show what these messages say.
            _drain(readers, events)
            if kill is None and plan.kill_at_s and now - t0 >= plan.kill_at_s:
                kill = _kill(procs, bw, holders, now - t0, events)
            back_after_s = None
            if kill is not None and kill.back_at_s is None:
                back_after_s = _watch_reclaim(kill, pool, conns, bw, holders, now - t0)
            if kill is not None and back_after_s is not None:
                # The reaper logs right after it is done: let its message
                # come in first, so that the events read in order.
                _drain(readers, events, wait_s=0.1)
                how = "by the parent" if kill.by_parent else "automatically"
                events.note(
                    f"everything pid {kill.pid} held is back after "
                    f"{back_after_s:.1f} s (reclaimed {how})"
                )
            tally.add(now, bw, cs)
            idle = _return_idle_shares(pool, bw, cs, idle, events)
            done = now >= stop_at and not any(p.is_alive() for p in procs)
            if live:
                screen.draw(frame(plan, tally, bw, cs, now - t0, procs, events))
            elif now >= next_print or done or events.unseen:
                print(line(tally, bw, cs, now - t0, events), flush=True)
                next_print += 1.0
            if done:
                break
            if now >= stop_at + 5:
                events.note("workers still running 5 s after the end: killed")
                _kill_all(procs)
            time.sleep(max(0.0, plan.interval_s - (time.monotonic() - now)))
    except KeyboardInterrupt:
        screen.close()
        _kill_all(procs)
        print("\ninterrupted: workers stopped, demo segments removed")
        return 130
    finally:
        screen.close()
        _kill_all(procs)
        log.handlers = saved_handlers
    failed = [p for p in procs if p.exitcode not in (0, -signal.SIGKILL)]
    elapsed_s = time.monotonic() - t0
    summary(plan, tally, kill, pool.stats(), conns.stats(), elapsed_s)
    for p in failed:
        print(f"worker {p.name} exited with {p.exitcode}")
    return 1 if failed else 0


def _drain(readers: list[mpc.Connection], events: Events, wait_s: float = 0) -> None:
    for r in mpc.wait(readers, timeout=wait_s):
        assert isinstance(r, mpc.Connection)
        try:
            events.note(str(r.recv()))
        except (EOFError, OSError):
            readers.remove(r)  # that worker is gone


def _return_idle_shares(
    pool: BandwidthManager,
    bw: dict[str, Any],
    cs: dict[str, Any],
    idle_before: set[str],
    events: Events,
) -> set[str]:
    """Release the shares of cameras without connections at two samples."""
    idle = {sid for sid in bw["streams"] if sid not in cs["streams"]}
    for sid in sorted(idle & idle_before):
        pool.release_bandwidth(sid)
        events.note(f"returned the share of {sid}: it has had no connection since")
    return idle - idle_before


def _kill_all(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()


def _kill(
    procs: list[Any],
    bw: dict[str, Any],
    holders: dict[int, int],
    at_s: float,
    events: Events,
) -> Kill | None:
    alive = [(i, p) for i, p in enumerate(procs) if p.is_alive()]
    if not alive:
        return None
    # The one holding the most, so that much has to come back.
    index, victim = max(alive, key=lambda ip: sum(held_by(ip[1].pid, bw, holders)))
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    held, shares = held_by(victim.pid, bw, holders)
    events.note(
        f"SIGKILL worker {index} (pid {victim.pid}), holding {held} connection(s) "
        f"and {shares} bandwidth share(s)"
    )
    return Kill(index, victim.pid, at_s, held, shares)


def _watch_reclaim(
    kill: Kill,
    pool: BandwidthManager,
    conns: ConnectionLimiter,
    bw: dict[str, Any],
    holders: dict[int, int],
    t_s: float,
) -> float | None:
    """Seconds from the kill until nothing was held by the killed worker any
    more, once that is so; None before."""
    held, shares = held_by(kill.pid, bw, holders)
    if held == 0 and shares == 0:
        kill.back_at_s = t_s
        return t_s - kill.at_s
    if t_s - kill.at_s > PARENT_REAPS_AFTER_S and not kill.by_parent:
        # No refusal has triggered the automatic reclaim: do it by hand, as a
        # gunicorn master's child_exit would with reap_pid().
        kill.by_parent = True
        conns.reap_pid(kill.pid)
        pool.reap_pid(kill.pid)
    return None
