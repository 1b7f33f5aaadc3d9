"""A Flask app whose per-client limit holds across every gunicorn worker.

Run it with four workers; a client gets 5 requests a minute in all, not 5 per
worker::

    gunicorn -w 4 -b 127.0.0.1:8000 examples.flask_limiter_app:app

The storage comes from ``SHMRATE_EXAMPLE_STORAGE`` (default
``shmrate://flask-limiter-example``), so the same app can be tried with
``memory://`` to see each worker count on its own. Each response names the
worker that served it in the ``X-Worker-Pid`` header.
"""

from __future__ import annotations

import os

from flask import Flask, Response
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

import shmrate.limits_storage  # noqa: F401  (registers the shmrate:// scheme)

STORAGE_URI = os.environ.get(
    "SHMRATE_EXAMPLE_STORAGE", "shmrate://flask-limiter-example"
)

app = Flask(__name__)
limiter = Limiter(
    get_remote_address,
    app=app,
    storage_uri=STORAGE_URI,
    strategy=os.environ.get("SHMRATE_EXAMPLE_STRATEGY", "fixed-window"),
)


@app.after_request
def name_the_worker(response: Response) -> Response:
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.route("/")
@limiter.limit("5 per minute")
def index() -> str:
    return "ok\n"
