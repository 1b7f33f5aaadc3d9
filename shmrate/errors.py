"""The exceptions shmrate raises.

Every error is a :class:`ShmrateError`. The subclasses that describe a familiar
situation also derive from the matching built-in, so callers who already catch
``TimeoutError``, ``FileNotFoundError`` or ``ValueError`` keep working. Each one
pickles with its message, so it can be raised in a worker and re-raised in the
parent.
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "ClosedError",
    "KindMismatch",
    "LayoutMismatch",
    "SegmentMissing",
    "ShmrateError",
    "StaleLimiter",
    "WaitTimeout",
]


class ShmrateError(Exception):
    """Base class of every error shmrate raises on purpose."""


class SegmentMissing(ShmrateError, FileNotFoundError):
    """``open(name)`` found no segment of that name on this host."""


class KindMismatch(ShmrateError):
    """The name belongs to an object of another kind (a name has one kind)."""


class LayoutMismatch(ShmrateError, ValueError):
    """The segment is damaged or was written by another layout version.

    shmrate refuses to use it. Remove it with ``shmrate rm NAME`` (or
    ``unlink()``) once no process needs it, and create it again.
    """


class ClosedError(ShmrateError):
    """The object was closed in this process; open it again to use it."""


class StaleLimiter(ShmrateError):
    """The stream behind a bandwidth limiter was released.

    The limiter's row may already serve another stream, so the old handle is
    refused instead of throttling the wrong stream. Ask the manager again with
    ``get_limiter(stream_id)``.
    """


class CapacityError(ShmrateError):
    """A fixed-size table in the segment is full; nothing live was overwritten."""


class WaitTimeout(ShmrateError, TimeoutError):
    """A blocking wait could not be granted within its timeout; nothing was taken."""
