"""gunicorn settings: 4 workers that share one request rate through shmrate.

Run it from this directory::

    gunicorn -c gunicorn.conf.py app:application

The master owns the shared segments. It creates them in ``on_starting``,
before any worker forks; the workers open them by name (``app.py``). When a
worker dies, however it dies, the master frees the requests it had in flight
in ``child_exit``. When the master exits it removes the segments in
``on_exit``: it is the one process that knows no worker will open them again.

The environment variables only exist so that the tests can run this file on a
free port with their own names; a real service writes its numbers here.
"""

from __future__ import annotations

import os
from typing import Any

import shmrate

# One prefix per service on the host: segment names are host-wide.
PREFIX = os.environ.get("SHMRATE_EXAMPLE_PREFIX", "example")
REQUESTS_PER_SECOND = int(os.environ.get("SHMRATE_EXAMPLE_RATE", "100"))
IN_FLIGHT_PER_CLIENT = 16
IN_FLIGHT_TOTAL = 64

bind = os.environ.get("SHMRATE_EXAMPLE_BIND", "127.0.0.1:8000")
workers = 4

_shared: list[shmrate.TokenBucket | shmrate.ConnectionLimiter] = []


def on_starting(server: Any) -> None:
    """Create the segments before the first worker forks."""
    requests = shmrate.TokenBucket(REQUESTS_PER_SECOND, name=f"{PREFIX}-requests")
    # A bucket left by a master that was killed keeps its old rate: set ours.
    requests.set_rate(REQUESTS_PER_SECOND)
    in_flight = shmrate.ConnectionLimiter(
        IN_FLIGHT_PER_CLIENT, IN_FLIGHT_TOTAL, name=f"{PREFIX}-in-flight"
    )
    _shared[:] = [requests, in_flight]
    server.log.info(
        "shmrate: %d requests/s for all workers; %d in flight per client, %d in all",
        REQUESTS_PER_SECOND,
        IN_FLIGHT_PER_CLIENT,
        IN_FLIGHT_TOTAL,
    )


def child_exit(server: Any, worker: Any) -> None:
    """The master has reaped a worker: free its requests in flight now.

    Without this they would come back on the next refusal anyway; here they
    come back at once, and the master knows the pid is gone.
    """
    for obj in _shared:
        if isinstance(obj, shmrate.ConnectionLimiter):
            freed = obj.reap_pid(worker.pid)
            if freed:
                server.log.warning(
                    "shmrate: freed %d request slot(s) of worker %d", freed, worker.pid
                )


def on_exit(server: Any) -> None:
    """The workers are gone: remove the segments from the host."""
    for obj in _shared:
        obj.unlink()
        obj.close()
