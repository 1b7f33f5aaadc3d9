"""shmrate: rate limits shared by every process on one host, with no server."""

from __future__ import annotations

from .bandwidth import BandwidthManager
from .connections import ConnectionLimiter
from .errors import (
    CapacityError,
    ClosedError,
    KindMismatch,
    LayoutMismatch,
    SegmentMissing,
    ShmrateError,
    StaleLimiter,
    WaitTimeout,
)
from .keyed import KeyedTokenBucket
from .limiter import RateLimiter
from .token_bucket import TokenBucket

__all__ = [
    "BandwidthManager",
    "CapacityError",
    "ClosedError",
    "ConnectionLimiter",
    "KeyedTokenBucket",
    "KindMismatch",
    "LayoutMismatch",
    "RateLimiter",
    "SegmentMissing",
    "ShmrateError",
    "StaleLimiter",
    "TokenBucket",
    "WaitTimeout",
]

__version__ = "0.1.0"
