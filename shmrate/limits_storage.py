"""A storage for the ``limits`` package that every process on the host shares.

``limits`` (which Flask-Limiter and slowapi build on) keeps its counters in a
storage chosen by URI. Its ``memory://`` storage lives in one process, so with
N workers every client gets N times its limit; the usual fix is a Redis
server. Importing this module registers the scheme ``shmrate://NAME``: the
counters then live in a shared-memory segment named NAME, and every worker on
the host counts against the same numbers, exactly, under one lock::

    import shmrate.limits_storage  # registers shmrate://

    limiter = Limiter(get_remote_address, app=app, storage_uri="shmrate://api")

Strategies: ``fixed-window`` and ``sliding-window-counter``. ``moving-window``
needs the time of every hit in the window of every key, which has no bound
that a fixed-size segment could hold, so asking for it raises
:class:`UnsupportedStrategy` when the limiter is built.

Each counter is a row of a fixed-size key table (``max_keys`` rows, 65,536 by
default, about 192 bytes each; set it with ``shmrate://NAME?max_keys=N`` or the
``max_keys`` storage option). The row of an expired counter is given to the
next new key; when every row holds a live counter, the least recently used
counter is evicted and counted (``stats()["evictions"]``), and its key starts
again from zero.

The segment stays on the host after the workers exit, like any named shmrate
object, and the next start of the application picks the counters up again.
Remove it with ``shmrate rm NAME`` or :meth:`ShmrateStorage.unlink` when no
process uses it.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from time import monotonic_ns
from typing import Any

import numpy as np
import posix_ipc
from limits.storage import SlidingWindowCounterSupport, Storage

from . import _check, _owner
from ._keytable import (
    M_USED_NS,
    PAYLOAD0,
    T_REUSED,
    T_SWEEPS,
    Geometry,
    IsSpare,
    KeyTable,
    encode_key,
    init_table,
    repair_table,
)
from ._layout import H_COUNT, H_EVICTIONS, H_HOLDER, KIND_LIMITS
from ._lock import LOCK_SLICE_S, SLOW
from ._segment import Segment, SegmentSpec
from .errors import ClosedError, ShmrateError

__all__ = ["ShmrateStorage", "UnsupportedStrategy"]

DEFAULT_MAX_KEYS = 65_536
NS_PER_S = 1_000_000_000

# Payload of a counter row (int64 words after the row's gen and used_ns, so
# that one cache line holds everything a hit reads)::
#
#   word  field       fixed window                 sliding window counter
#   0     count       hits in the window           hits in the current window
#   1     prev        (0)                          hits in the previous window
#   2     window      (0)                          current window number:
#                                                  floor(wall time / period)
#   3     period_ns   the expiry given to incr     the window length
#   4     dead_ns     monotonic time the window    monotonic end of the window
#                     expires                      after the current one
#   5     (spare)
#
# Invariants: counts are >= 0; a row holds information only while
# dead_ns > now (after that it reads as zero and its row may be reused); a
# sliding row's window numbers follow limits' own TimestampedSlidingWindow,
# so windows start at the same wall-clock instants in every process.
_COUNT = PAYLOAD0 + 0
_PREV = PAYLOAD0 + 1
_WINDOW = PAYLOAD0 + 2
_PERIOD = PAYLOAD0 + 3
_DEAD = PAYLOAD0 + 4
PAYLOAD_WORDS = 6
_USED = M_USED_NS
_BASE_MASK = 0xFFFF_FFFF

# Fixed-window and sliding-window rows of the same limit key must not meet.
_FIXED = b"F"
_SLIDING = b"S"


class UnsupportedStrategy(ShmrateError, NotImplementedError):
    """The ``limits`` strategy asked for cannot be kept in a bounded segment."""


def _closed(*_: object) -> None:
    raise posix_ipc.ExistentialError("closed")


def _is_spare(words: memoryview) -> IsSpare:
    def is_spare(base: int, now_ns: int) -> bool:
        return bool(words[base + _DEAD] <= now_ns)

    return is_spare


def _spare_mask(rows: np.ndarray[Any, np.dtype[np.int64]], now_ns: int) -> Any:
    return rows[:, _DEAD] <= now_ns


def _repair_limits(words: memoryview) -> str:
    def payload(row: memoryview, gen: int, now_ns: int) -> list[str]:
        notes = []
        if row[0] < 0 or row[1] < 0:
            row[0], row[1] = max(row[0], 0), max(row[1], 0)
            notes.append("counts clamped")
        period = max(row[3], 0)
        row[3] = period
        # dead_ns comes from monotonic time, which restarts at boot: a window
        # cannot end later than two periods from now.
        if row[4] > now_ns + 2 * period:
            row[4] = now_ns + 2 * period
            notes.append("expiry rebased")
        return notes

    return ", ".join(repair_table(words, payload))


def _expiry_ns(expiry: object) -> int:
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)):
        raise TypeError(
            f"shmrate: expiry must be a number of seconds, not {type(expiry).__name__}"
        )
    if not expiry > 0 or math.isinf(expiry):
        raise ValueError(f"shmrate: expiry must be > 0 seconds, got {expiry}")
    return int(expiry * NS_PER_S)


def _parse_uri(uri: str | None) -> tuple[str, dict[str, str]]:
    if not isinstance(uri, str):
        raise TypeError("shmrate: the storage needs a URI of the form shmrate://NAME")
    parts = urllib.parse.urlsplit(uri)
    name = urllib.parse.unquote(parts.netloc + parts.path)
    if parts.scheme != "shmrate" or not name:
        raise ValueError(
            f"shmrate: {uri!r} is not a storage URI of the form shmrate://NAME"
        )
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return name, query


def _max_keys(value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"shmrate: max_keys must be an int, got {value!r}"
            ) from None
    n = _check.amount(value, "max_keys")
    if not 1 <= n <= 1 << 24:
        raise ValueError(f"shmrate: max_keys must be from 1 to {1 << 24}, got {n}")
    return n


class ShmrateStorage(Storage, SlidingWindowCounterSupport):
    """``limits`` counters in shared memory, registered as ``shmrate://NAME``.

    Create it through the URI (``limits.storage.storage_from_string``,
    Flask-Limiter's ``storage_uri``, slowapi's ``storage_uri``) or directly:
    ``ShmrateStorage("shmrate://api", max_keys=100_000)``. The first process
    creates the segment; the others open it, and its size stays what the
    first one asked for.

    Every operation takes the segment's lock once, so the sliding-window
    check and its increment happen together: unlike storages that increment
    and then take the hit back, a hit refused here was never counted.
    """

    # limits' registry reads this list when the class is created; the base
    # class declares it as a plain attribute, so it cannot be a ClassVar here.
    STORAGE_SCHEME = ["shmrate"]  # noqa: RUF012

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        **options: float | str | bool,
    ) -> None:
        name, query = _parse_uri(uri)
        settings: dict[str, object] = {**query, **options}
        max_keys = _max_keys(settings.pop("max_keys", DEFAULT_MAX_KEYS))
        if settings:
            raise ValueError(
                f"shmrate: unknown storage options {sorted(settings)}; the only "
                "one is max_keys"
            )
        g = Geometry.for_keys(max_keys, PAYLOAD_WORDS)

        def init_tables(words: memoryview) -> None:
            init_table(words, g)

        spec = SegmentSpec(KIND_LIMITS, g.size_bytes, g.params, init_tables)
        self._bind(Segment.attach(name, KIND_LIMITS, spec, _repair_limits))
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @classmethod
    def open(cls, name: str) -> ShmrateStorage:
        """Open the existing storage ``name``; ``SegmentMissing`` (a
        ``FileNotFoundError``) if there is none."""
        self = cls.__new__(cls)
        self._bind(Segment.attach(name, KIND_LIMITS, None, _repair_limits))
        Storage.__init__(self, f"shmrate://{urllib.parse.quote(name)}")
        return self

    def _bind(self, seg: Segment) -> None:
        try:
            g = Geometry.from_words(seg.words)
        except BaseException:
            seg.close()
            raise
        self.name = seg.name
        self._seg = seg
        self._words = seg.words
        self._table = KeyTable(
            seg.words, g, _is_spare(seg.words), _spare_mask, seg.label
        )
        self._fixed: dict[str, int] = {}
        self._sliding: dict[str, int] = {}
        self._fixed_get = self._fixed.get
        self._sliding_get = self._sliding.get
        self._cache_max = max(g.max_keys, 1024)
        self._acquire = seg.sem.acquire
        self._release = seg.sem.release

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return (ShmrateError, OSError)

    @property
    def acquire_entry(self) -> Any:
        # limits' MovingWindowRateLimiter probes for this with hasattr() when it
        # is built; raising here (not AttributeError) stops it with a reason.
        raise UnsupportedStrategy(
            "shmrate: the moving-window strategy keeps the time of every hit "
            "of every key, which does not fit shmrate's fixed-size table; use "
            "strategy 'fixed-window' or 'sliding-window-counter'"
        )

    get_moving_window = acquire_entry

    # -- fixed window -----------------------------------------------------------

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount`` to the counter of ``key`` and return the new count.

        A counter that does not exist or has expired starts at ``amount`` and
        expires ``expiry`` seconds from now.
        """
        if key.__class__ is not str:
            key = _str_key(key)
        if amount.__class__ is not int or amount < 0:
            amount = _check.amount(amount, "amount")
        if expiry.__class__ is int and expiry > 0:
            period_ns = expiry * NS_PER_S
        else:
            period_ns = _expiry_ns(expiry)
        w = self._words
        hit = self._fixed_get(key)
        self._lock()
        now = monotonic_ns()
        if hit is None or w[base := hit & _BASE_MASK] != hit >> 32:
            try:
                base = self._row(_FIXED, self._fixed, key, now, True)
            except BaseException:
                self._unlock()
                raise
        w[base + _USED] = now
        if w[base + _DEAD] > now:
            count = w[base + _COUNT] + amount
        else:
            count = amount
            w[base + _PERIOD] = period_ns
            w[base + _DEAD] = now + period_ns
        w[base + _COUNT] = count
        w[H_HOLDER] = -now
        self._release()
        return int(count)

    def get(self, key: str) -> int:
        """The count of ``key`` (0 if it has none or it expired)."""
        key = _str_key(key)
        with self._seg.lock as w:
            now = monotonic_ns()
            base = self._row(_FIXED, self._fixed, key, now, False)
            if base < 0 or w[base + _DEAD] <= now:
                return 0
            return int(w[base + _COUNT])

    def get_expiry(self, key: str) -> float:
        """When the counter of ``key`` expires, in ``time.time()`` seconds
        (now if it has none)."""
        key = _str_key(key)
        with self._seg.lock as w:
            now = monotonic_ns()
            wall = time.time()
            base = self._row(_FIXED, self._fixed, key, now, False)
            if base < 0:
                return wall
            return wall + (w[base + _DEAD] - now) / NS_PER_S

    def clear(self, key: str) -> None:
        """Forget the counter of ``key``."""
        key = _str_key(key)
        with self._seg.lock:
            self._drop(_FIXED, self._fixed, key)

    # -- sliding window counter -------------------------------------------------

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Count ``amount`` hits if the weighted count leaves room for them.

        The weighted count is the previous window's hits times the share of
        that window still inside the sliding window, plus the current
        window's hits, computed as limits' own storages compute it.
        """
        if key.__class__ is not str:
            key = _str_key(key)
        if limit.__class__ is not int or limit < 0:
            limit = _check.amount(limit, "limit")
        if amount.__class__ is not int or amount < 0:
            amount = _check.amount(amount, "amount")
        if expiry.__class__ is int and expiry > 0:
            period_ns = expiry * NS_PER_S
        else:
            period_ns = _expiry_ns(expiry)
        if amount > limit:
            return False
        w = self._words
        hit = self._sliding_get(key)
        wall = time.time()
        window = int(wall / expiry)
        self._lock()
        now = monotonic_ns()
        if hit is None or w[base := hit & _BASE_MASK] != hit >> 32:
            try:
                base = self._row(_SLIDING, self._sliding, key, now, True)
            except BaseException:
                self._unlock()
                raise
        w[base + _USED] = now
        if w[base + _WINDOW] == window and w[base + _PERIOD] == period_ns:
            prev = w[base + _PREV]
            count = w[base + _COUNT]
        else:
            prev, count = self._advance(base, window, period_ns, now, wall, expiry)
        weighted: float = count
        if prev:
            prev_ttl = (1 - (((wall - expiry) / expiry) % 1)) * expiry
            weighted = prev * prev_ttl / expiry + count
        if math.floor(weighted) + amount > limit:
            self._unlock()
            return False
        w[base + _COUNT] = count + amount
        self._unlock()
        return True

    def get_sliding_window(
        self, key: str, expiry: int
    ) -> tuple[int, float, int, float]:
        """(previous count, its weight's remaining seconds, current count,
        seconds until the current window's hits stop counting)."""
        key = _str_key(key)
        _expiry_ns(expiry)
        with self._seg.lock:
            now = monotonic_ns()
            wall = time.time()
            base = self._row(_SLIDING, self._sliding, key, now, False)
            if base < 0:
                return 0, 0.0, 0, _current_ttl(wall, expiry)
            return self._slide(base, expiry, now, wall)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Forget both windows of ``key``."""
        key = _str_key(key)
        with self._seg.lock:
            self._drop(_SLIDING, self._sliding, key)

    def _slide(
        self, base: int, expiry: float, now: int, wall: float
    ) -> tuple[int, float, int, float]:
        """The row's windows as of ``wall``: limits' four numbers. Locked."""
        w = self._words
        window = int(wall / expiry)
        period_ns = int(expiry * NS_PER_S)
        if w[base + _WINDOW] == window and w[base + _PERIOD] == period_ns:
            prev, count = int(w[base + _PREV]), int(w[base + _COUNT])
        else:
            prev, count = self._advance(base, window, period_ns, now, wall, expiry)
        prev_ttl = (1 - (((wall - expiry) / expiry) % 1)) * expiry if prev else 0.0
        return prev, prev_ttl, count, _current_ttl(wall, expiry)

    def _advance(
        self,
        base: int,
        window: int,
        period_ns: int,
        now: int,
        wall: float,
        expiry: float,
    ) -> tuple[int, int]:
        """Move the row to ``window``; returns its (previous, current) counts.

        The current count becomes the previous one if ``window`` follows the
        row's window directly; otherwise both start at 0. Locked.
        """
        w = self._words
        prev = count = 0
        if w[base + _PERIOD] == period_ns and w[base + _DEAD] > now:
            if w[base + _WINDOW] == window - 1:
                prev = int(w[base + _COUNT])
            elif w[base + _WINDOW] == window:
                prev, count = int(w[base + _PREV]), int(w[base + _COUNT])
        w[base + _PREV] = prev
        w[base + _COUNT] = count
        w[base + _WINDOW] = window
        w[base + _PERIOD] = period_ns
        # The current window's hits count until the next window ends.
        w[base + _DEAD] = now + int(((window + 2) * expiry - wall) * NS_PER_S)
        return prev, count

    # -- the table (caller holds the lock) ---------------------------------------

    def _row(
        self, kind: bytes, cache: dict[str, int], key: str, now: int, create: bool
    ) -> int:
        """The first word of the row of ``key``: made (empty) if ``create``,
        else -1 when there is none."""
        w = self._words
        hit = cache.get(key)
        if hit is not None and w[hit & _BASE_MASK] == hit >> 32:
            return hit & _BASE_MASK
        table = self._table
        kb = encode_key(key, kind)
        h = table.hash(kb)
        base = table.find(kb, h)
        if base >= 0:
            gen = table.gen(base)
        elif not create:
            return -1
        else:
            base, gen = table.claim(kb, h, now)
            for i in range(PAYLOAD_WORDS):
                w[base + PAYLOAD0 + i] = 0
        if len(cache) >= self._cache_max:
            cache.clear()
        cache[key] = gen << 32 | base
        return base

    def _drop(self, kind: bytes, cache: dict[str, int], key: str) -> None:
        cache.pop(key, None)
        kb = encode_key(key, kind)
        base = self._table.find(kb, self._table.hash(kb))
        if base >= 0:
            self._table.drop(base)

    def _lock(self) -> None:
        try:
            self._acquire(LOCK_SLICE_S)
        except SLOW:
            self._seg.lock.wait_slow()
        except posix_ipc.ExistentialError:
            raise self._closed_error() from None
        self._words[H_HOLDER] = _owner._token

    def _closed_error(self) -> ClosedError:
        return ClosedError(
            f"shmrate: limits storage {self.name!r} is closed in this process"
        )

    def _unlock(self) -> None:
        self._words[H_HOLDER] = -monotonic_ns()
        self._release()

    # -- the rest of the storage contract ---------------------------------------

    def check(self) -> bool:
        """True while this process can use the storage."""
        if self._acquire is _closed:
            return False
        with self._seg.lock:
            return True

    def reset(self) -> int | None:
        """Forget every counter; returns how many there were."""
        with self._seg.lock:
            self._fixed.clear()
            self._sliding.clear()
            return self._table.clear()

    def stats(self) -> dict[str, int]:
        """Counters of the table, shared by all processes."""
        with self._seg.lock as w:
            return {
                "keys": int(w[H_COUNT]),
                "max_keys": self._table.g.max_keys,
                "evictions": int(w[H_EVICTIONS]),
                "reused": int(w[T_REUSED]),
                "sweeps": int(w[T_SWEEPS]),
            }

    def close(self) -> None:
        """Detach this process from the segment. Safe to call twice."""
        if self._acquire is _closed:
            return
        self._acquire = _closed
        self._fixed.clear()
        self._sliding.clear()
        self._table.release()
        self._seg.close()

    def unlink(self) -> None:
        """Remove the segment's name from the host (attached processes keep it)."""
        self._seg.unlink()

    def __enter__(self) -> ShmrateStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShmrateStorage.open, (self.name,))

    def __repr__(self) -> str:
        if self._acquire is _closed:
            return f"<ShmrateStorage {self.name!r} closed>"
        w = self._words
        return (
            f"<ShmrateStorage {self.name!r} keys={w[H_COUNT]}/{self._table.g.max_keys}>"
        )


def _str_key(key: object) -> str:
    if not isinstance(key, str):
        encode_key(key)  # raises the TypeError
    return str(key)


def _current_ttl(wall: float, expiry: float) -> float:
    return (1 - ((wall / expiry) % 1)) * expiry + expiry
