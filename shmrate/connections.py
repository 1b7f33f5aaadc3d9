"""ConnectionLimiter: per-stream and host-wide connection caps for every process."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from time import monotonic_ns
from typing import Any

import numpy as np

from . import _check, _leases, _owner
from ._base import SharedObject
from ._layout import (
    H_ALLOWED,
    H_COUNT,
    H_LEASE_FREE,
    H_P0,
    H_REAPED,
    H_REFUSED,
    HEADER_BYTES,
    KIND_CONNECTIONS,
    L_OWNER,
    L_ROW,
    LEASE,
    LEASE_WORDS,
    S_ALLOWED,
    S_REFUSED,
    S_VALUE,
    STREAM_WORDS,
    WORD,
)
from ._segment import Segment, SegmentSpec, TransientViews
from ._streams import StreamTable

__all__ = ["ConnectionLimiter"]

_LIVE: weakref.WeakSet[ConnectionLimiter] = weakref.WeakSet()


def _forget_parents_leases() -> None:
    for limiter in _LIVE:
        limiter._mine = {}


os.register_at_fork(after_in_child=_forget_parents_leases)

log = logging.getLogger("shmrate")

_T0 = HEADER_BYTES // WORD
_I8 = np.dtype("<i8")
MAX_TOTAL = 1 << 20


def _places(max_total: int) -> tuple[int, int]:
    """First words of the lease table and of its free list."""
    leases = _T0 + StreamTable.words_for(max_total)
    return leases, leases + max_total * LEASE_WORDS


def _size(max_total: int) -> int:
    _, lease_free = _places(max_total)
    return (lease_free + max_total) * WORD


def _init_tables(max_total: int) -> Any:
    def init(words: memoryview) -> None:
        StreamTable.init(words, _T0, max_total)
        _, lease_free = _places(max_total)
        for i in range(max_total):
            words[lease_free + i] = max_total - 1 - i
        words[H_LEASE_FREE] = max_total

    return init


def _repair(words: memoryview) -> str:
    """Derive every count from the live leases (they are the truth).

    A lease is taken when its owner is written and given back when the owner
    is cleared; every other write of ``try_acquire`` and ``release`` (the
    stream row, the counts, the free lists) is derived here, so a holder that
    died between any two of them has taken or given back exactly that lease.
    """
    max_total = int(words[H_P0 + 1])
    if _size(max_total) != len(words) * WORD:
        return "left alone: its size does not match its layout"
    views = TransientViews(words)
    try:
        table = StreamTable(views, _T0, max_total)
        records = table.records
        first_lease, first_free = _places(max_total)
        leases = views.array(first_lease, LEASE, max_total)
        rows_of = leases["row"]
        held = leases["owner"] != 0
        counted = held & (rows_of >= 0) & (rows_of < max_total)
        counted[counted] = records["live"][rows_of[counted]] == 1
        # A lease whose stream row is not live cannot come from the writes
        # above (the row is made live first and freed last); only damage
        # leaves one, and it is dropped rather than trusted.
        dropped = int((held & ~counted).sum())
        leases["owner"][held & ~counted] = 0
        counts = np.bincount(rows_of[counted], minlength=max_total)
        records["value"] = counts
        records["live"] = counts > 0
        table.rebuild()
        # Free leases in descending order: pops hand out the lowest first.
        free = np.flatnonzero(leases["owner"] == 0)[::-1]
        views.array(first_free, _I8, max_total)[: len(free)] = free
        words[H_LEASE_FREE] = len(free)
        total = int(counts.sum())
        words[H_COUNT] = total
        return f"counts rebuilt from {total} live leases ({dropped} dropped)"
    finally:
        views.release()


class ConnectionLimiter(SharedObject):
    """Connection caps per stream and for the whole host, shared by all processes.

    ``try_acquire(stream_id)`` takes a slot if the stream has fewer than
    ``max_per_stream`` connections and the host fewer than ``max_total``;
    ``release(stream_id)`` gives one back. Each slot is a *lease* that records
    the process holding it, and the counts are always what the live leases
    say: a worker that dies holding connections does not keep them. They come
    back on ``reap()``, on ``reap_pid(pid)``, or by themselves when a request
    is refused (at most once a second, so refusals stay cheap).

    ``release`` gives back a lease of the calling process first; a process may
    also release a connection another process acquired (the oldest lease of
    that stream goes). Releasing a stream with no connections does nothing.

    Stream IDs are ``str`` of at most 128 bytes of UTF-8. Naming, opening,
    pickling and lifetime work as for :class:`~shmrate.TokenBucket`.
    """

    KIND = KIND_CONNECTIONS
    REPAIR = staticmethod(_repair)

    def __init__(
        self, max_per_stream: int, max_total: int, *, name: str | None = None
    ) -> None:
        per_stream = _check.amount(max_per_stream, "max_per_stream")
        total = _check.amount(max_total, "max_total")
        if not 1 <= total <= MAX_TOTAL:
            raise ValueError(
                f"shmrate: max_total must be 1 to {MAX_TOTAL}, got {max_total}"
            )
        spec = SegmentSpec(
            KIND_CONNECTIONS, _size(total), (per_stream, total), _init_tables(total)
        )
        self._attach(name, spec)
        if (self.max_per_stream, self.max_total) != (per_stream, total):
            log.warning(
                "%s exists with max_per_stream=%d, max_total=%d; kept those "
                "(asked for %d, %d)",
                self._seg.label,
                self.max_per_stream,
                self.max_total,
                per_stream,
                total,
            )

    def _bind(self, seg: Segment) -> None:
        super()._bind(seg)
        self.max_per_stream = seg.param(0)
        self.max_total = seg.param(1)
        if not 1 <= self.max_total <= MAX_TOTAL or _size(self.max_total) != seg.size:
            raise seg.refuse(
                f"is {seg.size} bytes, which does not match its max_total "
                f"{self.max_total}"
            )
        self._table = StreamTable(seg, _T0, self.max_total)
        first_lease, first_free = _places(self.max_total)
        self._leases = seg.view(first_lease, self.max_total * LEASE_WORDS)
        self._lease_free = seg.view(first_free, self.max_total)
        self._lease_records = seg.array(first_lease, LEASE, self.max_total)
        # This process's leases by stream key, so release() finds its own
        # first without a scan. A forked child starts with none of its own.
        self._mine: dict[bytes, list[int]] = {}
        _LIVE.add(self)

    # -- acquire and release ----------------------------------------------------

    def try_acquire(self, stream_id: str) -> bool:
        """Take a connection slot for ``stream_id`` if both caps allow it."""
        table = self._table
        key, h = table.lookup_key(stream_id)
        words, rows, leases = self._words, table.rows, self._leases
        reap_due = False
        self._acquire()
        try:
            r = table.find(key, h)
            count = rows[r * STREAM_WORDS + S_VALUE] if r >= 0 else 0
            if count >= self.max_per_stream or words[H_COUNT] >= self.max_total:
                words[H_REFUSED] += 1
                if r >= 0:
                    rows[r * STREAM_WORDS + S_REFUSED] += 1
                reap_due = _leases.auto_reap_due(words, monotonic_ns())
                lease = -1
            else:
                if r < 0:
                    r = table.insert(key, h)  # never full: rows == max_total
                top = words[H_LEASE_FREE] - 1
                lease = self._lease_free[top]
                words[H_LEASE_FREE] = top
                # The owner after the row: writing it takes the slot.
                leases[lease * LEASE_WORDS + L_ROW] = r
                leases[lease * LEASE_WORDS + L_OWNER] = _owner._token
                rows[r * STREAM_WORDS + S_VALUE] = count + 1
                rows[r * STREAM_WORDS + S_ALLOWED] += 1
                words[H_COUNT] += 1
                words[H_ALLOWED] += 1
        finally:
            self._release()
        if lease >= 0:
            self._mine.setdefault(key, []).append(lease)
            return True
        # Refused: perhaps because dead processes hold slots. Reclaim them
        # (at most once a second host-wide) and try once more.
        return reap_due and self.reap() > 0 and self.try_acquire(stream_id)

    def release(self, stream_id: str) -> None:
        """Give back one connection of ``stream_id`` (this process's first)."""
        table = self._table
        key, h = table.lookup_key(stream_id)
        mine = self._mine.get(key)
        token = _owner._token
        self._acquire()
        try:
            r = table.find(key, h)
            if r < 0:
                return
            lease = -1
            while mine:
                candidate = mine.pop()
                b = candidate * LEASE_WORDS
                if self._leases[b + L_OWNER] == token and self._leases[b + L_ROW] == r:
                    lease = candidate
                    break
            if lease < 0:
                lease = self._any_lease_of(r)
            self._free_lease(lease, r)
        finally:
            self._release()

    def _any_lease_of(self, r: int) -> int:
        records = self._lease_records
        hits = (records["row"] == r) & (records["owner"] != 0)
        return int(hits.nonzero()[0][0])

    def _free_lease(self, lease: int, r: int) -> None:
        """Free ``lease`` of stream row ``r``. Caller holds the lock.

        Clearing the owner gives the slot back (see ``_repair``); the rest
        follows from it.
        """
        words, rows = self._words, self._table.rows
        self._leases[lease * LEASE_WORDS + L_OWNER] = 0
        top = words[H_LEASE_FREE]
        self._lease_free[top] = lease
        words[H_LEASE_FREE] = top + 1
        count = rows[r * STREAM_WORDS + S_VALUE] - 1
        rows[r * STREAM_WORDS + S_VALUE] = count
        words[H_COUNT] -= 1
        if count <= 0:
            self._table.delete(r)

    @contextlib.contextmanager
    def connection(self, stream_id: str) -> Iterator[bool]:
        """``with limiter.connection(sid) as ok:`` holds one slot if ``ok``,
        and gives it back on leaving the block, exceptions included."""
        ok = self.try_acquire(stream_id)
        try:
            yield ok
        finally:
            if ok:
                self.release(stream_id)

    # -- counts ----------------------------------------------------------------

    def get_count(self, stream_id: str) -> int:
        """Connections ``stream_id`` holds now, across all processes."""
        key, h = self._table.lookup_key(stream_id)
        with self._seg.locked():
            r = self._table.find(key, h)
            return int(self._table.rows[r * STREAM_WORDS + S_VALUE]) if r >= 0 else 0

    def get_total(self) -> int:
        """Connections of all streams now."""
        with self._seg.locked() as words:
            return int(words[H_COUNT])

    def streams(self) -> dict[str, int]:
        """Every stream holding connections, with its count."""
        table = self._table
        with self._seg.locked():
            return {
                table.key_of(r): int(table.rows[r * STREAM_WORDS + S_VALUE])
                for r in table.live_rows()
            }

    def stats(self) -> dict[str, Any]:
        """A snapshot, exact across all processes.

        ``allowed``/``refused`` count ``try_acquire`` outcomes, ``reaped`` the
        leases reclaimed from dead processes, ``recoveries`` the locks taken
        over from dead holders; ``total`` is the connections held now, and
        ``streams`` maps each stream holding connections to its ``count``,
        ``allowed`` and ``refused``.
        """
        table = self._table
        rows = table.rows
        with self._seg.locked():
            snap: dict[str, Any] = self._header_stats()
            snap["total"] = int(self._words[H_COUNT])
            snap["max_total"] = self.max_total
            snap["max_per_stream"] = self.max_per_stream
            snap["streams"] = {
                table.key_of(r): {
                    "count": int(rows[r * STREAM_WORDS + S_VALUE]),
                    "allowed": int(rows[r * STREAM_WORDS + S_ALLOWED]),
                    "refused": int(rows[r * STREAM_WORDS + S_REFUSED]),
                }
                for r in table.live_rows()
            }
        return snap

    def holders(self) -> dict[int, int]:
        """Connections held per pid."""
        with self._seg.locked():
            owners = self._lease_records["owner"].copy()
        held: dict[int, int] = {}
        for token in owners[owners != 0]:
            pid = _owner.pid_of(int(token))
            held[pid] = held.get(pid, 0) + 1
        return held

    # -- reclaiming --------------------------------------------------------------

    def reap(self) -> int:
        """Free the leases of dead processes; returns how many were freed."""
        return self._reap(None)

    def reap_pid(self, pid: int) -> int:
        """Free the leases of ``pid``, which the caller knows has exited
        (a gunicorn master's ``child_exit`` hook). Returns how many."""
        return self._reap(_check.amount(pid, "pid"))

    def _reap(self, pid: int | None) -> int:
        with self._seg.locked():
            owners = self._lease_records["owner"].copy()
        dead = _leases.dead_owners(owners, pid)
        if not dead:
            return 0
        freed: dict[int, int] = {}
        with self._seg.locked() as words:
            for lease in range(self.max_total):
                b = lease * LEASE_WORDS
                owner = self._leases[b + L_OWNER]
                if owner in dead:
                    self._free_lease(lease, self._leases[b + L_ROW])
                    freed[owner] = freed.get(owner, 0) + 1
            words[H_REAPED] += sum(freed.values())
        for owner, n in freed.items():
            log.warning(
                "%s: reclaimed %d connection(s) of pid %d, which exited",
                self._seg.label,
                n,
                _owner.pid_of(owner),
            )
        return sum(freed.values())

    def __repr__(self) -> str:
        if self._seg.closed:
            return f"<ConnectionLimiter {self.name!r} closed>"
        return (
            f"<ConnectionLimiter {self.name!r} total={self._seg.words[H_COUNT]}"
            f"/{self.max_total} per_stream<={self.max_per_stream}>"
        )
