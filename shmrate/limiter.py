"""The interface every shmrate limiter offers."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["RateLimiter"]


@runtime_checkable
class RateLimiter(Protocol):
    """A limiter of units (requests, bytes) per second.

    :class:`~shmrate.TokenBucket` and the per-stream limiters of
    :class:`~shmrate.BandwidthManager` implement it; code that only needs to
    pace itself can accept any ``RateLimiter``.
    """

    def allow(self, n: int = 1) -> bool:
        """Take ``n`` units now if they are there, else take nothing: False."""
        ...

    def allow_n(self, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` units are taken; ``TimeoutError`` if ``timeout`` passes."""
        ...

    def set_rate(self, bytes_per_second: int) -> None:
        """Change the rate for every process at once."""
        ...

    def rate(self) -> int:
        """The current rate, in units per second."""
        ...
