"""Who a process is, in one int64, and whether that process is still alive.

Leases and the lock holder are recorded as an *owner token*: the pid in the low
22 bits (Linux never hands out pids above 2**22) and the process start time, in
clock ticks since boot, above them. The start time is what makes the token safe
against pid reuse: a new process that gets a dead worker's pid has a later start
time, so the dead worker's token still reads as dead.

Where ``/proc`` is missing (macOS), the start time is 0 and liveness falls back
to ``os.kill(pid, 0)``, which a reused pid can fool.
"""

from __future__ import annotations

import os

__all__ = ["PID_BITS", "alive", "current", "pid_of"]

PID_BITS = 22
_PID_MASK = (1 << PID_BITS) - 1


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    return raw.rpartition(")")[2].split()


def _start_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else 0


def _make_token(pid: int) -> int:
    return (_start_ticks(pid) << PID_BITS) | pid


_token = _make_token(os.getpid())


def _after_fork() -> None:
    global _token
    _token = _make_token(os.getpid())


os.register_at_fork(after_in_child=_after_fork)


def current() -> int:
    """This process's owner token (refreshed in a forked child)."""
    return _token


def pid_of(token: int) -> int:
    return token & _PID_MASK


def alive(token: int) -> bool:
    """True while the process behind ``token`` runs (zombies count as dead)."""
    pid = token & _PID_MASK
    start = token >> PID_BITS
    if pid == 0:
        return False
    fields = _stat_fields(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X", "x"):
        return False
    return start == 0 or int(fields[19]) == start
