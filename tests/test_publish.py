"""pglistener.notify() and notify_json(), sync and async, against a real server."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pglistener import (
    MAX_PAYLOAD_BYTES,
    InvalidChannelName,
    PayloadTooLarge,
    Worker,
    notify,
    notify_json,
)


def test_notify_round_trips_through_a_subscription(worker: Worker,
                                                   conn: psycopg.Connection) -> None:
    biggest = "é" * (MAX_PAYLOAD_BYTES // 2) + "x"          # 7999 bytes in UTF-8
    with worker.subscribe("Pub Lish", timeout=30) as sub:
        notify(conn, "Pub Lish", "it's; DROP TABLE x; --")
        notify(conn, "Pub Lish", biggest)
        notify(conn, "Pub Lish")
        assert [sub.get(timeout=30).payload for _ in range(3)] == [
            "it's; DROP TABLE x; --", biggest, ""]


def test_notify_json_pairs_with_subscribe_json(worker: Worker, conn: psycopg.Connection) -> None:
    value = {"id": 7, "tags": ["ü", None], "ok": True}
    with worker.subscribe_json("pub-json", timeout=30) as sub:
        notify_json(conn, "pub-json", value)
        assert sub.get(timeout=30) == value


def test_async_connection(dsn: str, worker: Worker) -> None:
    async def main() -> list[str]:
        sub = await worker.subscribe_async("pub-async", timeout=30)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await notify(aconn, "pub-async", "one")
            await notify_json(aconn, "pub-async", [2])
        got = [(await sub.get(timeout=30)).payload for _ in range(2)]
        await sub.unsubscribe()
        return got

    assert asyncio.run(main()) == ["one", "[2]"]


def test_in_a_transaction_it_is_sent_at_commit(worker: Worker, dsn: str) -> None:
    with worker.subscribe("pub-tx", timeout=30) as sub, psycopg.connect(dsn) as conn:
        notify(conn, "pub-tx", "held")
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.3)
        conn.commit()
        assert sub.get(timeout=30).payload == "held"


@pytest.mark.parametrize("channel, payload, error, message", [
    ("c", "é" * 4000, PayloadTooLarge, "8000 bytes"),
    ("c", "x" * 8000, PayloadTooLarge, "keep the data in a table"),
    ("c", "a\x00b", ValueError, "NUL"),
    ("c", b"bytes", TypeError, "notify_json"),
    ("x" * 64, "p", InvalidChannelName, "63 bytes"),
    ("", "p", InvalidChannelName, "empty"),
])
def test_bad_input_is_refused_before_anything_is_sent(
    conn: psycopg.Connection, channel: str, payload: str, error: type, message: str
) -> None:
    with conn.transaction():
        with pytest.raises(error, match=message):
            notify(conn, channel, payload)
        # The transaction is untouched: had the server refused a NOTIFY, it would be aborted
        # and this would raise InFailedSqlTransaction.
        assert conn.execute("SELECT 1").fetchone() == (1,)
