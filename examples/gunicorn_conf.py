"""gunicorn configuration that runs one pglistener supervisor in the master process:

    PGLISTENER_DSN="dbname=app" gunicorn -c examples/gunicorn_conf.py examples.wsgi_app:app

on_starting runs in the master before any worker is forked: the supervisor's address goes
into the environment that every worker inherits (Worker.from_env() there). A worker that
exits does not take the supervisor along (pglistener is fork-safe); on_exit stops it.
"""

from __future__ import annotations

import os
from typing import Any

from pglistener import Supervisor, Worker

workers = 2
_supervisor: Supervisor | None = None


def on_starting(server: Any) -> None:
    global _supervisor
    _supervisor = Supervisor(os.environ.get("PGLISTENER_DSN", "")).start()
    os.environ[Worker.ENV] = _supervisor.worker().address


def on_exit(server: Any) -> None:
    if _supervisor is not None:
        _supervisor.stop()
