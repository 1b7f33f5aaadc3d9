"""A private, throwaway redis-server on 127.0.0.1 for the Redis-backed peers.

The server listens on loopback only, keeps nothing on disk, and is stopped
through its own process handle; the bench never signals any process it did
not start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from types import TracebackType

LOOPBACK = "127.0.0.1"
_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING; speaks raw RESP on purpose,
    so the check works without redis-py."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def executable() -> str | None:
    return shutil.which("redis-server")


def version() -> str | None:
    path = executable()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True)
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return out.stdout.strip() or None


class RedisServer:
    """``with RedisServer() as server:`` gives ``server.url`` while it runs."""

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        path = executable()
        if path is None:
            raise FileNotFoundError("redis-server is not installed")
        # Another program can take the port between our probe and the
        # server's bind; a second pick almost never collides again.
        for _ in range(3):
            self.port = free_port()
            self._process = subprocess.Popen(
                [
                    path,
                    "--port", str(self.port),
                    "--bind", LOOPBACK,
                    "--save", "",
                    "--appendonly", "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline_s = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline_s:
            if self._process.poll() is not None:
                return False
            if ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
