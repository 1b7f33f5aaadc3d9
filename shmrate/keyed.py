"""KeyedTokenBucket: one token bucket per key, shared by every process."""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections.abc import Generator
from time import monotonic_ns
from typing import Any

import numpy as np
import posix_ipc

from . import _bucket, _check, _owner
from ._keytable import (
    M_GEN,
    M_USED_NS,
    PAYLOAD0,
    T_ALLOWED_CALLS,
    T_ALLOWED_UNITS,
    T_RATE,
    T_RATE_SINCE_NS,
    T_REFUSED_CALLS,
    T_REFUSED_UNITS,
    T_REUSED,
    T_SWEEPS,
    T_WAITED_NS,
    T_WAITS,
    Geometry,
    IsSpare,
    KeyTable,
    encode_key,
    init_table,
    repair_table,
)
from ._layout import (
    B_CAP,
    B_GEN,
    B_LAST,
    B_QHEAD,
    B_QTAIL,
    B_RATE,
    B_TOKENS,
    BUCKET_WORDS,
    H_COUNT,
    H_EVICTIONS,
    H_HOLDER,
    H_RECOVERIES,
    KIND_KEYED,
    MAX_RATE,
    MT,
    NS_PER_MS,
)
from ._lock import LOCK_SLICE_S, SLOW, SegmentLock
from ._segment import Segment, SegmentSpec
from .errors import ClosedError, WaitTimeout

__all__ = ["KeyedTokenBucket"]

log = logging.getLogger("shmrate")

DEFAULT_MAX_KEYS = 65_536

# Words of a row, from its first word: the table's key state, then the bucket.
# The process-local cache maps a key to gen << 32 | first word of its row: one
# int object instead of a tuple of two, which saves a cache miss per call.
_BASE_MASK = 0xFFFF_FFFF
_GEN_AT = M_GEN
_USED_AT = M_USED_NS
_RATE = PAYLOAD0 + B_RATE
_CAP = PAYLOAD0 + B_CAP
_TOKENS = PAYLOAD0 + B_TOKENS
_LAST = PAYLOAD0 + B_LAST
_QHEAD = PAYLOAD0 + B_QHEAD
_QTAIL = PAYLOAD0 + B_QTAIL

# A long wait sleeps at most this long at a time (as TokenBucket's waits do),
# so a set_rate() from another process is honoured within it.
WAIT_SLICE_NS = 100 * NS_PER_MS


def _closed(*_: object) -> None:
    raise posix_ipc.ExistentialError("closed")


def _key(key: object) -> str:
    if not isinstance(key, str):
        encode_key(key)  # raises the TypeError
    return str(key)


def _max_keys(value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"shmrate: max_keys must be an int, not {type(value).__name__}")
    n = operator.index(value)
    if not 1 <= n <= 1 << 24:
        raise ValueError(f"shmrate: max_keys must be from 1 to {1 << 24}, got {n}")
    return n


def _make_is_spare(words: memoryview) -> IsSpare:
    def is_spare(base: int, now_ns: int) -> bool:
        row = words[base + PAYLOAD0 : base + PAYLOAD0 + BUCKET_WORDS]
        try:
            _bucket.refill(row, now_ns)
            return bool(row[B_QHEAD] == row[B_QTAIL] and row[B_TOKENS] >= row[B_CAP])
        finally:
            row.release()

    return is_spare


def _spare_mask(rows: np.ndarray[Any, np.dtype[np.int64]], now_ns: int) -> Any:
    # Floats: elapsed milliseconds times the rate can pass int64 after a long
    # idle time, and a near miss only costs a re-check when the row is popped.
    elapsed_ms = np.maximum(now_ns - rows[:, _LAST], 0) // NS_PER_MS
    refilled = rows[:, _TOKENS] + elapsed_ms.astype(np.float64) * rows[:, _RATE]
    return (rows[:, _QHEAD] == rows[:, _QTAIL]) & (refilled >= rows[:, _CAP])


def _set_rate_rows(words: memoryview, g: Geometry, rate: int, now_ns: int) -> None:
    """``_bucket.set_rate(row, rate, now_ns)`` on every live row, vectorised.

    A Python loop over 100,000 rows would hold the lock for a third of a
    second. Rows nobody waits on (nearly all) are refilled with the arithmetic
    of ``_bucket.refill`` for an empty queue, in numpy; the few with queued
    waiters go through ``_bucket.refill`` itself. tests/test_keyed.py checks
    the two against each other.
    """
    a = np.frombuffer(words, dtype=np.int64)
    rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
    live = rows[:, M_GEN] > 0
    queued = np.flatnonzero(live & (rows[:, _QHEAD] != rows[:, _QTAIL])).tolist()
    plain = live & (rows[:, _QHEAD] == rows[:, _QTAIL])
    last = rows[:, _LAST]
    elapsed_ms = np.where(plain, np.maximum(now_ns - last, 0) // NS_PER_MS, 0)
    old_rate = rows[:, _RATE]
    old_cap = rows[:, _CAP]
    # Enough milliseconds to fill any bucket from empty; more would only risk
    # int64 overflow in the product below.
    useful_ms = np.minimum(elapsed_ms, old_cap // np.maximum(old_rate, 1) + 1)
    tokens = np.minimum(old_cap, rows[:, _TOKENS] + useful_ms * old_rate)
    rows[:, _TOKENS] = tokens
    # A bucket that is full after its refill drops the millisecond remainder.
    rows[:, _LAST] = np.where(
        (elapsed_ms > 0) & (tokens == old_cap), now_ns, last + elapsed_ms * NS_PER_MS
    )
    del a, rows, last, old_rate, old_cap, tokens
    for r in queued:
        base = g.rows0 + r * g.row_words
        row = words[base + PAYLOAD0 : base + PAYLOAD0 + BUCKET_WORDS]
        try:
            _bucket.refill(row, now_ns)
        finally:
            row.release()
    a = np.frombuffer(words, dtype=np.int64)
    rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
    live = rows[:, M_GEN] > 0
    cap = _bucket.capacity_mt_for(rate)
    rows[live, _RATE] = rate
    rows[live, _CAP] = cap
    rows[live, _TOKENS] = np.minimum(rows[live, _TOKENS], cap)
    del a, rows


def _repair_keyed(words: memoryview) -> str:
    if not 0 <= words[T_RATE] <= MAX_RATE:
        words[T_RATE] = min(max(words[T_RATE], 0), MAX_RATE)
    # A holder that died inside set_rate may leave rows at the old rate.
    rate = int(words[T_RATE])

    def payload(row: memoryview, gen: int, now_ns: int) -> list[str]:
        notes = []
        if row[B_RATE] != rate:
            _bucket.set_rate(row, rate, now_ns)
            notes.append("rate change finished")
        notes += _bucket.repair_row(row, now_ns)
        row[B_GEN] = gen
        return notes

    return ", ".join(repair_table(words, payload))


class _Wait:
    """A queued wait: the row it queues on (first word, gen) and its ticket."""

    __slots__ = ("base", "gen", "ticket")

    def __init__(self, base: int, gen: int, ticket: _bucket.Ticket) -> None:
        self.base = base
        self.gen = gen
        self.ticket = ticket


class KeyedTokenBucket:
    """A token bucket for every key (client address, API key, user), shared by
    every process on the host, like an nginx ``limit_req`` zone.

    Each key's bucket behaves as a :class:`~shmrate.TokenBucket` of
    ``bytes_per_second``: it holds at most ``max(bytes_per_second, 1024)``
    tokens, starts full the first time the key is seen, refills in whole
    milliseconds without losing time, and its waits queue first-come,
    first-served across processes. ``set_rate`` changes every key's rate at
    once.

    The table has ``max_keys`` rows (about 240 bytes each, allocated when the
    segment is created). A bucket that has refilled to full holds no
    information, since a new bucket starts full, so its row is given to the
    next new key. Only when every row holds a bucket that is not full is the
    least recently used key evicted (its next call starts from a full bucket
    again); ``stats()["evictions"]`` counts those, and a warning is logged the
    first time a process evicts. A key stays fast to find at any fill: each
    process keeps a cache from key to row that is checked against the row's
    generation under the lock, and misses go through a seeded hash index.

    Keys are ``str``; keys longer than 64 bytes of UTF-8 are stored as a
    256-bit BLAKE2b digest. Naming, sharing, pickling, ``close()`` and
    ``unlink()`` work as for :class:`~shmrate.TokenBucket`, and so does the
    recovery of a lock whose holder died: the next waiter rebuilds the table's
    index from its rows.
    """

    __slots__ = (
        "__weakref__",
        "_acquire",
        "_cache",
        "_cache_get",
        "_cache_max",
        "_release",
        "_seg",
        "_table",
        "_words",
        "name",
    )

    def __init__(
        self,
        bytes_per_second: int,
        *,
        name: str | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        rate = _check.rate(bytes_per_second)
        g = Geometry.for_keys(_max_keys(max_keys), BUCKET_WORDS)

        def init_tables(words: memoryview) -> None:
            init_table(words, g)
            words[T_RATE] = rate
            words[T_RATE_SINCE_NS] = monotonic_ns()

        spec = SegmentSpec(KIND_KEYED, g.size_bytes, g.params, init_tables)
        self._bind(Segment.attach(name, KIND_KEYED, spec, _repair_keyed))
        existing = (int(self._words[T_RATE]), self._table.g.max_keys)
        if existing != (rate, g.max_keys):
            log.warning(
                "%s exists with rate %d and max_keys %d; kept them (asked for %d "
                "and %d; use set_rate)",
                self._seg.label,
                *existing,
                rate,
                g.max_keys,
            )

    @classmethod
    def open(cls, name: str) -> KeyedTokenBucket:
        """Open the existing table ``name``; ``SegmentMissing`` (a
        ``FileNotFoundError``) if there is none."""
        self = cls.__new__(cls)
        self._bind(Segment.attach(name, KIND_KEYED, None, _repair_keyed))
        return self

    def _bind(self, seg: Segment) -> None:
        try:
            g = Geometry.from_words(seg.words)
        except BaseException:
            seg.close()
            raise
        self._seg = seg
        self.name = seg.name
        self._words = seg.words
        self._table = KeyTable(
            seg.words, g, _make_is_spare(seg.words), _spare_mask, seg.label
        )
        self._cache: dict[str, int] = {}
        self._cache_get = self._cache.get
        self._cache_max = max(g.max_keys, 1024)
        self._acquire = seg.sem.acquire
        self._release = seg.sem.release

    # -- the hot path ----------------------------------------------------------

    def allow(self, key: str, n: int = 1) -> bool:
        """Take ``n`` tokens from ``key``'s bucket if it has them, else none.

        Never waits (beyond the lock). False when ``n`` exceeds the capacity.
        """
        if n.__class__ is not int or n < 0:
            n = _check.amount(n)
        w = self._words
        # A key that is not a str misses the cache (or is unhashable, a
        # TypeError here) and is refused by _row_for with the lock released.
        hit = self._cache_get(key)
        try:
            self._acquire(LOCK_SLICE_S)
        except SLOW:
            self._seg.lock.wait_slow()
        except posix_ipc.ExistentialError:
            raise self._closed_error() from None
        w[H_HOLDER] = _owner._token
        now = monotonic_ns()
        try:
            if hit is None or w[base := hit & _BASE_MASK] != hit >> 32:
                base = self._row_for(
                    key, now, n * MT <= _bucket.capacity_mt_for(w[T_RATE])
                )
                if base < 0:
                    # An unknown key asked for more than a full bucket holds.
                    return self._refused(n)
            w[base + _USED_AT] = now
            tokens = w[base + _TOKENS]
            last = w[base + _LAST]
            if now - last >= NS_PER_MS:
                if tokens:
                    # _bucket.refill inlined for the common case. A bucket with
                    # tokens has no queue (row invariant), so the refill goes to
                    # the bucket: whole milliseconds, the rest credited later,
                    # unless the bucket fills (then the remainder is dropped).
                    ms = (now - last) // NS_PER_MS
                    tokens += ms * w[base + _RATE]
                    cap = w[base + _CAP]
                    if tokens >= cap:
                        tokens = cap
                        w[base + _LAST] = now
                    else:
                        w[base + _LAST] = last + ms * NS_PER_MS
                else:
                    self._refill(base, now)
                    tokens = w[base + _TOKENS]
            need = n * MT
            if tokens >= need:
                w[base + _TOKENS] = tokens - need
                w[T_ALLOWED_CALLS] += 1
                w[T_ALLOWED_UNITS] += n
                return True
            w[base + _TOKENS] = tokens
            return self._refused(n)
        finally:
            # On an exception too (a bad key, a signal handler that raises):
            # a process that lives on must never keep the lock.
            w[H_HOLDER] = -now
            self._release()

    def _refused(self, n: int) -> bool:
        """Count a refusal of ``n``; returns False. Caller holds the lock."""
        w = self._words
        w[T_REFUSED_CALLS] += 1
        w[T_REFUSED_UNITS] += n
        return False

    # -- rows (caller holds the lock) ------------------------------------------

    def _row_for(self, key: str, now: int, create: bool) -> int:
        """The first word of ``key``'s row, made (full) if ``create``, else -1."""
        table = self._table
        kb = encode_key(key)
        h = table.hash(kb)
        base = table.find(kb, h)
        if base >= 0:
            gen = table.gen(base)
        elif not create:
            return -1
        else:
            base, gen = table.claim(kb, h, now)
            row = self._row(base)
            try:
                _bucket.init_row(row, int(self._words[T_RATE]), now, gen)
            finally:
                row.release()
        cache = self._cache
        if len(cache) >= self._cache_max:
            cache.clear()
        cache[key] = gen << 32 | base
        return base

    def _row(self, base: int) -> memoryview:
        """The bucket of the row at ``base``, for _bucket (release it after)."""
        return self._words[base + PAYLOAD0 : base + PAYLOAD0 + BUCKET_WORDS]

    def _refill(self, base: int, now: int) -> None:
        row = self._row(base)
        try:
            _bucket.refill(row, now)
        finally:
            row.release()

    # -- waits -------------------------------------------------------------------

    def allow_n(self, key: str, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` tokens are taken from ``key``'s bucket.

        Raises ``ValueError`` at once if ``n`` exceeds the capacity, and
        :class:`~shmrate.WaitTimeout` (a ``TimeoutError``) at once if the tokens
        cannot be there within ``timeout`` seconds at the current rate. A wait
        that fails or is interrupted takes nothing. If the key is evicted while
        it waits (only when the table is full of busy keys), the wait starts
        again on the key's new, full bucket.
        """
        steps = self._wait_steps(key, n, timeout)
        try:
            for delay_s in steps:
                time.sleep(delay_s)
        finally:
            steps.close()

    async def allow_n_async(
        self, key: str, n: int, timeout: float | None = None
    ) -> None:
        """:meth:`allow_n` for asyncio. Cancelling it before it is granted
        takes nothing."""
        steps = self._wait_steps(key, n, timeout)
        try:
            for delay_s in steps:
                await asyncio.sleep(delay_s)
        finally:
            steps.close()

    def _wait_steps(
        self, key: str, n: int, timeout: float | None
    ) -> Generator[float, None, None]:
        """The one wait behind both forms: yields how long to sleep next."""
        key = _key(key)
        n = _check.amount(n)
        timeout_ns = _check.timeout_ns(timeout)
        started = monotonic_ns()
        deadline = None if timeout_ns is None else started + timeout_ns
        wait = self._enqueue(key, n, deadline)
        if wait is None:
            return
        granted = False
        try:
            while (delay_s := self._delay(key, wait, deadline, started)) is not None:
                yield delay_s
            granted = True
        finally:
            if not granted:
                self._cancel(wait)

    def _enqueue(self, key: str, n: int, deadline: int | None) -> _Wait | None:
        with self._locked() as w:
            now = monotonic_ns()
            cap_mt = _bucket.capacity_mt_for(int(w[T_RATE]))
            if n * MT > cap_mt:
                raise ValueError(
                    f"shmrate: {self.name!r}: cannot wait for {n} tokens, more than "
                    f"the capacity {cap_mt // MT}; split the request"
                )
            return self._reserve(key, n, now, deadline)

    def _reserve(
        self, key: str, n: int, now: int, deadline: int | None
    ) -> _Wait | None:
        """Take ``n`` from the key's bucket (None) or queue for it. Locked."""
        w = self._words
        base = self._row_for(key, now, True)
        w[base + _USED_AT] = now
        row = self._row(base)
        try:
            ticket = _bucket.reserve(row, n, now)
            if ticket is None:
                w[T_ALLOWED_CALLS] += 1
                w[T_ALLOWED_UNITS] += n
                return None
            wake = _bucket.wake_ns(row, ticket)
            if deadline is not None and (wake is None or wake > deadline):
                _bucket.cancel(row, ticket)
                raise self._timeout(n, deadline - now)
            return _Wait(base, int(w[base + _GEN_AT]), ticket)
        finally:
            row.release()

    def _delay(
        self, key: str, wait: _Wait, deadline: int | None, started: int
    ) -> float | None:
        """Seconds to sleep before looking again, or None once served."""
        need = wait.ticket.need_mt // MT
        with self._locked() as w:
            now = monotonic_ns()
            if w[wait.base + _GEN_AT] != wait.gen:
                # Evicted while waiting: queue again on the key's new bucket.
                again = self._reserve(key, need, now, deadline)
                if again is None:
                    self._count_wait(now - started)
                    return None
                wait.base, wait.gen, wait.ticket = again.base, again.gen, again.ticket
            base = wait.base
            w[base + _USED_AT] = now
            row = self._row(base)
            try:
                _bucket.refill(row, now)
                if _bucket.served(row, wait.ticket):
                    w[T_ALLOWED_CALLS] += 1
                    w[T_ALLOWED_UNITS] += need
                    self._count_wait(now - started)
                    return None
                wake = _bucket.wake_ns(row, wait.ticket)
            finally:
                row.release()
            if deadline is not None and (wake is None or wake > deadline):
                # The rate dropped: raise, and _wait_steps withdraws the wait.
                raise self._timeout(need, deadline - started)
            sleep_ns = WAIT_SLICE_NS if wake is None else min(wake - now, WAIT_SLICE_NS)
            return max(sleep_ns, 0) / 1e9

    def _count_wait(self, waited_ns: int) -> None:
        self._words[T_WAITS] += 1
        self._words[T_WAITED_NS] += waited_ns

    def _cancel(self, wait: _Wait) -> None:
        with self._locked() as w:
            if w[wait.base + _GEN_AT] != wait.gen:
                return  # evicted: the row, and the share, belong to another key
            row = self._row(wait.base)
            try:
                _bucket.refill(row, monotonic_ns())
                _bucket.cancel(row, wait.ticket)
            finally:
                row.release()

    def _timeout(self, n: int, timeout_ns: int) -> WaitTimeout:
        w = self._words
        w[T_REFUSED_CALLS] += 1
        w[T_REFUSED_UNITS] += n
        return WaitTimeout(
            f"shmrate: {self.name!r}: {n} tokens cannot be had within "
            f"{max(timeout_ns, 0) / 1e9:.3f} s at {w[T_RATE]} tokens/s; nothing taken"
        )

    # -- rate and introspection ------------------------------------------------

    def tokens(self, key: str) -> int:
        """Whole tokens in ``key``'s bucket now (a key not seen yet: capacity)."""
        key = _key(key)
        with self._locked() as w:
            now = monotonic_ns()
            base = self._row_for(key, now, False)
            if base < 0:
                return int(_bucket.capacity_mt_for(int(w[T_RATE])) // MT)
            self._refill(base, now)
            return int(w[base + _TOKENS] // MT)

    def set_rate(self, bytes_per_second: int) -> None:
        """Change every key's rate at once.

        Each bucket is first credited at the old rate up to now; its capacity
        becomes ``max(bytes_per_second, 1024)`` and its tokens are clamped to
        it. This visits every row (about 15 ms at 100,000 keys).
        """
        rate = _check.rate(bytes_per_second)
        with self._locked() as w:
            now = monotonic_ns()
            _set_rate_rows(w, self._table.g, rate, now)
            w[T_RATE] = rate
            w[T_RATE_SINCE_NS] = now

    def rate(self) -> int:
        """The rate of every key's bucket, in tokens per second."""
        with self._locked() as w:
            return int(w[T_RATE])

    def capacity(self) -> int:
        """The most tokens a key's bucket holds: ``max(rate, 1024)``."""
        with self._locked() as w:
            return int(_bucket.capacity_mt_for(int(w[T_RATE])) // MT)

    def stats(self) -> dict[str, int]:
        """A snapshot of the table's counters, exact across all processes.

        ``keys`` live of ``max_keys``; ``evictions`` counts keys forgotten while
        their bucket was not full, ``reused`` rows taken from full buckets,
        ``sweeps`` the scans that looked for those. The call and unit counters
        and ``waits``/``waited_ns`` add up every key, as a TokenBucket's do for
        its one bucket; ``recoveries`` counts locks taken over from dead
        holders.
        """
        with self._locked() as w:
            rate = int(w[T_RATE])
            return {
                "rate": rate,
                "capacity": int(_bucket.capacity_mt_for(rate) // MT),
                "recoveries": int(w[H_RECOVERIES]),
                "keys": int(w[H_COUNT]),
                "max_keys": self._table.g.max_keys,
                "evictions": int(w[H_EVICTIONS]),
                "reused": int(w[T_REUSED]),
                "sweeps": int(w[T_SWEEPS]),
                "allowed_calls": int(w[T_ALLOWED_CALLS]),
                "allowed_units": int(w[T_ALLOWED_UNITS]),
                "refused_calls": int(w[T_REFUSED_CALLS]),
                "refused_units": int(w[T_REFUSED_UNITS]),
                "waits": int(w[T_WAITS]),
                "waited_ns": int(w[T_WAITED_NS]),
            }

    # -- plumbing ---------------------------------------------------------------

    def _locked(self) -> SegmentLock:
        return self._seg.lock

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"shmrate: KeyedTokenBucket {self.name!r} is closed in this process"
        )

    def close(self) -> None:
        """Detach this process from the table. Safe to call twice."""
        if self._acquire is _closed:
            return
        self._acquire = _closed
        self._cache.clear()
        self._table.release()
        self._seg.close()

    def unlink(self) -> None:
        """Remove the table's name from the host (processes attached keep it)."""
        self._seg.unlink()

    def __enter__(self) -> KeyedTokenBucket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeyedTokenBucket.open, (self.name,))

    def __repr__(self) -> str:
        if self._acquire is _closed:
            return f"<KeyedTokenBucket {self.name!r} closed>"
        w = self._words
        return (
            f"<KeyedTokenBucket {self.name!r} rate={w[T_RATE]}/s "
            f"keys={w[H_COUNT]}/{self._table.g.max_keys}>"
        )
