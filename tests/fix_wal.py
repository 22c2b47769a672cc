"""What the WAL tests share (test_wal, test_changes, test_failover): fast reconnects, a
fresh slot and a connection on the logical cluster, reading and emitting in bulk, the
walsender's pid."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fix_cluster import Cluster

from fix_supervisor import wait_for
from pglistener import Gap, Supervisor

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2}

#: A test of what differs between versions, on the one where it differs.
def on_server(version: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("logical_cluster", [version], indirect=True,
                                   ids=[f"pg{version}"])


@pytest.fixture
def slot(logical_cluster: Cluster) -> Iterator[str]:
    """A fresh slot name; the slot, and a publication of the same name if a test made one,
    are dropped after the test (the cluster keeps its slots, and a slot left behind holds
    WAL)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
        drop_slot(conn, name)
        conn.execute(f"DROP PUBLICATION IF EXISTS {name}")


def drop_slot(conn: psycopg.Connection, name: str) -> None:
    """Drop slot `name`, if it exists, once no walsender holds it."""
    wait_for(lambda: conn.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active",
        (name,)).fetchone() == (0,), "the slot to be released")
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = %s", (name,))


@pytest.fixture
def pg(logical_cluster: Cluster) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the logical cluster."""
    with psycopg.connect(logical_cluster.dsn, autocommit=True) as c:
        yield c


def emit_many(conn: psycopg.Connection, channel: str, first: int, count: int,
              transactions: int = 1) -> None:
    """Messages str(first) .. str(first + count - 1), in `transactions` transactions."""
    per = -(-count // transactions)
    for start in range(first, first + count, per):
        stop = min(start + per, first + count)
        conn.execute("SELECT pg_logical_emit_message(true, %s, i::text) "
                     "FROM generate_series(%s::int, %s::int) i", (channel, start, stop - 1))


def read(sub: Any, n: int, timeout: float = 30) -> list[Any]:
    return [sub.get(timeout=timeout) for _ in range(n)]


def numbers(items: list[Any]) -> list[int | str]:
    return [f"GAP:{i.reason}" if isinstance(i, Gap) else int(i.payload) for i in items]


def walsender(sup: Supervisor) -> int:
    wait_for(lambda: sup.stats().wal_state == "streaming", "the WAL source to stream")
    pid = sup.stats().wal_backend_pid
    assert pid is not None
    return pid
