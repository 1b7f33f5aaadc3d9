"""What the ``shmrate`` command shows: text for list, show and top, and the
screen that redraws a live view in place. Part of the command, like ``cli.py``:
the functions here build lines, and only :class:`Screen` writes them.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from ._inspect import DEV_SHM, SegmentInfo, Snapshot, process_name

__all__ = [
    "Rates",
    "Screen",
    "deferred_interrupts",
    "level",
    "pids",
    "show_lines",
    "size",
    "top_block",
]


def n(x: float) -> str:
    """A whole number with thousands separators."""
    return f"{round(x):,}"


def size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    if nbytes < 1024:
        return f"{nbytes} B"
    x = nbytes / 1024
    for unit in ("KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def _count(k: int, what: str) -> str:
    return f"{k} {what}" if k == 1 else f"{k} {what}s"


def pids(held: dict[int, int]) -> str:
    """``1234x3 1240x1``: pids and how many leases each holds."""
    return " ".join(f"{p}x{k}" for p, k in sorted(held.items())) or "-"


def level(snap: Snapshot) -> str:
    """The one-line state of a segment, for ``list``."""
    s, seg = snap.stats, snap.segment
    if s is None:
        h = seg.header
        return (
            f"count {n(h['count'])}, allowed {n(h['allowed'])}, "
            f"refused {n(h['refused'])} (header only)"
        )
    if "max_total" in s:
        return (
            f"{n(s['total'])}/{n(s['max_total'])} connections, "
            f"{_count(len(s['streams']), 'stream')} "
            f"(<= {n(s['max_per_stream'])} each)"
        )
    if "allocated" in s:
        return (
            f"{n(s['allocated'])}/{n(s['total'])} B/s allocated, "
            f"{_count(len(s['streams']), 'stream')}"
        )
    return f"{n(s['rate'])}/s, {n(s['tokens'])}/{n(s['capacity'])} tokens"


def _created(ns: int) -> str:
    when = datetime.datetime.fromtimestamp(ns / 1e9)
    return when.isoformat(sep=" ", timespec="seconds")


def show_lines(snap: Snapshot, attached: Iterable[int]) -> list[str]:
    """Everything about one segment, for ``show``."""
    seg, s = snap.segment, snap.stats
    out = [
        f"{seg.kind_name} {seg.name!r}",
        f"  file        {DEV_SHM}/{seg.id} ({size(seg.size_bytes)}, uid {seg.uid})",
        f"  created     {_created(seg.created_ns)}",
        f"  level       {level(snap)}",
    ]
    h = seg.header
    if s is not None and "rate" in s:
        out.append(f"  counters    {_bucket_counters(s)}")
        out.append(f"              lock recoveries {n(s['recoveries'])}")
    else:
        out.append(
            f"  counters    allowed {n(h['allowed'])}, refused {n(h['refused'])}, "
            f"leases reaped {n(h['reaped'])}, lock recoveries {n(h['recoveries'])}"
        )
    if s is None:
        out.append(
            f"  header      count {n(h['count'])}, evictions {n(h['evictions'])}, "
            f"params {list(seg.params)} (a kind this shmrate does not know)"
        )
    out.append(f"  leases      {_holder_text(snap)}")
    procs = [f"{p} ({process_name(p)})" for p in sorted(attached)]
    out.append(f"  attached    {', '.join(procs) or '-'}")
    if s is not None and "streams" in s:
        out.append("")
        out += _stream_table(s)
    return out


def _holder_text(snap: Snapshot) -> str:
    if not snap.holders:
        return "-"
    text = pids(snap.live_holders)
    if snap.dead_holders:
        text += f"; exited, not reaped yet: {pids(snap.dead_holders)}"
    return text


def _bucket_counters(s: dict[str, Any]) -> str:
    return (
        f"allowed {n(s['allowed_calls'])} calls/{n(s['allowed_units'])} units, "
        f"refused {n(s['refused_calls'])}/{n(s['refused_units'])}, "
        f"waits {n(s['waits'])} ({s['waited_ns'] / 1e9:.3f} s)"
    )


def _stream_table(s: dict[str, Any]) -> list[str]:
    streams: dict[str, dict[str, int]] = s["streams"]
    if "max_total" in s:
        rows = [f"  {'STREAM':<24} {'CONNS':>6} {'ALLOWED':>10} {'REFUSED':>10}"]
        for sid, e in sorted(streams.items()):
            rows.append(
                f"  {sid:<24} {e['count']:>6} {n(e['allowed']):>10} "
                f"{n(e['refused']):>10}"
            )
    else:
        rows = [
            f"  {'STREAM':<24} {'ALLOC B/s':>12} {'TOKENS':>12} {'ALLOWED B':>14} "
            f"{'REFUSED':>8} {'WAITS':>7} {'PID':>7}"
        ]
        for sid, e in sorted(streams.items()):
            rows.append(
                f"  {sid:<24} {n(e['allocation']):>12} {n(e['tokens']):>12} "
                f"{n(e['allowed_units']):>14} {n(e['refused_calls']):>8} "
                f"{n(e['waits']):>7} {e['pid']:>7}"
            )
    if not streams:
        rows.append("  (no streams)")
    return rows


# -- rates between two snapshots -----------------------------------------------


@dataclass
class Rates:
    """Per-second rates of a segment's counters between two snapshots.

    A counter that went down belongs to a stream row that was released and
    taken again in between: it has no rate (None), like a stream seen for the
    first time.
    """

    cur: dict[str, Any]
    prev: dict[str, Any] | None
    dt_s: float

    def of(self, key: str) -> float | None:
        if self.prev is None or key not in self.prev or self.dt_s <= 0:
            return None
        d = self.cur[key] - self.prev[key]
        return d / self.dt_s if d >= 0 else None

    def stream(self, sid: str, key: str) -> float | None:
        if self.prev is None or self.dt_s <= 0:
            return None
        before = self.prev.get("streams", {}).get(sid)
        if before is None:
            return None
        d = self.cur["streams"][sid][key] - before[key]
        return d / self.dt_s if d >= 0 else None


def per_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x < 100 else n(x)


def pct(x: float | None, of: int) -> str:
    if x is None or of <= 0:
        return "-"
    return f"{100 * x / of:.0f}%"


def top_block(snap: Snapshot, r: Rates) -> list[str]:
    """A segment's lines in ``top``: levels, and rates since the last frame."""
    seg, s = snap.segment, snap.stats
    title = f"{seg.kind_name} {seg.name!r}"
    reaped = f"reaped {n(seg.header['reaped'])}"
    held = f"leases {pids(snap.live_holders)}"
    if s is None:
        return [
            f"{title}  count {n(seg.header['count'])}  allowed "
            f"{per_s(r.of('allowed'))}/s  refused {per_s(r.of('refused'))}/s  "
            f"{reaped}  (header only)"
        ]
    if "max_total" in s:
        out = [
            f"{title}  {n(s['total'])}/{n(s['max_total'])} connections  accepted "
            f"{per_s(r.of('allowed'))}/s  refused {per_s(r.of('refused'))}/s  "
            f"{reaped}  {held}",
            f"  {'STREAM':<24} {'CONNS':>9} {'ACCEPTED/s':>11} {'REFUSED/s':>10}",
        ]
        for sid, e in sorted(s["streams"].items()):
            out.append(
                f"  {sid:<24} {e['count']:>4}/{s['max_per_stream']:<4} "
                f"{per_s(r.stream(sid, 'allowed')):>11} "
                f"{per_s(r.stream(sid, 'refused')):>10}"
            )
        return out
    if "allocated" in s:
        out = [
            f"{title}  {n(s['allocated'])}/{n(s['total'])} B/s allocated  "
            f"allocations refused {per_s(r.of('refused'))}/s  {reaped}  {held}",
            f"  {'STREAM':<24} {'ALLOC B/s':>12} {'RATE B/s':>12} {'%':>5} "
            f"{'REFUSED/s':>10} {'WAITS/s':>8} {'PID':>7}",
        ]
        for sid, e in sorted(s["streams"].items()):
            rate = r.stream(sid, "allowed_units")
            out.append(
                f"  {sid:<24} {n(e['allocation']):>12} {per_s(rate):>12} "
                f"{pct(rate, e['allocation']):>5} "
                f"{per_s(r.stream(sid, 'refused_calls')):>10} "
                f"{per_s(r.stream(sid, 'waits')):>8} {e['pid']:>7}"
            )
        return out
    rate = r.of("allowed_units")
    return [
        f"{title}  rate {n(s['rate'])}/s  tokens {n(s['tokens'])}/{n(s['capacity'])}"
        f"  admitted {per_s(rate)}/s ({pct(rate, s['rate'])})  refused "
        f"{per_s(r.of('refused_calls'))}/s  waits {per_s(r.of('waits'))}/s"
    ]


def problem_line(seg: SegmentInfo, reason: str) -> str:
    return f"{seg.kind_name} {seg.label!r}  ! {reason}"


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while shared state is read.

    A read takes the segment's lock. Interrupted between taking and giving it
    back, this process would keep the lock until it exits, and the workers
    using the segment would stall until one of them takes it over. Blocked
    signals stay pending and arrive the moment the read is done.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- the screen ----------------------------------------------------------------


class Screen:
    """Writes frames: redrawn in place on a terminal, appended elsewhere.

    ``full`` clears the whole screen for each frame (``top``); otherwise only
    the lines of the last frame are redrawn, so what was printed before stays
    (the demo). Lines are cut to the terminal's width, since a wrapped line
    would throw the count of lines to redraw off.
    """

    def __init__(self, out: TextIO, *, live: bool, full: bool) -> None:
        self.out = out
        self.live = live
        self.full = full
        self._height = 0

    def draw(self, lines: list[str]) -> None:
        if not self.live:
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
            return
        width = shutil.get_terminal_size().columns
        lines = [ln[: width - 1] for ln in lines]
        if self.full:
            head = "\x1b[H\x1b[J"  # home, clear to the end of the screen
        elif self._height:
            head = f"\x1b[{self._height}F\x1b[J"  # up to the frame's first line
        else:
            head = "\x1b[?25l"  # hide the cursor while frames are drawn
        if self.full and not self._height:
            head = "\x1b[?25l" + head
        self.out.write(head + "\n".join(lines) + "\n")
        self.out.flush()
        self._height = len(lines)

    def close(self) -> None:
        """Leave the last frame standing and give the cursor back."""
        if self.live and self._height:
            self.out.write("\x1b[?25h")
            self.out.flush()
