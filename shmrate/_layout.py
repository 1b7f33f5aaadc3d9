"""The layout of a shmrate segment, described once with numpy dtypes.

A segment is a fixed header followed by typed tables. Every field is a
little-endian int64, so the hot path reads and writes fields through a
``memoryview`` cast to ``'q'`` using the word indices defined here, and numpy
views of the same bytes serve the scans and the introspection.

Header (``HEADER``, 512 bytes at offset 0)::

    word  field         unit / meaning                           written by
    0     magic         b"shmrate\\0" as an int64                creator, once
    1     version       LAYOUT_VERSION                            creator, once
    2     kind          KIND_* below                              creator, once
    3     state         0 initialising, 1 ready                   creator, last
    4     holder        >0 owner token of the lock holder;        every holder
                        <=0 minus the time (ns) of the last release
    5     size          segment size in bytes                     creator, once
    6     boot          hash of the kernel boot id                creator; repair
    7     created_ns    wall-clock time of creation (ns)          creator, once
    8     recoveries    locks taken over from dead holders        recoverer
    9     reaped        leases reclaimed from dead owners         reaper
    10-15 p0..p5        parameters of the kind (see each class)   creator, once
    16    name_len      bytes of the UTF-8 name                   creator, once
    17    count         connections held / bytes/s allocated /    every holder
                        keys live (by kind)
    18    free_top      entries on the stream rows' free list     every holder
    19    (spare, 0)    no index keeps tombstones
    20    next_gen      the next generation number to hand out    every holder
    21    last_reap_ns  monotonic time of the last automatic reap reaper
    22    seed          random seed of the stream-key hash        creator, once
    23    lease_free    entries on the lease free list            every holder
    24    evictions     keys evicted from a full keyed table      every holder
    25    allowed       requests granted (streams kinds)          every holder
    26    refused       requests refused (streams kinds)          every holder
    27-31 (spare)
    32-63 name          the name given by the user (<=256 bytes)  creator, once

Bucket row (``BUCKET``, 128 bytes; a TokenBucket has one, a BandwidthManager one
per stream). Tokens are kept in milli-tokens (mt) so that a refill of whole
milliseconds at ``rate`` tokens/s adds exactly ``ms * rate`` mt::

    word  field          unit / meaning
    0     rate           tokens per second (also mt per ms)
    1     cap_mt         capacity, mt: max(rate, 1024) * 1000
    2     tokens_mt      tokens on hand, mt
    3     last_ns        monotonic time up to which refill was credited, ns
    4     q_head_mt      mt paid to queued waiters so far (this queue generation)
    5     q_tail_mt      mt queued waiters asked for (this queue generation)
    6     q_gen          bumped each time the queue drains and restarts at 0
    7     gen            row generation; 0 means the row is free
    8-13  stats          allowed calls/units, refused calls/units, waits, waited_ns
    14    owner_row      BandwidthManager: stream row that owns this bucket
    15    (spare)

Invariants of a bucket row, true whenever the lock is free:

* ``rate >= 0`` and ``cap_mt == max(rate, 1024) * 1000``;
* ``0 <= tokens_mt <= cap_mt``;
* ``0 <= q_head_mt <= q_tail_mt``;
* the queue holds waiters (``q_head_mt < q_tail_mt``) only while
  ``tokens_mt == 0``: refills pay the queue first, so ``allow()`` can test
  ``tokens_mt`` alone and still never jump the queue;
* a waiter's ticket (``q_gen``, end of its share) stays in the queue
  (``end <= q_tail_mt``) until it is served: the head reaches its end or
  ``q_gen`` moves on, which is why an emptied queue gets its new ``q_gen``
  before its head and tail go back to 0;
* ``last_ns <= now``; it advances in whole milliseconds, so sub-millisecond
  remainders are credited later, never lost.

A holder killed between two writes leaves either a valid row that holds no
more tokens than before (or than the update would have left) and keeps every
live waiter's place, or a row that breaks one of the first four rules, which
``repair_row`` in ``_bucket.py`` mends: it recomputes the capacity, clamps the
tokens, restarts a broken queue under a new ``q_gen`` (only a dead waiter can
be unpaid then) and pays stray tokens to the queue. The write orders that
make this so are explained where the writes are; tests/test_torn_updates.py
stops every update between each pair of its writes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BUCKET",
    "HEADER",
    "HEADER_BYTES",
    "KIND_BANDWIDTH",
    "KIND_BUCKET",
    "KIND_CONNECTIONS",
    "KIND_KEYED",
    "KIND_LIMITS",
    "KIND_NAMES",
    "LAYOUT_VERSION",
    "MAGIC",
    "WORD",
]

WORD = 8
MAGIC = int.from_bytes(b"shmrate\0", "little")
LAYOUT_VERSION = 1

KIND_BUCKET = 1
KIND_CONNECTIONS = 2
KIND_BANDWIDTH = 3
KIND_KEYED = 4
KIND_LIMITS = 5
KIND_NAMES = {
    KIND_BUCKET: "TokenBucket",
    KIND_CONNECTIONS: "ConnectionLimiter",
    KIND_BANDWIDTH: "BandwidthManager",
    KIND_KEYED: "KeyedTokenBucket",
    KIND_LIMITS: "limits storage",
}

STATE_INIT = 0
STATE_READY = 1

NAME_MAX_BYTES = 128

_I8 = "<i8"

HEADER = np.dtype(
    [
        ("magic", _I8),
        ("version", _I8),
        ("kind", _I8),
        ("state", _I8),
        ("holder", _I8),
        ("size", _I8),
        ("boot", _I8),
        ("created_ns", _I8),
        ("recoveries", _I8),
        ("reaped", _I8),
        ("p", _I8, (6,)),
        ("name_len", _I8),
        ("count", _I8),
        ("free_top", _I8),
        ("spare19", _I8),
        ("next_gen", _I8),
        ("last_reap_ns", _I8),
        ("seed", _I8),
        ("lease_free", _I8),
        ("evictions", _I8),
        ("allowed", _I8),
        ("refused", _I8),
        ("spare", _I8, (5,)),
        ("name", "S256"),
    ]
)
HEADER_BYTES = HEADER.itemsize
assert HEADER_BYTES == 512

H_MAGIC = 0
H_VERSION = 1
H_KIND = 2
H_STATE = 3
H_HOLDER = 4
H_SIZE = 5
H_BOOT = 6
H_CREATED_NS = 7
H_RECOVERIES = 8
H_REAPED = 9
H_P0 = 10
H_NAME_LEN = 16
H_COUNT = 17
H_FREE_TOP = 18
H_NEXT_GEN = 20
H_LAST_REAP_NS = 21
H_SEED = 22
H_LEASE_FREE = 23
H_EVICTIONS = 24
H_ALLOWED = 25
H_REFUSED = 26
H_NAME_BYTE = 32 * WORD

BUCKET = np.dtype(
    [
        ("rate", _I8),
        ("cap_mt", _I8),
        ("tokens_mt", _I8),
        ("last_ns", _I8),
        ("q_head_mt", _I8),
        ("q_tail_mt", _I8),
        ("q_gen", _I8),
        ("gen", _I8),
        ("allowed_calls", _I8),
        ("allowed_units", _I8),
        ("refused_calls", _I8),
        ("refused_units", _I8),
        ("waits", _I8),
        ("waited_ns", _I8),
        ("owner_row", _I8),
        ("spare", _I8),
    ]
)
BUCKET_WORDS = BUCKET.itemsize // WORD


def _word(dtype: np.dtype[np.void], field: str) -> int:
    return int(dtype.fields[field][1]) // WORD  # type: ignore[index]


B_RATE = _word(BUCKET, "rate")
B_CAP = _word(BUCKET, "cap_mt")
B_TOKENS = _word(BUCKET, "tokens_mt")
B_LAST = _word(BUCKET, "last_ns")
B_QHEAD = _word(BUCKET, "q_head_mt")
B_QTAIL = _word(BUCKET, "q_tail_mt")
B_QGEN = _word(BUCKET, "q_gen")
B_GEN = _word(BUCKET, "gen")
B_ALLOWED_CALLS = _word(BUCKET, "allowed_calls")
B_ALLOWED_UNITS = _word(BUCKET, "allowed_units")
B_REFUSED_CALLS = _word(BUCKET, "refused_calls")
B_REFUSED_UNITS = _word(BUCKET, "refused_units")
B_WAITS = _word(BUCKET, "waits")
B_WAITED_NS = _word(BUCKET, "waited_ns")
B_OWNER_ROW = _word(BUCKET, "owner_row")

# The largest rate accepted, in tokens (bytes) per second: capacity in
# milli-tokens must stay far inside int64.
MAX_RATE = 10**15
MIN_CAPACITY = 1024
MT = 1000  # milli-tokens per token
NS_PER_MS = 1_000_000


# Stream row (``STREAM``, 192 bytes), for ConnectionLimiter and BandwidthManager.
# Rows never move: the open-addressing index (one int64 slot per entry: EMPTY
# or a row number) points at them, and a free list holds the unused ones::
#
#     word  field     unit / meaning
#     0     live      1 while the row holds a stream
#     1     hash      crc32 of the key, seeded with the header's seed
#     2     key_len   bytes of the key
#     3     value     connections held / bytes/s allocated
#     4     owner     BandwidthManager: owner token of the allocation
#     5     allowed   requests granted for this stream
#     6     refused   requests refused for this stream
#     7     (spare)
#     8-23  key       the stream ID, UTF-8, <= 128 bytes
#
# Invariants (whenever the lock is free; ``repair`` restores them from the rows
# and leases, which are the truth):
#
# * the index holds exactly the live rows, each once, reachable by probing
#   from ``hash & (slots - 1)``; the free list holds exactly the other rows;
# * ConnectionLimiter: a row is live iff some lease points at it, its value is
#   the number of leases that do, and the header count is the number of live
#   leases; the lease free list holds exactly the leases without an owner;
# * BandwidthManager: bucket row i belongs to stream row i while it is live: a
#   live row has a non-zero owner and bucket gen, a free row's bucket has gen
#   0; the header count is the sum of the live rows' values and at most the
#   pool; ``next_gen`` is above every gen handed out.
#
# What a holder that dies between two writes leaves, and what the repair
# makes of it: a lease counts from the write of its owner (after its row) to
# the write that clears it, and every count is derived from the leases. A new
# allocation is complete once its owner is written (after its limiter's gen
# and its share); a release clears the limiter's gen first. A live row
# missing its owner or gen is an allocation or release cut short and is
# dropped, returning its share. A changed share is written before its limiter
# speeds up and after it slows down. The index and free list are rebuilt
# from the live flags, which ``insert`` sets after the key and ``delete``
# clears before the row is listed free.
STREAM = np.dtype(
    [
        ("live", _I8),
        ("hash", _I8),
        ("key_len", _I8),
        ("value", _I8),
        ("owner", _I8),
        ("allowed", _I8),
        ("refused", _I8),
        ("spare", _I8),
        ("key", "S128"),
    ]
)
STREAM_WORDS = STREAM.itemsize // WORD
S_LIVE = _word(STREAM, "live")
S_HASH = _word(STREAM, "hash")
S_KEY_LEN = _word(STREAM, "key_len")
S_VALUE = _word(STREAM, "value")
S_OWNER = _word(STREAM, "owner")
S_ALLOWED = _word(STREAM, "allowed")
S_REFUSED = _word(STREAM, "refused")
S_KEY_BYTE = STREAM.fields["key"][1]  # type: ignore[index]
KEY_MAX_BYTES = 128

INDEX_EMPTY = -1

# Lease (``LEASE``, 16 bytes): one connection slot. ``owner`` is 0 when free;
# writing it (after ``row``) takes the slot, clearing it gives the slot back.
LEASE = np.dtype([("owner", _I8), ("row", _I8)])
LEASE_WORDS = LEASE.itemsize // WORD
L_OWNER = 0
L_ROW = 1
