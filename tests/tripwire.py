"""Fail an operation between two of its writes to shared memory.

A holder can die between any two writes inside the lock. To put it there on
purpose, the tests swap the int64 views an object keeps (its header words,
bucket rows, stream table, leases) for :class:`TrappedView` proxies that count
each write and call the tripwire's ``on_trip`` just before write number ``n``.
Nothing in the library changes: its hot paths keep their code and their speed,
and only the objects a test traps go through the proxies.

``on_trip`` raises :class:`Tripped` for tests that stay in one process and
look at the torn state; it sends SIGKILL to the process itself for the
fault-injection workers, which then really die holding the lock.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from shmrate import BandwidthManager, ConnectionLimiter, TokenBucket

__all__ = ["TrappedView", "Tripped", "Tripwire", "kill_self", "trap"]


class Tripped(BaseException):
    """Raised at the chosen write (a BaseException, so no library code eats it)."""


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_tripped() -> None:
    raise Tripped


class Tripwire:
    """Counts write points; trips just before point number ``n`` once armed.

    After tripping, every later data write raises :class:`Tripped` too, so that
    clean-up code on the way out (``finally`` blocks) cannot finish the
    interrupted update: the state stays as the dead holder left it.
    """

    def __init__(self, on_trip: Callable[[], None] = _raise_tripped) -> None:
        self.on_trip = on_trip
        self.left: int | None = None
        self.count = 0
        self.tripped = False

    def arm(self, n: int | None) -> None:
        """Trip before write point ``n`` (0 is the first); None only counts."""
        self.left = n
        self.count = 0
        self.tripped = False

    def disarm(self) -> None:
        self.left = None
        self.tripped = False

    def point(self) -> None:
        if self.tripped:
            raise Tripped
        if self.left is not None:
            if self.left == 0:
                self.tripped = True
                self.on_trip()
            self.left -= 1
        self.count += 1


class TrappedView:
    """An int64 view whose writes pass the tripwire first."""

    __slots__ = ("_view", "_wire")

    def __init__(self, view: Any, wire: Tripwire) -> None:
        self._view = view
        self._wire = wire

    def __getitem__(self, i: Any) -> Any:
        got = self._view[i]
        return TrappedView(got, self._wire) if isinstance(i, slice) else got

    def __setitem__(self, i: Any, value: Any) -> None:
        self._wire.point()
        self._view[i] = value

    def __len__(self) -> int:
        return len(self._view)

    def release(self) -> None:
        self._view.release()


def _after(call: Callable[..., Any], wire: Tripwire) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        got = call(*args)
        wire.point()
        return got

    return wrapped


def _before(call: Callable[..., Any], wire: Tripwire) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        wire.point()
        return call(*args)

    return wrapped


def trap(obj: Any, wire: Tripwire, *, lock_points: bool = False) -> Any:
    """Route ``obj``'s shared writes through ``wire``; returns ``obj``.

    With ``lock_points``, the moments just after the semaphore is taken (before
    the holder is recorded) and just before it is posted (after the release
    stamp is written) are write points too. Only a process that really dies
    there may use them: a raise there would leave the semaphore taken.
    """
    if isinstance(obj, TokenBucket):
        if isinstance(obj._row, TrappedView):
            return obj
        obj._row = TrappedView(obj._row, wire)
        obj._words = TrappedView(obj._words, wire)
        if lock_points:
            obj._acquire = _after(obj._acquire, wire)
            obj._release = _before(obj._release, wire)
        return obj
    assert isinstance(obj, (ConnectionLimiter, BandwidthManager))
    obj._words = TrappedView(obj._words, wire)
    table = obj._table
    for part in ("header", "rows", "index", "free"):
        setattr(table, part, TrappedView(getattr(table, part), wire))
    if isinstance(obj, ConnectionLimiter):
        obj._leases = TrappedView(obj._leases, wire)
        obj._lease_free = TrappedView(obj._lease_free, wire)
    else:
        obj._buckets = TrappedView(obj._buckets, wire)
    if lock_points:
        lock = obj._seg.lock
        lock._sem_acquire = _after(lock._sem_acquire, wire)
        lock._sem_release = _before(lock._sem_release, wire)
    return obj
