"""The stream table: fixed rows keyed by stream ID, found by open addressing.

Stream IDs are ``str`` of at most 128 bytes of UTF-8. A row is found through an
index of ``slots`` int64 entries (a power of two, at least twice the rows, so
probes stay short at full load): each holds a row number or ``INDEX_EMPTY``.
The hash is zlib's CRC-32 of the key's bytes seeded with a random number kept
in the segment header, so unrelated interpreters (whatever their
``PYTHONHASHSEED``) agree on it and callers cannot choose colliding IDs
without first reading the segment.

Deletion shifts later entries of the probe run back instead of leaving
tombstones, so the index never degrades and never needs a periodic rebuild.
Rows never move; unused rows sit on a free list. Every function here expects
the caller to hold the segment's lock. After a holder died mid-update,
``rebuild`` derives the index and free list from the rows' ``live`` flags.
"""

from __future__ import annotations

import array
import secrets
import zlib

import numpy as np

from ._layout import (
    H_FREE_TOP,
    H_SEED,
    HEADER_BYTES,
    INDEX_EMPTY,
    KEY_MAX_BYTES,
    S_HASH,
    S_KEY_BYTE,
    S_KEY_LEN,
    S_LIVE,
    STREAM,
    STREAM_WORDS,
    WORD,
)
from ._segment import Segment, TransientViews
from .errors import CapacityError

__all__ = ["StreamTable", "stream_key"]


def stream_key(stream_id: object) -> bytes:
    """Check a stream ID and return its UTF-8 bytes."""
    if type(stream_id) is not str:
        if not isinstance(stream_id, str):
            raise TypeError(
                f"shmrate: a stream ID must be a str, not {type(stream_id).__name__}"
            )
        stream_id = str(stream_id)
    try:
        key = stream_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"shmrate: stream ID {stream_id!r} is not valid UTF-8"
        ) from None
    if len(key) > KEY_MAX_BYTES:
        raise ValueError(
            f"shmrate: stream ID {stream_id[:40]!r}... is {len(key)} bytes of UTF-8; "
            f"the most is {KEY_MAX_BYTES}"
        )
    return key


_ZERO_ROW = memoryview(bytes(STREAM.itemsize)).cast("q")
_EMPTY_INDEX = array.array("q", [INDEX_EMPTY])

# How many stream IDs a process remembers the bytes and hash of.
_RECENT_IDS = 4096


def _slots_for(nrows: int) -> int:
    slots = 8
    while slots < 2 * nrows:
        slots *= 2
    return slots


class StreamTable:
    """This process's view of one segment's stream table."""

    def __init__(
        self, seg: Segment | TransientViews, first_word: int, nrows: int
    ) -> None:
        slots = _slots_for(nrows)
        self.nrows = nrows
        self.mask = slots - 1
        self.header = seg.view(0, HEADER_BYTES // WORD)
        self.rows = seg.view(first_word, nrows * STREAM_WORDS)
        self.index = seg.view(first_word + nrows * STREAM_WORDS, slots)
        self.free = seg.view(first_word + nrows * STREAM_WORDS + slots, nrows)
        self.keys = seg.byte_view(first_word * WORD, nrows * STREAM.itemsize)
        self.records = seg.array(first_word, STREAM, nrows)
        self.seed = int(self.header[H_SEED]) & 0xFFFFFFFF
        self._recent: dict[object, tuple[bytes, int]] = {}

    @staticmethod
    def words_for(nrows: int) -> int:
        """Words the table takes for ``nrows`` rows (rows, index, free list)."""
        return nrows * STREAM_WORDS + _slots_for(nrows) + nrows

    @staticmethod
    def init(words: memoryview, first_word: int, nrows: int) -> None:
        """Lay out an empty table (rows are already zero)."""
        slots = _slots_for(nrows)
        index = first_word + nrows * STREAM_WORDS
        for i in range(index, index + slots):
            words[i] = INDEX_EMPTY
        free = index + slots
        for i in range(nrows):
            words[free + i] = nrows - 1 - i  # pops hand out row 0 first
        words[H_FREE_TOP] = nrows
        words[H_SEED] = secrets.randbits(32)

    def hash(self, key: bytes) -> int:
        return zlib.crc32(key, self.seed)

    def lookup_key(self, stream_id: str) -> tuple[bytes, int]:
        """The checked key bytes of ``stream_id`` and their hash.

        Remembers the answer for recently seen IDs (only valid IDs are ever
        stored, so a hit needs no check).
        """
        try:
            hit = self._recent.get(stream_id)
        except TypeError:  # unhashable: certainly not a str
            hit = None
        if hit is not None:
            return hit
        key = stream_key(stream_id)
        hit = (key, zlib.crc32(key, self.seed))
        if len(self._recent) >= _RECENT_IDS:
            self._recent.clear()
        self._recent[stream_id] = hit
        return hit

    def find(self, key: bytes, h: int) -> int:
        """The row holding ``key``, or -1."""
        index, rows, mask = self.index, self.rows, self.mask
        i = h & mask
        while (r := index[i]) != INDEX_EMPTY:
            base = r * STREAM_WORDS
            if rows[base + S_HASH] == h and rows[base + S_KEY_LEN] == len(key):
                start = base * WORD + S_KEY_BYTE
                if self.keys[start : start + len(key)] == key:
                    return r
            i = (i + 1) & mask
        return -1

    def insert(self, key: bytes, h: int) -> int:
        """Give ``key`` (not present) a row; ``CapacityError`` if none is free."""
        top = self.header[H_FREE_TOP]
        if top <= 0:
            raise CapacityError(
                f"shmrate: all {self.nrows} stream rows are in use; release streams "
                "or create the object with more rows"
            )
        r = self.free[top - 1]
        self.header[H_FREE_TOP] = top - 1
        base = r * STREAM_WORDS
        rows = self.rows
        rows[base : base + STREAM_WORDS] = _ZERO_ROW
        start = base * WORD + S_KEY_BYTE
        self.keys[start : start + len(key)] = key
        rows[base + S_HASH] = h
        rows[base + S_KEY_LEN] = len(key)
        rows[base + S_LIVE] = 1
        i = h & self.mask
        while self.index[i] != INDEX_EMPTY:
            i = (i + 1) & self.mask
        self.index[i] = r
        return int(r)

    def delete(self, r: int) -> None:
        """Remove live row ``r`` from the index and put it on the free list."""
        index, rows, mask = self.index, self.rows, self.mask
        i = rows[r * STREAM_WORDS + S_HASH] & mask
        while index[i] != r:
            i = (i + 1) & mask
        # Backward-shift deletion: pull later entries of the run into the gap
        # when their home slot does not lie (cyclically) between gap and them.
        j = i
        while True:
            j = (j + 1) & mask
            moved = index[j]
            if moved == INDEX_EMPTY:
                break
            home = rows[moved * STREAM_WORDS + S_HASH] & mask
            stays = (i < home <= j) if i <= j else (home > i or home <= j)
            if not stays:
                index[i] = moved
                i = j
        index[i] = INDEX_EMPTY
        rows[r * STREAM_WORDS + S_LIVE] = 0
        top = self.header[H_FREE_TOP]
        self.free[top] = r
        self.header[H_FREE_TOP] = top + 1

    def has_room(self) -> bool:
        return bool(self.header[H_FREE_TOP] > 0)

    def key_of(self, r: int) -> str:
        start = r * STREAM_WORDS * WORD + S_KEY_BYTE
        n = self.rows[r * STREAM_WORDS + S_KEY_LEN]
        return bytes(self.keys[start : start + n]).decode("utf-8")

    def live_rows(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.records["live"] == 1)]

    def rebuild(self) -> None:
        """Derive the index and the free list from the rows' live flags.

        The rows are the truth: ``insert`` makes a row live only once its key
        and hash are written, and ``delete`` clears the flag before the row
        goes on the free list, so a holder that died anywhere in between
        leaves rows this rebuilds from exactly.
        """
        self.index[:] = _EMPTY_INDEX * (self.mask + 1)
        for r in self.live_rows():
            i = self.rows[r * STREAM_WORDS + S_HASH] & self.mask
            while self.index[i] != INDEX_EMPTY:
                i = (i + 1) & self.mask
            self.index[i] = r
        # Descending, so that pops hand out the lowest row first.
        free = np.flatnonzero(self.records["live"] != 1)[::-1]
        self.free[: len(free)] = memoryview(free.astype("<i8").tobytes()).cast("q")
        self.header[H_FREE_TOP] = len(free)
