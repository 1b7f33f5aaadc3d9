"""A tiny WSGI app behind shmrate's middleware (see gunicorn.conf.py).

``/`` answers with the worker's pid; ``/slow?s=2`` takes that long; ``/health``
is never limited. Every other request counts against one rate shared by all
the workers, and against the caps on requests in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from shmrate.wsgi import RateLimitMiddleware

PREFIX = os.environ.get("SHMRATE_EXAMPLE_PREFIX", "example")


def hello(
    environ: dict[str, Any], start_response: Callable[..., Any]
) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["2"])[0])
        time.sleep(min(seconds, 10.0))
    body = f"hello from worker {os.getpid()}\n".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
    )
    return [body]


# Names, not objects: each worker opens them on its first request, after the
# master created them in on_starting.
application = RateLimitMiddleware(
    hello,
    f"{PREFIX}-requests",
    routes={"/health": None},
    concurrency=f"{PREFIX}-in-flight",
)
