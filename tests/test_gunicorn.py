"""examples/gunicorn, end to end: real gunicorn, 4 workers, one request rate."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

import shmrate
from shmrate._segment import shm_name_for

gunicorn_config = pytest.importorskip("gunicorn.config")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "gunicorn")
RATE = 40  # requests per second for the whole server
DRIVE_S = 3.0
MAX_REQUESTS = 10_000  # the load is bounded in count as well as in time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, timeout: float = 10) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        conn.close()


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, prefix: str) -> None:
        self.proc = proc
        self.port = port
        self.prefix = prefix


@pytest.fixture
def server() -> Iterator[Server]:
    """gunicorn on a free loopback port, stopped by its own pid afterwards."""
    prefix = f"test-gunicorn-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "SHMRATE_EXAMPLE_PREFIX": prefix,
        "SHMRATE_EXAMPLE_RATE": str(RATE),
        "SHMRATE_EXAMPLE_BIND": f"127.0.0.1:{port}",
    }
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    if any(s.name == "control_socket_disable" for s in gunicorn_config.KNOWN_SETTINGS):
        args.append("--no-control-socket")  # no socket in $HOME for a test run
    proc = subprocess.Popen(
        [*args, "app:application"],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_until_up(proc, port)
        yield Server(proc, port, prefix)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        # on_exit removed the segments; if the master failed to, say so.
        left = [n for n in (f"{prefix}-requests", f"{prefix}-in-flight") if _exists(n)]
        assert not left, f"gunicorn left {left}; its log:\n{log}"


def _exists(name: str) -> bool:
    return os.path.exists("/dev/shm" + shm_name_for(name))


def _wait_until_up(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gunicorn exited at start"
        try:
            if get(port, "/health", timeout=1)[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gunicorn did not answer within 30 s")


def _drive(port: int, seconds: float, clients: int) -> Counter[tuple[int, str]]:
    """Send requests from ``clients`` threads for ``seconds``; count outcomes.

    The key is (status, what): the worker pid for a 200, the Retry-After
    header for a 429.
    """
    outcomes: Counter[tuple[int, str]] = Counter()
    sent = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        nonlocal sent
        while time.monotonic() < end:
            with lock:
                if sent >= MAX_REQUESTS:
                    return
                sent += 1
            status, headers, body = get(port, "/")
            what = body.split()[-1] if status == 200 else headers.get("Retry-After", "")
            with lock:
                outcomes[(status, what)] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_four_workers_admit_one_rate_between_them(server: Server) -> None:
    with shmrate.TokenBucket.open(f"{server.prefix}-requests") as bucket:
        # Start from an empty bucket, so that what is admitted is the rate.
        bucket.allow(bucket.tokens())
        before = bucket.stats()["allowed_calls"]
        started = time.monotonic()
        outcomes = _drive(server.port, DRIVE_S, clients=6)
        elapsed = time.monotonic() - started
        admitted_exactly = bucket.stats()["allowed_calls"] - before

    admitted = sum(k for (status, _), k in outcomes.items() if status == 200)
    refused = sum(k for (status, _), k in outcomes.items() if status == 429)
    pids = {what for (status, what), _ in outcomes.items() if status == 200}
    assert set(status for status, _ in outcomes) <= {200, 429}
    assert admitted == admitted_exactly  # the shared counter saw every one
    assert refused > admitted  # the load was well over the limit
    # One limit for the server: RATE/s, not 4 x RATE/s. Wide band for a busy box.
    expected = RATE * elapsed
    assert 0.6 * expected <= admitted <= 1.5 * expected + 2
    assert len(pids) >= 2  # several workers served, under the one limit
    assert {what for (status, what) in outcomes if status == 429} == {"1"}


def test_child_exit_frees_the_slots_of_a_killed_worker(server: Server) -> None:
    result: list[BaseException] = []

    def slow_request() -> None:
        try:
            get(server.port, "/slow?s=5")
        except OSError as e:  # the worker is killed under it
            result.append(e)

    t = threading.Thread(target=slow_request)
    t.start()
    with shmrate.ConnectionLimiter.open(f"{server.prefix}-in-flight") as in_flight:
        deadline = time.monotonic() + 10
        while not (holders := in_flight.holders()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(holders) == 1, holders
        (worker,) = holders
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while in_flight.get_total() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight.get_total() == 0
        assert in_flight.stats()["reaped"] == 1
    t.join(timeout=15)
    assert get(server.port, "/health")[0] == 200  # the master replaced it
