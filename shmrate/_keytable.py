"""A fixed-size table of keys in a shared segment, reused and evicted by age.

Both keyed kinds (``KeyedTokenBucket`` and the ``limits`` storage) keep one row
per key: a payload that the kind defines (a bucket row, a window counter) and
the key itself. The table never grows: it has ``max_keys`` rows, sized when the
segment is created, and this module decides which row a new key gets.

Finding a key. An open-addressing index with linear probing maps a 63-bit
BLAKE2b hash of the key's bytes, keyed with the segment's random seed, to its
row. The seed lives in the segment, so every interpreter on the host computes
the same hash (never Python's salted ``hash()``), while a client who picks keys
cannot aim them at one probe chain without knowing it. The index has at least
twice as many slots as rows, so probe chains stay short. A slot holds the low 31
bits of the hash (which include the home slot) beside the row number, so a
probe compares the key's bytes only when those bits match, and a deletion can
shift later entries back into the gap without reading their rows: there are
never tombstones.

Giving a new key a row, in this order:

1. A row from the spare stack. It holds free rows and rows that a sweep found
   to hold no information (a full bucket, an expired counter). Such a row is
   still indexed and still serves its key until it is taken, so it is checked
   again when popped.
2. The least recently used row, if it holds no information. With one rate for
   every key, the row idle longest is the first to refill, so this is the
   common case once the table has filled.
3. A sweep: one vectorised pass over every row that pushes each row holding no
   information onto the spare stack. A sweep costs about 4 ms at 100,000 rows,
   so after one the next waits at least ``MIN_SWEEP_GAP_NS`` and 16 times the
   last sweep's cost. A bucket that refills within that gap can be overlooked,
   and a live row evicted instead; the gap bounds what floods of new keys can
   spend under the lock to a few per cent.
4. Eviction of the least recently used row, counted in the header's
   ``evictions`` word.

The least recently used row is found without a linked list, so using a key
costs one write (its ``used_ns`` stamp). A refresh picks the ``lru_batch``
rows with the oldest stamps (``numpy.argpartition``), sorted, into a candidate
list together with the stamps they had. Stamps only grow, so a candidate whose
stamp has not changed since is older than every row outside the list; one whose
stamp changed is skipped. The first unchanged candidate is therefore exactly the
least recently used row, and a refresh is needed once per ``lru_batch`` rows
taken.

Every ``KeyTable`` method but ``hash`` expects the caller to hold the
segment's lock.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic_ns
from typing import Any

import numpy as np

from ._layout import (
    H_COUNT,
    H_EVICTIONS,
    H_FREE_TOP,
    H_NEXT_GEN,
    H_P0,
    H_SEED,
    HEADER_BYTES,
    NS_PER_MS,
    WORD,
)
from .errors import LayoutMismatch

__all__ = [
    "KEY_BYTES",
    "M_GEN",
    "M_USED_NS",
    "PAYLOAD0",
    "T_ALLOWED_CALLS",
    "T_ALLOWED_UNITS",
    "T_RATE",
    "T_RATE_SINCE_NS",
    "T_REFUSED_CALLS",
    "T_REFUSED_UNITS",
    "T_REUSED",
    "T_SWEEPS",
    "T_WAITED_NS",
    "T_WAITS",
    "Geometry",
    "IsSpare",
    "KeyTable",
    "encode_key",
    "init_table",
    "repair_table",
]

log = logging.getLogger("shmrate")

# Segment of a key table (all int64 words; word 0 is the segment's start)::
#
#   words              field            meaning
#   0-63               header           _layout.HEADER; p0-p4 give the geometry:
#                                       max_keys, slots, lru_batch,
#                                       payload_words, KEY_BYTES
#   64-79              table words      T_* below
#   index0 ..          index            slots words: 0 empty, else
#                                       (hash & 0x7fffffff) << 32 | (row + 1)
#   stack0 ..          spare stack      max_keys words of row numbers;
#                                       header free_top entries are in use
#   lru0 ..            LRU candidates   lru_batch pairs (row, used_ns then)
#   rows0 ..           rows             max_keys rows of row_words words,
#                                       from a multiple of 8 words
#
# Table words (written by every holder unless noted):
#
#   T_RATE            KeyedTokenBucket: tokens/s of every key's bucket
#   T_RATE_SINCE_NS   KeyedTokenBucket: monotonic time T_RATE was set
#   T_ALLOWED_*       calls allowed and units they took, all keys
#   T_REFUSED_*       calls refused and units they asked for, all keys
#   T_WAITS           blocking waits granted after sleeping
#   T_WAITED_NS       time those waits slept, ns
#   T_REUSED          rows taken from keys that held no information
#   T_SWEEPS          sweeps run
#   T_NEXT_SWEEP_NS   monotonic time before which no sweep runs
#   T_LRU_HEAD        first LRU candidate not yet taken
#   T_LRU_LEN         LRU candidates listed
#
# Row (row_words words, a multiple of 8, so rows start on 64-byte cache lines
# and a hot call reads one line: gen, used_ns and the payload's first 6 words;
# P is payload_words):
#
#   word          field       meaning
#   0             gen         > 0: live, generation of this assignment; 0: free
#   1             used_ns     monotonic time of the key's last use
#   2 ..          payload     P words, defined by the kind
#   2 + P         hash        63-bit keyed BLAKE2b of the key bytes
#   3 + P         len         key bytes stored
#   4 + P         stacked     1 while the row is on the spare stack
#   5 + P         (spare)
#   6 + P ..      key         the key bytes (KEY_BYTES at most), then padding
#
# Invariants, true whenever the lock is free:
#
# * live rows (gen > 0) hold distinct keys; header count == live rows;
# * every live row has exactly one index slot, reachable from its home slot
#   (hash & (slots - 1)) without passing an empty slot; no other slot is used;
# * the spare stack holds distinct rows, exactly those with stacked == 1, and
#   every free row is on it (live rows on it are checked when popped);
# * next_gen is larger than every row's gen, so a (row, gen) pair names one
#   assignment of one key forever: a process-local cache of it never needs
#   to be invalidated, only compared;
# * LRU candidates are sorted by their recorded stamp, and every row not
#   listed with its current stamp has a stamp at least as new as the last one.
#
# A holder that dies can break any of these; repair_table rebuilds the index,
# the stack and the counts from the rows, which are the truth.

TABLE0 = HEADER_BYTES // WORD
T_RATE = TABLE0 + 0
T_RATE_SINCE_NS = TABLE0 + 1
T_ALLOWED_CALLS = TABLE0 + 2
T_ALLOWED_UNITS = TABLE0 + 3
T_REFUSED_CALLS = TABLE0 + 4
T_REFUSED_UNITS = TABLE0 + 5
T_WAITS = TABLE0 + 6
T_WAITED_NS = TABLE0 + 7
T_REUSED = TABLE0 + 8
T_SWEEPS = TABLE0 + 9
T_NEXT_SWEEP_NS = TABLE0 + 10
T_LRU_HEAD = TABLE0 + 11
T_LRU_LEN = TABLE0 + 12
TABLE_WORDS = 16

M_GEN = 0
M_USED_NS = 1
PAYLOAD0 = 2
# After the payload, at Geometry.hash_at and on:
_HASH, _LEN, _STACKED, _KEY = 0, 1, 2, 4
KEY_BYTES = 64
KEY_WORDS = KEY_BYTES // WORD

MAX_KEYS = 1 << 24  # row + 1 must fit the 32 low bits of an index slot
TAG_MASK = 0x7FFF_FFFF
ROW_MASK = 0xFFFF_FFFF
# Keys longer than KEY_BYTES are stored as this byte (never the first byte of
# UTF-8) and a 32-byte BLAKE2b digest of the whole key.
_FOLDED = b"\xff"

MIN_SWEEP_GAP_NS = 10 * NS_PER_MS
SWEEP_COST_RATIO = 16

# is_spare(base, now_ns): True if the row at word ``base`` holds no
# information now. spare_mask(rows, now_ns): the same for every row at once,
# allowed to say True too often (popping re-checks with is_spare).
IsSpare = Callable[[int, int], bool]
SpareMask = Callable[[np.ndarray[Any, np.dtype[np.int64]], int], Any]
RepairPayload = Callable[[memoryview, int, int], list[str]]


@dataclass(frozen=True)
class Geometry:
    """Where the parts of a key table are, in words from the segment start."""

    max_keys: int
    slots: int
    lru_batch: int
    payload_words: int

    @classmethod
    def for_keys(cls, max_keys: int, payload_words: int) -> Geometry:
        slots = 1 << max(2 * max_keys - 1, 1).bit_length()
        lru_batch = max(16, min(max_keys // 32, 4096))
        return cls(max_keys, slots, lru_batch, payload_words)

    @classmethod
    def from_words(cls, words: memoryview) -> Geometry:
        g = cls(*(int(words[H_P0 + i]) for i in range(4)))
        ok = (
            1 <= g.max_keys <= MAX_KEYS
            and g.slots >= 2 * g.max_keys
            and g.slots & (g.slots - 1) == 0
            and g.lru_batch >= 1
            and g.payload_words >= 1
            and words[H_P0 + 4] == KEY_BYTES
        )
        if not ok or g.size_bytes != len(words) * WORD:
            raise LayoutMismatch(
                "shmrate: the key table's geometry in the header does not match "
                "the segment; unlink it (shmrate rm NAME) and create it again"
            )
        return g

    @property
    def params(self) -> tuple[int, ...]:
        return (
            self.max_keys,
            self.slots,
            self.lru_batch,
            self.payload_words,
            KEY_BYTES,
        )

    @property
    def row_words(self) -> int:
        return -(-(self.hash_at + _KEY + KEY_WORDS) // 8) * 8

    # Words of a row's key state after its payload, from the row's start.

    @property
    def hash_at(self) -> int:
        return PAYLOAD0 + self.payload_words + _HASH

    @property
    def len_at(self) -> int:
        return PAYLOAD0 + self.payload_words + _LEN

    @property
    def stacked_at(self) -> int:
        return PAYLOAD0 + self.payload_words + _STACKED

    @property
    def key0(self) -> int:
        return PAYLOAD0 + self.payload_words + _KEY

    @property
    def index0(self) -> int:
        return TABLE0 + TABLE_WORDS

    @property
    def stack0(self) -> int:
        return self.index0 + self.slots

    @property
    def lru0(self) -> int:
        return self.stack0 + self.max_keys

    @property
    def rows0(self) -> int:
        return -(-(self.lru0 + 2 * self.lru_batch) // 8) * 8

    @property
    def size_bytes(self) -> int:
        return (self.rows0 + self.max_keys * self.row_words) * WORD


def encode_key(key: object, prefix: bytes = b"") -> bytes:
    """The bytes a key is stored as: ``prefix`` and its UTF-8, folded if long."""
    if not isinstance(key, str):
        raise TypeError(
            f"shmrate: a key must be a str, not {type(key).__name__} "
            "(convert it with str())"
        )
    raw = prefix + key.encode("utf-8", "surrogatepass")
    if len(raw) <= KEY_BYTES:
        return raw
    return _FOLDED + hashlib.blake2b(raw, digest_size=32).digest()


def _int64_array(words: memoryview) -> np.ndarray[Any, np.dtype[np.int64]]:
    # Built per use and dropped before returning: a numpy array that outlived
    # the call would keep the mapping exported and make close() leave it.
    return np.frombuffer(words, dtype=np.int64)


def init_table(words: memoryview, g: Geometry) -> None:
    """Lay out an empty table in a segment being created: every row free."""
    a = _int64_array(words)
    a[g.stack0 : g.stack0 + g.max_keys] = np.arange(g.max_keys - 1, -1, -1)
    rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
    rows[:, g.stacked_at] = 1
    del a, rows
    words[H_FREE_TOP] = g.max_keys
    words[H_NEXT_GEN] = 1
    words[H_SEED] = secrets.randbits(63)


class KeyTable:
    """This process's handle on the key table of one segment.

    ``words`` is the whole segment as int64 words. The kind supplies
    ``is_spare`` and ``spare_mask``, which say which rows hold no information.
    """

    def __init__(
        self,
        words: memoryview,
        g: Geometry,
        is_spare: IsSpare,
        spare_mask: SpareMask,
        label: str,
    ) -> None:
        self.g = g
        self.words = words
        self.bytes = words.cast("B")
        self.is_spare = is_spare
        self.spare_mask = spare_mask
        self.label = label
        self.rows0 = g.rows0
        self.row_words = g.row_words
        self.key0 = g.key0
        self.hash_at = g.hash_at
        self.len_at = g.len_at
        self.stacked_at = g.stacked_at
        self._hasher = hashlib.blake2b(
            digest_size=8, key=int(words[H_SEED]).to_bytes(8, "little")
        )
        self._warned_full = False

    def release(self) -> None:
        """Drop this handle's byte view (before the segment closes)."""
        self.bytes.release()

    # -- lookup ------------------------------------------------------------------

    def hash(self, kb: bytes) -> int:
        h = self._hasher.copy()
        h.update(kb)
        return int.from_bytes(h.digest(), "little") >> 1

    def find(self, kb: bytes, h: int) -> int:
        """The first word of the row holding ``kb``, or -1."""
        w = self.words
        index0 = self.g.index0
        mask = self.g.slots - 1
        tag = h & TAG_MASK
        i = tag & mask
        while True:
            v = w[index0 + i]
            if v == 0:
                return -1
            if v >> 32 == tag:
                base = self.rows0 + ((v & ROW_MASK) - 1) * self.row_words
                if w[base + self.len_at] == len(kb):
                    at = (base + self.key0) * WORD
                    if self.bytes[at : at + len(kb)] == kb:
                        return base
            i = (i + 1) & mask

    def gen(self, base: int) -> int:
        return int(self.words[base + M_GEN])

    def key_of(self, base: int) -> bytes:
        at = (base + self.key0) * WORD
        return bytes(self.bytes[at : at + self.words[base + self.len_at]])

    # -- rows for new keys -------------------------------------------------------

    def claim(self, kb: bytes, h: int, now_ns: int) -> tuple[int, int]:
        """Give ``kb`` (not in the table) a row; returns its first word and gen.

        The payload is left as it was; the caller initialises it at once.
        """
        w = self.words
        base = self._spare_row(now_ns)
        gen = w[H_NEXT_GEN]
        w[H_NEXT_GEN] = gen + 1
        w[base + self.hash_at] = h
        w[base + self.len_at] = len(kb)
        at = (base + self.key0) * WORD
        self.bytes[at : at + len(kb)] = kb
        w[base + M_USED_NS] = now_ns
        # gen last: a holder that dies before it leaves a free row behind.
        w[base + M_GEN] = gen
        self._index_insert((base - self.rows0) // self.row_words, h)
        w[H_COUNT] += 1
        return base, int(gen)

    def drop(self, base: int) -> None:
        """Forget the key of a live row; the row goes to the spare stack."""
        self._unassign(base)
        self._push((base - self.rows0) // self.row_words)

    def clear(self) -> int:
        """Forget every key; returns how many there were."""
        g = self.g
        a = _int64_array(self.words)
        a[g.index0 : g.index0 + g.slots] = 0
        a[g.stack0 : g.stack0 + g.max_keys] = np.arange(g.max_keys - 1, -1, -1)
        rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
        rows[:, :] = 0
        rows[:, g.stacked_at] = 1
        del a, rows
        w = self.words
        count = int(w[H_COUNT])
        w[H_COUNT] = 0
        w[H_FREE_TOP] = g.max_keys
        w[T_LRU_HEAD] = w[T_LRU_LEN] = 0
        w[T_NEXT_SWEEP_NS] = 0
        return count

    def _spare_row(self, now_ns: int) -> int:
        """A row no key holds, taken by the rules in the module docstring."""
        w = self.words
        stack0 = self.g.stack0
        while w[H_FREE_TOP] > 0:
            top = w[H_FREE_TOP] - 1
            w[H_FREE_TOP] = top
            base = self.rows0 + w[stack0 + top] * self.row_words
            w[base + self.stacked_at] = 0
            if w[base + M_GEN] == 0:
                return base
            if self.is_spare(base, now_ns):
                self._unassign(base)
                w[T_REUSED] += 1
                return base
            # Used again since the sweep listed it: it stays with its key.
        base = self._least_recent()
        if self.is_spare(base, now_ns):
            w[T_LRU_HEAD] += 1
            self._unassign(base)
            w[T_REUSED] += 1
            return base
        if now_ns >= w[T_NEXT_SWEEP_NS] and self._sweep(now_ns):
            return self._spare_row(now_ns)
        w[T_LRU_HEAD] += 1
        self._unassign(base)
        w[H_EVICTIONS] += 1
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "%s: all %d keys are in use; evicting the least recently used "
                "(a larger max_keys avoids this)",
                self.label,
                self.g.max_keys,
            )
        return base

    def _unassign(self, base: int) -> None:
        self._index_remove(base)
        self.words[base + M_GEN] = 0
        self.words[H_COUNT] -= 1

    def _push(self, row: int) -> None:
        w = self.words
        base = self.rows0 + row * self.row_words
        if w[base + self.stacked_at]:
            return
        w[base + self.stacked_at] = 1
        top = w[H_FREE_TOP]
        w[self.g.stack0 + top] = row
        w[H_FREE_TOP] = top + 1

    def _sweep(self, now_ns: int) -> int:
        """Push every unlisted row that holds no information; returns how many."""
        started = monotonic_ns()
        g = self.g
        a = _int64_array(self.words)
        rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
        spare = (rows[:, M_GEN] == 0) | self.spare_mask(rows, now_ns)
        found = np.flatnonzero(spare & (rows[:, g.stacked_at] == 0))
        top = int(self.words[H_FREE_TOP])
        a[g.stack0 + top : g.stack0 + top + len(found)] = found
        rows[found, g.stacked_at] = 1
        del a, rows, spare
        w = self.words
        w[H_FREE_TOP] = top + len(found)
        w[T_SWEEPS] += 1
        cost_ns = monotonic_ns() - started
        w[T_NEXT_SWEEP_NS] = now_ns + max(MIN_SWEEP_GAP_NS, SWEEP_COST_RATIO * cost_ns)
        log.debug(
            "%s: sweep found %d spare rows in %d us",
            self.label,
            len(found),
            cost_ns // 1000,
        )
        return len(found)

    def _least_recent(self) -> int:
        """The first word of the least recently used live row (one must exist)."""
        w = self.words
        lru0 = self.g.lru0
        for _ in range(2):
            head = w[T_LRU_HEAD]
            listed = w[T_LRU_LEN]
            while head < listed:
                base = self.rows0 + w[lru0 + 2 * head] * self.row_words
                if w[base + M_GEN] and w[base + M_USED_NS] == w[lru0 + 2 * head + 1]:
                    w[T_LRU_HEAD] = head
                    return base
                head += 1
            self._refresh_lru()
        raise AssertionError("shmrate: a full key table has no live row")

    def _refresh_lru(self) -> None:
        g = self.g
        a = _int64_array(self.words)
        rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
        stamps = rows[:, M_USED_NS].copy()
        stamps[rows[:, M_GEN] == 0] = np.iinfo(np.int64).max
        k = min(g.lru_batch, int(self.words[H_COUNT]))
        oldest = np.argpartition(stamps, k - 1)[:k] if k else stamps[:0]
        oldest = oldest[np.argsort(stamps[oldest], kind="stable")]
        pairs = a[g.lru0 : g.lru0 + 2 * g.lru_batch].reshape(g.lru_batch, 2)
        pairs[:k, 0] = oldest
        pairs[:k, 1] = stamps[oldest]
        del a, rows, pairs
        self.words[T_LRU_HEAD] = 0
        self.words[T_LRU_LEN] = k

    # -- the index ---------------------------------------------------------------

    def _index_insert(self, row: int, h: int) -> None:
        w = self.words
        index0 = self.g.index0
        mask = self.g.slots - 1
        tag = h & TAG_MASK
        i = tag & mask
        while w[index0 + i]:
            i = (i + 1) & mask
        w[index0 + i] = (tag << 32) | (row + 1)

    def _index_remove(self, base: int) -> None:
        """Delete the row's slot, shifting later entries of its chain back."""
        w = self.words
        index0 = self.g.index0
        mask = self.g.slots - 1
        want = (base - self.rows0) // self.row_words + 1
        i = w[base + self.hash_at] & mask
        for _ in range(self.g.slots):
            if w[index0 + i] & ROW_MASK == want:
                break
            i = (i + 1) & mask
        else:
            raise AssertionError("shmrate: a live row is missing from the index")
        j = i
        while True:
            j = (j + 1) & mask
            v = w[index0 + j]
            if v == 0:
                break
            home = (v >> 32) & mask
            # The entry at j may fill the gap at i unless its home lies
            # cyclically after i (then moving it would put it before its home).
            if (j - home) & mask >= (j - i) & mask:
                w[index0 + i] = v
                i = j
        w[index0 + i] = 0


def repair_table(words: memoryview, repair_payload: RepairPayload) -> list[str]:
    """Rebuild what a dead holder may have left half-written; rows are the truth.

    Rows with an impossible key length are freed, duplicate keys keep their
    first row, each live payload is repaired by ``repair_payload(payload,
    gen, now_ns)``, and the index, spare stack, counts and LRU list are built
    again from the rows.
    """
    g = Geometry.from_words(words)
    now = monotonic_ns()
    fixed: list[str] = []
    table = KeyTable(words, g, lambda base, now_ns: False, lambda r, n: None, "")
    try:
        w = words
        a = _int64_array(words)
        a[g.index0 : g.index0 + g.slots] = 0
        rows = a[g.rows0 :].reshape(g.max_keys, g.row_words)
        rows[:, g.stacked_at] = 0
        bad = (rows[:, M_GEN] < 0) | (rows[:, g.len_at] < 0)
        bad |= rows[:, g.len_at] > KEY_BYTES
        if bad.any():
            fixed.append(f"{int(bad.sum())} damaged rows freed")
            rows[bad, M_GEN] = 0
        live = np.flatnonzero(rows[:, M_GEN] > 0).tolist()
        top_gen = int(rows[:, M_GEN].max())
        del a, rows, bad
        if w[H_NEXT_GEN] <= top_gen:
            w[H_NEXT_GEN] = top_gen + 1
            fixed.append("generation counter advanced")
        seen: set[bytes] = set()
        payload_notes: set[str] = set()
        count = 0
        for row in live:
            base = g.rows0 + row * g.row_words
            kb = table.key_of(base)
            if kb in seen:
                w[base + M_GEN] = 0
                fixed.append("a duplicate key dropped")
                continue
            seen.add(kb)
            h = table.hash(kb)
            w[base + g.hash_at] = h
            if w[base + M_USED_NS] > now:
                w[base + M_USED_NS] = now
            payload = w[base + PAYLOAD0 : base + PAYLOAD0 + g.payload_words]
            try:
                payload_notes.update(repair_payload(payload, int(w[base + M_GEN]), now))
            finally:
                payload.release()
            table._index_insert(row, h)
            count += 1
        top = 0
        for row in range(g.max_keys):
            base = g.rows0 + row * g.row_words
            if w[base + M_GEN] == 0:
                w[g.stack0 + top] = row
                w[base + g.stacked_at] = 1
                top += 1
        w[H_FREE_TOP] = top
        w[H_COUNT] = count
        w[T_LRU_HEAD] = w[T_LRU_LEN] = 0
        w[T_NEXT_SWEEP_NS] = 0
        if w[T_RATE_SINCE_NS] > now:
            w[T_RATE_SINCE_NS] = now
        fixed.extend(sorted(payload_notes))
    finally:
        table.release()
    fixed.append(f"index rebuilt over {count} keys")
    return fixed
