"""Finding and reading the shmrate segments of this host, for operators.

The ``shmrate`` command and the Prometheus collector see the host through this
module. It never prints and never changes a segment on its own: it reads.

Discovery lists ``/dev/shm`` (Linux keeps POSIX shared memory there; other
systems offer no way to list it, so only a known name can be inspected there).
A segment's header is read with ``pread`` on a read-only descriptor, without
the lock and without mapping it: the fields a reader needs to recognise a
segment (magic, version, kind, size, name) are written once by the creator
before it marks the segment ready, and every other header word is a single
aligned int64 that a reader sees whole. That is enough for kinds this module
does not know (a newer shmrate's, or the keyed tables): they are shown by their
header alone.

The three public kinds are read in full through their own classes:
``open(name)``, then ``stats()``, which takes the segment's lock like any
other caller, so the numbers are one consistent snapshot, exact across all
processes. Opening by name maps the segment only for the moment of the read.

Who holds a segment is answered twice. Lease holders are the processes that
own connections (ConnectionLimiter) or bandwidth shares (BandwidthManager),
from the segment's own records; a process is taken for live while its pid runs,
so a pid reused since its holder died errs on the side of "in use". Attached
processes are those that map the segment or its semaphore now, from
``/proc/*/maps``; they include processes that hold no lease, such as every
worker using a TokenBucket.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import posix_ipc

from ._layout import (
    HEADER,
    HEADER_BYTES,
    KIND_BANDWIDTH,
    KIND_BUCKET,
    KIND_CONNECTIONS,
    KIND_NAMES,
    LAYOUT_VERSION,
    MAGIC,
    STATE_READY,
)
from ._segment import SHM_PREFIX, _unlink_quietly, check_name, shm_name_for
from .bandwidth import BandwidthManager
from .connections import ConnectionLimiter
from .errors import LayoutMismatch, SegmentMissing
from .token_bucket import TokenBucket

__all__ = [
    "DEV_SHM",
    "SegmentInfo",
    "Snapshot",
    "Unreadable",
    "attachments",
    "locate",
    "pid_alive",
    "process_name",
    "remove",
    "scan",
    "snapshot",
]

DEV_SHM = "/dev/shm"
_SEM_PREFIX = "sem."
_ID = re.compile(rf"^{SHM_PREFIX}[0-9a-f]{{20}}$")
# An operator may name a segment by its file: shmrate_<hex>, /shmrate_<hex> or
# /dev/shm/shmrate_<hex> (the only way to reach one whose header is damaged).
_BY_FILE = re.compile(
    rf"^(?:{DEV_SHM}/|/)?(?:{_SEM_PREFIX})?({SHM_PREFIX}[0-9a-f]{{20}})$"
)

OPENERS: dict[int, type[TokenBucket | ConnectionLimiter | BandwidthManager]] = {
    KIND_BUCKET: TokenBucket,
    KIND_CONNECTIONS: ConnectionLimiter,
    KIND_BANDWIDTH: BandwidthManager,
}

# Header words shown for every kind, known or not.
_GENERIC = (
    "count",
    "allowed",
    "refused",
    "recoveries",
    "reaped",
    "evictions",
)


class Unreadable(Exception):
    """A segment cannot be read (damaged, gone, not ours): the message says why."""

    def __init__(self, reason: str, *, permission: bool = False) -> None:
        super().__init__(reason)
        self.permission = permission


@dataclass
class SegmentInfo:
    """One shmrate entry of ``/dev/shm`` (or one looked up by name).

    ``problem`` is None for a healthy segment. Otherwise it says what is wrong,
    and ``damaged`` or ``no_permission`` says which kind of problem it is.
    """

    id: str  # shmrate_<20 hex>: the file in /dev/shm, without "sem."
    name: str | None = None
    kind: int = 0
    size_bytes: int = 0
    uid: int = -1
    created_ns: int = 0
    version: int = 0
    params: tuple[int, ...] = ()
    header: dict[str, int] = field(default_factory=dict)
    has_memory: bool = True
    has_semaphore: bool = True
    problem: str | None = None
    damaged: bool = False
    no_permission: bool = False

    @property
    def posix_name(self) -> str:
        return "/" + self.id

    @property
    def kind_name(self) -> str:
        if self.problem and not self.kind:
            return "?"
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")

    @property
    def label(self) -> str:
        """The name if the header gave one, else the file."""
        return self.name if self.name is not None else self.id


def _read_header(seg: SegmentInfo) -> None:
    """Fill ``seg`` from its header, or set ``seg.problem``."""
    try:
        shm = posix_ipc.SharedMemory(seg.posix_name, read_only=True)
    except posix_ipc.ExistentialError:
        seg.has_memory = False
        seg.problem = "only its semaphore is left (the memory was removed)"
        return
    except posix_ipc.PermissionsError:
        seg.no_permission = True
        seg.problem = "no permission to read it"
        with contextlib.suppress(OSError):
            seg.uid = os.stat(f"{DEV_SHM}/{seg.id}").st_uid
        return
    try:
        st = os.fstat(shm.fd)
        seg.size_bytes, seg.uid = st.st_size, st.st_uid
        raw = os.pread(shm.fd, HEADER_BYTES, 0)
    finally:
        shm.close_fd()
    try:
        _parse_header(seg, raw)
    except LayoutMismatch as e:
        seg.damaged = True
        seg.problem = str(e)


def _parse_header(seg: SegmentInfo, raw: bytes) -> None:
    if len(raw) < HEADER_BYTES:
        raise LayoutMismatch(
            f"{seg.size_bytes} bytes, too small for a header (being created, or "
            "left half-created by a process that died)"
        )
    h = np.frombuffer(raw, dtype=HEADER, count=1)[0]
    magic, state = int(h["magic"]), int(h["state"])
    if magic == 0 and state == 0:
        raise LayoutMismatch(
            "no header yet (being created, or left half-created by a process that died)"
        )
    if magic != MAGIC:
        raise LayoutMismatch("not a shmrate segment (bad magic)")
    seg.version = int(h["version"])
    seg.kind = int(h["kind"])
    seg.created_ns = int(h["created_ns"])
    seg.params = tuple(int(p) for p in h["p"])
    seg.header = {k: int(h[k]) for k in _GENERIC}
    if seg.version != LAYOUT_VERSION:
        raise LayoutMismatch(
            f"layout version {seg.version}; this shmrate reads {LAYOUT_VERSION}"
        )
    if state != STATE_READY:
        raise LayoutMismatch(
            "not marked ready (being created, or left half-created by a process "
            "that died)"
        )
    if int(h["size"]) != seg.size_bytes:
        raise LayoutMismatch(
            f"{seg.size_bytes} bytes but its header says {int(h['size'])}"
        )
    name_len = int(h["name_len"])
    raw_name = bytes(h["name"])[:name_len]
    try:
        name = raw_name.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        name = ""
    if len(raw_name) != name_len or not name or shm_name_for(name) != seg.posix_name:
        raise LayoutMismatch("its recorded name does not match its file name")
    seg.name = name


def _has(entry: str) -> bool:
    return os.path.exists(f"{DEV_SHM}/{entry}")


def _has_semaphore(seg_id: str) -> bool:
    if os.path.isdir(DEV_SHM):
        return _has(_SEM_PREFIX + seg_id)
    try:  # no directory to look in (macOS): open it to see
        posix_ipc.Semaphore("/" + seg_id).close()
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.PermissionsError:
        return True
    return True


def _look(seg_id: str) -> SegmentInfo:
    seg = SegmentInfo(seg_id)
    seg.has_semaphore = _has_semaphore(seg_id)
    _read_header(seg)
    if seg.problem is None and not seg.has_semaphore:
        seg.problem = "its semaphore is missing (removed by hand?)"
        seg.damaged = True
    return seg


def scan() -> list[SegmentInfo]:
    """Every shmrate segment (and lone semaphore) in ``/dev/shm``, by name.

    ``FileNotFoundError`` where there is no ``/dev/shm`` to list.
    """
    entries = os.listdir(DEV_SHM)
    ids = {e for e in entries if _ID.match(e)}
    ids |= {
        e[len(_SEM_PREFIX) :]
        for e in entries
        if e.startswith(_SEM_PREFIX) and _ID.match(e[len(_SEM_PREFIX) :])
    }
    found = [_look(i) for i in ids]
    # Removed between the listing and the read: not there any more.
    found = [s for s in found if s.has_memory or _has(_SEM_PREFIX + s.id)]
    return sorted(found, key=lambda s: (s.label.casefold(), s.id))


def locate(name: str) -> SegmentInfo:
    """The segment an operator means by ``name``.

    ``name`` is the name the segment was created with, or its file in
    ``/dev/shm`` (``shmrate_<hex>``, with or without the directory). Raises
    :class:`~shmrate.SegmentMissing` if neither exists.
    """
    candidates = []
    with contextlib.suppress(TypeError, ValueError):
        candidates.append(shm_name_for(check_name(name))[1:])
    by_file = _BY_FILE.match(name)
    if by_file:
        candidates.append(by_file.group(1))
    for seg_id in candidates:
        seg = _look(seg_id)
        if seg.has_memory or seg.has_semaphore:
            return seg
    raise SegmentMissing(f"shmrate: no segment named {name!r} on this host")


# -- processes -----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:
        if os.path.isdir("/proc/self"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ([b"Z"], [b"X"], [b"x"])


def process_name(pid: int) -> str:
    """The command name of ``pid`` ("?" if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def attachments() -> dict[str, set[int]]:
    """Which processes map which segment now: segment id -> pids.

    Reads ``/proc/*/maps``; a process whose map cannot be read (another user's,
    without privilege) is left out. This process is left out too.
    """
    me = os.getpid()
    found: dict[str, set[int]] = {}
    marker = f"{DEV_SHM}/"
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                lines = [ln for ln in f if marker in ln and SHM_PREFIX in ln]
        except OSError:
            continue
        for ln in lines:
            path = ln.rstrip("\n").split(marker, 1)[1]
            if path.endswith(" (deleted)"):
                continue  # an older segment of the same name, already removed
            if path.startswith(_SEM_PREFIX):
                path = path[len(_SEM_PREFIX) :]
            if _ID.match(path):
                found.setdefault(path, set()).add(pid)
    return found


# -- snapshots -----------------------------------------------------------------


@dataclass
class Snapshot:
    """One segment read in full: its header, its stats and who holds it.

    ``stats`` is the object's ``stats()`` for the kinds shmrate knows, and
    None for others. ``holders`` maps each pid that holds leases (connections,
    bandwidth shares) to how many it holds; ``dead_holders`` is the part of
    it whose processes have exited but were not reaped yet.
    """

    segment: SegmentInfo
    stats: dict[str, Any] | None
    holders: dict[int, int]
    dead_holders: dict[int, int]

    @property
    def live_holders(self) -> dict[int, int]:
        return {p: n for p, n in self.holders.items() if p not in self.dead_holders}

    def as_json(self, attached: set[int] | None = None) -> dict[str, Any]:
        """A plain dict for ``json.dumps`` (pids as string keys)."""
        seg = self.segment
        out: dict[str, Any] = {
            "name": seg.name,
            "kind": seg.kind_name,
            "kind_id": seg.kind,
            "file": f"{DEV_SHM}/{seg.id}",
            "semaphore": f"{DEV_SHM}/{_SEM_PREFIX}{seg.id}",
            "size_bytes": seg.size_bytes,
            "uid": seg.uid,
            "layout_version": seg.version,
            "created_ns": seg.created_ns,
            "params": list(seg.params),
            "header": dict(seg.header),
            "stats": self.stats,
            "lease_holders": {
                str(pid): {"leases": n, "alive": pid not in self.dead_holders}
                for pid, n in sorted(self.holders.items())
            },
        }
        if attached is not None:
            out["attached"] = {str(p): process_name(p) for p in sorted(attached)}
        return out


@contextlib.contextmanager
def _opened(
    seg: SegmentInfo,
) -> Iterator[TokenBucket | ConnectionLimiter | BandwidthManager]:
    assert seg.name is not None
    obj = OPENERS[seg.kind].open(seg.name)
    try:
        yield obj
    finally:
        obj.close()


def snapshot(seg: SegmentInfo) -> Snapshot:
    """Read ``seg`` in full. Raises :class:`Unreadable` if it has a problem.

    For the kinds shmrate knows this opens the object by name and takes its
    lock for the read (a lock left by a dead holder is recovered on the way,
    as for any caller); for other kinds it reads the header alone.
    """
    if seg.problem is not None:
        raise Unreadable(seg.problem, permission=seg.no_permission)
    if seg.kind not in OPENERS:
        return Snapshot(seg, None, {}, {})
    try:
        with _opened(seg) as obj:
            stats = obj.stats()
            holders = _holders(obj, stats)
    except SegmentMissing:
        raise Unreadable("removed while it was being read") from None
    except PermissionError as e:
        raise Unreadable(str(e), permission=True) from None
    except LayoutMismatch as e:
        raise Unreadable(str(e)) from None
    dead = {p: n for p, n in holders.items() if not pid_alive(p)}
    return Snapshot(seg, stats, holders, dead)


def _holders(obj: object, stats: dict[str, Any]) -> dict[int, int]:
    if isinstance(obj, ConnectionLimiter):
        return obj.holders()
    held: dict[int, int] = {}
    if isinstance(obj, BandwidthManager):
        for entry in stats["streams"].values():
            held[entry["pid"]] = held.get(entry["pid"], 0) + 1
    return held


def remove(seg: SegmentInfo) -> None:
    """Remove the segment's memory and semaphore from the host."""
    _unlink_quietly(seg.posix_name)
