"""A WSGI app that waits for a notification: gunicorn's workers share one supervisor.

Either wrap gunicorn:

    python -m pglistener supervise --dsn "dbname=app" -- gunicorn examples.wsgi_app:app -w 8

or let gunicorn's master start the supervisor (examples/gunicorn_conf.py):

    PGLISTENER_DSN="dbname=app" gunicorn -c examples/gunicorn_conf.py examples.wsgi_app:app

GET /next/CHANNEL?timeout=S answers with the next notification on CHANNEL (204 when none
came within S seconds). Each worker process finds the supervisor through PGLISTENER_ADDRESS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from pglistener import Gap, InvalidChannelName, Worker

_worker: Worker | None = None


def worker() -> Worker:
    global _worker
    if _worker is None:             # once per worker process, after gunicorn forked it
        _worker = Worker.from_env()
    return _worker


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if not path.startswith("/next/"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"GET /next/CHANNEL\n"]
    timeout = float(parse_qs(environ.get("QUERY_STRING", "")).get("timeout", ["10"])[0])
    try:
        sub = worker().subscribe(path[len("/next/"):], timeout=10)
    except InvalidChannelName as exc:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [str(exc).encode()]
    with sub:
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("X-Subscribed", "yes")])
        try:
            item = sub.get(timeout=timeout)
        except TimeoutError:
            return [b"null"]
    if isinstance(item, Gap):
        return [json.dumps({"gap": item.reason}).encode()]
    return [json.dumps({"channel": item.channel, "payload": item.payload}).encode()]
