"""Who holds what: owner tokens on leases and allocations, and reclaiming them.

Every connection slot (a lease) and every bandwidth allocation records its
owner token (pid and start time, see ``_owner``). Nothing else is trusted:
counts are derived from the live leases whenever they might be wrong. A
process that dies holding leases cannot give them back, so they are reclaimed
by ``reap()``, by ``reap_pid(pid)`` (a gunicorn master's ``child_exit``), and on
their own when a request is refused, at most once per ``AUTO_REAP_INTERVAL_NS``
so that a flood of refusals stays cheap.

Liveness is checked outside the lock (reading ``/proc`` takes microseconds);
a dead process stays dead, so what was found dead is still dead when the
leases are freed under the lock.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import _owner
from ._layout import H_LAST_REAP_NS

__all__ = ["AUTO_REAP_INTERVAL_NS", "auto_reap_due", "dead_owners"]

AUTO_REAP_INTERVAL_NS = 1_000_000_000


def dead_owners(tokens: Iterable[int], pid: int | None = None) -> set[int]:
    """The distinct owner tokens among ``tokens`` whose process is gone.

    With ``pid``, only the tokens of that pid count (a master that has just
    reaped that child knows it is gone; the check still guards against a pid
    that was reused since).
    """
    distinct = {int(t) for t in tokens if t > 0}
    if pid is not None:
        distinct = {t for t in distinct if _owner.pid_of(t) == pid}
    return {t for t in distinct if not _owner.alive(t)}


def auto_reap_due(words: memoryview, now_ns: int) -> bool:
    """True (and the time noted) if a refusal may trigger a reap now.

    Caller holds the lock.
    """
    if now_ns - words[H_LAST_REAP_NS] < AUTO_REAP_INTERVAL_NS:
        return False
    words[H_LAST_REAP_NS] = now_ns
    return True
