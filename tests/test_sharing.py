"""One bucket, many processes: fork, spawn, pickles, unrelated interpreters."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import textwrap
import time

import posix_ipc
import pytest

import shmrate
from shmrate import TokenBucket
from shmrate._layout import H_KIND, H_MAGIC, H_SIZE, H_VERSION
from shmrate._segment import shm_name_for
from tests import workers

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh, unrelated interpreter; return its stdout."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    return done.stdout


def segment_exists(name: str) -> bool:
    return os.path.exists("/dev/shm" + shm_name_for(name))


def test_a_bucket_made_before_fork_is_shared_by_the_children() -> None:
    with TokenBucket(0) as b, FORK.Pool(3) as pool:
        results = pool.map(b.allow, [100] * 9)
        assert all(results)
        assert b.tokens() == 124


def test_an_anonymous_bucket_pickles_into_spawn_children() -> None:
    with TokenBucket(0) as b, SPAWN.Pool(2) as pool:
        results = pool.starmap(workers.use_pickled, [(b, 300), (b, 300)])
        assert all(ok for ok, _ in results)
        assert b.tokens() == 424


def test_an_unrelated_interpreter_shares_a_named_bucket(name: str) -> None:
    with TokenBucket(0, name=name) as b:
        out = run_python(
            f"""
            import shmrate
            with shmrate.TokenBucket.open({name!r}) as b:
                print(b.allow(1000), b.tokens())
            """,
            env={"PYTHONHASHSEED": "12345"},
        )
        assert out.split() == ["True", "24"]
        assert b.tokens() == 24


def test_8_processes_creating_one_name_at_once_share_one_segment(name: str) -> None:
    start_at = time.time() + 1.0
    with SPAWN.Pool(8) as pool:
        shm_names = pool.starmap(
            workers.create_or_open_and_take, [(name, start_at, 100)] * 8
        )
    assert set(shm_names) == {shm_name_for(name)}
    with TokenBucket.open(name) as b:
        assert b.tokens() == 1024 - 800  # rate 0: every take came off one bucket


@pytest.mark.parametrize("how", ["fork", "spawn", "subprocess"])
def test_a_process_that_only_opened_a_bucket_never_removes_it(
    name: str, how: str
) -> None:
    with TokenBucket(1000, name=name) as b:
        if how == "subprocess":
            run_python(
                f"""
                import shmrate
                b = shmrate.TokenBucket.open({name!r})
                b.allow()
                """
            )
        else:
            ctx = mp.get_context(how)
            p = ctx.Process(target=workers.allow_n_times, args=(name, 1, 3))
            p.start()
            p.join(30)
            assert p.exitcode == 0
        # The resource tracker of the child (if any) has had time to act.
        time.sleep(0.3)
        assert segment_exists(name)
        with TokenBucket.open(name) as again:
            assert again.rate() == 1000
        assert b.allow()


def test_a_segment_created_in_a_spawn_child_outlives_it(name: str) -> None:
    p = SPAWN.Process(target=workers.create_or_open_and_take, args=(name, 0, 1))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    time.sleep(0.3)
    assert segment_exists(name)


def test_a_clean_life_prints_nothing_and_leaves_nothing() -> None:
    out = run_python(
        """
        import shmrate
        b = shmrate.TokenBucket(100, name="clean-life-check")
        b.allow()
        b.close()
        b.unlink()
        a = shmrate.TokenBucket(100)
        a.allow()
        print("done")
        """
    )
    assert out == "done\n"
    assert not segment_exists("clean-life-check")


def test_open_of_a_missing_name_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        TokenBucket.open("no-such-bucket-here")
    with pytest.raises(shmrate.SegmentMissing):
        TokenBucket.open("no-such-bucket-here")


def test_bad_names_are_refused() -> None:
    with pytest.raises(TypeError):
        TokenBucket(1, name=b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TokenBucket(1, name="")
    with pytest.raises(ValueError):
        TokenBucket(1, name="x" * 129)


def corrupt(name: str, word: int, value: int) -> None:
    shm = posix_ipc.SharedMemory(shm_name_for(name))
    with mmap.mmap(shm.fd, 0) as mm:
        mv = memoryview(mm).cast("q")
        mv[word] = value
        mv.release()
    shm.close_fd()


@pytest.mark.parametrize(
    ("word", "value", "error", "words"),
    [
        (H_MAGIC, 42, shmrate.LayoutMismatch, "not a shmrate segment"),
        (H_VERSION, 99, shmrate.LayoutMismatch, "layout version 99"),
        (H_SIZE, 4096, shmrate.LayoutMismatch, "header says 4096"),
        (H_KIND, 3, shmrate.KindMismatch, "belongs to a BandwidthManager"),
    ],
)
def test_a_damaged_or_foreign_segment_is_refused(
    name: str, word: int, value: int, error: type, words: str
) -> None:
    TokenBucket(1000, name=name).close()
    corrupt(name, word, value)
    with pytest.raises(error, match=words) as info:
        TokenBucket.open(name)
    assert isinstance(info.value, shmrate.ShmrateError)
    with pytest.raises(error):
        TokenBucket(1000, name=name)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root"
)
def test_a_full_dev_shm_is_a_clean_oserror_at_creation() -> None:
    # A private, 64 KiB /dev/shm in a new mount namespace: a bucket fits, a
    # 16,000-stream layout would not. Without the allocation at creation the
    # process would die of SIGBUS on first touch instead.
    code = textwrap.dedent(
        """
        import shmrate
        from shmrate._segment import Segment, SegmentSpec
        small = shmrate.TokenBucket(1, name="fits")
        spec = SegmentSpec(1, 10 * 1024 * 1024, (), lambda words: None)
        try:
            Segment.attach("too-big", 1, spec, lambda words: "")
        except OSError as e:
            print("OSError", e.errno)
        import os
        print(sorted(os.listdir("/dev/shm")))
        """
    )
    script = (
        "mount -t tmpfs -o size=64k tmpfs /dev/shm && "
        f"exec {sys.executable} -c '{code}'"
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
    )
    if "unshare failed" in done.stderr or "Operation not permitted" in done.stderr:
        pytest.skip("no mount namespaces here")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "OSError 28"  # ENOSPC
    # The failed segment left no half-made memory object behind (its
    # semaphore stays, for processes that may still be opening the name).
    assert shm_name_for("too-big")[1:] not in eval(lines[1])
    assert shm_name_for("fits")[1:] in eval(lines[1])


def test_4_processes_hammering_one_bucket_admit_what_the_rate_allows(
    name: str,
) -> None:
    rate, seconds = 2000, 1.5
    with TokenBucket(rate, name=name) as b:
        q = FORK.Queue()
        start_at = time.time() + 0.3
        procs = [
            FORK.Process(target=workers.hammer, args=(name, start_at, seconds, q))
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        admitted = sum(q.get(timeout=30) for _ in procs)
        for p in procs:
            p.join()
        most = rate * seconds + b.capacity()
        # The bucket also refilled for the ~0.3 s before the start: allow it.
        assert admitted <= most + rate * 0.35
        assert admitted >= 0.9 * most


def test_restarted_pool_workers_leave_the_segment_in_place(name: str) -> None:
    # maxtasksperchild=1: every task runs in a new worker, and each exiting
    # worker is a chance for a resource tracker to remove what it opened.
    with TokenBucket(0, name=name) as b:
        with SPAWN.Pool(2, maxtasksperchild=1) as pool:
            got = pool.starmap(workers.allow_n_times, [(name, 1, 10)] * 6)
        assert sum(got) == 60
        time.sleep(0.3)
        assert segment_exists(name)
        assert b.tokens() == 1024 - 60


def test_a_segment_from_before_a_reboot_is_rebased_not_trusted(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from shmrate._layout import B_LAST, H_BOOT, HEADER_BYTES

    TokenBucket(1000, name=name).close()
    # As if written under another boot: another boot id, and a refill time
    # far ahead of this boot's monotonic clock.
    corrupt(name, H_BOOT, 12345)
    corrupt(name, HEADER_BYTES // 8 + B_LAST, time.monotonic_ns() + 10**15)
    with caplog.at_level("WARNING", logger="shmrate"), TokenBucket.open(name) as b:
        assert b.allow(1024)
        time.sleep(0.05)
        assert 20 <= b.tokens() <= 200  # refills again at 1000/s
    assert "reboot" in caplog.text
