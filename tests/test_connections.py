"""ConnectionLimiter across real processes: exact caps, leases, reclaiming."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmrate
from shmrate import BandwidthManager, ConnectionLimiter
from tests import workers
from tests.conftest import unlink_name

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_caps_per_stream_and_in_total() -> None:
    with ConnectionLimiter(2, 3) as c:
        assert c.try_acquire("a") and c.try_acquire("a")
        assert not c.try_acquire("a")  # per stream
        assert c.try_acquire("b")
        assert not c.try_acquire("c")  # in total
        assert (c.get_count("a"), c.get_count("b"), c.get_total()) == (2, 1, 3)
        c.release("a")
        assert c.try_acquire("c")
        assert c.streams() == {"a": 1, "b": 1, "c": 1}
        assert c.holders() == {os.getpid(): 3}


def test_releasing_a_stream_without_connections_does_nothing() -> None:
    with ConnectionLimiter(2, 3) as c:
        c.release("nobody")
        assert c.try_acquire("a")
        c.release("a")
        c.release("a")
        assert (c.get_count("a"), c.get_total()) == (0, 0)
        assert type(c.get_count("a")) is int


def test_the_context_manager_releases_on_exit_even_on_error() -> None:
    with ConnectionLimiter(1, 1) as c:
        with pytest.raises(RuntimeError), c.connection("a") as ok:
            assert ok and c.get_total() == 1
            raise RuntimeError
        assert c.get_total() == 0
        with c.connection("a") as ok, c.connection("a") as second:
            assert ok and not second
        assert c.get_total() == 0


def test_8_spawn_processes_get_exactly_the_cap(name: str) -> None:
    with ConnectionLimiter(5, 100, name=name) as c:
        start_at = time.time() + 1.0
        with SPAWN.Pool(8) as pool:
            got = pool.starmap(
                workers.connection_attempts, [(name, "cam", 10, start_at)] * 8
            )
        assert sum(got) == 5
        # The processes exited holding them: their leases come back on reap.
        assert c.get_count("cam") == 5
        assert c.reap() == 5
        assert c.get_total() == 0


def test_interpreters_with_different_hash_seeds_share_a_stream(name: str) -> None:
    with ConnectionLimiter(5, 10, name=name) as c:
        for _ in range(3):
            assert c.try_acquire("client-42")
        code = textwrap.dedent(
            f"""
            import shmrate
            with shmrate.ConnectionLimiter.open({name!r}) as c:
                print(c.get_count("client-42"), c.try_acquire("client-42"))
            """
        )
        for seed in ("1", "999"):
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": REPO},
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.split()[1] == "True"
        assert c.get_count("client-42") == 5


def test_a_process_may_release_what_another_acquired(name: str) -> None:
    with ConnectionLimiter(5, 10, name=name) as c:
        p = FORK.Process(target=workers.connection_attempts, args=(name, "s", 2, 0))
        p.start()
        p.join(30)
        c.release("s")
        assert c.get_count("s") == 1


def test_a_killed_holder_gives_back_its_connections_and_bandwidth(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    bw_name = name + "-bw"
    try:
        with (
            ConnectionLimiter(5, 10, name=name) as c,
            BandwidthManager(10_000, name=bw_name) as pool,
        ):
            ready = FORK.Event()
            streams = ["a", "b", "c"]
            p = FORK.Process(
                target=workers.hold_streams_until_killed,
                args=(name, bw_name, streams, ready),
            )
            p.start()
            assert ready.wait(10)
            assert c.get_total() == 3
            assert pool.get_available_bandwidth() == 7000
            assert c.reap() == 0 and pool.reap() == 0  # alive: nothing to take
            assert p.pid is not None
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            with caplog.at_level(logging.WARNING, logger="shmrate"):
                assert c.reap_pid(p.pid) == 3
                assert pool.reap_pid(p.pid) == 3000
            assert c.get_total() == 0 and c.streams() == {}
            assert pool.get_available_bandwidth() == 10_000
            assert pool.get_limiter("a") is None
            messages = " ".join(r.getMessage() for r in caplog.records)
            assert f"pid {p.pid}" in messages and name in messages
    finally:
        unlink_name(bw_name)


def test_a_refusal_reclaims_dead_holders_by_itself(name: str) -> None:
    with ConnectionLimiter(5, 3, name=name) as c:
        ready = FORK.Event()
        p = FORK.Process(
            target=workers.hold_streams_until_killed,
            args=(name, name + "-bw2", ["x", "y", "z"], ready),
        )
        with BandwidthManager(10_000, name=name + "-bw2"):
            p.start()
            assert ready.wait(10)
            assert p.pid is not None
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            assert c.try_acquire("new")  # the table was full of a dead pid's
            assert c.get_total() == 1
        unlink_name(name + "-bw2")


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError):
        ConnectionLimiter(1, 0)
    with pytest.raises(TypeError):
        ConnectionLimiter(1.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConnectionLimiter(-1, 3)


def test_pickle_open_close_and_kind(name: str) -> None:
    with ConnectionLimiter(2, 4, name=name) as c:
        assert c.try_acquire("a")
        with pickle.loads(pickle.dumps(c)) as again:
            assert again.get_count("a") == 1
        with ConnectionLimiter.open(name) as again:
            assert (again.max_per_stream, again.max_total) == (2, 4)
        with pytest.raises(shmrate.KindMismatch):
            shmrate.TokenBucket.open(name)
        c.close()
        with pytest.raises(shmrate.ClosedError):
            c.try_acquire("a")
