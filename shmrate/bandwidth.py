"""BandwidthManager: a pool of bytes per second shared out to streams."""

from __future__ import annotations

import logging
from time import monotonic_ns
from typing import Any

from . import _bucket, _check, _leases, _owner
from ._base import SharedObject
from ._layout import (
    B_GEN,
    B_OWNER_ROW,
    BUCKET,
    BUCKET_WORDS,
    H_ALLOWED,
    H_COUNT,
    H_NEXT_GEN,
    H_P0,
    H_REAPED,
    H_REFUSED,
    HEADER_BYTES,
    KIND_BANDWIDTH,
    S_ALLOWED,
    S_OWNER,
    S_REFUSED,
    S_VALUE,
    STREAM_WORDS,
    WORD,
)
from ._segment import Segment, SegmentSpec, TransientViews
from ._streams import StreamTable
from .errors import CapacityError, StaleLimiter
from .token_bucket import TokenBucket, bucket_stats

__all__ = ["BandwidthManager"]

log = logging.getLogger("shmrate")

_T0 = HEADER_BYTES // WORD
MAX_STREAMS = 1 << 20


def _first_bucket(max_streams: int) -> int:
    return _T0 + StreamTable.words_for(max_streams)


def _size(max_streams: int) -> int:
    return (_first_bucket(max_streams) + max_streams * BUCKET_WORDS) * WORD


def _init_tables(max_streams: int) -> Any:
    def init(words: memoryview) -> None:
        StreamTable.init(words, _T0, max_streams)
        words[H_NEXT_GEN] = 1

    return init


def _repair(words: memoryview) -> str:
    """Rebuild the index, the limiters and the allocated sum from the rows.

    A live stream row counts only if its owner and its limiter's generation
    are both written: those are the last writes of a new allocation and the
    generation is the first one a release clears, so a row missing either
    is an allocation or a release cut short by its holder's death. No one
    was handed the new limiter, and the released one's handles are already
    refused; the row is dropped, which returns its share to the pool.
    """
    max_streams = int(words[H_P0 + 1])
    if _size(max_streams) != len(words) * WORD:
        return "left alone: its size does not match its layout"
    views = TransientViews(words)
    try:
        table = StreamTable(views, _T0, max_streams)
        records = table.records
        gens = views.array(_first_bucket(max_streams), BUCKET, max_streams)["gen"]
        torn = (records["live"] == 1) & ((gens == 0) | (records["owner"] <= 0))
        records["live"][torn] = 0
        records["value"][records["live"] != 1] = 0
        table.rebuild()
        live = table.live_rows()
        gens[records["live"] != 1] = 0  # a released stream's limiters stay refused
        buckets = views.view(_first_bucket(max_streams), max_streams * BUCKET_WORDS)
        now = monotonic_ns()
        fixed: list[str] = []
        for r in live:
            row = buckets[r * BUCKET_WORDS : (r + 1) * BUCKET_WORDS]
            fixed += _bucket.repair_row(row, now)
            row[B_OWNER_ROW] = r
            row.release()
        words[H_COUNT] = int(records["value"][live].sum())
        # Generations are never handed out twice, or a stale limiter handle
        # could pass for the stream that takes its row next.
        words[H_NEXT_GEN] = max(int(words[H_NEXT_GEN]), int(gens.max()) + 1)
        n_torn = int(torn.sum())
        return (
            f"index and allocations rebuilt from {len(live)} streams"
            + (f" ({n_torn} torn, dropped)" if n_torn else "")
            + "; "
            + (", ".join(sorted(set(fixed))) or "limiters intact")
        )
    finally:
        views.release()


class BandwidthManager(SharedObject):
    """A pool of ``total_bytes_per_second`` shared out to streams.

    ``allocate_bandwidth(stream_id, bytes_per_second)`` takes that much of the
    pool for the stream and returns its limiter: a :class:`TokenBucket` that
    lives in the manager's segment, so every process asking for the stream's
    limiter (``get_limiter``) gets the same bucket. Allocating a stream that
    already has a share changes the share, and its limiter's rate, if the pool
    covers the difference. ``release_bandwidth`` returns the share; limiters of
    a released stream raise :class:`~shmrate.StaleLimiter` instead of
    throttling whatever stream takes the row next.

    An allocation belongs to the process that made it last; when that process
    dies, the share returns to the pool on ``reap()``, ``reap_pid(pid)`` or the
    next refusal (at most once a second). At every moment the available
    bandwidth plus the allocations equals the total.

    The stream table holds ``max_streams`` rows; a full table raises
    :class:`~shmrate.CapacityError` and overwrites nothing.
    """

    KIND = KIND_BANDWIDTH
    REPAIR = staticmethod(_repair)

    def __init__(
        self,
        total_bytes_per_second: int,
        *,
        name: str | None = None,
        max_streams: int = 1024,
    ) -> None:
        total = _check.rate(total_bytes_per_second, "total_bytes_per_second")
        rows = _check.amount(max_streams, "max_streams")
        if not 1 <= rows <= MAX_STREAMS:
            raise ValueError(
                f"shmrate: max_streams must be 1 to {MAX_STREAMS}, got {max_streams}"
            )
        spec = SegmentSpec(
            KIND_BANDWIDTH, _size(rows), (total, rows), _init_tables(rows)
        )
        self._attach(name, spec)
        if (self.total, self.max_streams) != (total, rows):
            log.warning(
                "%s exists with total=%d, max_streams=%d; kept those "
                "(asked for %d, %d)",
                self._seg.label,
                self.total,
                self.max_streams,
                total,
                rows,
            )

    def _bind(self, seg: Segment) -> None:
        super()._bind(seg)
        self.total = seg.param(0)
        self.max_streams = seg.param(1)
        rows = self.max_streams
        if not 1 <= rows <= MAX_STREAMS or _size(rows) != seg.size:
            raise seg.refuse(
                f"is {seg.size} bytes, which does not match its max_streams {rows}"
            )
        self._table = StreamTable(seg, _T0, self.max_streams)
        self._first_bucket = _first_bucket(self.max_streams)
        self._buckets = seg.view(self._first_bucket, self.max_streams * BUCKET_WORDS)
        # Limiter handles this process made, by stream row: reused while the
        # row's generation is unchanged.
        self._limiters: dict[int, TokenBucket] = {}

    # -- allocations -------------------------------------------------------------

    def allocate_bandwidth(
        self, stream_id: str, bytes_per_second: int
    ) -> tuple[TokenBucket | None, bool]:
        """Give ``stream_id`` a share of the pool and return its limiter.

        Returns ``(limiter, True)``, or ``(None, False)`` if the pool cannot
        cover the share (or the change of share). A new stream's limiter
        starts full, with capacity ``max(bytes_per_second, 1024)``.
        """
        table = self._table
        key, h = table.lookup_key(stream_id)
        rate = _check.rate(bytes_per_second)
        words, rows = self._words, table.rows
        refused = ""
        self._acquire()
        try:
            now = monotonic_ns()
            r = table.find(key, h)
            old = rows[r * STREAM_WORDS + S_VALUE] if r >= 0 else 0
            if rate - old > self.total - words[H_COUNT]:
                refused = "pool"
            elif r < 0 and not table.has_room():
                refused = "table"
            if refused:
                words[H_REFUSED] += 1
                if r >= 0:
                    rows[r * STREAM_WORDS + S_REFUSED] += 1
                reap_due = _leases.auto_reap_due(words, now)
            else:
                # Write order (a holder may die between any two writes; the
                # repair derives the pool sum from the rows): a new stream
                # counts once its owner is written, after its limiter; a
                # changed share is recorded before its limiter speeds up and
                # after it slows down, so a torn change never lets the
                # stream run faster than the share the pool accounts for.
                if r < 0:
                    r = table.insert(key, h)
                    base = r * STREAM_WORDS
                    gen = words[H_NEXT_GEN]
                    words[H_NEXT_GEN] = gen + 1
                    bucket = self._bucket(r)
                    _bucket.init_row(bucket, rate, now, gen)
                    bucket[B_OWNER_ROW] = r
                    rows[base + S_VALUE] = rate
                else:
                    base = r * STREAM_WORDS
                    bucket = self._bucket(r)
                    gen = bucket[B_GEN]
                    if rate > old:
                        rows[base + S_VALUE] = rate
                        _bucket.set_rate(bucket, rate, now)
                    else:
                        _bucket.set_rate(bucket, rate, now)
                        rows[base + S_VALUE] = rate
                bucket.release()
                rows[base + S_OWNER] = _owner._token
                rows[base + S_ALLOWED] += 1
                words[H_COUNT] += rate - old
                words[H_ALLOWED] += 1
        finally:
            self._release()
        if not refused:
            return self._limiter(r, gen, stream_id), True
        # Dead processes may hold what is missing: reclaim (at most once a
        # second host-wide) and try once more.
        if reap_due and self._reap(None)[0] > 0:
            return self.allocate_bandwidth(stream_id, bytes_per_second)
        if refused == "table":
            raise self._full_error()
        return None, False

    def release_bandwidth(self, stream_id: str) -> None:
        """Return ``stream_id``'s share to the pool (nothing if it has none)."""
        table = self._table
        key, h = table.lookup_key(stream_id)
        self._acquire()
        try:
            r = table.find(key, h)
            if r >= 0:
                self._release_row(r)
        finally:
            self._release()

    def _release_row(self, r: int) -> None:
        """Caller holds the lock. The limiter's generation first: from that
        write on its handles are refused, and a holder that dies after it
        leaves a row the repair drops, returning the share. (Clearing the
        share first would free it for others while the limiter still ran.)"""
        table = self._table
        self._buckets[r * BUCKET_WORDS + B_GEN] = 0
        self._words[H_COUNT] -= table.rows[r * STREAM_WORDS + S_VALUE]
        table.rows[r * STREAM_WORDS + S_VALUE] = 0
        table.delete(r)
        self._limiters.pop(r, None)

    def get_available_bandwidth(self) -> int:
        """The total minus everything allocated, in bytes per second."""
        with self._seg.locked() as words:
            return int(self.total - words[H_COUNT])

    def get_allocation(self, stream_id: str) -> int:
        """The share of ``stream_id`` in bytes per second (0 if none)."""
        table = self._table
        key, h = table.lookup_key(stream_id)
        with self._seg.locked():
            r = table.find(key, h)
            return int(table.rows[r * STREAM_WORDS + S_VALUE]) if r >= 0 else 0

    def get_limiter(self, stream_id: str) -> TokenBucket | None:
        """The limiter of ``stream_id`` (the same bucket in every process)."""
        table = self._table
        key, h = table.lookup_key(stream_id)
        with self._seg.locked():
            r = table.find(key, h)
            gen = self._buckets[r * BUCKET_WORDS + B_GEN] if r >= 0 else 0
        return self._limiter(r, gen, stream_id) if gen else None

    def streams(self) -> dict[str, int]:
        """Every stream with a share, with its bytes per second."""
        table = self._table
        with self._seg.locked():
            return {
                table.key_of(r): int(table.rows[r * STREAM_WORDS + S_VALUE])
                for r in table.live_rows()
            }

    def stats(self) -> dict[str, Any]:
        """A snapshot, exact across all processes.

        ``allowed``/``refused`` count ``allocate_bandwidth`` outcomes,
        ``reaped`` the streams reclaimed from dead owners, ``recoveries`` the
        locks taken over from dead holders; ``allocated`` and ``available``
        are bytes/s now. ``streams`` maps each stream to its ``allocation``,
        its owner ``pid`` and its limiter's counters and levels (as
        :meth:`TokenBucket.stats`).
        """
        table = self._table
        rows = table.rows
        now = monotonic_ns()
        with self._seg.locked():
            snap: dict[str, Any] = self._header_stats()
            snap["total"] = self.total
            snap["allocated"] = int(self._words[H_COUNT])
            snap["available"] = self.total - snap["allocated"]
            streams = {}
            for r in table.live_rows():
                bucket = self._bucket(r)
                _bucket.refill(bucket, now)
                entry: dict[str, int] = {
                    "allocation": int(rows[r * STREAM_WORDS + S_VALUE]),
                    "pid": _owner.pid_of(int(rows[r * STREAM_WORDS + S_OWNER])),
                }
                entry.update(bucket_stats(bucket))
                bucket.release()
                streams[table.key_of(r)] = entry
            snap["streams"] = streams
        return snap

    def _limiter(self, r: int, gen: int, stream_id: str) -> TokenBucket:
        limiter = self._limiters.get(r)
        if limiter is None or limiter._gen != gen:
            limiter = TokenBucket._on_row(
                self._seg,
                self._first_bucket + r * BUCKET_WORDS,
                gen,
                stream_id,
                reopen=(_limiter_by_name, (self.name, stream_id)),
            )
            self._limiters[r] = limiter
        return limiter

    def _bucket(self, r: int) -> memoryview:
        return self._buckets[r * BUCKET_WORDS : (r + 1) * BUCKET_WORDS]

    def _full_error(self) -> CapacityError:
        return CapacityError(
            f"shmrate: BandwidthManager {self.name!r}: all {self.max_streams} stream "
            "rows are in use; release streams or create it with more max_streams"
        )

    # -- reclaiming --------------------------------------------------------------

    def reap(self) -> int:
        """Return the shares of dead processes to the pool.

        Returns the bytes per second reclaimed.
        """
        return self._reap(None)[1]

    def reap_pid(self, pid: int) -> int:
        """Return the shares of ``pid``, which the caller knows has exited.

        Returns the bytes per second reclaimed."""
        return self._reap(_check.amount(pid, "pid"))[1]

    def _reap(self, pid: int | None) -> tuple[int, int]:
        """(streams, bytes/s) taken back from dead owners."""
        table = self._table
        with self._seg.locked():
            owners = table.records["owner"][table.records["live"] == 1].copy()
        dead = _leases.dead_owners(owners, pid)
        if not dead:
            return 0, 0
        freed: dict[int, list[int]] = {}
        with self._seg.locked() as words:
            for r in table.live_rows():
                owner = table.rows[r * STREAM_WORDS + S_OWNER]
                if owner in dead:
                    freed.setdefault(owner, []).append(
                        int(table.rows[r * STREAM_WORDS + S_VALUE])
                    )
                    self._release_row(r)
            words[H_REAPED] += sum(len(v) for v in freed.values())
        for owner, shares in freed.items():
            log.warning(
                "%s: reclaimed %d stream(s), %d bytes/s, of pid %d, which exited",
                self._seg.label,
                len(shares),
                sum(shares),
                _owner.pid_of(owner),
            )
        return sum(len(v) for v in freed.values()), sum(sum(v) for v in freed.values())

    def close(self) -> None:
        """Detach this process (its limiters too). Safe to call twice."""
        self._limiters.clear()
        self._seg.close()

    def __repr__(self) -> str:
        if self._seg.closed:
            return f"<BandwidthManager {self.name!r} closed>"
        return (
            f"<BandwidthManager {self.name!r} allocated={self._words[H_COUNT]}"
            f"/{self.total} B/s>"
        )


def _limiter_by_name(manager: str, stream_id: str) -> TokenBucket:
    """Unpickle a stream limiter: open its manager and ask for the stream."""
    mgr = BandwidthManager.open(manager)
    limiter = mgr.get_limiter(stream_id)
    if limiter is None:
        mgr.close()
        raise StaleLimiter(
            f"shmrate: stream {stream_id!r} has no bandwidth in {manager!r} any more"
        )
    limiter._owns = True  # the handle keeps the manager's mapping alive
    return limiter
