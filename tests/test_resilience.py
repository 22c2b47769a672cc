"""Real faults: a frozen or reset stream, a restarted server, a standby, floods, slow readers.

Every test checks what a reader sees: order kept, and each notification either delivered or
accounted for by a Gap at the place where it went missing.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import Any

import psycopg
import pytest
from fix_cluster import Cluster
from fix_proxy import Proxy, proxied
from psycopg.conninfo import make_conninfo

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Gap, Notification, Supervisor
from pglistener.supervisor import _tcp_liveness
from workers import read_channels

FAST_RETRY = {"backoff_initial": 0.05, "backoff_max": 0.2}


def read(sub: Any, n: int, timeout: float = 30) -> list[Any]:
    return [sub.get(timeout=timeout) for _ in range(n)]


def texts(items: list[Any]) -> list[str]:
    """Notifications as their payloads, gaps as 'GAP:<reason>'."""
    return [f"GAP:{i.reason}" if isinstance(i, Gap) else i.payload for i in items]


def reconnected(sup: Supervisor, old_pid: int | None) -> bool:
    stats = sup.stats()
    return stats.connected and stats.backend_pid not in (None, old_pid)


def test_frozen_stream_is_noticed_within_liveness_timeout(
    dsn: str, proxy: Proxy, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """No FIN, no RST, TCP still acknowledged by the proxy: only the heartbeat can tell."""
    limit = 2.0
    sup = Supervisor(proxied(dsn, proxy), liveness_timeout=limit, **FAST_RETRY)
    with caplog.at_level(logging.INFO, logger="pglistener"), sup.start():
        sub = sup.worker().subscribe("frozen", timeout=30)
        notify(conn, "frozen", ["a", "b"])
        assert texts(read(sub, 2)) == ["a", "b"]
        old = sup.backend_pid
        proxy.freeze()
        frozen_at = time.monotonic()
        notify(conn, "frozen", ["lost"])          # goes into the frozen stream
        item = sub.get(timeout=60)
        noticed = time.monotonic() - frozen_at
        assert item == Gap("reconnect", None)
        # The bound is liveness_timeout after the server was last heard; allow for a slow
        # machine, but a frozen stream with no heartbeat would never be noticed at all.
        assert noticed < limit + 4, f"noticed after {noticed:.1f} s"
        wait_for(lambda: reconnected(sup, old), "the supervisor to reconnect")
        wait_for(lambda: "did not answer within liveness_timeout (2 s)" in caplog.text,
                 "the cause to be logged")
        assert sup.stats().reconnects == 1
        notify(conn, "frozen", ["c"])
        assert texts(read(sub, 1)) == ["c"]
        assert proxy.accepted == 2


def test_quiet_connection_is_kept_by_heartbeats(dsn: str, proxy: Proxy) -> None:
    """Silence from the server is fine as long as it answers the heartbeat."""
    with Supervisor(proxied(dsn, proxy), liveness_timeout=1.5).start() as sup:
        sub = sup.worker().subscribe("quiet", timeout=30)
        pid = sup.backend_pid
        time.sleep(4.5)     # three liveness_timeouts without a notification
        stats = sup.stats()
        assert stats.reconnects == 0
        assert stats.backend_pid == pid
        assert proxy.accepted == 1
        sub.unsubscribe()


def test_heartbeats_go_out_while_notifications_flow(dsn: str, conn: psycopg.Connection) -> None:
    """A session that only receives looks idle to the server: idle_session_timeout would end
    it unless the heartbeat keeps going when notifications keep the connection busy."""
    with Supervisor(make_conninfo(dsn, options="-c idle_session_timeout=1500"),
                    liveness_timeout=3).start() as sup:
        sub = sup.worker().subscribe("busy", timeout=30)
        pid = sup.backend_pid
        for i in range(20):          # 4 s: more than twice the idle timeout
            notify(conn, "busy", [str(i)])
            time.sleep(0.2)
        assert texts(read(sub, 20)) == [str(i) for i in range(20)]
        assert sup.stats().reconnects == 0
        assert sup.backend_pid == pid


def test_reset_stream_reconnects_with_one_gap(
    dsn: str, proxy: Proxy, conn: psycopg.Connection
) -> None:
    with Supervisor(proxied(dsn, proxy), **FAST_RETRY).start() as sup:
        sub = sup.worker().subscribe("reset", timeout=30)
        notify(conn, "reset", [str(i) for i in range(100)])
        wait_for(lambda: sup.stats().received == 100, "delivery before the reset")
        old = sup.backend_pid
        proxy.reset()
        wait_for(lambda: reconnected(sup, old), "the supervisor to reconnect")
        notify(conn, "reset", [str(i) for i in range(100, 200)])
        items = read(sub, 201)
        assert texts(items) == [str(i) for i in range(100)] + ["GAP:reconnect"] + \
            [str(i) for i in range(100, 200)]
        assert sup.stats().reconnects == 1


def test_tcp_liveness_settings_are_defaults_the_dsn_can_override() -> None:
    sup = Supervisor("host=db.example keepalives_idle=99", liveness_timeout=15)
    conninfo = sup._config.conninfo
    assert "keepalives_idle=99" in conninfo
    assert "tcp_user_timeout=15000" in conninfo
    assert "keepalives=1" in conninfo
    # The probes give up within about liveness_timeout.
    settings = _tcp_liveness(15)
    idle, interval, count = (int(settings[k]) for k in
                             ("keepalives_idle", "keepalives_interval", "keepalives_count"))
    assert idle + interval * count <= 15


@pytest.mark.every_server
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_gives_one_gap_then_the_stream_resumes(
    logical_cluster: Cluster, mode: str
) -> None:
    cluster = logical_cluster      # one of each version (its wal_level is no matter here)
    with Supervisor(cluster.dsn, **FAST_RETRY).start() as sup, \
            psycopg.connect(cluster.dsn, autocommit=True) as conn:
        w = sup.worker()
        a, b = w.subscribe("ra", timeout=30), w.subscribe("rb", timeout=30)
        notify(conn, "ra", [f"a{i}" for i in range(500)])
        wait_for(lambda: sup.stats().received == 500, "delivery before the restart")
        old = sup.backend_pid
        cluster.restart(mode)
        wait_for(lambda: reconnected(sup, old), "the supervisor to reconnect after restart")
        assert sup.stats().channels == ("ra", "rb")
        with psycopg.connect(cluster.dsn, autocommit=True) as conn2:
            notify(conn2, "ra", [f"a{i}" for i in range(500, 1000)])
            notify(conn2, "rb", ["b0"])
        assert texts(read(a, 1001)) == [f"a{i}" for i in range(500)] + ["GAP:reconnect"] + \
            [f"a{i}" for i in range(500, 1000)]
        assert texts(read(b, 2)) == ["GAP:reconnect", "b0"]
        # However many attempts failed while the server was down: one outage, one gap.
        assert sup.stats().reconnects == 1
        with pytest.raises(TimeoutError):
            a.get(timeout=0.2)


class Waiting:
    """A subscribe() left waiting in a thread for a server that cannot LISTEN yet."""

    def __init__(self, sup: Supervisor, channel: str) -> None:
        self.channel = channel
        self.got: list[Any] = []
        self.thread = threading.Thread(
            target=lambda: self.got.append(sup.worker().subscribe(channel, timeout=120)))
        self.thread.start()

    def held_by(self, sup: Supervisor, cause: str) -> None:
        """The supervisor reports `cause` as its last error, and subscribe() still waits."""
        wait_for(lambda: cause in (sup.stats().last_error or ""), f"the error {cause!r}")
        assert self.thread.is_alive()

    def receives_once_ready(self, dsn: str) -> None:
        """subscribe() returns, and nothing sent after that is lost: its LISTEN was
        committed before it returned."""
        self.thread.join(60)
        assert self.got, f"subscribe({self.channel!r}) did not return once the server was ready"
        with psycopg.connect(dsn, autocommit=True) as conn:
            notify(conn, self.channel, ["first"])
        assert texts(read(self.got[0], 1)) == ["first"]


def test_server_down_at_start_then_up(cluster: Cluster) -> None:
    cluster.stop()
    try:
        with Supervisor(cluster.dsn, **FAST_RETRY).start() as sup:
            waiting = Waiting(sup, "late")
            waiting.held_by(sup, "cannot connect")
            cluster.start()
            waiting.receives_once_ready(cluster.dsn)
    finally:
        if not (cluster.data / "postmaster.pid").exists():
            cluster.start()


def test_standby_refuses_listen_and_is_retried_until_promoted(cluster: Cluster) -> None:
    standby = cluster.standby("standby", 5433)
    try:
        with Supervisor(standby.dsn, **FAST_RETRY).start() as sup:
            waiting = Waiting(sup, "hot")
            # "cannot execute LISTEN during recovery": retried like a lost connection.
            waiting.held_by(sup, "during recovery")
            standby.promote()
            waiting.receives_once_ready(standby.dsn)
    finally:
        standby.stop("immediate")


def test_flood_of_100k_arrives_whole_and_in_order(
    supervisor: Supervisor, conn: psycopg.Connection
) -> None:
    total = 100_000
    sub = supervisor.worker().subscribe("flood100k", timeout=30, ring_bytes=16 * 1024 * 1024)
    sender = threading.Thread(target=lambda: [
        notify_in_one_go(conn, "flood100k", range(start, start + 10_000))
        for start in range(0, total, 10_000)])
    sender.start()
    got: list[str] = []
    while len(got) < total:
        got += texts(sub.get_many(4096, timeout=60))
    sender.join()
    assert got == [str(i) for i in range(total)]
    sub.unsubscribe()


def notify_in_one_go(conn: psycopg.Connection, channel: str, numbers: range,
                     pad: str = "") -> None:
    """One transaction, one statement: fast enough for floods."""
    conn.execute("SELECT pg_notify(%s, i::text || %s) FROM generate_series(%s::int, %s::int) i",
                 (channel, pad, numbers.start, numbers.stop - 1))


def test_a_reader_that_never_reads_holds_back_no_one(dsn: str, conn: psycopg.Connection) -> None:
    """200k notifications: the readers get all of them in order; the sleeper's ring fills, its
    count still adds up; the server's notification queue never backs up behind us."""
    total, batch = 200_000, 5_000
    pad = "." * 40
    with Supervisor(dsn, ring_bytes=64 * 1024 * 1024).start() as sup:
        w = sup.worker()
        sleeper = w.subscribe("flow", timeout=30, ring_bytes=16 * 1024)
        ctx = multiprocessing.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        readers = [ctx.Process(target=read_channels, args=(w, ["flow"], total, ready, out))
                   for _ in range(2)]
        for p in readers:
            p.start()
        for _ in readers:
            ready.get(timeout=60)

        for start in range(0, total, batch):
            notify_in_one_go(conn, "flow", range(start, start + batch), pad)
        results = [out.get(timeout=120) for _ in readers]
        for p in readers:
            p.join(30)
        for result in results:
            assert result == {"flow": [f"{i}{pad}" for i in range(total)]}

        # The sleeper's ring is full and still unread. Had that stalled the supervisor, the
        # server's queue would hold nearly all of the flow: each entry is a 16-byte header,
        # the channel and payload with their NULs, 4-aligned, in 8 KiB pages, out of a queue
        # of 2**20 pages (8 GB, the default). The server moves the queue's tail only when a
        # sender crosses a few pages, so send that much on a channel nobody listens to.
        entry = (16 + len("flow") + 1 + len(f"{total}{pad}") + 1 + 3) // 4 * 4
        stalled = total * entry / 8192 / 2 ** 20
        notify_in_one_go(conn, "nudge", range(2000), pad)
        usage = conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0]  # type: ignore
        assert usage < stalled / 10, (usage, stalled)

        wait_for(lambda: sup.stats().received == total, "the supervisor to take all")
        seen, missed, expected = 0, 0, 0
        while seen + missed < total:
            item = sleeper.get(timeout=30)
            if isinstance(item, Gap):
                assert item.reason == "overflow"
                missed += item.missed
                expected += item.missed
            else:
                assert isinstance(item, Notification)
                assert item.payload == f"{expected}{pad}"     # in order, right after its gap
                seen += 1
                expected += 1
        assert seen + missed == total
        assert missed > total // 2        # it really did overflow
        with pytest.raises(TimeoutError):
            sleeper.get(timeout=0.2)

