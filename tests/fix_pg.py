"""A real PostgreSQL for the test session: PGLISTENER_TEST_DSN, or an embedded pgserver.

Never skips: a suite that cannot get a server fails, loudly, so a broken install is seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator

import psycopg
import pytest

ENV_DSN = "PGLISTENER_TEST_DSN"


@pytest.fixture(scope="session")
def dsn() -> Iterator[str]:
    given = os.environ.get(ENV_DSN)
    if given:
        _check(given, f"{ENV_DSN} names a server that does not answer")
        yield given
        return
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        import pgserver
    except ImportError as exc:
        pytest.fail(f"no PostgreSQL for the tests: set {ENV_DSN} or install pgserver ({exc})")
    with tempfile.TemporaryDirectory(prefix="pglistener-pg-") as datadir:
        try:
            server = pgserver.get_server(datadir, cleanup_mode="stop")
        except Exception as exc:  # noqa: BLE001 - any failure to start is a test failure
            pytest.fail(f"could not start the embedded PostgreSQL (pgserver): {exc}; "
                        f"set {ENV_DSN} to use another server")
        uri = server.get_uri()
        _check(uri, "the embedded PostgreSQL does not answer")
        try:
            yield uri
        finally:
            server.cleanup()


def _check(dsn: str, what: str) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"{what}: {exc}")


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection for sending notifications and inspecting the server."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def notify(conn: psycopg.Connection, channel: str, payloads: list[str]) -> None:
    """Send payloads on channel in one transaction, in order."""
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany("SELECT pg_notify(%s, %s)", [(channel, p) for p in payloads])


@contextlib.contextmanager
def notifying(conn: psycopg.Connection, channel: str, payload: str,
              every: float = 0.1) -> Iterator[None]:
    """Send payload on channel at once and every `every` seconds until the block ends: for a
    subscription made inside the block whose LISTEN may not be committed yet (a NOTIFY
    before it is not heard), so the block gets the payload however slow the machine is."""
    stop = threading.Event()

    def send() -> None:
        while True:
            notify(conn, channel, [payload])
            if stop.wait(every):
                return

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join()


def sessions(conn: psycopg.Connection, application_name: str) -> int:
    """How many server sessions carry this application_name."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                       (application_name,)).fetchone()
    assert row is not None
    return int(row[0])
