"""Create-or-open a named segment and its semaphore, and detach or remove them.

A segment is a POSIX shared-memory object (``/dev/shm/shmrate_<hash>`` on
Linux, the same kind of object ``multiprocessing.shared_memory`` makes) plus a
POSIX named semaphore of the same name. Both names derive from a fixed hash of
the user's name (BLAKE2b of its UTF-8 bytes, never ``hash()``), so unrelated
interpreters agree on them.

The shared memory is opened through ``posix_ipc`` and mapped with ``mmap``
instead of through ``multiprocessing.shared_memory.SharedMemory``: that class
registers every open, attach-only included, with
``multiprocessing.resource_tracker`` before Python 3.13, and the tracker then
removes the segment under other processes' feet when its own clients exit
(CPython issue 82300). Opening the object directly keeps the tracker out of it
on every Python version, so no process removes a segment on exit; only
``unlink()`` does.

Creation is race-free: every process opens the object with ``O_CREAT`` (never
exclusive) and then takes an ``flock`` on it. The first to hold the flock finds
it empty, sizes it, allocates every page (so a full /dev/shm is an ``OSError``
now, not a SIGBUS later), writes the header and marks it ready; the others find
it ready. The kernel drops the flock of a creator that dies, and the next
process finishes the job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import posix_ipc

from ._layout import (
    H_BOOT,
    H_CREATED_NS,
    H_KIND,
    H_MAGIC,
    H_NAME_BYTE,
    H_NAME_LEN,
    H_P0,
    H_SIZE,
    H_STATE,
    H_VERSION,
    HEADER_BYTES,
    KIND_NAMES,
    LAYOUT_VERSION,
    MAGIC,
    NAME_MAX_BYTES,
    STATE_READY,
)
from ._lock import SegmentLock
from .errors import KindMismatch, LayoutMismatch, SegmentMissing

__all__ = ["Segment", "SegmentSpec", "TransientViews", "check_name", "shm_name_for"]

log = logging.getLogger("shmrate")

SHM_PREFIX = "shmrate_"
_DEV_SHM = "/dev/shm"


def check_name(name: object) -> str:
    """Validate a segment name; returns it."""
    if not isinstance(name, str):
        raise TypeError(f"shmrate: a name must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if not name or size > NAME_MAX_BYTES or "\0" in name:
        raise ValueError(
            f"shmrate: name {name!r} must be 1 to {NAME_MAX_BYTES} bytes of UTF-8 "
            f"without NUL (it is {size})"
        )
    return name


def shm_name_for(name: str) -> str:
    """The host-wide object name for ``name`` (29 characters with the slash)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=10)
    return "/" + SHM_PREFIX + digest.hexdigest()


def _boot_hash() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            raw = f.read().strip()
    except OSError:
        return 0
    return int.from_bytes(hashlib.blake2b(raw, digest_size=7).digest(), "little")


BOOT = _boot_hash()


@dataclass(frozen=True)
class SegmentSpec:
    """What a creator needs: the kind, total size, parameters and table setup."""

    kind: int
    size: int
    params: tuple[int, ...]
    init_tables: Callable[[memoryview], None]


def _unlink_quietly(shm_name: str) -> None:
    for unlink in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
        with contextlib.suppress(posix_ipc.ExistentialError):
            unlink(shm_name)


def _unlink_if_creator(shm_name: str, creator_pid: int) -> None:
    # Runs from a weakref finalizer, possibly at interpreter exit and possibly
    # in a forked child that inherited it: only the creating process unlinks.
    if os.getpid() == creator_pid:
        _unlink_quietly(shm_name)


def _replaced_under_us(fd: int, shm_name: str) -> bool:
    """True if the name was unlinked (or re-created) after we opened ``fd``."""
    if not os.path.isdir(_DEV_SHM):
        return False  # not Linux: no path to compare against
    try:
        st = os.stat(_DEV_SHM + shm_name)
    except FileNotFoundError:
        return True
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)


class Segment:
    """One mapped segment and its lock, as seen by this process."""

    def __init__(
        self,
        name: str,
        kind: int,
        shm_name: str,
        mm: mmap.mmap,
        sem: posix_ipc.Semaphore,
        repair: Callable[[memoryview], str],
        fd: int,
    ) -> None:
        self.name = name
        self.kind = kind
        self.shm_name = shm_name
        self.size = len(mm)
        self.label = f"{KIND_NAMES.get(kind, 'segment')} {name!r}"
        self._mm = mm
        self.words = memoryview(mm).cast("q")
        self.sem = sem
        self.fd = fd
        self.lock = SegmentLock(sem, self.words, fd, self.label, repair)
        self.closed = False
        # Views handed out, released at close. Weakly held: a view nobody
        # uses any more (a stale limiter's row) goes with its last reference.
        self._views: weakref.WeakValueDictionary[int, memoryview] = (
            weakref.WeakValueDictionary()
        )
        self._arrays: list[npt.NDArray[Any]] = []
        self._finalizer: weakref.finalize[[str, int], Segment] | None = None

    # -- creation ------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        name: str | None,
        kind: int,
        spec: SegmentSpec | None,
        repair: Callable[[memoryview], str],
    ) -> Segment:
        """Create-or-open ``name`` (with ``spec``) or only open it (``spec=None``).

        ``name=None`` makes an anonymous segment whose name the creating
        process removes when it closes the segment, when the object is
        collected, or when the process exits, whichever comes first.
        """
        anonymous = name is None
        if name is None:
            name = f"anon-{os.getpid()}-{secrets.token_hex(6)}"
        check_name(name)
        shm_name = shm_name_for(name)
        create = spec is not None
        flags = posix_ipc.O_CREAT if create else 0
        if not create and not _exists(shm_name):
            raise SegmentMissing(_missing_message(kind, name))
        try:
            sem = posix_ipc.Semaphore(shm_name, flags, mode=0o600, initial_value=1)
        except posix_ipc.ExistentialError:
            raise SegmentMissing(_missing_message(kind, name)) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(f"shmrate: {name!r}: {e}") from None
        try:
            mm, fd = _map(name, kind, shm_name, spec)
        except BaseException:
            sem.close()
            raise
        seg = cls(name, kind, shm_name, mm, sem, repair, fd)
        if anonymous:
            seg._finalizer = weakref.finalize(
                seg, _unlink_if_creator, shm_name, os.getpid()
            )
        if seg.words[H_BOOT] != BOOT:
            # The segment outlived a reboot (a bind-mounted /dev/shm): its
            # monotonic stamps belong to the old boot. Repair rebases them.
            with seg.locked():
                what = repair(seg.words)
                seg.words[H_BOOT] = BOOT
            log.warning("%s: written before the last reboot; %s", seg.label, what)
        log.debug("%s: attached (%s, %d bytes)", seg.label, shm_name, seg.size)
        return seg

    # -- use -----------------------------------------------------------------

    def view(self, first_word: int, words: int) -> memoryview:
        """An int64 view of ``words`` words; released when the segment closes."""
        v = self.words[first_word : first_word + words]
        self._views[id(v)] = v
        return v

    def byte_view(self, first_byte: int, size: int) -> memoryview:
        """A bytes view; released when the segment closes."""
        v = memoryview(self._mm)[first_byte : first_byte + size]
        self._views[id(v)] = v
        return v

    def array(
        self, first_word: int, dtype: np.dtype[Any], count: int
    ) -> npt.NDArray[Any]:
        """A numpy view of ``count`` records, for scans; dropped at close."""
        a = np.frombuffer(self._mm, dtype=dtype, count=count, offset=first_word * 8)
        self._arrays.append(a)
        return a

    def locked(self) -> SegmentLock:
        """``with seg.locked() as words:`` holds the segment's lock."""
        return self.lock

    def param(self, i: int) -> int:
        return int(self.words[H_P0 + i])

    def refuse(self, what: str) -> LayoutMismatch:
        """Detach from a segment found damaged; returns the error to raise.

        For the checks only a kind can make (its tables against its size),
        after the header passed ``_validate``.
        """
        self.close()
        return LayoutMismatch(
            f"shmrate: {self.name!r} ({self.shm_name}) {what}; {_fix(self.name)}"
        )

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Detach this process. Safe to call twice; never raises BufferError."""
        if self.closed:
            return
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()  # anonymous: the creator's close removes the name
        self._arrays.clear()
        for v in list(self._views.values()):
            v.release()
        self._views.clear()
        self.words.release()
        self.sem.close()
        os.close(self.fd)
        try:
            self._mm.close()
        except BufferError:
            # A view we did not hand out (a caller's numpy array) still holds
            # the buffer; the mapping goes away when that view does.
            log.debug("%s: mapping still exported; left to the GC", self.label)
        log.debug("%s: closed", self.label)

    def unlink(self) -> None:
        """Remove the name from the host. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer.detach()
        _unlink_quietly(self.shm_name)
        log.debug("%s: unlinked %s", self.label, self.shm_name)


def _exists(shm_name: str) -> bool:
    try:
        posix_ipc.SharedMemory(shm_name).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


def _missing_message(kind: int, name: str) -> str:
    return f"shmrate: no {KIND_NAMES.get(kind, 'segment')} named {name!r} on this host"


def _map(
    name: str, kind: int, shm_name: str, spec: SegmentSpec | None
) -> tuple[mmap.mmap, int]:
    """Open, size if new, validate and map the shared memory of ``name``.

    Returns the mapping and a descriptor of the same object, kept for the
    lock's takeover (which must find this object even after an unlink).
    """
    flags = posix_ipc.O_CREAT if spec is not None else 0
    while True:
        try:
            shm = posix_ipc.SharedMemory(shm_name, flags, mode=0o600)
        except posix_ipc.ExistentialError:
            raise SegmentMissing(_missing_message(kind, name)) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(f"shmrate: {name!r}: {e}") from None
        try:
            fcntl.flock(shm.fd, fcntl.LOCK_EX)
            if _replaced_under_us(shm.fd, shm_name):
                continue
            size = os.fstat(shm.fd).st_size
            if size == 0 and spec is None:
                raise SegmentMissing(_missing_message(kind, name))
            if size == 0 or _unfinished(shm.fd, size):
                if spec is None:
                    raise LayoutMismatch(
                        f"shmrate: {name!r} ({shm_name}) was left half-created by a "
                        "process that died; unlink it (shmrate rm) and create it again"
                    )
                return _initialise(shm.fd, shm_name, name, spec), os.dup(shm.fd)
            mm = mmap.mmap(shm.fd, size)
            try:
                _validate(mm, name, kind, shm_name, spec)
            except BaseException:
                mm.close()
                raise
            return mm, os.dup(shm.fd)
        finally:
            # Unlock explicitly: mmap keeps a dup of the descriptor, which
            # would otherwise hold the flock for as long as the mapping lives.
            fcntl.flock(shm.fd, fcntl.LOCK_UN)
            shm.close_fd()


def _unfinished(fd: int, size: int) -> bool:
    if size < HEADER_BYTES:
        return False  # damaged, not unfinished: _validate says so
    state = os.pread(fd, 8, H_STATE * 8)
    magic = os.pread(fd, 8, H_MAGIC * 8)
    # ftruncate zero-fills, so a creator that died before writing the magic
    # leaves zeros; one that died later leaves the magic and state 0.
    return int.from_bytes(magic, "little") in (0, MAGIC) and state == bytes(8)


def _initialise(fd: int, shm_name: str, name: str, spec: SegmentSpec) -> mmap.mmap:
    try:
        os.ftruncate(fd, spec.size)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, spec.size)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(shm_name)
        raise OSError(
            e.errno or errno.ENOSPC,
            f"shmrate: cannot allocate {spec.size} bytes for {name!r} in shared "
            f"memory ({e.strerror}); free space in /dev/shm or make it larger",
        ) from None
    mm = mmap.mmap(fd, spec.size)
    words = memoryview(mm).cast("q")
    try:
        words[H_MAGIC] = MAGIC
        words[H_VERSION] = LAYOUT_VERSION
        words[H_KIND] = spec.kind
        words[H_SIZE] = spec.size
        words[H_BOOT] = BOOT
        words[H_CREATED_NS] = time.time_ns()
        for i, p in enumerate(spec.params):
            words[H_P0 + i] = p
        raw = name.encode("utf-8", "surrogatepass")
        words[H_NAME_LEN] = len(raw)
        mm[H_NAME_BYTE : H_NAME_BYTE + len(raw)] = raw
        spec.init_tables(words)
        words[H_STATE] = STATE_READY  # last: openers trust nothing before it
    finally:
        words.release()
    log.debug(
        "created %s %r (%s, %d bytes)", KIND_NAMES[spec.kind], name, shm_name, spec.size
    )
    return mm


def _fix(name: str) -> str:
    return (
        f"unlink it (shmrate rm {name!r}) once no process uses it, then create it again"
    )


def _validate(
    mm: mmap.mmap, name: str, kind: int, shm_name: str, spec: SegmentSpec | None
) -> None:
    fix = _fix(name)
    size = len(mm)
    if size < HEADER_BYTES:
        raise LayoutMismatch(
            f"shmrate: {name!r} ({shm_name}) is {size} bytes, too small for a "
            f"header; {fix}"
        )
    words = memoryview(mm).cast("q")
    try:
        magic, version, found = words[H_MAGIC], words[H_VERSION], words[H_KIND]
        recorded = words[H_SIZE]
    finally:
        words.release()
    if magic != MAGIC:
        raise LayoutMismatch(
            f"shmrate: {name!r} ({shm_name}) is not a shmrate segment (bad "
            f"magic); {fix}"
        )
    if version != LAYOUT_VERSION:
        raise LayoutMismatch(
            f"shmrate: {name!r} ({shm_name}) has layout version {version}, this "
            f"shmrate reads version {LAYOUT_VERSION}; {fix}"
        )
    if found != kind:
        raise KindMismatch(
            f"shmrate: the name {name!r} belongs to a "
            f"{KIND_NAMES.get(found, f'kind {found}')}, not a {KIND_NAMES[kind]}; "
            "choose another name"
        )
    if recorded != size:
        raise LayoutMismatch(
            f"shmrate: {name!r} ({shm_name}) is {size} bytes but its header says "
            f"{recorded}; {fix}"
        )


class TransientViews:
    """Views over ``words`` that the caller releases with ``release()``.

    The same ``view``/``byte_view``/``array`` methods as :class:`Segment`, for
    code that runs with only the word view in hand (the lock's repair).
    """

    def __init__(self, words: memoryview) -> None:
        self._words = words
        self._bytes = words.cast("B")
        self._views: list[memoryview] = [self._bytes]
        self._arrays: list[npt.NDArray[Any]] = []

    def view(self, first_word: int, words: int) -> memoryview:
        v = self._words[first_word : first_word + words]
        self._views.append(v)
        return v

    def byte_view(self, first_byte: int, size: int) -> memoryview:
        v = self._bytes[first_byte : first_byte + size]
        self._views.append(v)
        return v

    def array(
        self, first_word: int, dtype: np.dtype[Any], count: int
    ) -> npt.NDArray[Any]:
        v = self.byte_view(first_word * 8, dtype.itemsize * count)
        a = np.frombuffer(v, dtype=dtype, count=count)
        self._arrays.append(a)
        return a

    def release(self) -> None:
        self._arrays.clear()
        for v in reversed(self._views):
            v.release()
        self._views.clear()
