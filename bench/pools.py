"""Connection counts and bandwidth shares: shmrate against a Manager dict.

Each pool subject is made in the parent with all but one of its streams
already holding a connection (or a share), so that a worker's
take-and-give-back of the last stream runs with every stream live. The
baseline is what a user writes without shmrate: a ``Manager().dict()`` of
per-stream counts, the total in a ``Manager().Value`` and every change under
a ``Manager().Lock()``; each of those is a round trip to the manager process.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import multiprocessing
from dataclasses import dataclass
from typing import Any, ClassVar

from bench.subjects import Env, Made, attribute_or_reason

_FORK = multiprocessing.get_context("fork")

# A share small enough that the pool covers every stream twice over.
SHARE_BYTES_PER_S = 1_000_000
MAX_PER_STREAM = 4


def stream_id(index: int) -> str:
    return f"stream-{index:05d}"


@dataclass(frozen=True)
class _Spec:
    streams: int
    state: Any


class PoolSubject(abc.ABC):
    """A connection or bandwidth pool whose ``cycle`` takes and returns once."""

    key: ClassVar[str]
    title: ClassVar[str]
    resource: ClassVar[str]  # "connections" or "bandwidth"
    shared: ClassVar[bool] = True

    @classmethod
    @abc.abstractmethod
    def missing(cls, env: Env) -> str | None: ...

    @classmethod
    @abc.abstractmethod
    def make(cls, streams: int, env: Env) -> Made:
        """A pool of ``streams`` rows, all but the last already held."""

    @classmethod
    @abc.abstractmethod
    def open(cls, spec: object) -> PoolSubject: ...

    @abc.abstractmethod
    def cycle(self, stream: str) -> bool:
        """Take one connection (or a share) for ``stream``, then give it back."""

    # Not abstract: the Manager baselines hold nothing that needs detaching.
    def close(self) -> None:  # noqa: B027
        """Detach this process."""


def _shmrate() -> Any:
    return importlib.import_module("shmrate")


class ShmrateConnections(PoolSubject):
    key = "shmrate-conn"
    title = "shmrate ConnectionLimiter"
    resource = "connections"

    def __init__(self, limiter: Any) -> None:
        self._acquire = limiter.try_acquire
        self._release = limiter.release
        self._limiter = limiter

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return attribute_or_reason("shmrate", "ConnectionLimiter")

    @classmethod
    def make(cls, streams: int, env: Env) -> Made:
        name = env.unique("bench-conn")
        limiter = _shmrate().ConnectionLimiter(MAX_PER_STREAM, streams, name=name)
        for index in range(streams - 1):
            if not limiter.try_acquire(stream_id(index)):
                raise RuntimeError(f"ConnectionLimiter refused stream {index}")

        def cleanup() -> None:
            for index in range(streams - 1):
                limiter.release(stream_id(index))
            limiter.unlink()
            limiter.close()

        return Made(_Spec(streams, name), cleanup)

    @classmethod
    def open(cls, spec: object) -> PoolSubject:
        assert isinstance(spec, _Spec)
        limiters = _shmrate().ConnectionLimiter
        opener = getattr(limiters, "open", None)
        if opener is not None:
            return cls(opener(spec.state))
        # Without open(), the constructor creates or opens by name; the
        # arguments match what the parent made.
        return cls(limiters(MAX_PER_STREAM, spec.streams, name=spec.state))

    def cycle(self, stream: str) -> bool:
        if not self._acquire(stream):
            return False
        self._release(stream)
        return True

    def close(self) -> None:
        self._limiter.close()


class ShmrateBandwidth(PoolSubject):
    key = "shmrate-bw-pool"
    title = "shmrate BandwidthManager"
    resource = "bandwidth"

    def __init__(self, manager: Any) -> None:
        self._allocate = manager.allocate_bandwidth
        self._release = manager.release_bandwidth
        self._manager = manager

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return attribute_or_reason("shmrate", "BandwidthManager")

    @classmethod
    def make(cls, streams: int, env: Env) -> Made:
        name = env.unique("bench-bwpool")
        # The default stream table holds 1,024 rows; the bench runs it full.
        manager = _shmrate().BandwidthManager(
            2 * streams * SHARE_BYTES_PER_S, name=name
        )
        for index in range(streams - 1):
            _, ok = manager.allocate_bandwidth(stream_id(index), SHARE_BYTES_PER_S)
            if not ok:
                raise RuntimeError(f"BandwidthManager refused stream {index}")

        def cleanup() -> None:
            for index in range(streams - 1):
                manager.release_bandwidth(stream_id(index))
            manager.unlink()
            manager.close()

        return Made(_Spec(streams, name), cleanup)

    @classmethod
    def open(cls, spec: object) -> PoolSubject:
        assert isinstance(spec, _Spec)
        return cls(_shmrate().BandwidthManager.open(spec.state))

    def cycle(self, stream: str) -> bool:
        _, ok = self._allocate(stream, SHARE_BYTES_PER_S)
        if not ok:
            return False
        self._release(stream)
        return True

    def close(self) -> None:
        self._manager.close()


@dataclass(frozen=True)
class _ManagerState:
    counts: Any
    total: Any
    lock: Any
    limit: int


def _manager_make(streams: int, limit: int, hold: int) -> Made:
    manager = _FORK.Manager()
    state = _ManagerState(manager.dict(), manager.Value("q", 0), manager.Lock(), limit)
    with state.lock:
        state.counts.update({stream_id(index): hold for index in range(streams - 1)})
        state.total.value = hold * (streams - 1)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            manager.shutdown()

    return Made(_Spec(streams, state), cleanup)


class ManagerConnections(PoolSubject):
    key = "manager-conn"
    title = "hand-written Manager().dict() + Manager().Lock()"
    resource = "connections"

    def __init__(self, state: _ManagerState) -> None:
        self._state = state

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return None

    @classmethod
    def make(cls, streams: int, env: Env) -> Made:
        return _manager_make(streams, streams, 1)

    @classmethod
    def open(cls, spec: object) -> PoolSubject:
        assert isinstance(spec, _Spec)
        return cls(spec.state)

    def try_acquire(self, stream: str) -> bool:
        state = self._state
        with state.lock:
            count = state.counts.get(stream, 0)
            total = state.total.value
            if count >= MAX_PER_STREAM or total >= state.limit:
                return False
            state.counts[stream] = count + 1
            state.total.value = total + 1
            return True

    def release(self, stream: str) -> None:
        state = self._state
        with state.lock:
            count = state.counts.get(stream, 0)
            if count == 0:
                return
            if count == 1:
                del state.counts[stream]
            else:
                state.counts[stream] = count - 1
            state.total.value -= 1

    def cycle(self, stream: str) -> bool:
        if not self.try_acquire(stream):
            return False
        self.release(stream)
        return True


class ManagerBandwidth(PoolSubject):
    key = "manager-bw"
    title = "hand-written Manager().dict() + Manager().Lock()"
    resource = "bandwidth"

    def __init__(self, state: _ManagerState) -> None:
        self._state = state

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return None

    @classmethod
    def make(cls, streams: int, env: Env) -> Made:
        return _manager_make(
            streams, 2 * streams * SHARE_BYTES_PER_S, SHARE_BYTES_PER_S
        )

    @classmethod
    def open(cls, spec: object) -> PoolSubject:
        assert isinstance(spec, _Spec)
        return cls(spec.state)

    def allocate(self, stream: str, bytes_per_second: int) -> bool:
        state = self._state
        with state.lock:
            old = state.counts.get(stream, 0)
            allocated = state.total.value
            if allocated - old + bytes_per_second > state.limit:
                return False
            state.counts[stream] = bytes_per_second
            state.total.value = allocated - old + bytes_per_second
            return True

    def release(self, stream: str) -> None:
        state = self._state
        with state.lock:
            old = state.counts.pop(stream, 0)
            state.total.value -= old

    def cycle(self, stream: str) -> bool:
        if not self.allocate(stream, SHARE_BYTES_PER_S):
            return False
        self.release(stream)
        return True


POOL_SUBJECTS: list[type[PoolSubject]] = [
    ShmrateConnections,
    ManagerConnections,
    ShmrateBandwidth,
    ManagerBandwidth,
]
