"""ShmrateCollector: exact host-wide numbers from any one process."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest

import shmrate
from shmrate._segment import shm_name_for
from tests import workers
from tests.conftest import unlink_name

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from shmrate.prometheus import ShmrateCollector  # noqa: E402

FORK = mp.get_context("fork")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scrape(
    collector: ShmrateCollector,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Register on a fresh registry, render the text format and parse it back."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


def test_counters_of_given_objects_are_exact_across_processes(name: str) -> None:
    with shmrate.TokenBucket(0, name=name) as bucket, FORK.Pool(4) as pool:
        admitted = sum(pool.starmap(workers.allow_n_times, [(name, 3, 100)] * 4))
        got = scrape(ShmrateCollector([bucket]))
    ids = labels(name=name, kind="TokenBucket", stream="")
    assert got[("shmrate_bucket_allowed_calls_total", ids)] == admitted == 341
    assert got[("shmrate_bucket_allowed_units_total", ids)] == 3 * admitted
    assert got[("shmrate_bucket_refused_calls_total", ids)] == 400 - admitted
    assert got[("shmrate_bucket_tokens", ids)] == 1024 % 3
    assert got[("shmrate_bucket_capacity", ids)] == 1024
    assert got[("shmrate_bucket_rate", ids)] == 0


def test_the_host_scan_sees_what_other_processes_hold(name: str) -> None:
    code = (
        "import sys, shmrate\n"
        f"c = shmrate.ConnectionLimiter(2, 8, name={name + '-c'!r})\n"
        f"w = shmrate.BandwidthManager(1000, name={name + '-w'!r})\n"
        "assert c.try_acquire('a') and c.try_acquire('a') and c.try_acquire('b')\n"
        "assert not c.try_acquire('a')\n"
        "assert w.allocate_bandwidth('a', 600)[1]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "ready\n"
        got = scrape(ShmrateCollector())
    finally:
        other.communicate("")
        unlink_name(name + "-c")
        unlink_name(name + "-w")
    c = labels(name=name + "-c")
    assert got[("shmrate_connections", c)] == 3
    assert got[("shmrate_connections_max", c)] == 8
    assert (
        got[("shmrate_stream_connections", labels(name=name + "-c", stream="a"))] == 2
    )
    refused = (
        "shmrate_stream_connections_refused_total",
        labels(name=name + "-c", stream="a"),
    )
    assert got[refused] == 1
    ck = labels(name=name + "-c", kind="ConnectionLimiter")
    assert got[("shmrate_requests_allowed_total", ck)] == 3
    assert got[("shmrate_requests_refused_total", ck)] == 1
    assert got[("shmrate_lease_holders", ck)] == 1
    assert got[("shmrate_unreaped_leases", ck)] == 0
    w = labels(name=name + "-w")
    assert got[("shmrate_bandwidth_allocated_bytes_per_second", w)] == 600
    assert got[("shmrate_bandwidth_pool_bytes_per_second", w)] == 1000
    stream = labels(name=name + "-w", kind="BandwidthManager", stream="a")
    assert got[("shmrate_bucket_rate", stream)] == 600


def test_leases_of_an_exited_process_show_as_unreaped(name: str) -> None:
    with shmrate.ConnectionLimiter(4, 4, name=name) as conns:
        child = FORK.Process(target=_take_two, args=(conns,))
        child.start()
        child.join()
        got = scrape(ShmrateCollector([conns]))
        ids = labels(name=name, kind="ConnectionLimiter")
        assert got[("shmrate_unreaped_leases", ids)] == 2
        assert got[("shmrate_lease_holders", ids)] == 0
        assert conns.reap() == 2
        got = scrape(ShmrateCollector([conns]))
        assert got[("shmrate_unreaped_leases", ids)] == 0
        assert got[("shmrate_leases_reaped_total", ids)] == 2


def _take_two(conns: shmrate.ConnectionLimiter) -> None:
    assert conns.try_acquire("x") and conns.try_acquire("y")


def test_a_damaged_segment_is_exported_as_unreadable(name: str) -> None:
    shmrate.TokenBucket(1, name=name).close()
    path = "/dev/shm" + shm_name_for(name)
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    got = scrape(ShmrateCollector())
    reason = "not a shmrate segment (bad magic)"
    assert got[("shmrate_segment_unreadable", labels(file=path, reason=reason))] == 1


def test_describe_names_every_family_without_reading_segments() -> None:
    names = {m.name for m in ShmrateCollector().describe()}
    assert "shmrate_bucket_allowed_units" in names
    assert all(not m.samples for m in ShmrateCollector().describe())
