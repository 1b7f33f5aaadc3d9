"""What every keyed shmrate object shares: attaching, opening by name,
pickling, closing and unlinking."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from ._layout import H_ALLOWED, H_REAPED, H_RECOVERIES, H_REFUSED
from ._segment import Segment, SegmentSpec

__all__ = ["SharedObject"]

_T = TypeVar("_T", bound="SharedObject")


class SharedObject:
    """Base of the classes whose state is one segment of their own kind."""

    KIND: ClassVar[int]

    @staticmethod
    def REPAIR(words: memoryview) -> str:
        """Restore the kind's invariants after a lock holder died (lock held);
        returns what was done, for the log."""
        raise NotImplementedError

    _seg: Segment
    name: str

    def _attach(self, name: str | None, spec: SegmentSpec | None) -> None:
        self._bind(Segment.attach(name, self.KIND, spec, type(self).REPAIR))

    @classmethod
    def open(cls: type[_T], name: str) -> _T:
        """Open the existing object ``name``; ``SegmentMissing`` (a
        ``FileNotFoundError``) if there is none, ``KindMismatch`` if the name
        belongs to another kind."""
        self = cls.__new__(cls)
        self._attach(name, None)
        return self

    def _bind(self, seg: Segment) -> None:
        self._seg = seg
        self._words = seg.words
        self._acquire = seg.lock.acquire
        self._release = seg.lock.release
        self.name = seg.name

    def _header_stats(self) -> dict[str, int]:
        """Object-wide counters. Caller holds the lock."""
        w = self._words
        return {
            "allowed": int(w[H_ALLOWED]),
            "refused": int(w[H_REFUSED]),
            "recoveries": int(w[H_RECOVERIES]),
            "reaped": int(w[H_REAPED]),
        }

    def close(self) -> None:
        """Detach this process. Safe to call twice."""
        self._seg.close()

    def unlink(self) -> None:
        """Remove the name from the host (processes attached keep using it).

        Call it once no process will open the name again: a process that
        creates the name afterwards gets a new object the others do not see.
        """
        self._seg.unlink()

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self).open, (self.name,))
