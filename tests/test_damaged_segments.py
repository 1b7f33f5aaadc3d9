"""A damaged segment is refused, never used, for every kind of object.

Each case damages a named segment from outside (as a stray write, another
shmrate version or a truncating tool would), then opens it both ways: with
``open`` and with the create-or-open constructor. Both must raise
:class:`~shmrate.LayoutMismatch` naming the segment and saying to unlink it,
leave its bytes as they were, and keep no descriptor or mapping open; once
unlinked, the name can be created afresh.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import Any

import posix_ipc
import pytest

import shmrate
from shmrate import BandwidthManager, ConnectionLimiter, TokenBucket
from shmrate._layout import H_MAGIC, H_P0, H_SIZE, H_STATE, H_VERSION, WORD
from shmrate._segment import shm_name_for
from tests.conftest import unlink_name

MAKERS: dict[str, Callable[[str], Any]] = {
    "TokenBucket": lambda name: TokenBucket(1000, name=name),
    "ConnectionLimiter": lambda name: ConnectionLimiter(2, 8, name=name),
    "BandwidthManager": lambda name: BandwidthManager(10_000, name=name, max_streams=8),
}
OPENERS: dict[str, Callable[[str], Any]] = {
    "TokenBucket": TokenBucket.open,
    "ConnectionLimiter": ConnectionLimiter.open,
    "BandwidthManager": BandwidthManager.open,
}


def _shm(name: str) -> Any:
    return posix_ipc.SharedMemory(shm_name_for(name))


def write_word(name: str, word: int, value: int) -> None:
    shm = _shm(name)
    with mmap.mmap(shm.fd, 0) as mm:
        words = memoryview(mm).cast("q")
        words[word] = value
        words.release()
    shm.close_fd()


def read_word(name: str, word: int) -> int:
    shm = _shm(name)
    raw = os.pread(shm.fd, WORD, word * WORD)
    shm.close_fd()
    return int.from_bytes(raw, "little", signed=True)


def truncate(name: str, size: int) -> None:
    shm = _shm(name)
    os.ftruncate(shm.fd, size)
    shm.close_fd()


def contents(name: str) -> bytes:
    shm = _shm(name)
    size = os.fstat(shm.fd).st_size
    data = os.pread(shm.fd, size, 0)
    shm.close_fd()
    return data


def bad_magic(name: str, kind: str) -> str:
    write_word(name, H_MAGIC, 42)
    return "not a shmrate segment"


def other_version(name: str, kind: str) -> str:
    write_word(name, H_VERSION, 99)
    return "layout version 99"


def size_word_wrong(name: str, kind: str) -> str:
    size = read_word(name, H_SIZE)
    write_word(name, H_SIZE, size + 4096)
    return f"header says {size + 4096}"


def truncated(name: str, kind: str) -> str:
    size = read_word(name, H_SIZE)
    truncate(name, size - WORD)
    return f"is {size - WORD} bytes but its header says {size}"


def truncated_into_the_header(name: str, kind: str) -> str:
    truncate(name, 100)
    return "too small for a header"


def tables_do_not_fit(name: str, kind: str) -> str:
    # The header is consistent with the file, but not with the kind's own
    # layout: its parameters (or, for a bucket, its size) say another shape.
    if kind == "TokenBucket":
        size = read_word(name, H_SIZE)
        truncate(name, size + 64)
        write_word(name, H_SIZE, size + 64)
        return "not the 640 of a TokenBucket"
    write_word(name, H_P0 + 1, 9)
    return "does not match its max_"


DAMAGES = [
    bad_magic,
    other_version,
    size_word_wrong,
    truncated,
    truncated_into_the_header,
    tables_do_not_fit,
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_damaged_segment_is_refused_by_name_and_left_as_it_is(
    name: str, kind: str, damage: Callable[[str, str], str]
) -> None:
    MAKERS[kind](name).close()
    says = damage(name, kind)
    before, fds = contents(name), open_fds()
    for attach in (OPENERS[kind], MAKERS[kind]):
        with pytest.raises(shmrate.LayoutMismatch) as info:
            attach(name)
        message = str(info.value)
        assert says in message
        assert repr(name) in message and shm_name_for(name) in message
        assert "unlink it" in message
        assert isinstance(info.value, shmrate.ShmrateError)
        assert isinstance(info.value, ValueError)
    assert contents(name) == before  # refused, never used
    assert open_fds() == fds
    unlink_name(name)
    with MAKERS[kind](name) as fresh:
        assert repr(fresh)  # a new, usable object under the same name


@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_segment_left_half_created_is_refused_by_open(name: str, kind: str) -> None:
    # A creator that died before marking the segment ready: open refuses it
    # (a creator would finish the job instead, see _segment.py).
    MAKERS[kind](name).close()
    write_word(name, H_STATE, 0)
    with pytest.raises(shmrate.LayoutMismatch, match="half-created"):
        OPENERS[kind](name)
    with MAKERS[kind](name) as again:
        assert repr(again)
