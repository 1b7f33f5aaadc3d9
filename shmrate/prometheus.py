"""Prometheus metrics from shmrate's shared counters (``pip install
shmrate[prometheus]``).

The counters live in the shared segments, not in the process, so one
collector in any one process exports exact values for the whole host: every
worker's calls are already summed in the segment. Nothing needs
``PROMETHEUS_MULTIPROC_DIR``, and a worker that dies loses nothing. Register
the collector in one process only (a gunicorn master, a sidecar, or one worker),
or each series is exported once per process that serves it::

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY
    from shmrate.prometheus import ShmrateCollector

    REGISTRY.register(ShmrateCollector())  # every segment on this host
    start_http_server(9108)

``ShmrateCollector(objects=[bucket, limiter])`` exports only those objects.
Each scrape reads each object's ``stats()`` under its lock, so the numbers of
one object are one consistent snapshot. Without objects the collector finds
the segments in ``/dev/shm`` (Linux) at every scrape, so segments created later
appear on their own; kinds this version does not know are exported from their
header (``count``, ``allowed``, ``refused``, ``reaped``, ``recoveries``).

Per-stream series carry a ``stream`` label and come and go with their streams:
a released stream's counters go with it, since its row is reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shmrate.prometheus needs prometheus_client: pip install 'shmrate[prometheus]'"
    ) from e

from . import _inspect
from .bandwidth import BandwidthManager
from .connections import ConnectionLimiter
from .token_bucket import TokenBucket

__all__ = ["ShmrateCollector"]

Shared = TokenBucket | ConnectionLimiter | BandwidthManager

_KIND = {
    TokenBucket: "TokenBucket",
    ConnectionLimiter: "ConnectionLimiter",
    BandwidthManager: "BandwidthManager",
}

# name -> (type, help, label names); "c" is a counter, "g" a gauge.
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "shmrate_requests_allowed": (
        "c",
        "try_acquire / allocate_bandwidth calls granted (header counters)",
        ("name", "kind"),
    ),
    "shmrate_requests_refused": (
        "c",
        "try_acquire / allocate_bandwidth calls refused (header counters)",
        ("name", "kind"),
    ),
    "shmrate_leases_reaped": (
        "c",
        "leases (connections, bandwidth shares) reclaimed from dead processes",
        ("name", "kind"),
    ),
    "shmrate_lock_recoveries": (
        "c",
        "locks taken over from holders that died holding them",
        ("name", "kind"),
    ),
    "shmrate_lease_holders": (
        "g",
        "live processes that hold leases",
        ("name", "kind"),
    ),
    "shmrate_unreaped_leases": (
        "g",
        "leases still held by processes that have exited (reclaimed on the next "
        "refusal, reap() or reap_pid())",
        ("name", "kind"),
    ),
    "shmrate_segment_count": (
        "g",
        "the header's count word (connections, bytes/s allocated, keys, by kind)",
        ("name", "kind"),
    ),
    "shmrate_segment_size_bytes": ("g", "size of the segment", ("name", "kind")),
    "shmrate_segment_unreadable": (
        "g",
        "1 for a segment that cannot be read (damaged, half-created, no permission)",
        ("file", "reason"),
    ),
    "shmrate_bucket_allowed_calls": (
        "c",
        "allow / allow_n calls granted",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_allowed_units": (
        "c",
        "tokens (bytes, requests) granted",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_refused_calls": (
        "c",
        "allow calls refused and allow_n waits timed out",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_refused_units": (
        "c",
        "tokens asked for by refused calls",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_waits": (
        "c",
        "allow_n calls that had to wait",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_waited_seconds": (
        "c",
        "time spent in those waits",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_rate": (
        "g",
        "refill rate in tokens (bytes, requests) per second",
        ("name", "kind", "stream"),
    ),
    "shmrate_bucket_capacity": ("g", "most tokens held", ("name", "kind", "stream")),
    "shmrate_bucket_tokens": ("g", "tokens on hand now", ("name", "kind", "stream")),
    "shmrate_connections": ("g", "connections held now", ("name",)),
    "shmrate_connections_max": ("g", "the host-wide connection cap", ("name",)),
    "shmrate_connections_per_stream_max": ("g", "the per-stream cap", ("name",)),
    "shmrate_stream_connections": (
        "g",
        "connections a stream holds now",
        ("name", "stream"),
    ),
    "shmrate_stream_connections_allowed": (
        "c",
        "try_acquire calls granted for a stream",
        ("name", "stream"),
    ),
    "shmrate_stream_connections_refused": (
        "c",
        "try_acquire calls refused for a stream",
        ("name", "stream"),
    ),
    "shmrate_bandwidth_pool_bytes_per_second": (
        "g",
        "the pool's total",
        ("name",),
    ),
    "shmrate_bandwidth_allocated_bytes_per_second": (
        "g",
        "the part of the pool allocated to streams",
        ("name",),
    ),
    "shmrate_stream_allocation_bytes_per_second": (
        "g",
        "a stream's share of the pool",
        ("name", "stream"),
    ),
}

_BUCKET_COUNTERS = (
    ("shmrate_bucket_allowed_calls", "allowed_calls", 1.0),
    ("shmrate_bucket_allowed_units", "allowed_units", 1.0),
    ("shmrate_bucket_refused_calls", "refused_calls", 1.0),
    ("shmrate_bucket_refused_units", "refused_units", 1.0),
    ("shmrate_bucket_waits", "waits", 1.0),
    ("shmrate_bucket_waited_seconds", "waited_ns", 1e-9),
    ("shmrate_bucket_rate", "rate", 1.0),
    ("shmrate_bucket_capacity", "capacity", 1.0),
    ("shmrate_bucket_tokens", "tokens", 1.0),
)


def _families() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
    out: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for name, (typ, text, labels) in _FAMILIES.items():
        cls = CounterMetricFamily if typ == "c" else GaugeMetricFamily
        out[name] = cls(name, text, labels=list(labels))
    return out


@dataclass
class _Reading:
    """One object's numbers, from its own handle or from the host scan."""

    name: str
    kind: str
    stats: dict[str, Any] | None
    header: dict[str, int] | None
    holders: dict[int, int]
    dead: dict[int, int]
    size_bytes: int | None


class ShmrateCollector(Collector):
    """Exports the counters and levels of shmrate objects.

    ``objects``: the objects to export, or None for every shmrate segment on
    the host, found anew at each scrape. The collector holds no state of its
    own: any process that registers it exports the same, exact numbers.
    """

    def __init__(self, objects: Iterable[Shared] | None = None) -> None:
        self._objects = None if objects is None else list(objects)

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading any segment (for registration)."""
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        families = _families()
        for reading in self._readings(families):
            _export(reading, families)
        yield from families.values()

    def _readings(
        self, families: dict[str, CounterMetricFamily | GaugeMetricFamily]
    ) -> Iterator[_Reading]:
        if self._objects is not None:
            for obj in self._objects:
                yield _read_object(obj)
            return
        try:
            segments = _inspect.scan()
        except FileNotFoundError:
            return  # no /dev/shm to list: nothing to export
        for seg in segments:
            try:
                snap = _inspect.snapshot(seg)
            except _inspect.Unreadable as e:
                path = f"{_inspect.DEV_SHM}/{seg.id}"
                families["shmrate_segment_unreadable"].add_metric([path, str(e)], 1)
                continue
            assert seg.name is not None
            yield _Reading(
                seg.name,
                seg.kind_name,
                snap.stats,
                seg.header,
                snap.holders,
                snap.dead_holders,
                seg.size_bytes,
            )


def _read_object(obj: Shared) -> _Reading:
    stats: dict[str, Any] = dict(obj.stats())
    holders: dict[int, int] = {}
    if isinstance(obj, ConnectionLimiter):
        holders = obj.holders()
    elif isinstance(obj, BandwidthManager):
        for e in stats["streams"].values():
            holders[e["pid"]] = holders.get(e["pid"], 0) + 1
    dead = {p: k for p, k in holders.items() if not _inspect.pid_alive(p)}
    return _Reading(obj.name, _KIND[type(obj)], stats, None, holders, dead, None)


def _export(r: _Reading, f: dict[str, CounterMetricFamily | GaugeMetricFamily]) -> None:
    nk = [r.name, r.kind]
    s = r.stats
    if s is not None:
        f["shmrate_lock_recoveries"].add_metric(nk, s["recoveries"])
    elif r.header is not None:
        f["shmrate_lock_recoveries"].add_metric(nk, r.header["recoveries"])
    if r.size_bytes is not None:
        f["shmrate_segment_size_bytes"].add_metric(nk, r.size_bytes)
    if s is None or "allowed" in s:
        counts = s if s is not None else r.header
        assert counts is not None
        f["shmrate_requests_allowed"].add_metric(nk, counts["allowed"])
        f["shmrate_requests_refused"].add_metric(nk, counts["refused"])
        f["shmrate_leases_reaped"].add_metric(nk, counts["reaped"])
        f["shmrate_lease_holders"].add_metric(nk, len(r.holders) - len(r.dead))
        f["shmrate_unreaped_leases"].add_metric(nk, sum(r.dead.values()))
    if s is None:
        assert r.header is not None
        f["shmrate_segment_count"].add_metric(nk, r.header["count"])
    elif "max_total" in s:
        _export_connections(r.name, s, f)
    elif "allocated" in s:
        f["shmrate_bandwidth_pool_bytes_per_second"].add_metric([r.name], s["total"])
        f["shmrate_bandwidth_allocated_bytes_per_second"].add_metric(
            [r.name], s["allocated"]
        )
        for sid, e in s["streams"].items():
            f["shmrate_stream_allocation_bytes_per_second"].add_metric(
                [r.name, sid], e["allocation"]
            )
            _export_bucket([r.name, r.kind, sid], e, f)
    else:
        _export_bucket([r.name, r.kind, ""], s, f)


def _export_connections(
    name: str, s: dict[str, Any], f: dict[str, CounterMetricFamily | GaugeMetricFamily]
) -> None:
    f["shmrate_connections"].add_metric([name], s["total"])
    f["shmrate_connections_max"].add_metric([name], s["max_total"])
    f["shmrate_connections_per_stream_max"].add_metric([name], s["max_per_stream"])
    for sid, e in s["streams"].items():
        f["shmrate_stream_connections"].add_metric([name, sid], e["count"])
        f["shmrate_stream_connections_allowed"].add_metric([name, sid], e["allowed"])
        f["shmrate_stream_connections_refused"].add_metric([name, sid], e["refused"])


def _export_bucket(
    labels: list[str],
    s: dict[str, Any],
    f: dict[str, CounterMetricFamily | GaugeMetricFamily],
) -> None:
    for family, key, scale in _BUCKET_COUNTERS:
        f[family].add_metric(labels, s[key] * scale)
