"""shmrate itself: a named TokenBucket and a BandwidthManager stream limiter."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from bench.subjects import Env, Limit, Made, Subject, attribute_or_reason


def _shmrate() -> Any:
    # Imported on demand so that the bench starts (and reports the missing
    # piece) on a checkout where shmrate is half written.
    return importlib.import_module("shmrate")


@dataclass(frozen=True)
class _NamedSpec:
    limit: Limit
    name: str


class ShmrateBucket(Subject):
    """``shmrate.TokenBucket`` opened by name in every worker."""

    key = "shmrate"
    title = "shmrate TokenBucket"
    algorithm = "token bucket"
    shared = True
    can_wait = True
    # DESIGN.md: less than 1 ms since the last refill adds nothing yet.
    refill_step_s = 0.001

    def __init__(self, limit: Limit, bucket: Any) -> None:
        super().__init__(limit)
        self._bucket = bucket
        self.try_once = bucket.allow

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return attribute_or_reason("shmrate", "TokenBucket")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        name = env.unique("bench-tb")
        bucket = _shmrate().TokenBucket(limit.rate_per_s, name=name)

        def cleanup() -> None:
            bucket.unlink()
            bucket.close()

        return Made(_NamedSpec(limit, name), cleanup)

    @classmethod
    def open(cls, spec: object) -> Subject:
        assert isinstance(spec, _NamedSpec)
        return cls(spec.limit, _shmrate().TokenBucket.open(spec.name))

    def wait(self, n: int, timeout_s: float) -> bool:
        try:
            self._bucket.allow_n(n, timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._bucket.close()


_STREAM = "bench-stream"


class ShmrateStream(ShmrateBucket):
    """A stream's limiter from ``shmrate.BandwidthManager``, found by name.

    The pool is twice the stream's share so that the allocation always fits;
    workers reach the limiter through ``BandwidthManager.open(name)`` and
    ``get_limiter``, the way a process that did not allocate it would.
    """

    key = "shmrate-bw"
    title = "shmrate BandwidthManager stream"

    def __init__(self, limit: Limit, bucket: Any, manager: Any) -> None:
        super().__init__(limit, bucket)
        self._manager = manager

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return attribute_or_reason("shmrate", "BandwidthManager")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        name = env.unique("bench-bw")
        manager = _shmrate().BandwidthManager(2 * limit.rate_per_s, name=name)
        limiter, ok = manager.allocate_bandwidth(_STREAM, limit.rate_per_s)
        if not ok:
            manager.unlink()
            manager.close()
            raise RuntimeError("BandwidthManager refused a share of half its pool")

        def cleanup() -> None:
            manager.release_bandwidth(_STREAM)
            _close_quietly(limiter)
            manager.unlink()
            manager.close()

        return Made(_NamedSpec(limit, name), cleanup)

    @classmethod
    def open(cls, spec: object) -> Subject:
        assert isinstance(spec, _NamedSpec)
        manager = _shmrate().BandwidthManager.open(spec.name)
        limiter = manager.get_limiter(_STREAM)
        if limiter is None:
            manager.close()
            raise RuntimeError(f"no limiter for {_STREAM!r} in {spec.name!r}")
        return cls(spec.limit, limiter, manager)

    def close(self) -> None:
        _close_quietly(self._bucket)
        self._manager.close()


def _close_quietly(limiter: Any) -> None:
    # A stream limiter is a row of its manager's segment; whether the handle
    # has a close() of its own is the library's choice, not the bench's.
    close = getattr(limiter, "close", None)
    if callable(close):
        close()


SUBJECTS: list[type[Subject]] = [ShmrateBucket, ShmrateStream]
