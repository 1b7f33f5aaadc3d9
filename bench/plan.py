"""How long and how often each measure runs, in the full and the quick mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    """Durations in seconds, repetitions as counts.

    The full plan fits in about six minutes on a two-core machine; the
    quick plan (for CI, so the bench cannot rot) in a few seconds.
    """

    quick: bool
    reps: int
    cost_s: float
    throughput_s: float
    processes: tuple[int, ...]
    accuracy_s: float
    accuracy_processes: tuple[int, ...]
    accuracy_rates_per_s: tuple[int, ...]
    accuracy_reps: int
    bin_s: float
    wait_rate_per_s: int
    wait_window_s: float
    wait_n: int
    wait_samples: int
    wait_min_samples: int
    wait_budget_s: float
    wait_timeout_s: float
    pool_streams: int
    pool_s: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


_COMMON: dict[str, Any] = {
    "accuracy_rates_per_s": (20_000, 500),
    "bin_s": 0.1,
    # 1,000 units at 100,000/s is a 10 ms wait: long enough that a waiter
    # sleeps, short enough for many samples. The ideal wake time is known to
    # within one unit's refill, 10 us at this rate. Window peers get 20 ms
    # windows of 2,000, the same average rate.
    "wait_rate_per_s": 100_000,
    "wait_window_s": 0.02,
    "wait_n": 1000,
    "wait_timeout_s": 2.0,
    "pool_streams": 1024,
}

FULL = Plan(
    quick=False,
    reps=3,
    cost_s=0.5,
    throughput_s=0.5,
    processes=(1, 2, 4, 8),
    accuracy_s=3.0,
    accuracy_processes=(4, 8),
    accuracy_reps=1,
    wait_samples=100,
    wait_min_samples=5,
    wait_budget_s=2.5,
    pool_s=0.5,
    **_COMMON,
)

QUICK = Plan(
    quick=True,
    reps=1,
    cost_s=0.1,
    throughput_s=0.15,
    processes=(1, 2),
    accuracy_s=0.4,
    accuracy_processes=(4,),
    accuracy_reps=1,
    wait_samples=5,
    wait_min_samples=3,
    wait_budget_s=0.4,
    pool_s=0.1,
    **_COMMON,
)
