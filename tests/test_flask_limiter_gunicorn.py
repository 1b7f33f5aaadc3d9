"""End to end: Flask-Limiter on real gunicorn with 4 workers.

With ``shmrate://`` one client gets its limit across all workers; with
``memory://`` each worker counts alone and the client gets more.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("flask_limiter")
pytest.importorskip("limits")
gunicorn_config = pytest.importorskip("gunicorn.config")

REPO = Path(__file__).resolve().parent.parent
WORKERS = 4
LIMIT = 5  # examples/flask_limiter_app.py: "5 per minute"
REQUESTS = 60
CLIENT_THREADS = 16
# gunicorn 24 and later open a control socket under ~/.gunicorn unless told not to.
QUIET = [
    "--no-control-socket"
    for setting in gunicorn_config.KNOWN_SETTINGS
    if setting.name == "control_socket_disable"
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Worker-Pid", "")
    finally:
        conn.close()


class Gunicorn:
    """A gunicorn master serving the example app, stopped by its own pid."""

    def __init__(self, storage_uri: str, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        env = {**os.environ, "SHMRATE_EXAMPLE_STORAGE": storage_uri}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
        )
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--workers",
                    str(WORKERS),
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--chdir",
                    str(REPO),
                    *QUIET,
                    "examples.flask_limiter_app:app",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every worker has loaded the app and answered (an unlimited 404).

        A worker logs that it boots before it imports the app, so the log is
        not enough: a worker still importing would open the storage later.
        """
        deadline = time.monotonic() + timeout_s
        answered: set[str] = set()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    batch = list(
                        pool.map(lambda _: _get(self.port, "/ready"), range(8))
                    )
                except OSError:
                    time.sleep(0.1)
                    continue
                answered |= {pid for status, pid in batch if status == 404}
                if len(answered) >= WORKERS:
                    return
        raise AssertionError(
            "gunicorn did not start:\n" + self.log.read_text(errors="replace")
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[Gunicorn] = []

    def start(storage_uri: str) -> Gunicorn:
        g = Gunicorn(storage_uri, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(g)
        g.wait_ready()
        return g

    yield start
    for g in started:
        g.stop()


def _flood(port: int) -> tuple[int, int, set[str]]:
    """REQUESTS requests from one client, CLIENT_THREADS at a time."""
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        results = list(pool.map(lambda _: _get(port, "/"), range(REQUESTS)))
    ok = sum(status == 200 for status, _ in results)
    limited = sum(status == 429 for status, _ in results)
    return ok, limited, {pid for _, pid in results}


def test_one_client_gets_its_limit_across_all_workers(name: str, serve: object) -> None:
    # name before serve: gunicorn stops before the name fixture removes the
    # segment, so no worker can create it again afterwards.
    server = serve(f"shmrate://{name}")  # type: ignore[operator]
    ok, limited, pids = _flood(server.port)
    assert (ok, limited) == (LIMIT, REQUESTS - LIMIT), pids


def test_memory_storage_lets_the_client_have_the_limit_once_per_worker(
    serve: object,
) -> None:
    server = serve("memory://")  # type: ignore[operator]
    ok, limited, pids = _flood(server.port)
    assert len(pids) > 1, "every request went to one worker; nothing to compare"
    assert LIMIT < ok <= LIMIT * WORKERS
    assert ok + limited == REQUESTS
