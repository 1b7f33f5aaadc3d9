"""What ``shmrate demo`` shows: the live frame, the plain lines, the summary,
and the rates they are computed from. Part of the command; it prints.

How rates are measured. A limiter admits what it refills, less what it still
holds: over an interval, admitted bytes = rate x time - the change in tokens
on hand (and in the part of a queued wait already paid, under one chunk). A
camera whose source kept its limiter empty at both ends of an interval therefore
shows exactly its allocation, up to a chunk, whoever pushed in between. The
summary counts those intervals only: not the start burst of a new limiter
(which starts full), nor the time a share sat unused after its pusher died.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._cli_view import n
from .bandwidth import BandwidthManager
from .connections import ConnectionLimiter

if TYPE_CHECKING:
    from ._cli_demo import Plan

__all__ = ["Events", "Kill", "Tally", "frame", "held_by", "intro", "line", "summary"]

# A camera released and allocated again between two samples gets a new row
# whose counters restart. Counting intervals only from a camera's third sample
# on makes that show as a counter that went down, never as a plausible rate:
# the old row had taken at least two intervals of bytes more than the new one
# can have.
STEADY_AFTER_SAMPLES = 3

# A camera steady for less than this is left out of the largest deviation: one
# chunk in a short measurement is a large fraction of it.
MIN_STEADY_S = 2.0


class Events(logging.Handler):
    """The view's event lines: the parent's own notes and the workers' logs."""

    def __init__(self, t0: float) -> None:
        super().__init__(logging.WARNING)
        self.t0 = t0
        self.lines: list[str] = []
        self.unseen = 0

    def note(self, text: str) -> None:
        self.lines.append(f"{time.monotonic() - self.t0:5.1f} s  {text}")
        self.unseen += 1

    def take_unseen(self) -> list[str]:
        new = self.lines[len(self.lines) - self.unseen :] if self.unseen else []
        self.unseen = 0
        return new

    def emit(self, record: logging.LogRecord) -> None:
        self.note(f"pid {os.getpid()} (parent): {record.getMessage()}")


# -- rates ---------------------------------------------------------------------


@dataclass
class Tally:
    """Rates from consecutive samples, and the steady totals for the summary."""

    plan: Plan
    t0: float
    prev: tuple[float, dict[str, Any], dict[str, Any]] | None = None
    ages: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    steady: dict[str, list[float]] = field(default_factory=dict)  # units, s
    steady_alloc_units: float = 0.0
    steady_units: float = 0.0
    refusal_rates: tuple[float, float] = (0.0, 0.0)

    def add(self, t: float, bw: dict[str, Any], cs: dict[str, Any]) -> None:
        streams = bw["streams"]
        ages: dict[str, int] = {}
        self.rates = {}
        if self.prev is not None:
            t_prev, bw_prev, cs_prev = self.prev
            dt = t - t_prev
            self.refusal_rates = (
                (cs["refused"] - cs_prev["refused"]) / dt,
                (bw["refused"] - bw_prev["refused"]) / dt,
            )
            for sid, e in streams.items():
                before = bw_prev["streams"].get(sid)
                if before is None:
                    continue
                units = e["allowed_units"] - before["allowed_units"]
                if units < 0:
                    ages[sid] = 0  # released and allocated again in between
                    continue
                ages[sid] = self.ages.get(sid, 0)
                if ages[sid] < STEADY_AFTER_SAMPLES:
                    continue
                if e["allocation"] != before["allocation"]:
                    continue
                chunk = self.plan.chunk_bytes
                if e["tokens"] >= chunk or before["tokens"] >= chunk:
                    continue  # not saturated at both ends: see the module doc
                self.rates[sid] = units / dt
                got = self.steady.setdefault(sid, [0.0, 0.0])
                got[0] += units
                got[1] += dt
                self.steady_units += units
                self.steady_alloc_units += e["allocation"] * dt
        self.ages = {sid: ages.get(sid, 0) + 1 for sid in streams}
        self.prev = (t, bw, cs)


@dataclass
class Kill:
    """The worker killed midway, what it held, and when all of it was back."""

    index: int
    pid: int
    at_s: float
    connections: int
    shares: int
    back_at_s: float | None = None
    by_parent: bool = False


def held_by(pid: int, bw: dict[str, Any], holders: dict[int, int]) -> tuple[int, int]:
    """(connections, bandwidth shares) that ``pid`` holds in these samples."""
    shares = sum(1 for e in bw["streams"].values() if e["pid"] == pid)
    return holders.get(pid, 0), shares


# -- output --------------------------------------------------------------------


def intro(
    plan: Plan, pool: BandwidthManager, conns: ConnectionLimiter, pids: list[Any]
) -> None:
    kill = f"at {plan.kill_at_s:.1f} s" if plan.kill_at_s else "never"
    print(
        "shmrate demo: a simulated ingest appliance, no server\n"
        f"  {plan.workers} worker processes {' '.join(map(str, pids))}, "
        f"{plan.handlers} connection handlers each\n"
        f"  {plan.streams} cameras, each allocated {n(plan.stream_bytes_per_second)} "
        f"B/s from a pool of {n(plan.pool_bytes_per_second)} B/s\n"
        f"  caps: {plan.max_per_stream} connections per camera, {plan.max_total} "
        "in total\n"
        f"  segments: {pool.name}, {conns.name} (try `shmrate top` meanwhile)\n"
        f"  the worker holding the most connections and shares is SIGKILLed {kill}\n",
        flush=True,
    )


def frame(
    plan: Plan,
    tally: Tally,
    bw: dict[str, Any],
    cs: dict[str, Any],
    t_s: float,
    procs: list[Any],
    events: Events,
) -> list[str]:
    alive = " ".join(str(p.pid) for p in procs if p.is_alive()) or "none"
    out = [
        f"{t_s:5.1f} s of {plan.duration_s:.1f}   workers alive: {alive}",
        f"  {'CAMERA':<8} {'CONNS':>6} {'ALLOC B/s':>11} {'RATE B/s':>11} "
        f"{'%':>5}  OWNER",
    ]
    conn_streams = cs["streams"]
    rate_sum = alloc_sum = 0.0
    for sid in plan.stream_ids:
        e = bw["streams"].get(sid)
        count = conn_streams.get(sid, {}).get("count", 0)
        conns_text = f"{count}/{plan.max_per_stream}"
        if e is None:
            out.append(f"  {sid:<8} {conns_text:>6} {'-':>11}")
            continue
        rate = tally.rates.get(sid)
        if rate is None:
            rate_text, pct = "starting", ""
        else:
            rate_text, pct = n(rate), f"{100 * rate / e['allocation']:.0f}%"
            rate_sum += rate
            alloc_sum += e["allocation"]
        out.append(
            f"  {sid:<8} {conns_text:>6} {n(e['allocation']):>11} {rate_text:>11} "
            f"{pct:>5}  {e['pid']}"
        )
    total_pct = f"{100 * rate_sum / alloc_sum:.0f}%" if alloc_sum else ""
    starting = len(bw["streams"]) - len(tally.rates)
    refused_conns, refused_allocs = tally.refusal_rates
    out += [
        f"  {'ALL':<8} {cs['total']:>3}/{plan.max_total:<2} {n(bw['allocated']):>11} "
        f"{n(rate_sum):>11} {total_pct:>5}  pool {n(bw['total'])} B/s"
        + (f"; RATE leaves out {starting} starting" if starting else ""),
        f"  refused: {n(cs['refused'])} connections ({refused_conns:.0f}/s), "
        f"{n(bw['refused'])} allocations ({refused_allocs:.0f}/s)   reclaimed: "
        f"{cs['reaped']} connections, {bw['reaped']} shares",
        "  events:",
        *[f"    {line}" for line in events.lines[-6:]],
    ]
    events.unseen = 0
    return out


def line(
    tally: Tally, bw: dict[str, Any], cs: dict[str, Any], t_s: float, events: Events
) -> str:
    new = events.take_unseen()
    rate = sum(tally.rates.values())
    alloc = sum(bw["streams"][s]["allocation"] for s in tally.rates)
    pushed = (
        f"{n(rate)} of {n(alloc)} B/s ({100 * rate / alloc:.1f}%)" if alloc else "-"
    )
    line = (
        f"{t_s:5.1f} s  {cs['total']} connections, {len(bw['streams'])} cameras; "
        f"{n(bw['allocated'])} of {n(bw['total'])} B/s allocated; steady cameras "
        f"push {pushed}; refused {n(cs['refused'])} "
        f"connections, {n(bw['refused'])} allocations; reclaimed {cs['reaped']} "
        f"connections, {bw['reaped']} shares"
    )
    return "\n".join([line, *[f"{e[:7]}  event: {e[9:]}" for e in new]])


def summary(
    plan: Plan,
    tally: Tally,
    kill: Kill | None,
    bw: dict[str, Any],
    cs: dict[str, Any],
    elapsed_s: float,
) -> None:
    print(
        f"\nsummary after {elapsed_s:.1f} s (steady intervals only: a new "
        "limiter's start burst is left out)"
    )
    print(f"  {'CAMERA':<8} {'CONFIGURED':>11} {'ACHIEVED':>11} {'DEVIATION':>10}  FOR")
    worst: tuple[float, str] | None = None
    short = []
    for sid in plan.stream_ids:
        units, secs = tally.steady.get(sid, (0.0, 0.0))
        if secs <= 0:
            print(f"  {sid:<8} {n(plan.stream_bytes_per_second):>11} {'-':>11}")
            continue
        achieved = units / secs
        dev = achieved / plan.stream_bytes_per_second - 1
        if secs < MIN_STEADY_S:
            short.append(sid)
        elif worst is None or abs(dev) > abs(worst[0]):
            worst = (dev, sid)
        print(
            f"  {sid:<8} {n(plan.stream_bytes_per_second):>11} {n(achieved):>11} "
            f"{100 * dev:>+9.2f}%  {secs:.1f} s"
        )
    if tally.steady_alloc_units:
        dev = tally.steady_units / tally.steady_alloc_units - 1
        print(
            f"  all cameras together: {n(tally.steady_units)} bytes pushed against "
            f"{n(tally.steady_alloc_units)} allocated ({100 * dev:+.2f}%)"
        )
    if worst is not None:
        others = (
            f"; not counting {', '.join(short)}, steady for under {MIN_STEADY_S:.0f} s"
            if short
            else ""
        )
        print(f"  largest deviation: {100 * worst[0]:+.2f}% ({worst[1]}{others})")
    else:
        print(
            "  largest deviation: none measured (no camera steady for "
            f"{MIN_STEADY_S:.0f} s)"
        )
    print(
        f"  connections: {n(cs['allowed'])} accepted, {n(cs['refused'])} refused "
        f"(caps: {plan.max_per_stream} per camera, {plan.max_total} in total)"
    )
    print(
        f"  allocations: {n(bw['allowed'])} granted, {n(bw['refused'])} refused "
        "(pool full)"
    )
    print(
        f"  reclaimed from dead processes: {cs['reaped']} connection(s), "
        f"{bw['reaped']} share(s); lock recoveries: "
        f"{cs['recoveries'] + bw['recoveries']}"
    )
    if kill is not None:
        print(
            f"  worker {kill.index} (pid {kill.pid}), SIGKILLed at {kill.at_s:.1f} s, "
            f"held {kill.connections} connection(s) and {kill.shares} share(s):"
        )
        if kill.back_at_s is None:
            print("    NOT all of it was back by the end")
        else:
            how = "reaped by the parent" if kill.by_parent else "reclaimed on its own"
            print(
                f"    all of it back {kill.back_at_s - kill.at_s:.1f} s later ({how})"
            )
    print(
        f"  left at the end: {cs['total']} connections, {n(bw['allocated'])} B/s "
        "allocated; the demo's segments are removed on exit"
    )
