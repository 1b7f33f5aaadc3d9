"""The three parts of ``python -m bench.keyed``, run from the parent.

Each part makes its shmrate objects through ``Run.own``, which watches
/dev/shm while they are made and removed, and keeps the raw numbers of every
repetition for the JSON file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bench.measures import log, summary
from bench.runner import run_together
from bench.shm_tracker import ShmTracker
from bench.subjects import UNREACHABLE_PER_S, pid_tag

_FORK = multiprocessing.get_context("fork")


class _Named(Protocol):
    """A shmrate object: its name outlives the process until unlinked."""

    def unlink(self) -> None: ...

    def close(self) -> None: ...


_N = TypeVar("_N", bound=_Named)

STRATEGIES = {
    "fixed-window": "FixedWindowRateLimiter",
    "sliding-window-counter": "SlidingWindowCounterRateLimiter",
}
# A day's window of 10**9 hits: out of reach of any run, and a sliding window
# counter's wall-clock window boundary (midnight UTC) is rarely crossed.
LIMITS_ITEM = "1000000000/day"
_DAY_S = 86_400
_BARRIER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class KeyedPlan:
    """Sizes as counts; ``reps`` are interleaved, so that load from other
    processes falls on every subject of a part alike."""

    quick: bool
    keys: int
    max_keys: int
    calls: int
    reps: int
    limits_keys: int
    limits_warmup_hits: int
    limits_hits: int
    limits_redis_hits: int
    limits_reps: int
    processes: int
    shared_hits: int

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = KeyedPlan(
    quick=False,
    keys=100_000,
    # Room to spare, as a deployment would size it: a table whose every row
    # is live has to look for spare rows on each new key.
    max_keys=131_072,
    calls=100_000,
    reps=15,
    limits_keys=1024,
    limits_warmup_hits=2_000,
    limits_hits=20_000,
    # A Redis round trip costs about 100 us, so fewer hits give as many
    # clock ticks per sample as the shared-memory storages get.
    limits_redis_hits=5_000,
    limits_reps=9,
    processes=4,
    shared_hits=5_000,
)

QUICK = dataclasses.replace(
    FULL,
    quick=True,
    calls=20_000,
    reps=3,
    limits_warmup_hits=500,
    limits_hits=2_000,
    limits_redis_hits=500,
    limits_reps=3,
    shared_hits=200,
)


# -- helpers -------------------------------------------------------------------


def _ns_per_call(call: Callable[[Any], object], args: Sequence[object]) -> float:
    started_ns = time.perf_counter_ns()
    for arg in args:
        call(arg)
    return (time.perf_counter_ns() - started_ns) / len(args)


def _fresh(keys: Sequence[str]) -> list[str]:
    """Equal strings in new objects, laid out in call order.

    A server builds each request's key (from an address or a header) just
    before the call: a new object whose hash is not computed yet, not the
    object the table was filled with.
    """
    return [key.encode().decode() for key in keys]


def _client_keys(count: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]


def _with_ratios(runs: dict[str, list[float]], reference: str) -> dict[str, Any]:
    """Summaries of every subject, with the ratio of each repetition to the
    reference's run of the same repetition (they ran back to back)."""
    out: dict[str, Any] = {}
    for key, values in runs.items():
        entry: dict[str, Any] = {"samples": values}
        if values:
            entry.update(summary(values))
        paired = [v / r for v, r in zip(values, runs[reference], strict=False) if r]
        if key != reference and paired:
            entry["paired_ratios"] = paired
            entry["ratio"] = entry["median"] / statistics.median(runs[reference])
        out[key] = entry
    return out


class Run:
    """What one run of the bench collects besides the numbers."""

    def __init__(self, plan: KeyedPlan) -> None:
        self.plan = plan
        self.tracker = ShmTracker()
        self.tag = pid_tag()
        self.errors: list[str] = []
        self.failures: list[str] = []
        self.skipped: dict[str, str] = {}
        self._names = 0

    def name(self, stem: str) -> str:
        self._names += 1
        return f"bench-{stem}-{self.tag}-{self._names}"

    def own(self, stack: contextlib.ExitStack, make: Callable[[], _N]) -> _N:
        """Make a shmrate object, and on leaving ``stack`` remove its name from
        the host and detach, watching /dev/shm both times."""
        with self.tracker.watch():
            made = make()

        def remove() -> None:
            with self.tracker.watch():
                made.unlink()
                made.close()

        stack.callback(remove)
        return made

    def error(self, entry: dict[str, Any], what: str, exc: BaseException) -> None:
        message = f"{what}: {type(exc).__name__}: {exc}"
        entry["error"] = message
        self.errors.append(message)
        log(f"  ERROR {message}")


# -- (a) KeyedTokenBucket against TokenBucket ------------------------------------


def keyed(run: Run) -> dict[str, Any]:
    """ns per allow() call: one bucket against a table of ``keys`` live keys."""
    from shmrate import KeyedTokenBucket, TokenBucket

    plan = run.plan
    rng = random.Random(7)
    keys = _client_keys(plan.keys)
    shuffled = rng.sample(keys, plan.keys)[: plan.calls]
    # Key i is drawn with weight 1 / (i + 1): Zipf's law with s = 1, the
    # usual model of a few heavy clients among many light ones.
    zipf = rng.choices(
        keys, weights=[1 / (i + 1) for i in range(plan.keys)], k=plan.calls
    )
    sequences = {
        "keyed-shuffled": shuffled,
        "keyed-zipf": zipf,
        "keyed-hot": [keys[7]] * plan.calls,
    }
    ones = [1] * plan.calls
    with contextlib.ExitStack() as stack:
        bucket = run.own(
            stack, lambda: TokenBucket(UNREACHABLE_PER_S, name=run.name("tb"))
        )
        table = run.own(
            stack,
            lambda: KeyedTokenBucket(
                UNREACHABLE_PER_S, name=run.name("keyed"), max_keys=plan.max_keys
            ),
        )
        for key in keys:
            table.allow(key)
        log(f"  keyed: {plan.keys:,} keys live")
        runs: dict[str, list[float]] = {
            "token-bucket": [],
            **{k: [] for k in sequences},
        }
        # Round 0 is thrown away: it pays for what the first calls after the
        # fill warm up (caches, branch predictors, the interpreter's inline
        # caches), and that would land on TokenBucket alone.
        for rep in range(plan.reps + 1):
            round_ns = {"token-bucket": _ns_per_call(bucket.allow, ones)}
            for label, sequence in sequences.items():
                args = _fresh(sequence)
                round_ns[label] = _ns_per_call(table.allow, args)
            if rep:
                for label, ns in round_ns.items():
                    runs[label].append(ns)
                log(f"  keyed: repetition {rep}/{plan.reps} done")
        stats = table.stats()
    return {"subjects": _with_ratios(runs, "token-bucket"), "table": stats}


# -- (b) limits: the cost of one hit ---------------------------------------------


def _storages(
    run: Run, stack: contextlib.ExitStack, redis_url: str | None, stem: str
) -> dict[str, str]:
    """The URI of each storage that can run; the shmrate segment is made here
    and removed when ``stack`` closes."""
    from shmrate.limits_storage import ShmrateStorage

    name = run.name(stem)
    run.own(stack, lambda: ShmrateStorage(f"shmrate://{name}"))
    uris = {"memory://": "memory://", "shmrate://": f"shmrate://{name}"}
    if redis_url is not None:
        uris["redis://"] = redis_url
    return uris


def _close_storage(storage: object) -> None:
    # shmrate's storage detaches; limits' own storages have nothing to close.
    close = getattr(storage, "close", None)
    if close is not None:
        close()


def limits_cost(run: Run, redis_url: str | None) -> dict[str, Any]:
    """µs per ``strategy.hit`` on each storage, the keys cycling over 1,024."""
    from limits import parse, strategies
    from limits.storage import storage_from_string

    plan = run.plan
    item = parse(LIMITS_ITEM)
    clients = [str(i % plan.limits_keys) for i in range(plan.limits_hits)]
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        storages = {}
        for label, uri in _storages(run, stack, redis_url, "limits").items():
            storages[label] = storage_from_string(uri)
            stack.callback(_close_storage, storages[label])
        for strategy, class_name in STRATEGIES.items():
            # Bound as Flask-Limiter calls it: hit(item, *identifiers).
            hits = {
                label: functools.partial(
                    getattr(strategies, class_name)(storage).hit, item, "bench"
                )
                for label, storage in storages.items()
            }
            for hit in hits.values():
                _ns_per_call(hit, clients[: plan.limits_warmup_hits])
            runs: dict[str, list[float]] = {label: [] for label in hits}
            for rep in range(plan.limits_reps):
                for label, hit in hits.items():
                    n = plan.limits_redis_hits if label == "redis://" else len(clients)
                    runs[label].append(_ns_per_call(hit, clients[:n]) / 1000)
                log(
                    f"  limits {strategy}: repetition {rep + 1}/{plan.limits_reps} done"
                )
            out[strategy] = _with_ratios(runs, "shmrate://")
            for label, entry in out[strategy].items():
                entry["hits"] = (
                    plan.limits_redis_hits if label == "redis://" else len(clients)
                )
    return out


# -- (c) limits: exact counts across processes -----------------------------------


class _Counter:
    """One process's strategy on one storage, hitting and reading one key."""

    def __init__(self, uri: str, class_name: str, key: str) -> None:
        from limits import parse, strategies
        from limits.storage import storage_from_string

        self._storage = storage_from_string(uri)
        self._limiter = getattr(strategies, class_name)(self._storage)
        self._item = parse(LIMITS_ITEM)
        self._key = key

    def hit(self) -> bool:
        return bool(self._limiter.hit(self._item, self._key))

    def count(self) -> int:
        stats = self._limiter.get_window_stats(self._item, self._key)
        return int(self._item.amount - stats.remaining)

    def close(self) -> None:
        _close_storage(self._storage)


def _hit_then_look(
    counter: _Counter, go_s: float, hits: int, barrier: Any
) -> dict[str, Any]:
    admitted = sum(counter.hit() for _ in range(hits))
    # Every process reads only after all have hit: a shared count then
    # holds every process's hits, an unshared one only this process's.
    barrier.wait(timeout=_BARRIER_TIMEOUT_S)
    return {"admitted": admitted, "sees": counter.count()}


def _count_once(uri: str, class_name: str, key: str, plan: KeyedPlan) -> dict[str, Any]:
    barrier = _FORK.Barrier(plan.processes)
    opener = functools.partial(_Counter, uri, class_name, key)
    task = functools.partial(_hit_then_look, hits=plan.shared_hits, barrier=barrier)
    results = run_together(opener, task, plan.processes, _BARRIER_TIMEOUT_S)
    reader = _Counter(uri, class_name, key)
    try:
        fresh = reader.count()
    finally:
        reader.close()
    return {
        "admitted": sum(r["admitted"] for r in results),
        "each_sees": [r["sees"] for r in results],
        "fresh_reader_sees": fresh,
    }


def exactness(run: Run, redis_url: str | None) -> dict[str, Any]:
    """Processes x hits on one key of each storage, and what each one counts."""
    plan = run.plan
    expected = plan.processes * plan.shared_hits
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        uris = _storages(run, stack, redis_url, "exact")
        for label, class_name in STRATEGIES.items():
            out[label] = {}
            for storage, uri in uris.items():
                entry: dict[str, Any] = {"expected": expected}
                out[label][storage] = entry
                try:
                    # The sliding window counter's windows start at fixed
                    # wall-clock instants; a run that straddles one moves
                    # its first hits to the previous window, so run again.
                    for _ in range(2):
                        window = int(time.time() // _DAY_S)
                        key = run.name(f"exact-{label}")
                        entry.update(_count_once(uri, class_name, key, plan))
                        if int(time.time() // _DAY_S) == window:
                            break
                except Exception as exc:
                    run.error(entry, f"exactness {label} {storage}", exc)
                    continue
                entry["exact"] = (
                    entry["admitted"] == expected
                    and entry["fresh_reader_sees"] == expected
                    and all(sees == expected for sees in entry["each_sees"])
                )
                if storage == "shmrate://" and not entry["exact"]:
                    run.failures.append(
                        f"FAILURE: shmrate:// {label} counted "
                        f"{entry['fresh_reader_sees']} of {expected} hits "
                        f"(each process saw {entry['each_sees']})"
                    )
            log(f"  exactness {label}: done")
    return out
