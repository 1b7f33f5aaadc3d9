"""The invariants of every kind of segment, checked from the outside.

Each ``*_problems`` function reads an object's shared state and returns what
is wrong with it, as sentences (an empty list when all holds). The caller
holds the object's lock, so the state is the one every other process would
see next. The rules are those written next to the layout in
``shmrate/_layout.py``; the fault-injection tests and ``bench/soak.py`` check
them after killing processes at random moments.
"""

from __future__ import annotations

from time import monotonic_ns
from typing import Any

from shmrate import BandwidthManager, ConnectionLimiter, TokenBucket
from shmrate._bucket import capacity_mt_for
from shmrate._layout import (
    B_CAP,
    B_GEN,
    B_LAST,
    B_QHEAD,
    B_QTAIL,
    B_RATE,
    B_TOKENS,
    BUCKET_WORDS,
    H_COUNT,
    H_FREE_TOP,
    H_LEASE_FREE,
    H_NEXT_GEN,
    INDEX_EMPTY,
    L_OWNER,
    L_ROW,
    LEASE_WORDS,
    S_HASH,
    S_KEY_BYTE,
    S_KEY_LEN,
    S_LIVE,
    S_OWNER,
    S_VALUE,
    STREAM_WORDS,
    WORD,
)
from shmrate._streams import StreamTable

__all__ = ["bucket_row_problems", "problems"]


def bucket_row_problems(row: Any, what: str, now_ns: int | None = None) -> list[str]:
    """A bucket row: rate and capacity agree, tokens in bounds, queue sane."""
    out = []
    rate, cap, tokens = row[B_RATE], row[B_CAP], row[B_TOKENS]
    head, tail = row[B_QHEAD], row[B_QTAIL]
    if rate < 0 or cap != capacity_mt_for(rate):
        out.append(f"{what}: rate {rate} with capacity {cap} mt")
    if not 0 <= tokens <= cap:
        out.append(f"{what}: tokens {tokens} mt outside [0, {cap}]")
    if not 0 <= head <= tail:
        out.append(f"{what}: wait queue head {head} and tail {tail}")
    elif head < tail and tokens != 0:
        out.append(f"{what}: {tokens} mt on hand while waiters queue")
    if now_ns is not None and row[B_LAST] > now_ns:
        out.append(f"{what}: refill time {row[B_LAST]} after now {now_ns}")
    return out


def _table_problems(table: StreamTable) -> list[str]:
    """Index holds exactly the live rows, each reachable; free list the rest."""
    out = []
    nrows, rows = table.nrows, table.rows
    live = {r for r in range(nrows) if rows[r * STREAM_WORDS + S_LIVE] == 1}
    indexed = [table.index[i] for i in range(table.mask + 1)]
    entries = [r for r in indexed if r != INDEX_EMPTY]
    if sorted(entries) != sorted(live):
        out.append(f"index holds rows {sorted(entries)}, live rows are {sorted(live)}")
    for r in live:
        n = rows[r * STREAM_WORDS + S_KEY_LEN]
        start = r * STREAM_WORDS * WORD + S_KEY_BYTE
        key = bytes(table.keys[start : start + n])
        if table.find(key, rows[r * STREAM_WORDS + S_HASH]) != r:
            out.append(f"live row {r} ({key!r}) cannot be found")
    top = table.header[H_FREE_TOP]
    free = [table.free[i] for i in range(max(top, 0))]
    if sorted(free) != sorted(set(range(nrows)) - live):
        out.append(f"free list {sorted(free)} is not the rows that are not live")
    return out


def _connection_problems(c: ConnectionLimiter) -> list[str]:
    out = _table_problems(c._table)
    rows, leases, words = c._table.rows, c._leases, c._words
    counts: dict[int, int] = {}
    free_leases = set()
    for i in range(c.max_total):
        if leases[i * LEASE_WORDS + L_OWNER] == 0:
            free_leases.add(i)
        else:
            r = leases[i * LEASE_WORDS + L_ROW]
            counts[r] = counts.get(r, 0) + 1
    for r in range(c.max_total):
        value = rows[r * STREAM_WORDS + S_VALUE]
        is_live = rows[r * STREAM_WORDS + S_LIVE] == 1
        held = counts.get(r, 0)
        if value != held or is_live != (held > 0):
            out.append(
                f"stream row {r}: count {value}, live {is_live}, {held} live leases"
            )
        if held > c.max_per_stream:
            out.append(f"stream row {r}: {held} leases, above {c.max_per_stream}")
    total = sum(counts.values())
    if words[H_COUNT] != total:
        out.append(f"total {words[H_COUNT]} but {total} live leases")
    if total > c.max_total:
        out.append(f"{total} live leases, above max_total {c.max_total}")
    top = words[H_LEASE_FREE]
    listed = sorted(c._lease_free[i] for i in range(max(top, 0)))
    if listed != sorted(free_leases):
        out.append(f"lease free list {listed} is not the free leases")
    return out


def _bandwidth_problems(m: BandwidthManager) -> list[str]:
    out = _table_problems(m._table)
    rows, buckets, words = m._table.rows, m._buckets, m._words
    now = monotonic_ns()
    allocated = 0
    newest = 0
    for r in range(m.max_streams):
        row = buckets[r * BUCKET_WORDS : (r + 1) * BUCKET_WORDS]
        gen = row[B_GEN]
        newest = max(newest, gen)
        if rows[r * STREAM_WORDS + S_LIVE] == 1:
            value = rows[r * STREAM_WORDS + S_VALUE]
            allocated += value
            if value < 0 or gen == 0 or rows[r * STREAM_WORDS + S_OWNER] <= 0:
                out.append(f"live stream row {r}: share {value}, bucket gen {gen}")
            out += bucket_row_problems(row, f"limiter of stream row {r}", now)
        elif gen != 0:
            out.append(f"free stream row {r} keeps a limiter of generation {gen}")
        row.release()
    if words[H_COUNT] != allocated:
        out.append(
            f"allocated sum {words[H_COUNT]} but the shares add up to {allocated}"
        )
    if not 0 <= allocated <= m.total:
        out.append(f"{allocated} bytes/s allocated of a pool of {m.total}")
    if words[H_NEXT_GEN] <= newest:
        out.append(f"next generation {words[H_NEXT_GEN]} already used ({newest})")
    return out


def problems(obj: Any) -> list[str]:
    """What is wrong with ``obj``'s shared state. Caller holds its lock."""
    if isinstance(obj, TokenBucket):
        return bucket_row_problems(obj._row, f"bucket {obj.name!r}", monotonic_ns())
    if isinstance(obj, ConnectionLimiter):
        return _connection_problems(obj)
    assert isinstance(obj, BandwidthManager)
    return _bandwidth_problems(obj)
