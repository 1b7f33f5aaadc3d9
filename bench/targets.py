"""The targets of issue 5, judged from one run's results."""

from __future__ import annotations

from typing import Any

from bench.report import markdown_table, median_of, ms_text, ratio_text

SHMRATE_KEYS = ("shmrate", "shmrate-bw")


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of issue 5, judged for each shmrate rate subject."""
    out = []
    for key in SHMRATE_KEYS:
        if key not in results["subjects"]:
            continue
        out += _targets_for(key, results)
    return out


def _quotient(value: float | None, reference: float | None) -> float | None:
    return value / reference if value and reference else None


def _targets_for(key: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    cost = results["cost"]
    accuracy_runs = results["accuracy"].get(key, {}).get("runs", [])
    wait = results["waits"].get(key, {})

    def two_procs(subject: str) -> float | None:
        return median_of(results["throughput"].get(subject, {}).get("2"))

    rows: list[dict[str, Any]] = []

    def add(target: str, measured: str, ok: bool | None) -> None:
        row = {"subject": key, "target": target, "measured": measured}
        rows.append(row | {"verdict": _verdict(ok)})

    mine, floor = median_of(cost.get(key)), median_of(cost.get("floor"))
    ratio = _quotient(mine, floor)
    add(
        "allow() ≤ 1.5x the floor, one process",
        ratio_text(mine, floor),
        None if ratio is None else ratio <= 1.5,
    )

    mine, hand = two_procs(key), two_procs("hand-written")
    ratio = _quotient(mine, hand)
    add(
        "2 processes: ≥ 2x the hand-written bucket",
        ratio_text(mine, hand),
        None if ratio is None else ratio >= 2,
    )

    over_redis = [two_procs("limits-fixed"), two_procs("limits-moving")]
    best = max((v for v in over_redis if v), default=None)
    ratio = _quotient(mine, best)
    add(
        "2 processes: ≥ 100x limits over Redis (its faster strategy)",
        ratio_text(mine, best),
        None if ratio is None else ratio >= 100,
    )

    over = sum(run["over"] for run in accuracy_runs)
    add(
        "accuracy: no over-admission (4 and 8 processes)",
        f"{over} over" if accuracy_runs else "-",
        over == 0 if accuracy_runs else None,
    )
    least = min((run["used"] for run in accuracy_runs), default=None)
    add(
        "accuracy: ≥ 99% of the allowed amount used",
        "-" if least is None else f"{least:.1%}",
        None if least is None else least >= 0.99,
    )

    p50, p99 = wait.get("p50_ms"), wait.get("p99_ms")
    cpu = wait.get("cpu_fraction")
    add(
        "blocking wait: lateness p50 ≤ 0.5 ms",
        f"{ms_text(p50)} ms",
        None if p50 is None else p50 <= 0.5,
    )
    add(
        "blocking wait: lateness p99 ≤ 3 ms",
        f"{ms_text(p99)} ms",
        None if p99 is None else p99 <= 3.0,
    )
    add(
        "blocking wait: waiter < 5% of a core",
        "-" if cpu is None else f"{cpu:.1%}",
        None if cpu is None else cpu < 0.05,
    )
    return rows


def table(rows: list[dict[str, Any]], quick: bool) -> str:
    if not rows:
        return "## Targets\n\nshmrate did not run, so no target was judged."
    note = " (--quick: tiny samples, indicative only)" if quick else ""
    body = markdown_table(
        ["shmrate subject", "target", "measured", "verdict"],
        [[r["subject"], r["target"], r["measured"], r["verdict"]] for r in rows],
    )
    return f"## Targets from issue 5{note}\n\n{body}"
