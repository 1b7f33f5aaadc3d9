from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from shmrate._segment import _unlink_quietly, shm_name_for


def _ours() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm") if "shmrate_" in e}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must remove each segment and semaphore it creates."""
    before = _ours()
    yield
    leaked = _ours() - before
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


def unlink_name(name: str) -> None:
    _unlink_quietly(shm_name_for(name))


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh segment name, removed from the host after the test."""
    n = f"test-{uuid.uuid4().hex[:12]}"
    yield n
    unlink_name(n)
