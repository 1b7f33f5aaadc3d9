"""``python -m bench.keyed``: per-key limits, measured side by side (issue 7).

Three parts, each against its reference from the same run:

- **keyed**: ``KeyedTokenBucket.allow(key)`` with 100,000 live keys against
  one ``TokenBucket.allow()``, for shuffled keys, Zipf-distributed keys and one
  hot key; the target is at most twice the single bucket's cost.
- **limits cost**: one hit through limits' own strategy objects (fixed window
  and sliding window counter) on ``memory://``, ``shmrate://`` and ``redis://``
  on the bench's private Redis; the target is Redis at least 20 times the cost
  of shmrate.
- **exactness**: forked processes hit one key of each storage; a shared
  storage must count every hit of every process, and ``memory://`` shows what
  an unshared one counts instead.

The parts are in ``bench.keyed_measures``, the tables and the targets in
``bench.keyed_report``. ``--quick`` runs in a few seconds without Redis, with
tiny repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from bench import cli, keyed_report, report
from bench.keyed_measures import FULL, QUICK, Run, exactness, keyed, limits_cost
from bench.measures import log
from bench.subjects import import_or_reason


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.keyed",
        description="KeyedTokenBucket against TokenBucket, and shmrate's limits "
        "storage against limits over Redis (issue 7).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds, no Redis, tiny repetitions (what CI runs)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the raw numbers "
        "(default bench/results/keyed.json, or keyed-quick.json with --quick)",
    )
    parser.add_argument("--reps", type=int, help="repetitions of every part")
    return parser


def _meta() -> dict[str, Any]:
    box = report.machine()
    box["command"] = shlex.join(["python", "-m", "bench.keyed", *sys.argv[1:]])
    # Ratios are from one run, but the absolute numbers move with the
    # priority against whatever else runs on the two cores.
    box["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    return {"machine": box, "versions": report.versions()}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _timed(results: dict[str, Any], name: str) -> Iterator[None]:
    log(name)
    started_s = time.monotonic()
    try:
        yield
    finally:
        results.setdefault("part_s", {})[name] = time.monotonic() - started_s


def _measure(run: Run) -> dict[str, Any]:
    results: dict[str, Any] = {"plan": run.plan.as_json()}
    with _timed(results, "keyed"):
        try:
            results["keyed"] = keyed(run)
        except Exception as exc:
            results["keyed"] = {}
            run.error(results["keyed"], "keyed", exc)
    results["limits_cost"] = {}
    results["exactness"] = {}
    no_limits = import_or_reason("limits", "limits")
    if no_limits is not None:
        run.skipped["limits"] = no_limits
        log(f"skip limits: {no_limits}")
        return results
    # Importing shmrate.limits_storage registers shmrate:// with limits.
    no_storage = import_or_reason("shmrate.limits_storage", "shmrate.limits_storage")
    if no_storage is not None:
        run.skipped["shmrate://"] = no_storage
        log(f"skip limits: {no_storage}")
        return results
    no_redis_py = import_or_reason("redis", "redis (redis-py)")
    with cli._redis(no_redis_py is None, run.plan.quick) as (url, no_redis):
        if no_redis_py is not None and not run.plan.quick:
            no_redis = no_redis_py
        if url is None:
            run.skipped["redis://"] = no_redis
            log(f"skip redis://: {no_redis}")
        for name, part in (("limits_cost", limits_cost), ("exactness", exactness)):
            with _timed(results, name):
                try:
                    results[name] = part(run, url)
                except Exception as exc:
                    results[name] = {}
                    run.error(results[name], name, exc)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = dataclasses.replace(plan, reps=args.reps, limits_reps=args.reps)
    # A terminated bench still runs its cleanups (Redis, segments).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    meta = _meta()
    title = "shmrate bench: per-key limits (issue 7)"
    print(report.header(meta, title), flush=True)
    started_s = time.monotonic()
    run = Run(plan)
    results = _measure(run)
    results["meta"] = meta
    results["skipped"] = run.skipped
    results["failures"] = run.failures
    results["errors"] = run.errors
    results["leftovers"] = run.tracker.leftovers()
    results["elapsed_s"] = time.monotonic() - started_s
    results["targets"] = keyed_report.judge(results)

    os.makedirs(cli.RESULTS_DIR, exist_ok=True)
    stem = "keyed-quick" if plan.quick else "keyed"
    json_path = args.json or os.path.join(cli.RESULTS_DIR, f"{stem}.json")
    with open(json_path, "w", encoding="utf-8") as out:
        json.dump(results, out, indent=1)
    lines = [keyed_report.tables(results), ""]
    lines += results["failures"]
    lines += [f"ERROR {error}" for error in results["errors"]]
    if results["leftovers"]:
        lines.append("FAILURE: left in /dev/shm: " + ", ".join(results["leftovers"]))
    else:
        lines.append("/dev/shm: every entry the bench created is gone")
    lines.append(f"raw numbers: {json_path}")
    lines.append(f"elapsed: {results['elapsed_s']:.0f} s")
    print("\n".join(lines), flush=True)
    markdown_path = os.path.splitext(json_path)[0] + ".md"
    with open(markdown_path, "w", encoding="utf-8") as out:
        out.write(report.header(meta, title) + "\n" + "\n".join(lines) + "\n")

    # A missed speed target is a finding, not a failure; the run fails when
    # shmrate's shared count is wrong, something raised, or /dev/shm kept
    # an entry.
    failed = results["failures"] or results["errors"] or results["leftovers"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
