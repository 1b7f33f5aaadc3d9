"""The measures, run from the parent: each ``Bench`` method makes a fresh
limiter for every run (so no run inherits another's state), runs a task of
``bench.tasks`` in forked workers and keeps the raw numbers for the JSON file."""

from __future__ import annotations

import functools
import importlib
import math
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bench.plan import Plan
from bench.pools import PoolSubject, stream_id
from bench.runner import WorkerHung, run_together
from bench.shm_tracker import ShmTracker, listing
from bench.subjects import UNREACHABLE_PER_S, Env, Limit, Subject
from bench.tasks import cycle_pool, hammer, spin, wait_samples


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: an actual sample, never an interpolation."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """Runs the measures over the subjects that can run here."""

    def __init__(self, plan: Plan, env: Env, tracker: ShmTracker) -> None:
        self.plan = plan
        self.env = env
        self.tracker = tracker
        self.errors: list[str] = []
        self.failures: list[str] = []
        self.hung: set[str] = set()

    @contextmanager
    def _made(self, cls: Any, arg: object) -> Iterator[object]:
        with self.tracker.watch():
            made = cls.make(arg, self.env)
        try:
            yield made.spec
        finally:
            with self.tracker.watch():
                made.cleanup()

    def _together(
        self,
        cls: Any,
        arg: object,
        task: Callable[..., dict[str, Any]],
        processes: int,
        budget_s: float,
    ) -> list[dict[str, Any]]:
        if cls.key in self.hung:
            raise WorkerHung("skipped: a worker of it hung earlier in this run")
        # Workers only open what the parent made, so only make() and the
        # cleanup are watched for new /dev/shm entries; watching the runs too
        # would also catch what unrelated processes create meanwhile.
        with self._made(cls, arg) as spec:
            opener = functools.partial(cls.open, spec)
            try:
                return run_together(opener, task, processes, budget_s)
            except WorkerHung:
                # One hang costs the whole overrun allowance; do not pay it
                # again for every remaining run of the same subject.
                self.hung.add(cls.key)
                raise

    def _error(
        self, entry: dict[str, Any], key: str, what: str, exc: Exception
    ) -> None:
        message = f"{key}: {what}: {type(exc).__name__}: {exc}"
        entry["error"] = message
        self.errors.append(message)
        log(f"  ERROR {message}")

    def cost(self, subjects: Sequence[type[Subject]]) -> dict[str, Any]:
        """Nanoseconds per non-blocking try, one process, limit out of reach."""
        out: dict[str, Any] = {
            s.key: {"ns_per_call": [], "refused": 0} for s in subjects
        }
        task = functools.partial(spin, duration_s=self.plan.cost_s)
        for rep in range(self.plan.reps):
            for cls in subjects:
                entry = out[cls.key]
                if "error" in entry:
                    continue
                try:
                    [result] = self._together(
                        cls, Limit(UNREACHABLE_PER_S), task, 1, self.plan.cost_s
                    )
                except Exception as exc:
                    self._error(entry, cls.key, "cost", exc)
                    continue
                elapsed_s = result["end_s"] - result["start_s"]
                entry["ns_per_call"].append(elapsed_s / result["calls"] * 1e9)
                entry["refused"] += result["calls"] - result["admitted"]
            log(f"  cost: repetition {rep + 1}/{self.plan.reps} done")
        for entry in out.values():
            if entry["ns_per_call"]:
                entry.update(summary(entry["ns_per_call"]))
        return out

    def throughput(self, subjects: Sequence[type[Subject]]) -> dict[str, Any]:
        """Admitted tries per second of N processes on one unreachable limit."""
        out: dict[str, Any] = {s.key: {} for s in subjects}
        task = functools.partial(spin, duration_s=self.plan.throughput_s)
        for rep in range(self.plan.reps):
            for processes in self.plan.processes:
                for cls in subjects:
                    entry = out[cls.key]
                    if "error" in entry:
                        continue
                    try:
                        results = self._together(
                            cls,
                            Limit(UNREACHABLE_PER_S),
                            task,
                            processes,
                            self.plan.throughput_s,
                        )
                    except Exception as exc:
                        self._error(entry, cls.key, f"{processes} processes", exc)
                        continue
                    span_s = max(r["end_s"] for r in results) - results[0]["go_s"]
                    run = entry.setdefault(
                        str(processes), {"admitted_per_s": [], "calls_per_s": []}
                    )
                    admitted = sum(r["admitted"] for r in results)
                    calls = sum(r["calls"] for r in results)
                    run["admitted_per_s"].append(admitted / span_s)
                    run["calls_per_s"].append(calls / span_s)
            log(f"  throughput: repetition {rep + 1}/{self.plan.reps} done")
        for entry in out.values():
            for run in entry.values():
                if isinstance(run, dict):
                    run.update(summary(run["admitted_per_s"]))
        return out

    def accuracy(self, subjects: Sequence[type[Subject]]) -> dict[str, Any]:
        """Admitted against the most the algorithm allows, under a flood."""
        out: dict[str, Any] = {s.key: {"runs": []} for s in subjects}
        plan = self.plan
        task = functools.partial(hammer, duration_s=plan.accuracy_s, bin_s=plan.bin_s)
        for rep in range(plan.accuracy_reps):
            for rate_per_s in plan.accuracy_rates_per_s:
                for processes in plan.accuracy_processes:
                    for cls in subjects:
                        entry = out[cls.key]
                        if "error" in entry:
                            continue
                        limit = Limit(rate_per_s)
                        try:
                            results = self._together(
                                cls, limit, task, processes, plan.accuracy_s
                            )
                        except Exception as exc:
                            self._error(entry, cls.key, "accuracy", exc)
                            continue
                        run = self._judge(cls, limit, processes, results)
                        run["rep"] = rep
                        entry["runs"].append(run)
                    log(
                        f"  accuracy: {rate_per_s}/s with {processes} processes"
                        f" (repetition {rep + 1}/{plan.accuracy_reps}) done"
                    )
        return out

    def _judge(
        self,
        cls: type[Subject],
        limit: Limit,
        processes: int,
        results: list[dict[str, Any]],
    ) -> dict[str, Any]:
        go_s = results[0]["go_s"]
        span_s = max(r["end_s"] for r in results) - go_s
        admitted = sum(r["admitted"] for r in results)
        allowed = cls.allowance(limit, span_s)
        bins = [
            sum(column) for column in zip(*(r["bins"] for r in results), strict=True)
        ]
        if admitted > allowed:
            message = (
                f"FAILURE: {cls.key} admitted {admitted} where its algorithm "
                f"allows at most {allowed:.1f} ({limit.rate_per_s}/s, "
                f"{processes} processes, {span_s:.2f} s)"
            )
            self.failures.append(message)
            log(f"  {message}")
        return {
            "rate_per_s": limit.rate_per_s,
            "processes": processes,
            "duration_s": span_s,
            "admitted": admitted,
            "calls": sum(r["calls"] for r in results),
            "allowed": allowed,
            "used": admitted / allowed,
            "over": max(0, admitted - math.floor(allowed)),
            "bins": bins,
        }

    def waits(self, subjects: Sequence[type[Subject]]) -> dict[str, Any]:
        """Lateness of a blocking wait and the CPU the waiter burns."""
        plan = self.plan
        limit = Limit(plan.wait_rate_per_s, plan.wait_window_s)
        task = functools.partial(
            wait_samples,
            n=plan.wait_n,
            samples=plan.wait_samples,
            min_samples=plan.wait_min_samples,
            budget_s=plan.wait_budget_s,
            timeout_s=plan.wait_timeout_s,
        )
        budget_s = plan.wait_budget_s + plan.wait_min_samples * plan.wait_timeout_s
        out: dict[str, Any] = {}
        for cls in subjects:
            entry: dict[str, Any] = {"rate_per_s": limit.rate_per_s, "n": plan.wait_n}
            out[cls.key] = entry
            try:
                [result] = self._together(cls, limit, task, 1, budget_s)
            except Exception as exc:
                self._error(entry, cls.key, "waits", exc)
                continue
            lateness_ms = [s * 1000 for s in result["lateness_s"]]
            entry.update(
                lateness_ms=lateness_ms,
                timeouts=result["timeouts"],
                samples=len(lateness_ms) + result["timeouts"],
                cpu_fraction=result["cpu_s"] / max(result["wall_s"], 1e-9),
            )
            if lateness_ms:
                entry["p50_ms"] = percentile(lateness_ms, 0.50)
                entry["p99_ms"] = percentile(lateness_ms, 0.99)
            log(f"  waits: {cls.key} done")
        return out

    def pools(self, subjects: Sequence[type[PoolSubject]]) -> dict[str, Any]:
        """Take-and-return of one stream while every other stream is live."""
        plan = self.plan
        streams = plan.pool_streams
        task = functools.partial(
            cycle_pool, duration_s=plan.pool_s, stream=stream_id(streams - 1)
        )
        out: dict[str, Any] = {
            s.key: {"resource": s.resource, "streams": streams, "ns_per_cycle": []}
            for s in subjects
        }
        for rep in range(plan.reps):
            for cls in subjects:
                entry = out[cls.key]
                if "error" in entry:
                    continue
                try:
                    [result] = self._together(cls, streams, task, 1, plan.pool_s)
                except Exception as exc:
                    self._error(entry, cls.key, "pools", exc)
                    continue
                if result["refused"]:
                    self._error(
                        entry,
                        cls.key,
                        "pools",
                        RuntimeError(f"refused {result['refused']} cycles"),
                    )
                    continue
                elapsed_s = result["end_s"] - result["start_s"]
                entry["ns_per_cycle"].append(elapsed_s / result["calls"] * 1e9)
            log(f"  pools: repetition {rep + 1}/{plan.reps} done")
        for entry in out.values():
            if entry["ns_per_cycle"]:
                entry.update(summary(entry["ns_per_cycle"]))
        return out

    def segments(self) -> dict[str, Any]:
        """Bytes in /dev/shm per stream for each shmrate class that exists."""
        streams = self.plan.pool_streams
        cases: list[tuple[str, str, int, Callable[[Any, str], Any]]] = [
            (
                "TokenBucket",
                "TokenBucket",
                1,
                lambda m, n: m.TokenBucket(10**6, name=n),
            ),
            (
                f"ConnectionLimiter({streams} total)",
                "ConnectionLimiter",
                streams,
                lambda m, n: m.ConnectionLimiter(4, streams, name=n),
            ),
            (
                f"BandwidthManager({streams} streams)",
                "BandwidthManager",
                streams,
                lambda m, n: m.BandwidthManager(10**9, name=n),
            ),
        ]
        out: dict[str, Any] = {}
        for label, attribute, per, build in cases:
            try:
                module = importlib.import_module("shmrate")
            except ImportError:
                return {"error": "shmrate not installed"}
            if not hasattr(module, attribute):
                out[label] = {"skipped": f"shmrate.{attribute} not available yet"}
                continue
            before = listing()
            with self.tracker.watch():
                obj = build(module, self.env.unique("bench-size"))
                entries = self.tracker.sizes(listing() - before)
                obj.unlink()
                obj.close()
            size = sum(apparent for apparent, _ in entries.values())
            allocated = sum(alloc for _, alloc in entries.values())
            out[label] = {
                "entries": {name: list(sizes) for name, sizes in entries.items()},
                "streams": per,
                "bytes": size,
                "allocated_bytes": allocated,
                "bytes_per_stream": size / per,
            }
        return out
