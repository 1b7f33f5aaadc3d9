"""WSGI middleware: one request rate for all the workers of a server.

Every worker process of a gunicorn (or uWSGI, or mod_wsgi) server wraps its
application in :class:`RateLimitMiddleware`; the buckets are shared segments,
so the limit holds for the server as a whole, not per worker::

    from shmrate.wsgi import RateLimitMiddleware

    application = RateLimitMiddleware(
        app,
        "api",                        # a TokenBucket name: every request
        routes={"/upload": "upload",  # requests under /upload use this one
                "/health": None},     # and these are not limited at all
    )

Each request is charged ``cost`` tokens to exactly one bucket: the one of the
longest route prefix that matches its path, else the default bucket, else none
(the request is not rate-limited). A route's bucket replaces the default for
its requests; it does not add to it. A request that finds too few tokens gets
``429 Too Many Requests`` with a ``Retry-After`` header: the whole seconds
until the bucket, at its current rate, holds the missing tokens. It is an
estimate, a lower bound while other processes queue in ``allow_n`` on the same
bucket; a bucket of rate 0 never refills, and its 429 has no ``Retry-After``.

An optional :class:`~shmrate.ConnectionLimiter` also caps requests in flight:
per key (the client address by default) and in total. A request over a cap
gets 429 with ``Retry-After: 1``. Its slot is given back when the server closes
the response; a worker killed in the middle of a request leaves its slot
behind, which comes back on the limiter's next refusal or at once through the
master's ``child_exit`` hook (``reap_pid``; see ``examples/gunicorn``).

Objects may be given by name: they are opened on first use in each process,
so the middleware can be built before the server forks (``preload_app``) or
after. The segments must exist by then: the master creates them (``on_starting``)
and removes them when it exits (``on_exit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .connections import ConnectionLimiter
from .token_bucket import TokenBucket

__all__ = ["RateLimitMiddleware", "retry_after_s"]

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def retry_after_s(bucket: TokenBucket, n: int = 1) -> int | None:
    """Whole seconds until ``bucket`` holds ``n`` tokens at its current rate.

    At least 1 (``Retry-After`` counts whole seconds, and 0 invites a retry
    storm). None when the tokens can never be there: rate 0, or ``n`` above
    the capacity.
    """
    s = bucket.stats()
    if s["rate"] <= 0 or n > s["capacity"]:
        return None
    missing = max(n - s["tokens"], 0)
    return max(1, math.ceil(missing / s["rate"]))


def _remote_addr(environ: Environ) -> str:
    return str(environ.get("REMOTE_ADDR") or "-")


class _ReleasingBody:
    """The app's response, giving the request's slot back when closed."""

    def __init__(self, body: Iterable[bytes], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()


class RateLimitMiddleware:
    """Limits the requests of a WSGI app with shared token buckets.

    ``limit``: the bucket (or its name) every request is charged to unless a
    route matches; None to leave other requests alone. ``routes``: path
    prefixes and their buckets (None: not limited); ``"/api"`` matches ``/api``
    and ``/api/...``, not ``/apix``. ``cost``: tokens per request. ``concurrency`` and
    ``concurrency_key``: a ConnectionLimiter (or its name) that caps requests in
    flight per key and in total, and the function that gives a request's key.
    """

    def __init__(
        self,
        app: WSGIApp,
        limit: TokenBucket | str | None = None,
        *,
        routes: Mapping[str, TokenBucket | str | None] | None = None,
        cost: int = 1,
        concurrency: ConnectionLimiter | str | None = None,
        concurrency_key: Callable[[Environ], str] = _remote_addr,
    ) -> None:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"shmrate: cost must be an int >= 1, got {cost!r}")
        self.app = app
        self.cost = cost
        self._default = limit
        # Longest prefix first, so the first match is the most specific.
        self._routes = sorted(
            ((p.rstrip("/"), b) for p, b in (routes or {}).items()),
            key=lambda pb: len(pb[0]),
            reverse=True,
        )
        self._concurrency = concurrency
        self._key = concurrency_key
        self._opened: dict[str, TokenBucket] = {}

    def _bucket(self, path: str) -> TokenBucket | None:
        chosen = self._default
        for prefix, bucket in self._routes:
            if path == prefix or path.startswith(prefix + "/"):
                chosen = bucket
                break
        if chosen is None or isinstance(chosen, TokenBucket):
            return chosen
        opened = self._opened.get(chosen)
        if opened is None:
            opened = self._opened[chosen] = TokenBucket.open(chosen)
        return opened

    def _limiter(self) -> ConnectionLimiter | None:
        if isinstance(self._concurrency, str):
            self._concurrency = ConnectionLimiter.open(self._concurrency)
        return self._concurrency

    def __call__(
        self, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        bucket = self._bucket(str(environ.get("PATH_INFO") or "/"))
        if bucket is not None and not bucket.allow(self.cost):
            wait_s = retry_after_s(bucket, self.cost)
            return _too_many(start_response, wait_s, "request rate limit")
        limiter = self._limiter()
        if limiter is None:
            return self.app(environ, start_response)
        key = self._key(environ)
        if not limiter.try_acquire(key):
            return _too_many(start_response, 1, "too many requests in flight")
        try:
            body = self.app(environ, start_response)
        except BaseException:
            limiter.release(key)
            raise
        return _ReleasingBody(body, lambda: limiter.release(key))


def _too_many(
    start_response: StartResponse, retry_after: int | None, why: str
) -> list[bytes]:
    text = f"429 Too Many Requests: {why}"
    if retry_after is not None:
        text += f"; retry in {retry_after} s"
    body = (text + "\n").encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    start_response("429 Too Many Requests", headers)
    return [body]
