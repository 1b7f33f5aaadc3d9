"""The ``shmrate`` command, run as a real process against real segments."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import shmrate
from shmrate._layout import H_KIND, WORD
from shmrate._segment import shm_name_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO}
COMMAND = [sys.executable, "-m", "shmrate"]


def shmrate_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def file_of(name: str) -> str:
    return "/dev/shm" + shm_name_for(name)


@pytest.fixture
def three(name: str) -> Iterator[tuple[str, str, str]]:
    """A bucket, a connection limiter and a bandwidth pool, in use by this process."""
    names = (f"{name}-b", f"{name}-c", f"{name}-w")
    bucket = shmrate.TokenBucket(1000, name=names[0])
    conns = shmrate.ConnectionLimiter(2, 10, name=names[1])
    pool = shmrate.BandwidthManager(1_000_000, name=names[2], max_streams=8)
    try:
        assert bucket.allow(24)
        assert conns.try_acquire("cam-1") and conns.try_acquire("cam-1")
        assert not conns.try_acquire("cam-1")
        assert conns.try_acquire("cam-2")
        limiter, ok = pool.allocate_bandwidth("cam-1", 300_000)
        assert ok and limiter is not None and limiter.allow(1000)
        yield names
    finally:
        for obj in (bucket, conns, pool):
            obj.unlink()
            obj.close()


def test_every_subcommand_has_help() -> None:
    for sub in ("list", "show", "top", "rm", "demo"):
        done = shmrate_cli(sub, "--help")
        assert done.returncode == 0, done.stderr
        assert f"usage: shmrate {sub}" in done.stdout
    assert "exit codes" in shmrate_cli("--help").stdout


def test_list_shows_each_kind_with_its_levels_and_lease_holders(
    three: tuple[str, str, str],
) -> None:
    done = shmrate_cli("list")
    assert done.returncode == 0, done.stderr
    lines = {ln.split()[0]: ln for ln in done.stdout.splitlines()[1:]}
    b, c, w = three
    me = os.getpid()
    assert "TokenBucket" in lines[b] and "1,000/s" in lines[b]
    assert "3/10 connections, 2 streams" in lines[c] and f"{me}x3" in lines[c]
    assert "300,000/1,000,000 B/s allocated" in lines[w] and f"{me}x1" in lines[w]


def test_list_json_holds_the_exact_stats(three: tuple[str, str, str]) -> None:
    done = shmrate_cli("list", "--json")
    assert done.returncode == 0, done.stderr
    by_name = {e["name"]: e for e in json.loads(done.stdout)}
    b, c, w = three
    assert by_name[b]["stats"]["allowed_units"] == 24
    assert by_name[c]["stats"]["refused"] == 1
    assert by_name[c]["lease_holders"] == {
        str(os.getpid()): {"leases": 3, "alive": True}
    }
    assert by_name[w]["stats"]["streams"]["cam-1"]["allowed_units"] == 1000
    assert str(os.getpid()) in by_name[w]["attached"]


def test_show_prints_per_stream_rows(three: tuple[str, str, str]) -> None:
    _, c, w = three
    done = shmrate_cli("show", c)
    assert done.returncode == 0, done.stderr
    assert "ConnectionLimiter" in done.stdout
    rows = [ln.split() for ln in done.stdout.splitlines() if "cam-" in ln]
    assert rows == [["cam-1", "2", "2", "1"], ["cam-2", "1", "1", "0"]]
    shown = json.loads(shmrate_cli("show", w, "--json").stdout)
    assert shown["kind"] == "BandwidthManager"
    assert shown["stats"]["streams"]["cam-1"]["allocation"] == 300_000
    assert shown["stats"]["streams"]["cam-1"]["pid"] == os.getpid()


def test_a_missing_name_exits_3_everywhere() -> None:
    for args in (("show", "no-such-name"), ("rm", "no-such-name"), ("top", "nope")):
        done = shmrate_cli(*args)
        assert done.returncode == 3, (args, done.stderr)
        assert "no segment named" in done.stderr
        assert "Traceback" not in done.stderr


def _damage(name: str) -> None:
    """A segment and semaphore under ``name``'s file names, with a bad magic."""
    bucket = shmrate.TokenBucket(10, name=name)
    bucket.close()
    with open(file_of(name), "r+b") as f:
        f.write(b"garbage!")


def test_a_damaged_segment_is_flagged_and_can_be_removed(name: str) -> None:
    _damage(name)
    shown = shmrate_cli("show", name)
    assert shown.returncode == 4
    assert "is damaged: not a shmrate segment" in shown.stderr
    listed = shmrate_cli("list")
    assert listed.returncode == 0
    assert any(
        shm_name_for(name)[1:] in ln and "! not a shmrate" in ln
        for ln in listed.stdout.splitlines()
    )
    removed = shmrate_cli("rm", name)
    assert removed.returncode == 0, removed.stderr
    assert not os.path.exists(file_of(name))


def test_a_kind_this_version_does_not_know_is_shown_from_its_header(
    name: str,
) -> None:
    shmrate.TokenBucket(10, name=name).close()
    with open(file_of(name), "r+b") as f:
        f.seek(H_KIND * WORD)
        f.write((9).to_bytes(8, "little"))
    listed = shmrate_cli("list")
    rows = [ln for ln in listed.stdout.splitlines() if ln.startswith(name + " ")]
    assert len(rows) == 1
    assert "kind 9" in rows[0] and "header only" in rows[0]
    shown = shmrate_cli("show", name, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["stats"] is None
    assert shmrate_cli("rm", name).returncode == 0


def _hold_a_connection(name: str) -> subprocess.Popen[str]:
    """A process that takes a connection, lets go of the segment, and waits."""
    code = (
        "import sys, time, shmrate\n"
        f"c = shmrate.ConnectionLimiter.open({name!r})\n"
        "assert c.try_acquire('s')\n"
        "c.close()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_rm_refuses_while_a_live_process_holds_leases(name: str) -> None:
    shmrate.ConnectionLimiter(1, 4, name=name).close()
    holder = _hold_a_connection(name)
    try:
        refused = shmrate_cli("rm", name)
        assert refused.returncode == 1
        assert f"pids holding leases: {holder.pid}x1" in refused.stderr
        assert os.path.exists(file_of(name))
    finally:
        holder.kill()
        holder.communicate()
    # A holder that has exited holds nothing: no --force needed.
    done = shmrate_cli("rm", name)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(file_of(name))


def test_rm_refuses_while_a_process_has_it_open_unless_forced(name: str) -> None:
    with shmrate.TokenBucket(5, name=name):
        refused = shmrate_cli("rm", name)
        assert refused.returncode == 1
        assert f"processes that have it open: {os.getpid()}" in refused.stderr
        forced = shmrate_cli("rm", name, "--force")
        assert forced.returncode == 0, forced.stderr
        assert "despite its users" in forced.stdout
        assert not os.path.exists(file_of(name))


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to take the privilege away",
)
def test_no_permission_exits_5(name: str) -> None:
    shmrate.TokenBucket(5, name=name).close()
    os.chmod(file_of(name), 0)
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    done = subprocess.run(
        [*unprivileged, *COMMAND, "show", name],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 5, done.stderr
    assert "no permission" in done.stderr


def test_top_draws_frames_and_stops_after_iterations(
    three: tuple[str, str, str],
) -> None:
    done = shmrate_cli("top", "--iterations", "2", "--interval", "0.2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("shmrate top") == 2
    assert "\x1b" not in done.stdout  # not a terminal: plain frames
    for n in three:
        assert repr(n) in done.stdout
    assert "RATE B/s" in done.stdout and "REFUSED/s" in done.stdout


def test_top_redraws_in_place_on_a_terminal(three: tuple[str, str, str]) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*COMMAND, "top", three[2], "--iterations", "2", "--interval", "0.2"],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the terminal's other end closed
            chunk = b""
        if not chunk:
            break
        out += chunk
    os.close(leader)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count(b"\x1b[H\x1b[J") == 2  # home and clear, once per frame
    assert out.endswith(b"\x1b[?25h")  # the cursor is given back


def test_top_quits_cleanly_on_ctrl_c(three: tuple[str, str, str]) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "top", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "shmrate top" in out


def test_the_demo_runs_kills_a_worker_and_cleans_up() -> None:
    done = shmrate_cli(
        "demo",
        "--duration",
        "4",
        "--kill-at",
        "1",
        "--workers",
        "3",
        "--interval",
        "0.25",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "\x1b" not in out  # not a terminal: plain lines
    assert "SIGKILL worker" in out
    assert "summary after" in out
    assert "all cameras together" in out
    assert "all of it back" in out  # the killed worker's leases came back
    assert "left at the end: 0 connections, 0 B/s allocated" in out
    assert done.stderr == ""


def test_the_demo_cleans_up_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*COMMAND, "demo", "--duration", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None
    while "segments:" not in (line := proc.stdout.readline()):
        assert line, "the demo ended before it started"
    tag = line.split("segments: ")[1].split(",")[0]
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in out
    assert "Traceback" not in err
    assert not os.path.exists(file_of(tag))
