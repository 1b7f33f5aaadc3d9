"""The ``shmrate`` command: list, show, top and rm the segments of this host,
and run the demo. With ``_cli_view`` and ``_cli_demo``, the only code that
prints.

Exit codes: 0 done; 1 refused (``rm`` of a segment in use) or another
failure; 2 bad usage; 3 no such segment; 4 a damaged segment; 5 no permission.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import posix_ipc

from . import _inspect
from ._cli_view import (
    Rates,
    Screen,
    deferred_interrupts,
    level,
    pids,
    problem_line,
    show_lines,
    size,
    top_block,
)
from ._inspect import SegmentInfo, Snapshot, Unreadable
from .errors import SegmentMissing, ShmrateError

__all__ = ["main"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_DAMAGED = 4
EXIT_PERMISSION = 5

_EPILOG = (
    "exit codes: 0 done, 1 refused or failed, 2 bad usage, 3 no such segment, "
    "4 damaged segment, 5 no permission"
)


class Failure(Exception):
    """A message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _err(message: str) -> None:
    print(f"shmrate: {message}", file=sys.stderr)


def _locate(name: str) -> SegmentInfo:
    try:
        return _inspect.locate(name)
    except SegmentMissing:
        raise Failure(
            f"no segment named {name!r} on this host (see `shmrate list`)",
            EXIT_MISSING,
        ) from None


def _check(seg: SegmentInfo, name: str) -> None:
    if seg.no_permission:
        raise Failure(
            f"{name!r} ({_inspect.DEV_SHM}/{seg.id}, uid {seg.uid}): no permission "
            "to read it; run as its owner or as root",
            EXIT_PERMISSION,
        )
    if seg.problem is not None:
        raise Failure(
            f"{name!r} ({_inspect.DEV_SHM}/{seg.id}) is damaged: {seg.problem}; "
            f"remove it with `shmrate rm {seg.id}` once no process uses it",
            EXIT_DAMAGED,
        )


def _snapshot(seg: SegmentInfo, name: str) -> Snapshot:
    _check(seg, name)
    try:
        return _read(seg)
    except Unreadable as e:
        code = EXIT_PERMISSION if e.permission else EXIT_DAMAGED
        raise Failure(f"{name!r}: {e}", code) from None


def _read(seg: SegmentInfo) -> Snapshot:
    with deferred_interrupts():
        return _inspect.snapshot(seg)


def _scan() -> list[SegmentInfo]:
    try:
        return _inspect.scan()
    except FileNotFoundError:
        raise Failure(
            f"cannot list segments: there is no {_inspect.DEV_SHM} here (Linux "
            "only); `shmrate show NAME` still works with a name",
            EXIT_REFUSED,
        ) from None


# -- list ----------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    segs = _scan()
    attached = _inspect.attachments()
    rows: list[dict[str, Any]] = []
    for seg in segs:
        users = attached.get(seg.id, set())
        try:
            snap = _read(seg)
        except Unreadable as e:
            rows.append({"segment": seg, "problem": str(e), "attached": users})
            continue
        rows.append({"segment": seg, "snapshot": snap, "attached": users})
    if args.json:
        print(json.dumps([_list_json(r) for r in rows], indent=2))
        return EXIT_OK
    if not rows:
        print("no shmrate segments on this host")
        return EXIT_OK
    table = [("NAME", "KIND", "LEVEL", "SIZE", "LEASES (pid x n)", "OPEN BY")]
    for r in rows:
        seg = r["segment"]
        opened = str(len(r["attached"]))
        if "problem" in r:
            table.append(
                (
                    seg.label,
                    seg.kind_name,
                    f"! {r['problem']}",
                    size(seg.size_bytes),
                    "",
                    opened,
                )
            )
            continue
        snap = r["snapshot"]
        held = pids(snap.live_holders)
        if snap.dead_holders:
            held += f" (+{sum(snap.dead_holders.values())} of exited pids)"
        table.append(
            (seg.label, seg.kind_name, level(snap), size(seg.size_bytes), held, opened)
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        cells = [row[i].ljust(widths[i]) for i in range(5)]
        print("  ".join([*cells, row[5]]).rstrip())
    return EXIT_OK


def _list_json(r: dict[str, Any]) -> dict[str, Any]:
    seg: SegmentInfo = r["segment"]
    if "problem" in r:
        return {
            "name": seg.name,
            "kind": seg.kind_name,
            "file": f"{_inspect.DEV_SHM}/{seg.id}",
            "problem": r["problem"],
            "attached": sorted(r["attached"]),
        }
    out = r["snapshot"].as_json(r["attached"])
    return dict(out)


# -- show ----------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    seg = _locate(args.name)
    snap = _snapshot(seg, args.name)
    attached = _inspect.attachments().get(seg.id, set())
    if args.json:
        print(json.dumps(snap.as_json(attached), indent=2))
    else:
        print("\n".join(show_lines(snap, attached)))
    return EXIT_OK


# -- rm ------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    seg = _locate(args.name)
    if seg.no_permission:
        _check(seg, args.name)
    users: list[str] = []
    if seg.problem is None:
        snap = _snapshot(seg, args.name)
        if snap.live_holders:
            users.append(f"pids holding leases: {pids(snap.live_holders)}")
    attached = _inspect.attachments().get(seg.id, set())
    if attached:
        procs = ", ".join(f"{p} ({_inspect.process_name(p)})" for p in sorted(attached))
        users.append(f"processes that have it open: {procs}")
    if users and not args.force:
        raise Failure(
            f"{args.name!r} is in use; not removed. {'; '.join(users)}. Stop them "
            "first, or remove it anyway with --force (they keep the old segment "
            "and a process that opens the name later gets a new one)",
            EXIT_REFUSED,
        )
    try:
        _inspect.remove(seg)
    except (posix_ipc.PermissionsError, PermissionError) as e:
        raise Failure(
            f"{args.name!r}: no permission to remove it: {e}", EXIT_PERMISSION
        ) from None
    what = f"{seg.kind_name} {seg.name!r}" if seg.name else repr(args.name)
    note = " despite its users" if users else ""
    print(f"removed {what} ({_inspect.DEV_SHM}/{seg.id} and its semaphore){note}")
    return EXIT_OK


# -- top -----------------------------------------------------------------------


def cmd_top(args: argparse.Namespace) -> int:
    if args.name is not None:
        _check(_locate(args.name), args.name)

        def segments() -> list[SegmentInfo]:
            try:
                return [_inspect.locate(args.name)]
            except SegmentMissing:
                return []  # removed meanwhile: say so and keep watching

    else:
        _scan()
        segments = _scan
    screen = Screen(sys.stdout, live=sys.stdout.isatty() and not args.plain, full=True)
    previous: dict[str, tuple[float, dict[str, Any]]] = {}
    frames = 0
    try:
        while True:
            lines = _top_frame(segments(), previous, args.name)
            screen.draw(lines)
            frames += 1
            if args.iterations and frames >= args.iterations:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view is meant to end
    finally:
        screen.close()
    return EXIT_OK


def _top_frame(
    segs: list[SegmentInfo],
    previous: dict[str, tuple[float, dict[str, Any]]],
    name: str | None,
) -> list[str]:
    now = time.monotonic()
    stamp = time.strftime("%H:%M:%S")
    lines = [f"shmrate top  {stamp}  {len(segs)} segment(s)   Ctrl-C quits", ""]
    if not segs:
        lines.append(f"{name!r} was removed" if name else "no shmrate segments")
    seen = set()
    for seg in segs:
        seen.add(seg.id)
        try:
            snap = _read(seg)
        except Unreadable as e:
            lines += [problem_line(seg, str(e)), ""]
            continue
        cur = snap.stats if snap.stats is not None else seg.header
        before = previous.get(seg.id)
        rates = Rates(cur, None, 0.0)
        if before is not None:
            rates = Rates(cur, before[1], now - before[0])
        previous[seg.id] = (now, cur)
        lines += [*top_block(snap, rates), ""]
    for gone in set(previous) - seen:
        del previous[gone]
    return lines


# -- main ----------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from ._cli_demo import run_demo

    return run_demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmrate",
        description="Inspect and manage the shmrate limits of this host.",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log shmrate's DEBUG messages"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, run: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, epilog=_EPILOG)
        p.set_defaults(run=run)
        return p

    p = command("list", cmd_list, "every shmrate segment on this host, one a line")
    p.add_argument("--json", action="store_true", help="print JSON instead")
    p = command("show", cmd_show, "one segment in full, per-stream rows included")
    p.add_argument("name", metavar="NAME", help="its name, or its file shmrate_<hex>")
    p.add_argument("--json", action="store_true", help="print JSON instead")
    p = command(
        "top",
        cmd_top,
        "a live view of every segment (or of NAME): per-stream rates against "
        "allocations, refusals per second; Ctrl-C quits",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="only this segment")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between frames (1)"
    )
    p.add_argument(
        "--iterations", type=int, default=0, help="quit after N frames (0: never)"
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="append frames, no escapes (default when stdout is not a terminal)",
    )
    p = command(
        "rm",
        cmd_rm,
        "remove a segment and its semaphore; refused while live processes hold "
        "leases on it or have it open, unless --force",
    )
    p.add_argument("name", metavar="NAME", help="its name, or its file shmrate_<hex>")
    p.add_argument("--force", action="store_true", help="remove it even if in use")
    p = command(
        "demo",
        _demo,
        "a simulated ingest appliance: forked workers share connection caps and "
        "a bandwidth pool; one is killed midway and its leases come back",
    )
    from ._cli_demo import add_arguments

    add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shmrate: %(levelname)s: %(message)s"))
    log = logging.getLogger("shmrate")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # A parent shell may have set SIGINT to be ignored; Ctrl-C must reach us.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code: int = args.run(args)
    except Failure as f:
        _err(str(f))
        return f.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shmrate list | head`: the reader has had enough. Point stdout at
        # /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ShmrateError, OSError) as e:
        # What the library raises on purpose (a full /dev/shm is an OSError)
        # says what to do already; a traceback would add nothing.
        _err(str(e))
        return EXIT_REFUSED
    return code


if __name__ == "__main__":
    sys.exit(main())
