"""Token-bucket arithmetic on one bucket row. Every function here expects the
caller to hold the segment's lock, and takes the time as ``now_ns`` so tests can
drive it with a fake clock.

The bucket holds ``tokens_mt`` milli-tokens, at most ``cap_mt``, and gains
``rate`` milli-tokens per whole millisecond since ``last_ns``. Less than a
millisecond adds nothing yet, and ``last_ns`` advances only by the milliseconds
credited, so no time is lost.

Blocking waits queue for their tokens instead of retrying. A waiter that cannot
be served at once appends its amount to the row's queue (``q_tail_mt``), takes
what tokens are on hand towards it, and every later refill pays the queue
(``q_head_mt``) before any token reaches the bucket. A waiter is served when
the head passes the end of its share of the queue, or when the queue has
drained since (``q_gen`` moved on). While anyone waits the bucket is empty, so
a stream of small ``allow()`` calls from other processes cannot starve a large
wait: it is the same guarantee golang.org/x/time/rate gets from reserving
tokens ahead, kept as a FIFO in shared memory. A waiter that dies or gives up
while others queue behind it leaves its share in the queue; those tokens flow
to no one, so nothing is ever admitted twice.

A holder can die between any two writes of an update. The writes are ordered
so that what it leaves is either a valid row that admits no more than before
and keeps every live waiter's place, or one that ``repair_row`` recognises
and mends (tokens above the capacity, a head past the tail, tokens on hand
while waiters queue). tests/test_torn_updates.py stops every update here
between each pair of its writes and checks exactly that.
"""

from __future__ import annotations

from typing import NamedTuple

from ._layout import (
    B_CAP,
    B_GEN,
    B_LAST,
    B_OWNER_ROW,
    B_QGEN,
    B_QHEAD,
    B_QTAIL,
    B_RATE,
    B_TOKENS,
    BUCKET_WORDS,
    MIN_CAPACITY,
    MT,
    NS_PER_MS,
)

__all__ = [
    "Ticket",
    "cancel",
    "capacity_mt_for",
    "credit",
    "init_row",
    "refill",
    "repair_row",
    "reserve",
    "served",
    "set_rate",
    "wake_ns",
]


_ZERO_TAIL = memoryview(bytes((BUCKET_WORDS - B_GEN - 1) * 8)).cast("q")


class Ticket(NamedTuple):
    """A queued wait: the queue generation and where its share ends (mt)."""

    q_gen: int
    end_mt: int
    need_mt: int


def capacity_mt_for(rate: int) -> int:
    return max(rate, MIN_CAPACITY) * MT


def init_row(row: memoryview, rate: int, now_ns: int, gen: int) -> None:
    """Make ``row`` a full bucket of ``rate`` tokens/s (generation ``gen``).

    The generation is written last: a row whose writer died before it still
    has generation 0 (free), and the owner's repair discards it.
    """
    cap = capacity_mt_for(rate)
    _restart_queue(row)
    row[B_RATE] = rate
    row[B_CAP] = cap
    row[B_TOKENS] = cap
    row[B_LAST] = now_ns
    row[B_GEN + 1 :] = _ZERO_TAIL
    row[B_OWNER_ROW] = -1
    row[B_GEN] = gen


def credit(row: memoryview, add_mt: int) -> None:
    """Add ``add_mt``: to the queue first, the rest to the bucket up to capacity."""
    head = row[B_QHEAD]
    tail = row[B_QTAIL]
    if head < tail:
        pay = min(add_mt, tail - head)
        add_mt -= pay
        if head + pay == tail:
            # Drained: every waiter is served. Serve them in one write, then
            # restart the queue at 0, so the numbers never grow without bound.
            row[B_QHEAD] = tail
            _restart_queue(row)
        else:
            row[B_QHEAD] = head + pay
    if add_mt:
        row[B_TOKENS] = min(row[B_CAP], row[B_TOKENS] + add_mt)


def _restart_queue(row: memoryview) -> None:
    """Empty the queue under a new generation, serving every ticket of the old.

    The generation goes first: zeroing the head while the old generation
    stands would send every waiter of it back to the start of the queue, and
    zeroing both would leave them outside it for good. A holder that dies
    after the generation leaves a queue its waiters have all left, or a head
    above the tail, which ``repair_row`` restarts again.
    """
    row[B_QGEN] = row[B_QGEN] + 1
    row[B_QTAIL] = 0
    row[B_QHEAD] = 0


def refill(row: memoryview, now_ns: int) -> None:
    """Credit the whole milliseconds elapsed since ``last_ns``.

    Once the bucket is full, the part of a millisecond not yet credited is
    dropped too (``last_ns`` jumps to now): a full bucket gains nothing from
    time, and keeping that remainder would admit up to ``rate * 1 ms`` more
    than ``rate * elapsed + capacity``.
    """
    last = row[B_LAST]
    ms = (now_ns - last) // NS_PER_MS
    if ms > 0:
        row[B_LAST] = last + ms * NS_PER_MS
        add = ms * row[B_RATE]
        if add:
            credit(row, add)
        if row[B_TOKENS] == row[B_CAP]:
            row[B_LAST] = now_ns


def set_rate(row: memoryview, rate: int, now_ns: int) -> None:
    """Credit the time so far at the old rate, then switch and clamp."""
    refill(row, now_ns)
    cap = capacity_mt_for(rate)
    row[B_RATE] = rate
    row[B_CAP] = cap
    row[B_TOKENS] = min(row[B_TOKENS], cap)


def reserve(row: memoryview, n: int, now_ns: int) -> Ticket | None:
    """Take ``n`` tokens now (None) or queue for them (a Ticket)."""
    refill(row, now_ns)
    need = n * MT
    tokens = row[B_TOKENS]
    if tokens >= need:
        row[B_TOKENS] = tokens - need
        return None
    head = row[B_QHEAD]
    end = row[B_QTAIL] + need
    # Tokens on hand (only when the queue was empty) go towards this share.
    # The tail first: a holder that dies there leaves tokens beside a queue,
    # which the repair pays to the queue exactly as the next writes would.
    # Tokens before head: dying between them loses this dead waiter's own
    # payment, where the other order would pay it twice.
    pay = min(tokens, end - head)
    row[B_QTAIL] = end
    row[B_TOKENS] = tokens - pay
    row[B_QHEAD] = head + pay
    return Ticket(row[B_QGEN], end, need)


def served(row: memoryview, ticket: Ticket) -> bool:
    return row[B_QGEN] != ticket.q_gen or row[B_QHEAD] >= ticket.end_mt


def wake_ns(row: memoryview, ticket: Ticket) -> int | None:
    """When refills at the current rate will have served ``ticket``.

    None when the rate is 0 (never, unless the rate changes). Assumes the row
    was just refilled and the ticket is not served yet.
    """
    rate = row[B_RATE]
    if rate <= 0:
        return None
    missing = ticket.end_mt - row[B_QHEAD]
    ms = -(-missing // rate)
    return int(row[B_LAST] + ms * NS_PER_MS)


def cancel(row: memoryview, ticket: Ticket) -> None:
    """Withdraw a queued wait; whatever it was already given goes back."""
    if served(row, ticket):
        # Served but not yet collected: hand the tokens on.
        credit(row, ticket.need_mt)
        return
    tail = row[B_QTAIL]
    if ticket.end_mt != tail:
        return  # others queue behind it: its share stays (see module doc)
    start = ticket.end_mt - ticket.need_mt
    head = row[B_QHEAD]
    if head > start:
        # It was at the front and partly paid: the queue is now empty. Its
        # payment goes back last, once no queue can claim it.
        row[B_QHEAD] = tail
        _restart_queue(row)
        row[B_TOKENS] = min(row[B_CAP], head - start)
    else:
        row[B_QTAIL] = start


def repair_row(row: memoryview, now_ns: int) -> list[str]:
    """Restore a row's invariants after its writer died mid-update.

    Every step is idempotent and leaves a state a second repair accepts, so
    a recoverer that dies here too is mended by the next one.
    """
    fixed = []
    if row[B_LAST] > now_ns:
        row[B_LAST] = now_ns
        fixed.append("refill time rebased")
    cap = capacity_mt_for(max(row[B_RATE], 0))
    if row[B_RATE] < 0:
        row[B_RATE] = 0
        fixed.append("rate reset to 0")
    if row[B_CAP] != cap:
        row[B_CAP] = cap
        fixed.append("capacity recomputed")
    if not 0 <= row[B_TOKENS] <= cap:
        row[B_TOKENS] = min(max(row[B_TOKENS], 0), cap)
        fixed.append("tokens clamped")
    head, tail = row[B_QHEAD], row[B_QTAIL]
    if not 0 <= head <= tail:
        # Queued waiters re-check against a new generation and are served.
        # The writes above never leave this state while a live waiter is
        # unpaid (only a dead one's share), so no one is admitted early.
        _restart_queue(row)
        fixed.append("wait queue reset")
    elif head < tail and row[B_TOKENS]:
        # Tokens must be 0 while anyone waits: pay them to the queue. Zero
        # first: dying between the two loses them, never pays them twice.
        on_hand = row[B_TOKENS]
        row[B_TOKENS] = 0
        credit(row, on_hand)
        fixed.append("tokens paid to the wait queue")
    return fixed
