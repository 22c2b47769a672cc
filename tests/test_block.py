"""overflow="block": lossless with bounded memory, on a real server (issue 12's tests)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import psycopg
import pytest
from fix_proxy import Proxy, proxied

from fix_supervisor import wait_for
from pglistener import Gap, Notification, Supervisor, Worker

SMALL = 64 * 1024


def flood(conn: psycopg.Connection, channel: str, n: int, start: int = 0) -> None:
    """n notifications numbered start.. in one transaction, sent by the server itself."""
    conn.execute("SELECT pg_notify(%s, i::text) FROM generate_series(%s::int, %s::int) AS i",
                 (channel, start, start + n - 1))


def numbers(items: list[Any]) -> list[int]:
    assert not [i for i in items if isinstance(i, Gap)], "a gap in a lossless stream"
    return [int(i.payload) for i in items]


def read_all(sub: Any, n: int, pause: float = 0.0) -> list[Any]:
    got: list[Any] = []
    while len(got) < n:
        got.extend(sub.get_many(1000, timeout=60))
        if pause:
            time.sleep(pause)       # slower than the server sends
    return got


def queue_usage(conn: psycopg.Connection) -> float:
    row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
    assert row is not None
    return float(row[0])


def test_a_slow_blocking_reader_misses_nothing_and_neither_does_its_neighbour(
        dsn: str, conn: psycopg.Connection) -> None:
    n = 300_000
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        slow = worker.subscribe("burst", ring_bytes=SMALL, overflow="block", timeout=30)
        fast = worker.subscribe("burst", timeout=30)
        fast_got: list[Any] = []
        reader = threading.Thread(target=lambda: fast_got.extend(read_all(fast, n)))
        reader.start()
        flood(conn, "burst", n)
        slow_got = read_all(slow, n, pause=0.002)
        reader.join(120)
        assert numbers(slow_got) == list(range(n))
        assert numbers(fast_got) == list(range(n))
        stats = sup.stats()
        by_policy = {r.overflow: r for r in stats.readers}
        assert by_policy["block"].missed == 0 and by_policy["gap"].missed == 0
        assert by_policy["block"].held_seconds > 0 and stats.held_seconds > 0
        assert stats.reconnects == 0
        wait_for(lambda: queue_usage(conn) < 0.0001, "the server's queue to drain")


def test_the_same_with_asyncio(dsn: str, conn: psycopg.Connection) -> None:
    n = 300_000

    async def main(worker: Worker) -> list[int]:
        got: list[int] = []
        async with await worker.subscribe_async("aburst", ring_bytes=SMALL, overflow="block",
                                                timeout=30) as sub:
            await asyncio.get_running_loop().run_in_executor(None, flood, conn, "aburst", n)
            async for item in sub:
                assert isinstance(item, Notification), item
                got.append(int(item.payload))
                if len(got) % 2000 == 0:
                    await asyncio.sleep(0.005)
                if len(got) == n:
                    break
        return got

    with Supervisor(dsn).start() as sup:
        assert asyncio.run(main(sup.worker())) == list(range(n))
        stats = sup.stats()
        assert stats.reconnects == 0 and stats.held_seconds > 0
        wait_for(lambda: queue_usage(conn) < 0.0001, "the server's queue to drain")


def test_block_timeout_gives_one_gap_with_the_exact_count(
        dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    n = 20_000
    with Supervisor(dsn, block_timeout=1.0).start() as sup:
        worker = sup.worker()
        stuck = worker.subscribe("expire", ring_bytes=16 * 1024, overflow="block", timeout=30)
        other = worker.subscribe("expire", timeout=30)
        flood(conn, "expire", n)
        # The connection moves on after block_timeout: the other reader gets everything.
        assert numbers(read_all(other, n)) == list(range(n))
        items = read_all(stuck, 1)
        while not any(isinstance(i, Gap) for i in items) or (
                len(items) - 1 + sum(i.missed for i in items if isinstance(i, Gap)) < n):
            items.extend(stuck.get_many(1000, timeout=30))
        gaps = [i for i in items if isinstance(i, Gap)]
        assert len(gaps) == 1 and gaps[0].reason == "overflow"
        seen = [int(i.payload) for i in items if not isinstance(i, Gap)]
        cut = items.index(gaps[0])
        # In order; the gap stands where they went missing, and counts them exactly.
        assert seen == list(range(cut)) + list(range(cut + gaps[0].missed, n))
        assert sup.stats().readers[0].missed == gaps[0].missed
        # Having made room it blocks again: the next burst is whole.
        flood(conn, "expire", 5000, start=n)
        assert numbers(read_all(stuck, 5000, pause=0.01)) == list(range(n, n + 5000))
        warned = [r for r in caplog.records if "block_timeout" in r.getMessage()]
        assert len(warned) == 1


def _hold(worker: Worker, ready: Any) -> None:
    sub = worker.subscribe("killed", ring_bytes=16 * 1024, overflow="block", timeout=30)
    ready.set()
    time.sleep(600)         # never reads
    sub.unsubscribe()


def test_a_killed_blocking_reader_releases_the_connection_at_once(
        dsn: str, conn: psycopg.Connection) -> None:
    n = 20_000
    ctx = multiprocessing.get_context("forkserver")
    with Supervisor(dsn, block_timeout=600).start() as sup:
        ready = ctx.Event()
        child = ctx.Process(target=_hold, args=(sup.worker(), ready), daemon=True)
        child.start()
        assert ready.wait(30)
        other = sup.worker().subscribe("killed", timeout=30)
        flood(conn, "killed", n)
        wait_for(lambda: sup.stats().held_seconds > 0, "the blocking reader to hold")
        got = other.get_many(n, timeout=5)
        assert len(got) < n                 # held back: block_timeout is far away
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        got += read_all(other, n - len(got))
        assert numbers(got) == list(range(n))
        child.join(30)


def test_holding_longer_than_liveness_timeout_is_not_an_outage(
        dsn: str, conn: psycopg.Connection) -> None:
    with Supervisor(dsn, liveness_timeout=1.5, block_timeout=60).start() as sup:
        sub = sup.worker().subscribe("patient", ring_bytes=16 * 1024, overflow="block",
                                     timeout=30)
        flood(conn, "patient", 5000)
        wait_for(lambda: sup.stats().held_seconds > 0, "the hold")
        time.sleep(4.5)         # three liveness_timeouts, held
        assert sup.stats().reconnects == 0
        # A subscribe meanwhile waits for its LISTEN's answer behind the held notifications.
        late = threading.Thread(
            target=lambda: sup.worker().subscribe("other", timeout=60).unsubscribe())
        late.start()
        assert numbers(read_all(sub, 5000)) == list(range(5000))
        late.join(60)
        assert not late.is_alive()
        assert sup.stats().reconnects == 0


def test_a_bad_policy_is_refused_saying_the_choices(worker: Worker) -> None:
    with pytest.raises(ValueError, match="'gap'.*'block'"):
        worker.subscribe("x", overflow="wait", timeout=30)
    with pytest.raises(TypeError, match="'gap' or 'block'"):
        worker.subscribe("x", overflow=None, timeout=30)  # type: ignore[arg-type]


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_a_server_lost_while_held_is_noticed_and_said(dsn: str, conn: psycopg.Connection,
                                                      proxy: Proxy, over: str) -> None:
    """The connection is held, nothing is read: the backend killed then is still noticed
    (within liveness_timeout, not block_timeout), and the blocking stream says so. Over TCP
    the end shows as the peer's FIN (POLLRDHUP) on a socket not polled for reading."""
    target = proxied(dsn, proxy) if over == "tcp" else dsn
    with Supervisor(target, liveness_timeout=3, block_timeout=600).start() as sup:
        sub = sup.worker().subscribe("lost-held", ring_bytes=16 * 1024, overflow="block",
                                     timeout=30)
        flood(conn, "lost-held", 5000)
        wait_for(lambda: sup.stats().held_seconds > 0, "the hold")
        old = sup.backend_pid
        conn.execute("SELECT pg_terminate_backend(%s)", (old,))
        wait_for(lambda: sup.stats().reconnects == 1, "the outage to be noticed", timeout=10)
        items = read_all(sub, 1)
        while not isinstance(items[-1], Gap):
            items += sub.get_many(1000, timeout=30)
        assert items[-1] == Gap("reconnect")
        assert numbers(items[:-1]) == list(range(len(items) - 1))      # in order until then
