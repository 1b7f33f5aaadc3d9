"""TokenBucket: one token bucket that every process on the host shares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator
from time import monotonic_ns
from typing import Any

import posix_ipc

from . import _bucket, _check, _owner
from ._layout import (
    B_ALLOWED_CALLS,
    B_ALLOWED_UNITS,
    B_CAP,
    B_GEN,
    B_LAST,
    B_RATE,
    B_REFUSED_CALLS,
    B_REFUSED_UNITS,
    B_TOKENS,
    B_WAITED_NS,
    B_WAITS,
    BUCKET,
    BUCKET_WORDS,
    H_HOLDER,
    H_RECOVERIES,
    HEADER_BYTES,
    KIND_BUCKET,
    MT,
    NS_PER_MS,
    WORD,
)
from ._lock import LOCK_SLICE_S, SLOW
from ._segment import Segment, SegmentSpec
from .errors import ClosedError, StaleLimiter, WaitTimeout

__all__ = ["TokenBucket"]

log = logging.getLogger("shmrate")

# A long wait sleeps at most this long at a time, then recomputes its wake-up
# time, so that a set_rate() from another process is honoured within it.
WAIT_SLICE_NS = 100 * NS_PER_MS

_ROW0 = HEADER_BYTES // WORD


def _closed(*_: object) -> None:
    raise posix_ipc.ExistentialError("closed")


_SIZE = HEADER_BYTES + BUCKET.itemsize


def _repair_bucket_segment(words: memoryview) -> str:
    if len(words) * WORD != _SIZE:
        return "left alone: its size does not match its layout"
    row = words[_ROW0 : _ROW0 + BUCKET_WORDS]
    try:
        fixed = _bucket.repair_row(row, monotonic_ns())
    finally:
        row.release()
    return ", ".join(fixed) or "nothing needed repair"


def _checked(seg: Segment) -> Segment:
    if seg.size != _SIZE:
        raise seg.refuse(f"is {seg.size} bytes, not the {_SIZE} of a TokenBucket")
    return seg


class TokenBucket:
    """A token bucket shared by every process on the host.

    The bucket holds at most ``capacity() == max(bytes_per_second, 1024)``
    tokens and starts full. It refills at ``rate()`` tokens per second, in
    whole milliseconds: less than a millisecond since the last refill adds
    nothing yet, and that time is credited later, never lost. One token is one
    unit of whatever you limit: a request, a byte.

    ``allow(n)`` takes ``n`` tokens if they are there and never waits; it is the
    call most code wants. ``allow_n(n, timeout)`` waits for them: it works out
    when they will be there and sleeps until then, queued first-come,
    first-served with the other waiters of every process, so a large request is
    not starved by a stream of small ``allow`` calls.

    With ``name=None`` the bucket is anonymous: share it with processes forked
    after it was made, or pickle it to others while the creating process keeps
    it open; the name goes when the creator closes the bucket or exits
    (processes already attached keep using it). With a name, the bucket
    is created or, if it exists, opened (its rate stays what it is), and it
    stays on the host until someone calls ``unlink()``. Decide which process
    owns that call: a process that opens a name after it was unlinked creates
    a new bucket that the others do not see.

    If a process dies while it holds the bucket's lock, the next process that
    waits for the lock takes it over within about a second and repairs the row.
    """

    __slots__ = (
        "__weakref__",
        "_acquire",
        "_gen",
        "_owns",
        "_release",
        "_reopen",
        "_row",
        "_seg",
        "_words",
        "name",
    )

    def __init__(self, bytes_per_second: int, *, name: str | None = None) -> None:
        rate = _check.rate(bytes_per_second)

        def init_tables(words: memoryview) -> None:
            _bucket.init_row(
                words[_ROW0 : _ROW0 + BUCKET_WORDS], rate, monotonic_ns(), 1
            )

        spec = SegmentSpec(KIND_BUCKET, _SIZE, (), init_tables)
        seg = _checked(Segment.attach(name, KIND_BUCKET, spec, _repair_bucket_segment))
        self._bind(seg, _ROW0, 1, owns=True)
        existing = self._row[B_RATE]
        if existing != rate:
            log.warning(
                "%s exists with rate %d; kept it (asked for %d; use set_rate)",
                seg.label,
                existing,
                rate,
            )

    @classmethod
    def open(cls, name: str) -> TokenBucket:
        """Open the existing bucket ``name``; ``SegmentMissing`` (a
        ``FileNotFoundError``) if there is none."""
        seg = _checked(Segment.attach(name, KIND_BUCKET, None, _repair_bucket_segment))
        self = cls.__new__(cls)
        self._bind(seg, _ROW0, 1, owns=True)
        return self

    @classmethod
    def _on_row(
        cls,
        seg: Segment,
        first_word: int,
        gen: int,
        name: str,
        reopen: tuple[Any, tuple[Any, ...]],
    ) -> TokenBucket:
        """A handle on a bucket row of another object's segment.

        ``reopen`` is what the handle pickles as: a callable and its arguments
        that find the same row in another process.
        """
        self = cls.__new__(cls)
        self._bind(seg, first_word, gen, owns=False)
        self.name = name
        self._reopen = reopen
        return self

    def _bind(self, seg: Segment, first_word: int, gen: int, *, owns: bool) -> None:
        self._seg = seg
        self._owns = owns
        self.name = seg.name
        self._words = seg.words
        self._row = seg.view(first_word, BUCKET_WORDS)
        self._gen = gen
        self._acquire = seg.sem.acquire
        self._release = seg.sem.release
        self._reopen: tuple[Any, tuple[Any, ...]] = (TokenBucket.open, (seg.name,))

    # -- the hot path ----------------------------------------------------------

    def allow(self, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket has them; otherwise take none.

        Never waits (beyond the lock). False when ``n`` exceeds the capacity.
        """
        if n.__class__ is not int or n < 0:
            n = _check.amount(n)
        row = self._row
        words = self._words
        try:
            self._acquire(LOCK_SLICE_S)
        except SLOW:
            self._seg.lock.wait_slow()
        except posix_ipc.ExistentialError:
            raise self._closed_error() from None
        words[H_HOLDER] = _owner._token
        now = monotonic_ns()
        try:
            if row[B_GEN] != self._gen:
                raise self._stale_error()
            if now - row[B_LAST] >= NS_PER_MS:
                _bucket.refill(row, now)
            tokens = row[B_TOKENS]
            need = n * MT
            if tokens >= need:
                row[B_TOKENS] = tokens - need
                row[B_ALLOWED_CALLS] += 1
                row[B_ALLOWED_UNITS] += n
                return True
            row[B_REFUSED_CALLS] += 1
            row[B_REFUSED_UNITS] += n
            return False
        finally:
            # On an exception too (a signal handler that raises in here): a
            # process that lives on must never keep the lock. A try block
            # costs nothing until something is raised.
            words[H_HOLDER] = -now
            self._release()

    # -- waits -------------------------------------------------------------------

    def allow_n(self, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` tokens are taken.

        Raises ``ValueError`` at once if ``n`` exceeds the capacity (it could
        never succeed), and :class:`~shmrate.WaitTimeout` (a ``TimeoutError``)
        at once if the tokens cannot be there within ``timeout`` seconds at the
        current rate. A wait that fails or is interrupted takes nothing.
        """
        steps = self._wait_steps(n, timeout)
        try:
            for delay_s in steps:
                time.sleep(delay_s)
        finally:
            steps.close()

    async def allow_n_async(self, n: int, timeout: float | None = None) -> None:
        """:meth:`allow_n` for asyncio. Cancelling it before it is granted
        takes nothing."""
        steps = self._wait_steps(n, timeout)
        try:
            for delay_s in steps:
                await asyncio.sleep(delay_s)
        finally:
            steps.close()

    def _wait_steps(
        self, n: int, timeout: float | None
    ) -> Generator[float, None, None]:
        """The one wait behind both forms: yields how long to sleep next.

        Closing it before it finishes (an exception or a cancellation in the
        sleep) withdraws the wait.
        """
        n = _check.amount(n)
        timeout_ns = _check.timeout_ns(timeout)
        started = monotonic_ns()
        deadline = None if timeout_ns is None else started + timeout_ns
        ticket = self._enqueue(n, deadline)
        if ticket is None:
            return
        granted = False
        try:
            while (delay_s := self._delay(ticket, deadline, started)) is not None:
                yield delay_s
            granted = True
        finally:
            if not granted:
                self._cancel(ticket)

    def _enqueue(self, n: int, deadline: int | None) -> _bucket.Ticket | None:
        """Take ``n`` now (None) or queue for it; refuse what cannot succeed."""
        with self._locked() as row:
            now = monotonic_ns()
            if n * MT > row[B_CAP]:
                raise ValueError(
                    f"shmrate: {self.name!r}: cannot wait for {n} tokens, more than "
                    f"the capacity {row[B_CAP] // MT}; split the request"
                )
            ticket = _bucket.reserve(row, n, now)
            if ticket is None:
                row[B_ALLOWED_CALLS] += 1
                row[B_ALLOWED_UNITS] += n
                return None
            wake = _bucket.wake_ns(row, ticket)
            if deadline is not None and (wake is None or wake > deadline):
                _bucket.cancel(row, ticket)
                raise self._timeout(n, row, deadline - now)
            return ticket

    def _delay(
        self, ticket: _bucket.Ticket, deadline: int | None, started: int
    ) -> float | None:
        """Seconds to sleep before looking again, or None once served."""
        with self._locked() as row:
            now = monotonic_ns()
            _bucket.refill(row, now)
            if _bucket.served(row, ticket):
                row[B_ALLOWED_CALLS] += 1
                row[B_ALLOWED_UNITS] += ticket.need_mt // MT
                row[B_WAITS] += 1
                row[B_WAITED_NS] += now - started
                return None
            wake = _bucket.wake_ns(row, ticket)
            if deadline is not None and (wake is None or wake > deadline):
                # The rate dropped: raise, and _wait_steps withdraws the wait.
                raise self._timeout(ticket.need_mt // MT, row, deadline - started)
            sleep_ns = WAIT_SLICE_NS if wake is None else min(wake - now, WAIT_SLICE_NS)
            return max(sleep_ns, 0) / 1e9

    def _cancel(self, ticket: _bucket.Ticket) -> None:
        with self._locked() as row:
            _bucket.refill(row, monotonic_ns())
            _bucket.cancel(row, ticket)

    def _timeout(self, n: int, row: memoryview, timeout_ns: int) -> WaitTimeout:
        row[B_REFUSED_CALLS] += 1
        row[B_REFUSED_UNITS] += n
        return WaitTimeout(
            f"shmrate: {self.name!r}: {n} tokens cannot be had within "
            f"{max(timeout_ns, 0) / 1e9:.3f} s at {row[B_RATE]} tokens/s; nothing taken"
        )

    # -- rate and introspection ------------------------------------------------

    def set_rate(self, bytes_per_second: int) -> None:
        """Change the rate for every process at once.

        The time since the last refill is first credited at the old rate; the
        capacity becomes ``max(bytes_per_second, 1024)`` and the tokens are
        clamped to it. Rate 0 is valid: the bucket then only drains. Waiters
        notice the change within 0.1 s.
        """
        rate = _check.rate(bytes_per_second)
        with self._locked() as row:
            _bucket.set_rate(row, rate, monotonic_ns())

    def rate(self) -> int:
        """The current rate in tokens per second."""
        with self._locked() as row:
            return int(row[B_RATE])

    def capacity(self) -> int:
        """The most tokens the bucket holds: ``max(rate, 1024)``."""
        with self._locked() as row:
            return int(row[B_CAP] // MT)

    def tokens(self) -> int:
        """Whole tokens in the bucket now (0 while waiters queue)."""
        with self._locked() as row:
            _bucket.refill(row, monotonic_ns())
            return int(row[B_TOKENS] // MT)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, exact across all processes.

        ``allowed_calls``/``allowed_units`` and ``refused_calls``/
        ``refused_units`` count ``allow`` and ``allow_n`` outcomes (units are
        tokens: bytes, requests); ``waits`` and ``waited_ns`` the waits that
        had to sleep; ``rate``, ``capacity`` and ``tokens`` are the levels now;
        ``recoveries`` counts locks taken over from dead holders in the
        bucket's segment.
        """
        with self._locked() as row:
            _bucket.refill(row, monotonic_ns())
            snap = bucket_stats(row)
            snap["recoveries"] = int(self._words[H_RECOVERIES])
        return snap

    # -- plumbing ---------------------------------------------------------------

    class _Locked:
        __slots__ = ("_b",)

        def __init__(self, b: TokenBucket) -> None:
            self._b = b

        def __enter__(self) -> memoryview:
            b = self._b
            try:
                b._acquire(LOCK_SLICE_S)
            except SLOW:
                b._seg.lock.wait_slow()
            except posix_ipc.ExistentialError:
                raise b._closed_error() from None
            b._words[H_HOLDER] = _owner._token
            if b._row[B_GEN] != b._gen:
                self.__exit__()
                raise b._stale_error()
            return b._row

        def __exit__(self, *exc: object) -> None:
            b = self._b
            b._words[H_HOLDER] = -monotonic_ns()
            b._release()

    def _locked(self) -> TokenBucket._Locked:
        return TokenBucket._Locked(self)

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"shmrate: TokenBucket {self.name!r} is closed in this process"
        )

    def _stale_error(self) -> StaleLimiter:
        return StaleLimiter(
            f"shmrate: the stream {self.name!r} was released; this limiter is no "
            "longer valid (call get_limiter again)"
        )

    def close(self) -> None:
        """Detach this process from the bucket. Safe to call twice."""
        self._acquire = _closed
        if self._owns:
            self._seg.close()

    def unlink(self) -> None:
        """Remove the bucket's name from the host (processes attached keep it)."""
        self._seg.unlink()

    def __enter__(self) -> TokenBucket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return self._reopen

    def __repr__(self) -> str:
        if self._acquire is _closed or self._seg.closed:
            return f"<TokenBucket {self.name!r} closed>"
        row = self._row
        return (
            f"<TokenBucket {self.name!r} rate={row[B_RATE]}/s "
            f"tokens={row[B_TOKENS] // MT}/{row[B_CAP] // MT}>"
        )


_STAT_FIELDS = (
    "allowed_calls",
    "allowed_units",
    "refused_calls",
    "refused_units",
    "waits",
    "waited_ns",
)


def bucket_stats(row: memoryview) -> dict[str, int]:
    """Counters and levels of a bucket row as plain ints. Caller holds the lock."""
    names = BUCKET.names or ()
    snap = {k: int(row[names.index(k)]) for k in _STAT_FIELDS}
    snap["rate"] = int(row[B_RATE])
    snap["capacity"] = int(row[B_CAP] // MT)
    snap["tokens"] = int(row[B_TOKENS] // MT)
    return snap
