"""RateLimitMiddleware: one shared limit, 429 with Retry-After, slots in flight."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

import shmrate
from shmrate.wsgi import RateLimitMiddleware, retry_after_s

FORK = mp.get_context("fork")


class Response:
    """What the middleware answered: status, headers and body."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: dict[str, str] = {}

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        self.status = status
        self.headers = dict(headers)
        return lambda data: None


def ok_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def call(
    app: Any, path: str = "/", addr: str = "10.0.0.1"
) -> tuple[Response, Iterable[bytes]]:
    response = Response()
    environ = {"PATH_INFO": path, "REMOTE_ADDR": addr, "REQUEST_METHOD": "GET"}
    body = app(environ, response.start_response)
    return response, body


def drained(rate: int, name: str | None = None) -> shmrate.TokenBucket:
    bucket = shmrate.TokenBucket(rate, name=name)
    assert bucket.allow(bucket.capacity())
    return bucket


def test_requests_pass_while_tokens_last_then_get_429_with_retry_after() -> None:
    with shmrate.TokenBucket(0) as bucket:
        app = RateLimitMiddleware(ok_app, bucket, cost=256)
        statuses = [call(app)[0].status for _ in range(4)]
        assert statuses == ["200 OK"] * 4  # 1024 tokens, 256 a request
        refused, body = call(app)
        assert refused.status == "429 Too Many Requests"
        assert "Retry-After" not in refused.headers  # rate 0: never refills
        assert b"rate limit" in b"".join(body)
        assert bucket.stats()["refused_calls"] == 1


def test_retry_after_is_the_time_for_the_missing_tokens_at_the_rate() -> None:
    with drained(2) as bucket:
        app = RateLimitMiddleware(ok_app, bucket, cost=5)
        refused, _ = call(app)
        assert refused.status.startswith("429")
        # 5 tokens at 2/s: 3 s from empty; 2 s if one token came in meanwhile.
        assert refused.headers["Retry-After"] in ("2", "3")
        assert int(refused.headers["Content-Length"]) > 0


def test_retry_after_s_rounds_up_and_is_never_zero() -> None:
    with drained(1000) as bucket:
        assert retry_after_s(bucket, 1) == 1  # 1 ms away, still 1 s
        assert retry_after_s(bucket, 1024) in (1, 2)
        assert retry_after_s(bucket, 1025) is None  # above the capacity
    with shmrate.TokenBucket(0) as empty_forever:
        empty_forever.allow(1024)
        assert retry_after_s(empty_forever) is None


def test_the_longest_matching_route_decides_and_none_means_unlimited() -> None:
    with drained(0) as default, shmrate.TokenBucket(0) as api:
        app = RateLimitMiddleware(
            ok_app, default, routes={"/api": api, "/api/health": None}
        )
        assert call(app, "/api/users")[0].status == "200 OK"
        assert call(app, "/api")[0].status == "200 OK"
        assert api.stats()["allowed_calls"] == 2
        assert call(app, "/apix")[0].status.startswith("429")  # not under /api
        assert call(app, "/elsewhere")[0].status.startswith("429")
        for _ in range(3):
            assert call(app, "/api/health")[0].status == "200 OK"
        assert api.stats()["allowed_calls"] == 2


def test_without_a_default_only_routes_are_limited() -> None:
    with drained(0) as uploads:
        app = RateLimitMiddleware(ok_app, routes={"/upload/": uploads})
        assert call(app, "/")[0].status == "200 OK"
        assert call(app, "/upload/x")[0].status.startswith("429")


def _requests_in_child(app: RateLimitMiddleware, tries: int, q: Any) -> None:
    q.put(sum(call(app)[0].status == "200 OK" for _ in range(tries)))


def test_one_limit_holds_across_forked_workers(name: str) -> None:
    # Built before the fork with a name, as with gunicorn's preload_app: each
    # worker opens the bucket on its first request.
    shmrate.TokenBucket(0, name=name).close()
    app = RateLimitMiddleware(ok_app, name, cost=100)
    q = FORK.Queue()
    workers = [
        FORK.Process(target=_requests_in_child, args=(app, 6, q)) for _ in range(4)
    ]
    for w in workers:
        w.start()
    admitted = sum(q.get(timeout=30) for _ in workers)
    for w in workers:
        w.join()
    assert admitted == 10  # 1024 tokens / 100 a request, across all four


class Tracked:
    """A response body that records whether the server closed it."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"ok"

    def close(self) -> None:
        self.closed = True


def test_requests_in_flight_are_capped_until_the_server_closes_the_body() -> None:
    bodies: list[Tracked] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        bodies.append(Tracked())
        return bodies[-1]

    with shmrate.ConnectionLimiter(1, 10) as in_flight:
        limited = RateLimitMiddleware(app, concurrency=in_flight)
        first, body = call(limited, addr="10.0.0.1")
        assert first.status == "200 OK"
        second, _ = call(limited, addr="10.0.0.1")
        assert second.status.startswith("429")
        assert second.headers["Retry-After"] == "1"
        assert call(limited, addr="10.0.0.2")[0].status == "200 OK"  # another key
        assert in_flight.get_total() == 2
        body.close()  # type: ignore[attr-defined]
        assert bodies[0].closed
        assert in_flight.get_count("10.0.0.1") == 0
        assert call(limited, addr="10.0.0.1")[0].status == "200 OK"


def test_an_app_that_raises_gives_its_slot_back() -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("boom")

    with shmrate.ConnectionLimiter(1, 1) as in_flight:
        app = RateLimitMiddleware(broken, concurrency=in_flight)
        with pytest.raises(RuntimeError):
            call(app)
        assert in_flight.get_total() == 0


@pytest.mark.parametrize("cost", [0, -1, 1.5, True])
def test_cost_must_be_a_positive_int(cost: Any) -> None:
    with pytest.raises(ValueError, match="cost"):
        RateLimitMiddleware(ok_app, cost=cost)
