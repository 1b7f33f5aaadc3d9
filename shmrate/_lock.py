"""The segment's lock: a POSIX named semaphore that survives its holder's death.

A POSIX semaphore has no owner, so the kernel never gives it back when the
process holding it dies. Each holder therefore records its owner token in the
header word ``holder`` right after it acquires, and writes minus the release
time there just before it posts. The value tells a waiter whose timed wait ran
out who it is waiting for:

* a positive token whose process is dead: the holder died inside the critical
  section, and the waiter may take the lock over at once;
* a non-positive stamp that stays the same for ``UNRECORDED_HOLDER_S`` while the
  semaphore stays taken: someone acquired and died before recording itself
  (a window of a few bytecodes), and the waiter takes over then.

Taking over never posts the semaphore: the recovering waiter becomes the holder
(it writes its own token and runs the segment's repair), so the semaphore's
value never exceeds 1. Waiters that see the same dead holder race for an
``flock`` on a fresh descriptor of the segment; the kernel drops that lock if
the recoverer dies too, and the loser goes back to waiting. The descriptor is
reopened from one the segment keeps, so a takeover works even after the name
was unlinked.

A live holder that is stopped (SIGSTOP, a debugger) for longer than
``UNRECORDED_HOLDER_S`` between acquiring and recording itself would be taken
over while it still runs. The window is a few bytecodes long.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from time import monotonic_ns

import posix_ipc

from . import _owner
from ._layout import H_HOLDER, H_RECOVERIES
from .errors import ClosedError

__all__ = ["LOCK_SLICE_S", "UNRECORDED_HOLDER_S", "SegmentLock"]

log = logging.getLogger("shmrate")

# How long one timed wait lasts before the waiter looks at the holder.
LOCK_SLICE_S = 0.2
# How long a taken lock may show no recorded holder before it is taken over.
UNRECORDED_HOLDER_S = 1.0

# The waits that hand over to SegmentLock.wait_slow: a slice ran out, or a
# signal interrupted sem_timedwait (posix_ipc does not retry EINTR itself).
SLOW = (posix_ipc.BusyError, posix_ipc.SignalError)


class SegmentLock:
    """The semaphore of one segment, with dead-holder recovery.

    ``words`` is the segment viewed as int64 words (the header is words
    0-63). ``repair(words)`` is called with the lock held after a takeover, to
    mend what the dead holder may have left half-written; it returns a short
    description for the log.
    """

    def __init__(
        self,
        sem: posix_ipc.Semaphore,
        words: memoryview,
        fd: int,
        label: str,
        repair: Callable[[memoryview], str],
    ) -> None:
        self.sem = sem
        self.words = words
        self.fd = fd
        self.label = label
        self.repair = repair
        self._sem_acquire = sem.acquire
        self._sem_release = sem.release

    def acquire(self) -> None:
        """Take the lock and record this process as its holder."""
        try:
            self._sem_acquire(LOCK_SLICE_S)
        except SLOW:
            self.wait_slow()
        except posix_ipc.ExistentialError:
            raise ClosedError(f"{self.label} is closed in this process") from None
        self.words[H_HOLDER] = _owner._token

    def release(self) -> None:
        """Give the lock back. Caller holds it."""
        self.words[H_HOLDER] = -monotonic_ns()
        self._sem_release()

    def __enter__(self) -> memoryview:
        """``with lock as words:`` holds the lock for the block."""
        self.acquire()
        return self.words

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait_slow(self) -> None:
        """Wait for the lock after a first timed wait ran out or was interrupted.

        Returns holding the semaphore; the caller records itself as holder.
        """
        stamp_seen: int | None = None
        stamp_since = 0.0
        while True:
            try:
                self.sem.acquire(LOCK_SLICE_S)
                return
            except posix_ipc.SignalError:
                continue
            except posix_ipc.BusyError:
                pass
            except posix_ipc.ExistentialError:
                raise ClosedError(f"{self.label} is closed in this process") from None
            holder = self.words[H_HOLDER]
            if holder > 0:
                stamp_seen = None
                if not _owner.alive(holder) and self._take_over(holder):
                    return
                continue
            now = time.monotonic()
            if holder != stamp_seen:
                stamp_seen, stamp_since = holder, now
            elif now - stamp_since >= UNRECORDED_HOLDER_S and self._take_over(holder):
                return

    def _take_over(self, expected: int) -> bool:
        """Become the holder in place of a dead one; True if this process did."""
        # A descriptor of its own (a new open file description), so that the
        # flock excludes other threads of this process too. Reopened through
        # /proc from the descriptor the segment keeps, so it is this segment
        # even after its name was unlinked or reused.
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR)
        except OSError:
            fd = os.dup(self.fd)  # no /proc: threads of one process share it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another waiter is recovering; wait for it
            if self.words[H_HOLDER] != expected:
                return False
            if posix_ipc.SEMAPHORE_VALUE_SUPPORTED and self.sem.value != 0:
                return False  # released meanwhile: acquire it the normal way
            self.words[H_HOLDER] = _owner.current()
            self.words[H_RECOVERIES] += 1
            what = self.repair(self.words)
            if expected > 0:
                who = f"pid {_owner.pid_of(expected)}, which died holding it"
            else:
                who = "a process that died before it recorded itself"
            log.warning("%s: took over the lock from %s; %s", self.label, who, what)
            return True
        finally:
            os.close(fd)  # drops the flock (nothing else shares this descriptor)
