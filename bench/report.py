"""The machine header, the markdown tables and the targets from issue 5."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Callable
from typing import Any

from bench import redis_server

REFERENCE = "shmrate"

_DISTRIBUTIONS = (
    "shmrate",
    "posix_ipc",
    "numpy",
    "pyrate-limiter",
    "filelock",
    "limits",
    "redis",
    "throttled-py",
    "token-bucket",
    "matplotlib",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["redis-server"] = redis_server.version()
    return found


def header(meta: dict[str, Any], title: str = "shmrate bench") -> str:
    box = meta["machine"]
    installed = ", ".join(
        f"{name} {version}" for name, version in meta["versions"].items() if version
    )
    lines = [
        f"# {title}",
        "",
        f"- machine: {box['cores']} cores ({box['usable_cores']} usable), "
        f"{box['cpu_model']}, Linux {box['kernel']}, Python {box['python']}",
        f"- date: {box['date']}",
        f"- command: `{box['command']}`",
        f"- installed: {installed}",
    ]
    if "nice" in box:
        lines.append(f"- priority: nice {box['nice']}")
    return "\n".join([*lines, ""])


# -- formatting -------------------------------------------------------------


def ratio_text(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    ratio = value / reference
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ms_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def median_of(entry: dict[str, Any] | None) -> float | None:
    if not entry or "median" not in entry:
        return None
    value: float = entry["median"]
    return value


def _range(entry: dict[str, Any] | None, fmt: Callable[[float | None], str]) -> str:
    if not entry or "min" not in entry:
        return "-"
    return f"{fmt(entry['min'])} to {fmt(entry['max'])}"


# -- the tables --------------------------------------------------------------


def tables(results: dict[str, Any]) -> str:
    parts = [_summary(results), _cost(results), _throughput(results)]
    parts += [_accuracy(results), _waits(results), _pools(results)]
    parts += [_segments(results)]
    skipped = results["skipped"]
    if skipped:
        parts.append(
            "Skipped:\n\n"
            + "\n".join(f"- {key}: {reason}" for key, reason in skipped.items())
        )
    return "\n\n".join(part for part in parts if part) + "\n"


def _summary(results: dict[str, Any]) -> str:
    cost = results["cost"]
    throughput = results["throughput"]
    accuracy = results["accuracy"]
    waits = results["waits"]
    processes = results["plan"]["processes"]
    ref_cost = median_of(cost.get(REFERENCE))
    ref_tp = throughput.get(REFERENCE, {})
    head = ["subject", "shared", "try cost"]
    head += [f"admitted/s, {p} proc" for p in processes]
    head += ["accuracy: least used", "wait p50 late ms", "waiter CPU"]
    rows = []
    for key, meta in results["subjects"].items():
        row = [key, "yes" if meta["shared"] else "no"]
        row.append(ratio_text(median_of(cost.get(key)), ref_cost))
        for p in processes:
            mine = median_of(throughput.get(key, {}).get(str(p)))
            row.append(ratio_text(mine, median_of(ref_tp.get(str(p)))))
        runs = accuracy.get(key, {}).get("runs", [])
        row.append(f"{min(r['used'] for r in runs):.1%}" if runs else "-")
        wait = waits.get(key, {})
        row.append(ms_text(wait.get("p50_ms")))
        cpu = wait.get("cpu_fraction")
        row.append("-" if cpu is None else f"{cpu:.1%}")
        rows.append(row)
    return (
        "## Every subject against shmrate TokenBucket (ratio = subject ÷ shmrate)\n\n"
        "Above 1 in *try cost* means costlier than shmrate; below 1 in "
        "*admitted/s* means fewer admitted calls per second. The last three "
        "columns are absolute, not ratios: a ratio of near-zero lateness says "
        "nothing. *accuracy: least used* is the worst run's admitted ÷ allowed. "
        "Every number comes from this one run.\n\n" + markdown_table(head, rows)
    )


def _cost(results: dict[str, Any]) -> str:
    cost = results["cost"]
    ref = median_of(cost.get(REFERENCE))
    rows = []
    for key, entry in cost.items():
        rows.append(
            [
                key,
                results["subjects"][key]["algorithm"],
                _ns(median_of(entry)),
                _range(entry, _ns),
                ratio_text(median_of(entry), ref),
                entry.get("error", ""),
            ]
        )
    return (
        "## Single-process cost of a non-blocking try (ns per call, limit out of "
        f"reach; median of {results['plan']['reps']})\n\n"
        + markdown_table(
            ["subject", "algorithm", "ns/call", "min to max", "÷ shmrate", "note"], rows
        )
    )


def _throughput(results: dict[str, Any]) -> str:
    throughput = results["throughput"]
    processes = results["plan"]["processes"]
    ref = throughput.get(REFERENCE, {})
    rows = []
    for key, entry in throughput.items():
        row = [key]
        for p in processes:
            run = entry.get(str(p))
            cell = _count(median_of(run))
            if run:
                cell += f" ({ratio_text(median_of(run), median_of(ref.get(str(p))))})"
            row.append(cell)
        row.append(entry.get("error", ""))
        rows.append(row)
    head = ["subject", *(f"{p} proc" for p in processes), "note"]
    return (
        "## Aggregate admitted calls/s on one limiter, limit out of reach "
        f"(median of {results['plan']['reps']}; ratio to shmrate in brackets)\n\n"
        + markdown_table(head, rows)
    )


def _accuracy(results: dict[str, Any]) -> str:
    rows = []
    for key, entry in results["accuracy"].items():
        for run in entry.get("runs", []):
            verdict = "FAILURE: over-admitted" if run["over"] else "ok"
            rows.append(
                [
                    key,
                    f"{run['rate_per_s']:,}",
                    str(run["processes"]),
                    f"{run['duration_s']:.2f}",
                    f"{run['admitted']:,}",
                    f"{run['allowed']:,.0f}",
                    f"{run['used']:.1%}",
                    verdict,
                ]
            )
        if "error" in entry:
            rows.append([key, "", "", "", "", "", "", entry["error"]])
    head = [
        "subject",
        "limit/s",
        "procs",
        "s",
        "admitted",
        "allowed",
        "used",
        "verdict",
    ]
    return (
        "## Accuracy under a flood\n\n"
        "*allowed* is the most the algorithm admits: rate x time plus its burst "
        "(a token bucket's capacity; one window for window algorithms; "
        "one more second's lump for throttled-py's whole-second refill). A window "
        "algorithm reaches it only when a run ends just after a window opens, "
        "so rate x time alone, 75% of it at 500/s over 3 s, is its full use.\n\n"
        + markdown_table(head, rows)
    )


def _waits(results: dict[str, Any]) -> str:
    waits = results["waits"]
    if not waits:
        return ""
    rows = []
    for key, entry in waits.items():
        rows.append(
            [
                key,
                str(entry.get("samples", "-")),
                ms_text(entry.get("p50_ms")),
                ms_text(entry.get("p99_ms")),
                "-" if "cpu_fraction" not in entry else f"{entry['cpu_fraction']:.1%}",
                str(entry.get("timeouts", "-")),
                entry.get("error", ""),
            ]
        )
    plan = results["plan"]
    head = [
        "subject",
        "samples",
        "late p50 ms",
        "late p99 ms",
        "waiter CPU",
        "timeouts",
        "note",
    ]
    return (
        f"## Blocking waits ({plan['wait_n']} units at {plan['wait_rate_per_s']:,}/s "
        "after emptying the limiter; lateness = wake time - ideal time; CPU = "
        "the waiter's process time ÷ its wall time while blocked)\n\n"
        + markdown_table(head, rows)
    )


def _pools(results: dict[str, Any]) -> str:
    pools = results["pools"]
    if not pools:
        return ""
    rows = []
    for resource in ("connections", "bandwidth"):
        entries = {k: e for k, e in pools.items() if e["resource"] == resource}
        ref = next((e for k, e in entries.items() if k.startswith("shmrate")), None)
        for key, entry in entries.items():
            rows.append(
                [
                    resource,
                    key,
                    _ns(median_of(entry)),
                    _range(entry, _ns),
                    ratio_text(median_of(entry), median_of(ref)),
                    entry.get("error", ""),
                ]
            )
    streams = results["plan"]["pool_streams"]
    return (
        f"## Take and give back one stream with {streams:,} live streams "
        "(connection try_acquire + release; bandwidth allocate + release; "
        f"ns per pair, median of {results['plan']['reps']})\n\n"
        + markdown_table(
            ["pool", "subject", "ns/pair", "min to max", "÷ shmrate", "note"], rows
        )
    )


def _segments(results: dict[str, Any]) -> str:
    segments = results["segments"]
    if not segments or "error" in segments:
        return ""
    rows = []
    for label, entry in segments.items():
        if "skipped" in entry:
            rows.append([label, "-", "-", "-", entry["skipped"]])
            continue
        rows.append(
            [
                label,
                f"{entry['bytes']:,}",
                str(len(entry["entries"])),
                f"{entry['bytes_per_stream']:,.0f}",
                "",
            ]
        )
    return (
        "## shmrate's /dev/shm footprint (segments and semaphores; peers keep no "
        "comparable per-stream file)\n\n"
        + markdown_table(
            ["object", "bytes", "entries", "bytes per stream", "note"], rows
        )
    )
