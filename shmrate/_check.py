"""Argument checks shared by the public classes. Each raises before anything
is touched, with a message that names the argument and the value."""

from __future__ import annotations

import math
import operator

from ._layout import MAX_RATE

__all__ = ["amount", "rate", "timeout_ns"]


def amount(n: object, what: str = "n") -> int:
    """A count of units: an int >= 0 (bool is refused)."""
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"shmrate: {what} must be an int, not {type(n).__name__}")
    value = operator.index(n)  # int subclasses and numpy integers too
    if value < 0:
        raise ValueError(f"shmrate: {what} must be >= 0, got {value}")
    return value


def rate(r: object, what: str = "bytes_per_second") -> int:
    """A rate in units per second: an int from 0 to MAX_RATE."""
    r = amount(r, what)
    if r > MAX_RATE:
        raise ValueError(f"shmrate: {what} must be at most {MAX_RATE}, got {r}")
    return r


def timeout_ns(timeout: object) -> int | None:
    """A timeout in seconds (None: no limit) as whole nanoseconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"shmrate: timeout must be a number of seconds or None, "
            f"not {type(timeout).__name__}"
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"shmrate: timeout must be >= 0 seconds, got {timeout}")
    if math.isinf(timeout):
        return None
    return int(timeout * 1e9)
