"""Which /dev/shm entries the bench created, and whether it removed them all.

shmrate names its segments and semaphores by a hash of the user's name, so
the bench cannot recognise its own entries by prefix. Instead it lists
/dev/shm around everything that may create an entry (each ``make`` and each
measure run) and remembers what appeared; at the end every remembered entry
must be gone. Entries that another process creates at the same moment may be
remembered too; they are reported apart, only when they are also still there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

SHM_DIR = "/dev/shm"


def listing() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


class ShmTracker:
    def __init__(self) -> None:
        self.at_start = listing()
        self.seen: set[str] = set()

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Remember every entry that appears while the block runs."""
        before = listing()
        try:
            yield
        finally:
            self.seen |= listing() - before

    def leftovers(self, grace_s: float = 2.0) -> list[str]:
        """Entries the bench saw appear that still exist.

        Another process that creates and removes entries of its own (a test
        suite running beside the bench) can create one inside a watched
        block; such an entry is usually gone a moment later, so a second
        look after ``grace_s`` keeps it from being blamed on the bench.
        """
        left = self.seen & listing()
        if left:
            time.sleep(grace_s)
            left &= listing()
        return sorted(left)

    @staticmethod
    def sizes(names: set[str]) -> dict[str, tuple[int, int]]:
        """Apparent and allocated bytes of each entry."""
        result = {}
        for name in sorted(names):
            try:
                stat = os.stat(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                continue
            result[name] = (stat.st_size, stat.st_blocks * 512)
        return result
