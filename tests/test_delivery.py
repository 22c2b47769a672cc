"""Delivery through the supervisor to workers, on a real server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import psycopg
import pytest

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import (
    Gap,
    InvalidChannelName,
    Notification,
    SubscriptionClosed,
    Supervisor,
    Worker,
)
from workers import read_channels, read_forever


def payloads(sub: Any, n: int, timeout: float = 30) -> list[str]:
    return [sub.get(timeout=timeout).payload for _ in range(n)]


def test_notifications_arrive_in_order_with_sender_pid(
    worker: Worker, conn: psycopg.Connection
) -> None:
    with worker.subscribe("orders", timeout=30) as sub:
        notify(conn, "orders", [f"p{i}" for i in range(100)])
        items = [sub.get(timeout=30) for _ in range(100)]
    assert [n.payload for n in items] == [f"p{i}" for i in range(100)]
    assert {n.channel for n in items} == {"orders"}
    assert {n.pid for n in items} == {conn.info.backend_pid}


@pytest.mark.every_python
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_many_workers_overlapping_channels_order_and_no_loss(
    worker: Worker, conn: psycopg.Connection, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    channels = [f"ch{i}" for i in range(6)]
    plan = [channels[0:3], channels[2:5], channels[4:6] + channels[0:1], channels]
    per_channel = 500
    ready, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=read_channels, args=(worker, chans, per_channel, ready, out))
             for chans in plan]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    # Interleave the channels across many transactions.
    for start in range(0, per_channel, 50):
        with conn.transaction():
            for i in range(start, start + 50):
                for ch in channels:
                    conn.execute("SELECT pg_notify(%s, %s)", (ch, f"{ch}:{i}"))
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    seen = sorted(tuple(sorted(r)) for r in results)
    assert seen == sorted(tuple(sorted(chans)) for chans in plan)
    for result in results:
        for ch, got in result.items():
            assert got == [f"{ch}:{i}" for i in range(per_channel)]


def test_one_server_connection_and_one_listen_per_channel(
    supervisor: Supervisor, conn: psycopg.Connection
) -> None:
    w = supervisor.worker()
    subs = [w.subscribe(ch, timeout=30) for ch in ["a", "b", "a", "a", "b", "c"]]
    rows = conn.execute(
        "SELECT pid, application_name FROM pg_stat_activity WHERE application_name = 'pglistener'"
    ).fetchall()
    assert rows == [(supervisor.backend_pid, "pglistener")]
    assert supervisor.stats().channels == ("a", "b", "c")
    # UNLISTEN only when the last subscriber of a channel leaves: while one "a" remains the
    # server still delivers to us, after that it does not even send.
    for sub in subs[:2]:
        sub.unsubscribe()
    notify(conn, "a", ["still"])
    assert subs[2].get(timeout=30).payload == "still"
    for sub in subs[2:4]:
        sub.unsubscribe()
    assert supervisor.stats().channels == ("b", "c")
    # unsubscribe() returns before the UNLISTEN is committed; a LISTEN queued after it on the
    # supervisor's connection is committed after it, and subscribe() waits for that.
    w.subscribe("d", timeout=30).unsubscribe()
    before = supervisor.stats().received
    notify(conn, "a", ["nobody"])
    notify(conn, "b", ["marker"])
    assert subs[4].get(timeout=30).payload == "marker"
    assert supervisor.stats().received == before + 1     # "a" was not sent to us
    for sub in subs[4:]:
        sub.unsubscribe()


TRICKY = ["MixedCase", "with space", 'quo"te', "*", "select", "a;b", "ünïcødé", "日本語",
          "x" * 63, "é" * 31 + "x", "--", "'single'"]


def test_tricky_channel_names_round_trip(worker: Worker, conn: psycopg.Connection) -> None:
    subs = [worker.subscribe(name, timeout=30) for name in TRICKY]
    for name in TRICKY:
        conn.execute("SELECT pg_notify(%s, %s)", (name, name))
    for name, sub in zip(TRICKY, subs, strict=True):
        got = sub.get(timeout=30)
        assert (got.channel, got.payload) == (name, name)
        sub.unsubscribe()


@pytest.mark.parametrize(
    "bad, rule",
    [("", "empty"), ("a\x00b", "NUL"), ("x" * 64, "63 bytes"), ("é" * 32, "63 bytes"),
     (b"bytes", "str")],
)
def test_bad_channel_names_are_refused_and_the_supervisor_still_serves(
    worker: Worker, conn: psycopg.Connection, bad: Any, rule: str
) -> None:
    with pytest.raises(InvalidChannelName, match=rule):
        worker.subscribe(bad, timeout=30)
    with worker.subscribe("fine", timeout=30) as sub:
        notify(conn, "fine", ["ok"])
        assert sub.get(timeout=30).payload == "ok"


def test_supervisor_checks_names_itself(worker: Worker) -> None:
    # A worker that skips the client-side check still cannot get a bad LISTEN through.
    from pglistener._worker.control import Control

    ctl = Control.get(worker._path)
    reply, fds = ctl.request({"op": "subscribe", "channels": ["ok", "y" * 64]}, timeout=30)
    assert fds == []
    assert reply["ok"] is False and reply["error"] == "InvalidChannelName"
    for bad in ("y", [], None):
        reply, fds = ctl.request({"op": "subscribe", "channels": bad}, timeout=30)
        assert fds == [] and reply["ok"] is False and reply["error"] == "ValueError"
    with worker.subscribe("ok", timeout=30) as sub:        # and it still serves
        assert sub.channels == ("ok",)


def test_empty_and_largest_multibyte_payloads(worker: Worker, conn: psycopg.Connection) -> None:
    big = "é" * 3999 + "x"           # 7999 bytes in UTF-8, the most the server accepts
    assert len(big.encode()) == 7999
    with worker.subscribe("sizes", timeout=30) as sub:
        # Identical payloads in one transaction may be folded: one empty one per transaction.
        notify(conn, "sizes", ["", big])
        notify(conn, "sizes", ["", big[::-1]])
        assert payloads(sub, 4) == ["", big, "", big[::-1]]


def test_unsubscribe_stops_delivery(worker: Worker, conn: psycopg.Connection) -> None:
    keep = worker.subscribe("u", timeout=30)
    gone = worker.subscribe("u", timeout=30)
    notify(conn, "u", ["both"])
    assert gone.get(timeout=30).payload == "both"
    gone.unsubscribe()
    with pytest.raises(SubscriptionClosed):
        gone.get(timeout=1)
    notify(conn, "u", ["only-keep"])
    assert payloads(keep, 2) == ["both", "only-keep"]
    keep.unsubscribe()


def test_unsubscribe_wakes_a_blocked_reader(worker: Worker) -> None:
    sub = worker.subscribe("blocked", timeout=30)
    ended: list[str] = []

    def read_all() -> None:
        for _ in sub:
            pass
        ended.append("iteration ended")

    t = threading.Thread(target=read_all)
    t.start()
    time.sleep(0.2)
    sub.unsubscribe()
    t.join(30)
    assert ended == ["iteration ended"]


def test_callback_errors_are_logged_and_do_not_stop_delivery(
    worker: Worker, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []
    done = threading.Event()

    def callback(n: Notification) -> None:
        if n.payload == "boom":
            raise RuntimeError("handler failed")
        got.append(n.payload)
        if n.payload == "last":
            done.set()

    with caplog.at_level(logging.ERROR, logger="pglistener"):
        sub = worker.subscribe("cb", callback, timeout=30)
        notify(conn, "cb", ["first", "boom", "after", "last"])
        assert done.wait(30)
        sub.unsubscribe()
    assert got == ["first", "after", "last"]
    assert "handler failed" in caplog.text


def test_json_subscription_decodes_and_skips_what_is_not_json(
    worker: Worker, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    docs = [{"id": 1}, [1, 2], "text", None]
    with caplog.at_level(logging.ERROR, logger="pglistener"):
        with worker.subscribe_json("js", timeout=30) as sub:
            notify(conn, "js", [json.dumps(docs[0]), "{not json", json.dumps(docs[1]),
                                json.dumps(docs[2]), json.dumps(docs[3])])
            assert [sub.get(timeout=30) for _ in docs] == docs
    assert "not JSON" in caplog.text and "{not json" in caplog.text

    seen: list[Any] = []
    done = threading.Event()

    def callback(value: Any) -> None:
        seen.append(value)
        if value == "end":
            done.set()

    sub = worker.subscribe_json("js2", callback, timeout=30)
    notify(conn, "js2", ["oops", json.dumps({"a": 1}), json.dumps("end")])
    assert done.wait(30)
    sub.unsubscribe()
    assert seen == [{"a": 1}, "end"]


def test_overflow_is_a_gap_with_the_exact_count(dsn: str, conn: psycopg.Connection) -> None:
    with Supervisor(dsn, ring_bytes=16 * 1024).start() as sup:
        sub = sup.worker().subscribe("flood", timeout=30)
        sent = 5000
        notify(conn, "flood", [f"{i:06d}" for i in range(sent)])
        # Read only once the supervisor has taken all 5000 (~120 KB) into a 16 KiB ring.
        wait_for(lambda: sup.stats().received >= sent, "the supervisor to receive the flood",
                 timeout=60)
        seen: list[int] = []
        stream: list[Any] = []
        missed = 0
        while len(seen) + missed < sent:
            item = sub.get(timeout=30)
            stream.append(item)
            if isinstance(item, Gap):
                assert item.reason == "overflow"
                missed += item.missed
            else:
                seen.append(int(item.payload))
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.5)       # and nothing beyond what was sent
        sub.unsubscribe()
    assert missed > 0
    assert len(seen) + missed == sent
    # Each gap stands exactly where its notifications went missing: walking the stream, a
    # notification carries the next expected number and a gap skips exactly `missed` of them.
    expected = 0
    for item in stream:
        if isinstance(item, Gap):
            expected += item.missed
        else:
            assert int(item.payload) == expected
            expected += 1
    assert expected == sent


def _wakeups(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f
                    if line.startswith("voluntary_ctxt_switches"))


def test_a_reader_that_never_reads_costs_the_supervisor_no_wakeups(
        dsn: str, conn: psycopg.Connection) -> None:
    """Its ring is full and a gap waits for room: the supervisor sleeps until the reader
    makes room (it used to look again every 1-64 ms, about 16 wake-ups a second). Then the
    reader's first read wakes it, and the gap follows what fitted."""
    with Supervisor(dsn, ring_bytes=16 * 1024).start() as sup:
        sub = sup.worker().subscribe("never-read", timeout=30)
        notify(conn, "never-read", [f"{i:06d}" for i in range(2000)])
        wait_for(lambda: sup.stats().readers[0].missed > 0, "the ring to overflow")
        assert sup.pid is not None
        before = _wakeups(sup.pid)
        time.sleep(3)
        # The liveness tick (1 s) and a heartbeat may wake it; a retry timer would be ~50.
        assert _wakeups(sup.pid) - before <= 10
        items = [sub.get(timeout=30)]
        while not isinstance(items[-1], Gap):
            items.append(sub.get(timeout=30))
        assert items[-1] == Gap("overflow", 2000 - (len(items) - 1))
        sub.unsubscribe()


def test_reconnect_puts_a_gap_in_every_stream(
    supervisor: Supervisor, conn: psycopg.Connection
) -> None:
    w = supervisor.worker()
    a, b = w.subscribe("r1", timeout=30), w.subscribe("r2", timeout=30)
    notify(conn, "r1", ["before"])
    # Read it before killing the backend: PostgreSQL hands a NOTIFY to a listening backend
    # asynchronously, and one terminated before it forwarded "before" loses it (the server's
    # at-most-once, not ours): the stream would rightly be [Gap, "after"].
    assert a.get(timeout=30) == Notification("r1", "before", conn.info.backend_pid)
    old = supervisor.backend_pid
    conn.execute("SELECT pg_terminate_backend(%s)", (old,))
    wait_for(lambda: supervisor.backend_pid not in (None, old), "the supervisor to reconnect")
    notify(conn, "r1", ["after"])
    notify(conn, "r2", ["after"])
    assert [a.get(timeout=30) for _ in range(2)] == [
        Gap("reconnect", None), Notification("r1", "after", conn.info.backend_pid)]
    assert [b.get(timeout=30) for _ in range(2)] == [
        Gap("reconnect", None), Notification("r2", "after", conn.info.backend_pid)]
    a.unsubscribe()
    b.unsubscribe()


def test_get_many_returns_items_in_order(worker: Worker, conn: psycopg.Connection) -> None:
    with worker.subscribe("many", timeout=30) as sub:
        notify(conn, "many", [str(i) for i in range(1000)])
        got: list[str] = []
        while len(got) < 1000:
            got += [n.payload for n in sub.get_many(300, timeout=30)]
    assert got == [str(i) for i in range(1000)]


def test_a_killed_worker_is_detached_and_others_keep_their_stream(
    supervisor: Supervisor, conn: psycopg.Connection
) -> None:
    w = supervisor.worker()
    survivor = w.subscribe("shared", timeout=30)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    victims = [ctx.Process(target=read_forever, args=(w, ch, ready)) for ch in ("shared", "own")]
    for p in victims:
        p.start()
    for _ in victims:
        ready.get(timeout=60)
    assert supervisor.stats().subscriptions == 3
    notify(conn, "shared", [str(i) for i in range(1000)])
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)     # mid-stream
        p.join(30)
    notify(conn, "shared", [str(i) for i in range(1000, 2000)])
    wait_for(lambda: supervisor.stats().subscriptions == 1,
             "the dead worker's subscriptions to be reclaimed")
    assert supervisor.stats().channels == ("shared",)      # "own" was UNLISTENed
    assert payloads(survivor, 2000) == [str(i) for i in range(2000)]
    survivor.unsubscribe()


def test_one_subscription_to_several_channels_keeps_the_servers_order(
    supervisor: Supervisor, conn: psycopg.Connection
) -> None:
    w = supervisor.worker()
    with w.subscribe(["m1", "m2", "m1"], timeout=30) as both, \
            w.subscribe("m2", timeout=30) as alone:
        assert both.channels == ("m1", "m2") and both.channel == "m1, m2"
        with conn.transaction():
            for i in range(300):
                conn.execute("SELECT pg_notify(%s, %s)", (f"m{i % 2 + 1}", str(i)))
        got = [both.get(timeout=30) for _ in range(300)]
        assert [(n.channel, n.payload) for n in got] == [
            (f"m{i % 2 + 1}", str(i)) for i in range(300)]
        assert [alone.get(timeout=30).payload for _ in range(150)] == [
            str(i) for i in range(1, 300, 2)]
        assert supervisor.stats().channels == ("m1", "m2")
    # Both gone: both channels UNLISTENed (in one round trip).
    assert supervisor.stats().channels == ()
    with pytest.raises(InvalidChannelName):
        w.subscribe([], timeout=30)
    with pytest.raises(InvalidChannelName):
        w.subscribe(["ok", "x" * 64], timeout=30)
