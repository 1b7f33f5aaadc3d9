"""The tables of ``python -m bench.keyed`` and the targets of issue 7, item 4."""

from __future__ import annotations

from typing import Any

from bench.report import markdown_table

KEYED_WITHIN = 2.0
REDIS_AT_LEAST = 20.0

KEYED_ROWS = {
    "token-bucket": "TokenBucket.allow(), one bucket",
    "keyed-shuffled": "allow(key), shuffled keys",
    "keyed-zipf": "allow(key), Zipf keys (s = 1)",
    "keyed-hot": "allow(key), one hot key",
}
_KEYED_SHORT = {"keyed-shuffled": "shuffled", "keyed-zipf": "Zipf", "keyed-hot": "hot"}
_SHARED = {"memory://": "no", "shmrate://": "yes", "redis://": "yes"}


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _spread(entry: dict[str, Any], field: str, fmt: str) -> str:
    values = entry.get(field)
    if not values:
        return "-"
    return f"{min(values):{fmt}} to {max(values):{fmt}}"


def _number(entry: dict[str, Any], fmt: str) -> str:
    return "-" if "median" not in entry else f"{entry['median']:{fmt}}"


def _parts(part: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The strategies of a part; none when the whole part raised."""
    return [] if "error" in part else list(part.items())


# -- targets ---------------------------------------------------------------------


def judge(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per target: what was measured and PASS, MISS or n/a."""
    rows: list[dict[str, str]] = []

    def add(part: str, case: str, target: str, measured: str, ok: bool | None) -> None:
        rows.append(
            {
                "part": part,
                "case": case,
                "target": target,
                "measured": measured,
                "verdict": _verdict(ok),
            }
        )

    subjects = results.get("keyed", {}).get("subjects", {})
    for key, short in _KEYED_SHORT.items():
        ratio = subjects.get(key, {}).get("ratio")
        add(
            "keyed",
            short,
            f"allow(key), {short}: ≤ {KEYED_WITHIN:g}x TokenBucket.allow()",
            _ratio(ratio),
            None if ratio is None else ratio <= KEYED_WITHIN,
        )
    for strategy, storages in _parts(results["limits_cost"]):
        redis = storages.get("redis://", {})
        ratio = redis.get("ratio")
        add(
            "cost",
            strategy,
            f"limits {strategy}: redis:// ≥ {REDIS_AT_LEAST:g}x shmrate:// per hit",
            _ratio(ratio),
            None if ratio is None else ratio >= REDIS_AT_LEAST,
        )
    for strategy, storages in _parts(results["exactness"]):
        entry = storages.get("shmrate://", {})
        exact = entry.get("exact")
        measured = (
            "-"
            if exact is None
            else f"{entry['fresh_reader_sees']:,} of {entry['expected']:,}"
        )
        add(
            "exact",
            strategy,
            f"limits {strategy}: shmrate:// counts every process's hits",
            measured,
            exact,
        )
    return rows


def _verdict_line(rows: list[dict[str, str]], part: str, text: str) -> str:
    picked = [r for r in rows if r["part"] == part]
    if not picked:
        return ""
    cases = [
        f"{r['case']} n/a"
        if r["measured"] == "-"
        else f"{r['case']} {r['measured']} {r['verdict']}"
        for r in picked
    ]
    return f"{text}: " + ", ".join(cases) + "."


# -- tables ----------------------------------------------------------------------


def tables(results: dict[str, Any]) -> str:
    plan = results["plan"]
    rows = results["targets"]
    parts = [_keyed(results, rows), _limits_cost(results, rows)]
    parts += [_exactness(results), _targets(rows, plan["quick"])]
    # redis:// has its line in the limits table already.
    skipped = {k: why for k, why in results["skipped"].items() if k != "redis://"}
    if skipped:
        parts.append(
            "Skipped:\n\n"
            + "\n".join(f"- {key}: {why}" for key, why in skipped.items())
        )
    return "\n\n".join(part for part in parts if part)


def _keyed(results: dict[str, Any], targets: list[dict[str, str]]) -> str:
    plan = results["plan"]
    keyed = results.get("keyed", {})
    if "error" in keyed:
        return f"## KeyedTokenBucket\n\nERROR {keyed['error']}"
    rows = []
    for key, title in KEYED_ROWS.items():
        entry = keyed["subjects"].get(key, {})
        rows.append(
            [
                title,
                _number(entry, ",.0f"),
                _spread(entry, "samples", ",.0f"),
                "1.00x" if key == "token-bucket" else _ratio(entry.get("ratio")),
                _spread(entry, "paired_ratios", ".2f"),
            ]
        )
    table = keyed["table"]
    state = (
        f"The table held {table['keys']:,} live keys of {table['max_keys']:,} rows "
        f"at the end ({table['evictions']:,} evictions, {table['reused']:,} rows "
        "reused)."
    )
    head = ["calls", "ns/call", "min to max", "÷ TokenBucket", "paired ÷, min to max"]
    verdict = _verdict_line(
        targets,
        "keyed",
        f"Target: allow(key) within {KEYED_WITHIN:g}x of TokenBucket.allow()",
    )
    return (
        f"## KeyedTokenBucket.allow(key) with {plan['keys']:,} live keys against "
        "TokenBucket.allow() (ns per call, limit out of reach; median of "
        f"{plan['reps']} interleaved repetitions of {plan['calls']:,} calls)\n\n"
        "Shuffled: the keys in a random order, each at most once per repetition. "
        "Zipf: key i drawn with weight 1/(i + 1). Hot: one key every call. Keys "
        "are client addresses, built anew before every repetition, as a server "
        "builds them per request. *÷ TokenBucket* divides the medians; *paired* "
        "divides each repetition's run by the TokenBucket run just before it.\n\n"
        + markdown_table(head, rows)
        + f"\n\n{state}\n\n{verdict}"
    )


def _limits_cost(results: dict[str, Any], targets: list[dict[str, str]]) -> str:
    plan = results["plan"]
    cost = results["limits_cost"]
    if not cost:
        return ""
    if "error" in cost:
        return f"## limits per hit\n\nERROR {cost['error']}"
    rows = []
    for strategy, storages in cost.items():
        for storage, entry in storages.items():
            rows.append(
                [
                    strategy,
                    storage,
                    _SHARED[storage],
                    _number(entry, ",.2f"),
                    _spread(entry, "samples", ",.2f"),
                    "1.00x" if storage == "shmrate://" else _ratio(entry.get("ratio")),
                    _spread(entry, "paired_ratios", ".1f"),
                    f"{entry.get('hits', 0):,}",
                ]
            )
    head = [
        "strategy",
        "storage",
        "shared",
        "µs/hit",
        "min to max",
        "÷ shmrate://",
        "paired ÷, min to max",
        "hits per run",
    ]
    verdict = _verdict_line(
        targets,
        "cost",
        f"Target: redis:// at least {REDIS_AT_LEAST:g}x shmrate:// per hit",
    )
    redis = results["skipped"].get("redis://")
    skipped = f"\n\nredis:// not measured: {redis}." if redis else ""
    return (
        "## limits: one hit through its own strategy objects (µs per hit, limit "
        f"out of reach, {plan['limits_keys']:,} keys in turn; median of "
        f"{plan['limits_reps']} interleaved repetitions)\n\n"
        "redis:// is a private redis-server on 127.0.0.1 (no persistence), "
        "reached by redis-py; memory:// counts in one process only.\n\n"
        + markdown_table(head, rows)
        + skipped
        + (f"\n\n{verdict}" if verdict else "")
    )


def _seen(values: list[int]) -> str:
    if values and all(v == values[0] for v in values):
        return f"{values[0]:,} in each"
    return " / ".join(f"{v:,}" for v in values)


def _exactness(results: dict[str, Any]) -> str:
    plan = results["plan"]
    exact = results["exactness"]
    if not exact:
        return ""
    if "error" in exact:
        return f"## limits exactness\n\nERROR {exact['error']}"
    rows = []
    for strategy, storages in exact.items():
        for storage, entry in storages.items():
            if "error" in entry:
                rows.append([strategy, storage, "-", "-", "-", entry["error"]])
                continue
            if entry["exact"]:
                verdict = "exact"
            elif _SHARED[storage] == "no":
                verdict = "not shared: each process counts only its own hits"
            else:
                verdict = "FAILURE: counts lost or doubled"
            rows.append(
                [
                    strategy,
                    storage,
                    f"{entry['admitted']:,}",
                    _seen(entry["each_sees"]),
                    f"{entry['fresh_reader_sees']:,}",
                    verdict,
                ]
            )
    head = [
        "strategy",
        "storage",
        "admitted",
        "each process sees",
        "a new process sees",
        "verdict",
    ]
    expected = plan["processes"] * plan["shared_hits"]
    return (
        f"## limits: {plan['processes']} forked processes x "
        f"{plan['shared_hits']:,} hits on one key (expected count {expected:,})\n\n"
        "*each process sees* is the count limits' get_window_stats() gives in each "
        "process once all of them have hit; *a new process sees* is the same "
        "read from a storage opened afterwards.\n\n" + markdown_table(head, rows)
    )


def _targets(rows: list[dict[str, str]], quick: bool) -> str:
    note = " (--quick: tiny samples, indicative only)" if quick else ""
    body = markdown_table(
        ["target", "measured", "verdict"],
        [[r["target"], r["measured"], r["verdict"]] for r in rows],
    )
    return f"## Targets from issue 7, item 4{note}\n\n{body}"
