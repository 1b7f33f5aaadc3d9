"""The stream table: stream IDs, lookups, deletions, against a plain dict."""

from __future__ import annotations

import random

import pytest

from shmrate import ConnectionLimiter
from shmrate._streams import stream_key


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (b"bytes", TypeError),
        (17, TypeError),
        (None, TypeError),
        ("x" * 129, ValueError),
    ],
)
def test_bad_stream_ids_are_refused(bad: object, error: type) -> None:
    with pytest.raises(error):
        stream_key(bad)
    with ConnectionLimiter(1, 4) as c:
        for call in (c.try_acquire, c.release, c.get_count):
            with pytest.raises(error):
                call(bad)  # type: ignore[arg-type]
        assert c.get_total() == 0


def test_stream_ids_up_to_128_bytes_of_utf8_are_accepted() -> None:
    with ConnectionLimiter(1, 4) as c:
        for sid in ("", "é" * 64, "x" * 128, "cam/1:ingest"):
            assert c.try_acquire(sid)
            assert c.get_count(sid) == 1
        with pytest.raises(ValueError):
            c.try_acquire("é" * 65)  # 130 bytes


def test_the_table_agrees_with_a_dict_through_random_churn() -> None:
    # Many inserts and deletes force long probe runs that wrap around the
    # index, exercising backward-shift deletion.
    rnd = random.Random(7)
    model: dict[str, int] = {}
    with ConnectionLimiter(3, 256) as c:
        ids = [f"s{i}" for i in range(400)]
        for _ in range(6000):
            sid = rnd.choice(ids)
            if rnd.random() < 0.55:
                ok = c.try_acquire(sid)
                expect = model.get(sid, 0) < 3 and sum(model.values()) < 256
                assert ok == expect
                if ok:
                    model[sid] = model.get(sid, 0) + 1
            else:
                c.release(sid)
                if model.get(sid):
                    model[sid] -= 1
                    if not model[sid]:
                        del model[sid]
        assert c.streams() == model
        assert c.get_total() == sum(model.values())
        for sid in ids[:50]:
            assert c.get_count(sid) == model.get(sid, 0)
