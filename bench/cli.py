"""Command line: pick the plan and the subjects, run the measures, report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench import plot, redis_server, report, targets
from bench.measures import Bench, log
from bench.plan import FULL, QUICK, Plan
from bench.pools import POOL_SUBJECTS, PoolSubject
from bench.shm_tracker import ShmTracker
from bench.subjects import Env, Subject, pid_tag, subject_classes

MEASURES = ("segments", "cost", "throughput", "accuracy", "waits", "pools")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare shmrate with the rate limiters users pick instead.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds, no Redis, one tiny repetition (what CI runs)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the raw numbers "
        "(default bench/results/latest.json, or quick.json with --quick)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument(
        "--measures",
        metavar="NAMES",
        help="comma-separated subset of: " + ", ".join(MEASURES),
    )
    parser.add_argument(
        "--subjects",
        metavar="KEYS",
        help="comma-separated subject keys or patterns, e.g. 'shmrate*,floor'",
    )
    parser.add_argument(
        "--reps", type=int, help="repetitions of the cost, throughput and pool runs"
    )
    parser.add_argument(
        "--accuracy-reps",
        type=int,
        help="repetitions of each 3 s accuracy run (default 1, to fit six minutes)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the subjects and exit"
    )
    return parser


def _selected(key: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(key, p) for p in patterns)


@contextlib.contextmanager
def _redis(wanted: bool, quick: bool) -> Iterator[tuple[str | None, str]]:
    """Yield the URL of a private Redis, or None and the reason there is none."""
    if quick:
        yield None, "skipped by --quick (it runs without Redis)"
        return
    if not wanted:
        yield None, "not selected"
        return
    if redis_server.executable() is None:
        yield None, "redis-server not installed (apt-get install -y redis-server)"
        return
    server = redis_server.RedisServer()
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        yield None, f"redis-server did not start: {exc}"
        return
    try:
        log(f"redis-server {redis_server.version()} on {server.url}")
        yield server.url, ""
    finally:
        server.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan: Plan = QUICK if args.quick else FULL
    if args.reps:
        plan = dataclasses.replace(plan, reps=args.reps)
    if args.accuracy_reps:
        plan = dataclasses.replace(plan, accuracy_reps=args.accuracy_reps)
    patterns = args.subjects.split(",") if args.subjects else None
    measures = args.measures.split(",") if args.measures else list(MEASURES)
    unknown = set(measures) - set(MEASURES)
    if unknown:
        _parser().error(f"unknown measures: {', '.join(sorted(unknown))}")
    rate_classes = [c for c in subject_classes() if _selected(c.key, patterns)]
    pool_classes = [c for c in POOL_SUBJECTS if _selected(c.key, patterns)]
    if args.list:
        for cls in rate_classes:
            shared = "shared" if cls.shared else "unshared"
            print(f"{cls.key:18} {shared:9} {cls.title}")
        for pool in pool_classes:
            print(f"{pool.key:18} {'shared':9} {pool.title} ({pool.resource})")
        return 0

    # A terminated bench still runs its cleanups (Redis, segments, files).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    meta = {"machine": report.machine(), "versions": report.versions()}
    print(report.header(meta), flush=True)
    started_s = time.monotonic()
    tracker = ShmTracker()
    scratch = tempfile.mkdtemp(prefix="shmrate-bench-")
    wants_redis = any(c.needs_redis for c in rate_classes)
    try:
        with _redis(wants_redis, plan.quick) as (url, why_not):
            env = Env(url, why_not, scratch, pid_tag())
            results = _run(plan, env, tracker, rate_classes, pool_classes, measures)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["meta"] = meta
    results["elapsed_s"] = time.monotonic() - started_s
    results["leftovers"] = tracker.leftovers()
    return _finish(results, args, plan)


def _run(
    plan: Plan,
    env: Env,
    tracker: ShmTracker,
    rate_classes: list[type[Subject]],
    pool_classes: list[type[PoolSubject]],
    measures: list[str],
) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    runnable: list[type[Subject]] = []
    for cls in rate_classes:
        reason = cls.missing(env)
        if reason is None:
            runnable.append(cls)
        else:
            skipped[cls.key] = reason
    pools: list[type[PoolSubject]] = []
    for pool in pool_classes:
        reason = pool.missing(env)
        if reason is None:
            pools.append(pool)
        else:
            skipped[pool.key] = reason
    for key, reason in skipped.items():
        log(f"skip {key}: {reason}")

    bench = Bench(plan, env, tracker)
    shared = [c for c in runnable if c.shared]
    results: dict[str, Any] = {
        "plan": plan.as_json(),
        "subjects": {
            c.key: {"title": c.title, "algorithm": c.algorithm, "shared": c.shared}
            for c in runnable
        },
        "pool_subjects": {
            c.key: {"title": c.title, "resource": c.resource} for c in pools
        },
        "skipped": skipped,
    }
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "segments": bench.segments,
        "cost": lambda: bench.cost(runnable),
        "throughput": lambda: bench.throughput(shared),
        "accuracy": lambda: bench.accuracy([c for c in shared if c.enforces]),
        "waits": lambda: bench.waits([c for c in runnable if c.can_wait]),
        "pools": lambda: bench.pools(pools),
    }
    for name in MEASURES:
        results[name] = {}
        if name in measures:
            log(name)
            results[name] = steps[name]()
    results["failures"] = bench.failures
    results["errors"] = bench.errors
    return results


def _finish(results: dict[str, Any], args: argparse.Namespace, plan: Plan) -> int:
    results["targets"] = targets.judge(results)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = "quick" if plan.quick else "latest"
    json_path = args.json or os.path.join(RESULTS_DIR, f"{stem}.json")
    png_path = os.path.join(RESULTS_DIR, "rate_over_time.png")
    notes = []
    if args.no_plot or plan.quick:
        notes.append("plot: not drawn (--no-plot or --quick)")
    else:
        why_not = plot.rate_over_time(results, png_path)
        notes.append(f"plot: {why_not}" if why_not else f"plot: {png_path}")
    with open(json_path, "w", encoding="utf-8") as out:
        json.dump(results, out, indent=1)
    notes.append(f"raw numbers: {json_path}")

    text = report.tables(results) + "\n" + targets.table(results["targets"], plan.quick)
    shmrate_failures = [
        f for f in results["failures"] if f.startswith("FAILURE: shmrate")
    ]
    lines = [text, ""]
    lines += results["failures"]
    lines += [f"ERROR {error}" for error in results["errors"]]
    if results["leftovers"]:
        lines.append("FAILURE: left in /dev/shm: " + ", ".join(results["leftovers"]))
    else:
        lines.append("/dev/shm: every entry the bench created is gone")
    lines += notes
    lines.append(f"elapsed: {results['elapsed_s']:.0f} s")
    print("\n".join(lines), flush=True)
    markdown_path = os.path.splitext(json_path)[0] + ".md"
    with open(markdown_path, "w", encoding="utf-8") as out:
        out.write(report.header(results["meta"]) + "\n" + "\n".join(lines) + "\n")

    # A peer that over-admits is a finding about the peer; the bench itself
    # fails only when shmrate does, when something raised, or when it left
    # shared memory behind.
    failed = shmrate_failures or results["errors"] or results["leftovers"]
    return 1 if failed else 0
