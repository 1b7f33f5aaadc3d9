"""Subjects that need no server: the floor, the hand-written bucket, pyrate-limiter's
two cross-process buckets and the two unshared in-process references."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.subjects import (
    Env,
    Limit,
    Made,
    Subject,
    WindowSubject,
    import_or_reason,
)

# One fork context for every multiprocessing object the adapters create, so
# that a Lock is unlinked from /dev/shm as soon as it exists (a spawn-context
# Lock would leave that to the resource tracker).
_FORK = multiprocessing.get_context("fork")
_KEY = "bench"


@dataclass(frozen=True)
class _Spec:
    limit: Limit
    state: Any


class Floor(Subject):
    """The least any cross-process limiter can cost.

    One acquire and release of a posix_ipc semaphore around one
    ``time.monotonic()``: the lock and the clock read every shared limiter
    needs, and nothing else. It admits everything, so it only appears in the
    cost and throughput measures.
    """

    key = "floor"
    title = "floor: posix_ipc semaphore + monotonic()"
    algorithm = "none (lock and clock only)"
    shared = True
    enforces = False

    def __init__(self, limit: Limit, semaphore: Any) -> None:
        super().__init__(limit)
        self._semaphore = semaphore
        self.try_once = _floor_try(semaphore)

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return import_or_reason("posix_ipc", "posix_ipc")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        import posix_ipc

        name = "/" + env.unique("bench-floor")
        semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)

        def cleanup() -> None:
            semaphore.unlink()
            semaphore.close()

        return Made(_Spec(limit, name), cleanup)

    @classmethod
    def open(cls, spec: object) -> Subject:
        import posix_ipc

        assert isinstance(spec, _Spec)
        return cls(spec.limit, posix_ipc.Semaphore(spec.state))

    def close(self) -> None:
        self._semaphore.close()


def _floor_try(semaphore: Any) -> Callable[[int], bool]:
    acquire = semaphore.acquire
    release = semaphore.release
    clock = time.monotonic

    # A plain function, so the floor pays one Python call per try like
    # every other subject does.
    def try_once(n: int = 1) -> bool:
        acquire()
        clock()
        release()
        return True

    return try_once


class _RawBucket:
    """A token bucket in a ``RawArray`` under a ``multiprocessing.Lock``.

    This is the limiter most users write by hand today, written with care:
    the clock is read under the lock, so two processes can never credit the
    same interval twice, and a refused try keeps its refill.
    The state is ``[tokens, last_refill_s, rate_per_s, capacity]``.
    """

    def __init__(self, rate_per_s: int) -> None:
        capacity = float(max(rate_per_s, 1024))
        self.state = _FORK.RawArray(
            "d", [capacity, time.monotonic(), rate_per_s, capacity]
        )
        self.lock = _FORK.Lock()

    def _refill(self, state: Any, now_s: float) -> float:
        """Credit the time since the last refill; the caller holds the lock."""
        tokens: float = state[0] + (now_s - state[1]) * state[2]
        if tokens > state[3]:
            tokens = state[3]
        state[1] = now_s
        return tokens

    def try_take(self, n: int = 1) -> bool:
        state = self.state
        with self.lock:
            tokens = self._refill(state, time.monotonic())
            if tokens >= n:
                state[0] = tokens - n
                return True
            state[0] = tokens
            return False

    def wait_take(self, n: int, timeout_s: float) -> bool:
        state = self.state
        deadline_s = time.monotonic() + timeout_s
        if n > state[3]:
            return False
        while True:
            with self.lock:
                tokens = self._refill(state, time.monotonic())
                if tokens >= n:
                    state[0] = tokens - n
                    return True
                state[0] = tokens
                shortfall_s = (n - tokens) / state[2]
            if time.monotonic() + shortfall_s > deadline_s:
                return False
            time.sleep(shortfall_s)


class HandWritten(Subject):
    """The hand-written ``RawArray`` + ``multiprocessing.Lock`` token bucket."""

    key = "hand-written"
    title = "hand-written RawArray + mp.Lock bucket"
    algorithm = "token bucket"
    shared = True
    can_wait = True

    def __init__(self, limit: Limit, bucket: _RawBucket) -> None:
        super().__init__(limit)
        self._bucket = bucket
        self.try_once = bucket.try_take

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return None

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        # The array and the lock are inherited by forked workers; the heap
        # arena behind RawArray is unlinked at once, so nothing is left over.
        return Made(_Spec(limit, _RawBucket(limit.rate_per_s)), lambda: None)

    @classmethod
    def open(cls, spec: object) -> Subject:
        assert isinstance(spec, _Spec)
        return cls(spec.limit, spec.state)

    def wait(self, n: int, timeout_s: float) -> bool:
        return self._bucket.wait_take(n, timeout_s)


def _pyrate_rates(limit: Limit) -> list[Any]:
    from pyrate_limiter import Rate

    return [Rate(limit.per_window, round(limit.window_s * 1000))]


class _PyrateSubject(WindowSubject):
    """The part both pyrate-limiter buckets share: one Limiter per process."""

    algorithm = "sliding window log"
    shared = True
    can_wait = True

    def __init__(self, limit: Limit, limiter: Any) -> None:
        super().__init__(limit)
        self._limiter = limiter
        self.try_once = functools.partial(limiter.try_acquire, _KEY, blocking=False)

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return import_or_reason("pyrate_limiter", "pyrate-limiter")

    @classmethod
    def _new_limiter(cls, bucket: Any) -> Any:
        from pyrate_limiter import Limiter

        # buffer_ms=0: the default adds 50 ms to every blocking wait.
        return Limiter(bucket, buffer_ms=0)

    def wait(self, n: int, timeout_s: float) -> bool:
        return bool(
            self._limiter.try_acquire(_KEY, n, blocking=True, timeout=timeout_s)
        )

    def close(self) -> None:
        self._limiter.close()


class PyrateMultiprocess(_PyrateSubject):
    """pyrate-limiter's ``MultiprocessBucket``: a Manager list under an RLock."""

    key = "pyrate-mp"
    title = "pyrate-limiter MultiprocessBucket"

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        from pyrate_limiter import MultiprocessBucket

        before = set(_FORK.active_children())
        bucket = MultiprocessBucket.init(_pyrate_rates(limit))
        started = [p for p in _FORK.active_children() if p not in before]

        def cleanup() -> None:
            # init() starts a Manager and keeps it only inside the list proxy.
            manager = getattr(bucket.items, "_manager", None)
            if manager is not None:
                manager.shutdown()
            for process in started:
                process.join(timeout=5)
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)

        return Made(_Spec(limit, bucket), cleanup)

    @classmethod
    def open(cls, spec: object) -> Subject:
        assert isinstance(spec, _Spec)
        return cls(spec.limit, cls._new_limiter(spec.state))


class PyrateSQLite(_PyrateSubject):
    """pyrate-limiter's ``SQLiteBucket`` on one file, under a file lock."""

    key = "pyrate-sqlite"
    title = "pyrate-limiter SQLiteBucket + file lock"

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return super().missing(env) or import_or_reason("filelock", "filelock")

    @staticmethod
    def _bucket(limit: Limit, path: str) -> Any:
        from pyrate_limiter import SQLiteBucket

        return SQLiteBucket.init_from_file(
            _pyrate_rates(limit), table="bench", db_path=path, use_file_lock=True
        )

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        path = os.path.join(env.scratch_dir, env.unique("pyrate") + ".sqlite")
        # Creating the table here keeps the workers from racing to create it.
        cls._bucket(limit, path).close()

        def cleanup() -> None:
            for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)

        return Made(_Spec(limit, path), cleanup)

    @classmethod
    def open(cls, spec: object) -> Subject:
        assert isinstance(spec, _Spec)
        return cls(spec.limit, cls._new_limiter(cls._bucket(spec.limit, spec.state)))


class LimitsMemory(WindowSubject):
    """``limits`` with its in-process memory storage: one process only."""

    key = "limits-memory"
    title = "limits MovingWindow, memory:// (unshared)"
    algorithm = "moving window"
    shared = False

    def __init__(self, limit: Limit, strategy: Any, item: Any) -> None:
        super().__init__(limit)
        hit = strategy.hit

        def try_once(n: int = 1) -> bool:
            return bool(hit(item, _KEY, cost=n))

        self.try_once = try_once

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return import_or_reason("limits", "limits")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        return Made(_Spec(limit, None), lambda: None)

    @classmethod
    def open(cls, spec: object) -> Subject:
        from limits import RateLimitItemPerSecond, storage, strategies

        assert isinstance(spec, _Spec)
        item = RateLimitItemPerSecond(spec.limit.rate_per_s)
        strategy = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        return cls(spec.limit, strategy, item)


class FalconTokenBucket(Subject):
    """The ``token-bucket`` package with its memory storage: one process only."""

    key = "token-bucket"
    title = "token-bucket MemoryStorage (unshared)"
    algorithm = "token bucket"
    shared = False

    def __init__(self, limit: Limit, limiter: Any) -> None:
        super().__init__(limit)
        self.try_once = functools.partial(limiter.consume, _KEY)

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return import_or_reason("token_bucket", "token-bucket")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        return Made(_Spec(limit, None), lambda: None)

    @classmethod
    def open(cls, spec: object) -> Subject:
        import token_bucket

        assert isinstance(spec, _Spec)
        rate = spec.limit.rate_per_s
        capacity = max(rate, 1024)
        return cls(
            spec.limit,
            token_bucket.Limiter(rate, capacity, token_bucket.MemoryStorage()),
        )


SUBJECTS: list[type[Subject]] = [
    Floor,
    HandWritten,
    PyrateMultiprocess,
    PyrateSQLite,
    LimitsMemory,
    FalconTokenBucket,
]
