"""The common shape of every subject the bench compares, and the registry.

A subject is one rate limiter (shmrate's or a peer's) behind a small adapter.
The parent process calls ``make`` to create the shared state and gets back a
``Made``: a picklable ``spec`` that names that state, plus the parent's own
cleanup. Each worker process calls ``open(spec)`` and then only ``try_once``,
``wait`` and ``close``. Every adapter imports its library inside ``missing``,
``make`` and ``open``, never at module level, so a library that is not
installed (or a shmrate class that does not exist yet) costs one line in the
report instead of the whole run.
"""

from __future__ import annotations

import abc
import importlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

# Rates at or above this are the "limit out of reach" used by the cost and
# throughput measures: no run of a few seconds can spend 10**12 tokens.
UNREACHABLE_PER_S = 10**12


@dataclass(frozen=True)
class Limit:
    """A configured limit: ``rate_per_s`` on average, judged over ``window_s``.

    Token buckets use only the rate. Window algorithms (sliding logs, fixed
    and moving windows, GCRA's burst) allow ``rate_per_s * window_s`` per
    window; every full run uses one-second windows, and only the blocking-wait
    measure shortens them so that one sample does not take a whole second.
    """

    rate_per_s: int
    window_s: float = 1.0

    @property
    def per_window(self) -> int:
        return max(1, round(self.rate_per_s * self.window_s))


@dataclass(frozen=True)
class Env:
    """What the adapters may need from the run, besides the limit."""

    redis_url: str | None
    redis_absent_reason: str
    scratch_dir: str
    run_tag: str
    _counter: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def unique(self, stem: str) -> str:
        """A name no other object of this run (or of a concurrent run) uses."""
        return f"{stem}-{self.run_tag}-{next(self._counter)}"


@dataclass
class Made:
    """What ``make`` returns: the spec for the workers, the cleanup for us."""

    spec: object
    cleanup: Callable[[], None]


def import_or_reason(module: str, what: str) -> str | None:
    """None when ``module`` imports, else the line the report prints instead."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{what} not installed"
    return None


def attribute_or_reason(module: str, name: str) -> str | None:
    """None when ``module.name`` exists; shmrate grows its classes one by one."""
    reason = import_or_reason(module, module)
    if reason is not None:
        return reason
    if not hasattr(importlib.import_module(module), name):
        return f"{module}.{name} not available yet"
    return None


# Bounds each run of takes at one size while emptying a limiter.
_DRAIN_TRIES = 64
# Rounds of emptying before prime_wait gives up on a limiter.
_PRIME_TRIES = 5


class Subject(abc.ABC):
    """One rate limiter behind the interface every measure drives.

    ``try_once(n)`` is an attribute, not a method: each adapter binds it to the
    cheapest callable that does one non-blocking try of the library (often the
    library's own bound method), so the tight loop pays exactly one Python
    call per try, as a user's code would.
    """

    key: ClassVar[str]
    title: ClassVar[str]
    algorithm: ClassVar[str]
    shared: ClassVar[bool]
    needs_redis: ClassVar[bool] = False
    can_wait: ClassVar[bool] = False
    # False for the floor, which admits everything and so has no accuracy.
    enforces: ClassVar[bool] = True
    # The least time a bucket credits at once (shmrate refills in steps of
    # 1 ms and, unless full, keeps the remainder); 0 for a bucket that refills
    # on every call.
    refill_step_s: ClassVar[float] = 0.0

    try_once: Callable[[int], bool]

    def __init__(self, limit: Limit) -> None:
        self.limit = limit

    @classmethod
    @abc.abstractmethod
    def missing(cls, env: Env) -> str | None:
        """Why this subject cannot run here, or None when it can."""

    @classmethod
    @abc.abstractmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        """Create the limiter's state in the parent; the spec names it."""

    @classmethod
    @abc.abstractmethod
    def open(cls, spec: object) -> Subject:
        """Attach to the state named by ``spec``, in a worker process."""

    @classmethod
    def burst(cls, limit: Limit) -> float:
        """What the algorithm may admit on top of ``rate * time``.

        For a token bucket this is its capacity, ``max(rate, 1024)``; the
        window algorithms override it with what their windows allow.
        """
        return float(max(limit.rate_per_s, 1024))

    @classmethod
    def allowance(cls, limit: Limit, duration_s: float) -> float:
        """The most the algorithm admits in ``duration_s`` from a fresh start."""
        return limit.rate_per_s * duration_s + cls.burst(limit)

    def wait(self, n: int, timeout_s: float) -> bool:
        """Block until ``n`` units are taken; False when ``timeout_s`` passed."""
        raise NotImplementedError(f"{self.key} has no blocking wait")

    def prime_wait(self, n: int) -> float:
        """Empty the limiter and return when ``n`` units are due again.

        The return value is a ``time.monotonic()`` instant: the ideal wake time
        of a ``wait(n)`` that starts now. This default suits token buckets and
        GCRA, which earn units continuously at the configured rate.
        """
        rate_per_s = self.limit.rate_per_s
        for _ in range(_PRIME_TRIES):
            refused_s = self._empty()
            if not self.refill_step_s:
                return refused_s + n / rate_per_s
            stepped_s = self._next_step(refused_s)
            # A second step may have passed unseen (this process was off the
            # CPU); then the bucket is not empty, and this round is void.
            if stepped_s is not None and not self.try_once(1):
                return stepped_s + n / rate_per_s
        raise RuntimeError(f"{self.key}: could not empty the limiter")

    def _next_step(self, refused_s: float) -> float | None:
        """Wait for the bucket's next refill step; return a refusal just before.

        A bucket that credits time in steps keeps the part of a step not yet
        credited, so right after emptying it the instant its clock stands at
        is unknown, anywhere up to one step back. Polling for exactly one
        step's units pins that clock: the first poll that gets them is the
        first to see the step complete, and the refused poll before it began
        before the step completed. The bucket is then empty as of that step.
        """
        units = max(1, round(self.limit.rate_per_s * self.refill_step_s))
        deadline_s = refused_s + 3 * self.refill_step_s
        while time.monotonic() < deadline_s:
            began_s = time.monotonic()
            if self.try_once(units):
                return refused_s
            refused_s = began_s
        return None

    def _empty(self) -> float:
        """Take units until a try is refused; return when that try began.

        Sizes fall in powers of two from the capacity, so a bucket of capacity
        C empties in about 2 * log2(C) calls and is left with less than the
        last refused size. A limit that earns more units per call than a size
        (a fast rate behind a Redis round trip) never refuses that size; then
        the sizes climb back until one is refused, and the ideal wake time is
        uncertain by that size's worth of refill, about one call.
        """
        capacity = int(self.burst(self.limit))
        size = 1 << max(0, capacity.bit_length() - 1)
        climbing = False
        while size <= 4 * capacity:
            for _ in range(_DRAIN_TRIES):
                began_s = time.monotonic()
                if not self.try_once(size):
                    break
            else:
                climbing = True
                size *= 2
                continue
            if climbing or size == 1:
                return began_s
            size //= 2
        raise RuntimeError(f"{self.key}: could not empty the limiter")

    # Not abstract: most adapters hold nothing that needs detaching.
    def close(self) -> None:  # noqa: B027
        """Detach this process from the limiter (never destroys shared state)."""


class WindowSubject(Subject):
    """Shared behaviour of the algorithms that count admissions per window."""

    @classmethod
    def burst(cls, limit: Limit) -> float:
        # A window of length W admits at most rate * W, so any span of
        # length T, which meets at most floor(T / W) + 1 windows, admits
        # at most rate * T + rate * W.
        return float(limit.per_window)

    def prime_wait(self, n: int) -> float:
        # A window log's next admission depends on when every logged entry
        # arrived. Letting the window empty and then filling it in one call
        # puts every entry at one instant, so the next admission is exactly
        # one window later.
        time.sleep(self.limit.window_s + 0.005)
        filled_s = time.monotonic()
        if not self.try_once(self.limit.per_window):
            raise RuntimeError(f"{self.key}: an empty window refused a full burst")
        return filled_s + self.limit.window_s


def subject_classes() -> list[type[Subject]]:
    """Every rate-limit subject, in report order (shmrate first)."""
    from bench import local_subjects, redis_subjects, shmrate_subjects

    return [
        *shmrate_subjects.SUBJECTS,
        *local_subjects.SUBJECTS,
        *redis_subjects.SUBJECTS,
    ]


def pid_tag() -> str:
    """A short tag that keeps names of concurrent bench runs apart."""
    return f"{os.getpid()}{time.monotonic_ns() % 10_000:04d}"
