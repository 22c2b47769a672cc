"""The server the bench runs against: an embedded one when no DSN is given, and what the
bench and the soak ask of it (its WAL level, its pgbench, a slot dropped, a stream caught up).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import psycopg

from pglistener import Supervisor


def pgbench() -> str | None:
    """pgserver's pgbench, else the one on PATH."""
    import shutil

    try:
        from pgserver._commands import POSTGRES_BIN_PATH
        found = os.path.join(str(POSTGRES_BIN_PATH), "pgbench")
        if os.path.exists(found):
            return found
    except ImportError:
        pass
    return shutil.which("pgbench")


def wal_unusable(dsn: str) -> str | None:
    """Why this server cannot serve the WAL source, or None."""
    with psycopg.connect(dsn) as conn:
        level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
    if level != "logical":
        return f"the server's wal_level is {level}, not logical"
    return None


def start_server(stack: ExitStack) -> str:
    """An embedded PostgreSQL (pgserver) with wal_level = logical, for both sources."""
    import logging

    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    datadir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pglistener-bench-"))
    server = pgserver.get_server(datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
    with psycopg.connect(str(server.get_uri()), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_level = logical")
    server.cleanup()        # stopped; started again with the setting
    server = pgserver.get_server(datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
    stack.callback(server.cleanup)
    return str(server.get_uri())


def drop_slot(dsn: str, name: str) -> None:
    """Drop replication slot `name` once its reader (a supervisor stopping) has let go."""
    with psycopg.connect(dsn, autocommit=True) as c:
        wait = time.monotonic() + 10
        while time.monotonic() < wait and c.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active",
                (name,)).fetchone():
            time.sleep(0.1)
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                  "WHERE slot_name = %s AND NOT active", (name,))


def caught_up(sup: Supervisor, conn: psycopg.Connection[Any], timeout: float = 120) -> None:
    """Wait until the supervisor's stream has read what the server wrote before now: a
    marker message of its own has come through. A supervisor started on an existing slot
    first reads the WAL written since it was last confirmed, and what its predecessor had
    not confirmed comes again (the last transaction of a round, when its supervisor stopped
    within a feedback interval of reading it: 300k messages after a wal-drain), so that
    anything received is not yet a sign of being caught up: the walsender would still be
    sending it, on the clock of the round that follows."""
    from pglistener import Notification

    token = f"caught up? {time.monotonic_ns()}"
    deadline = time.monotonic() + timeout
    with sup.worker().subscribe("bench_marker", source="wal", timeout=timeout) as sub:
        conn.execute("SELECT pg_logical_emit_message(true, 'bench_marker', %s)", [token])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the WAL source did not catch up with the server")
            item = sub.get(timeout=left)
            if isinstance(item, Notification) and item.payload == token:
                return


def wait_streaming(sup: Supervisor, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sup.stats().wal_state != "streaming":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the WAL source does not stream: {sup.stats().wal_last_error}")
        time.sleep(0.05)
