"""The WAL source on a real server (wal_level = logical, a cluster of the tests' own): what
emit() sends arrives exactly once, in commit order, with no Gap, whatever happens to the
replication connection; the slot is never confirmed past what a reader holds."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fix_cluster import Cluster
from fix_proxy import Proxy, proxied, upstream_of
from fix_wal import FAST, drop_slot, emit_many, numbers, on_server, read, walsender

import pglistener
from fix_supervisor import wait_for
from pglistener import Notification, Supervisor, WalSourceError


def slot_row(conn: psycopg.Connection, name: str) -> tuple[Any, ...] | None:
    return conn.execute("SELECT active_pid, confirmed_flush_lsn::text, wal_status "
                        "FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()


def confirmed(conn: psycopg.Connection, name: str) -> int:
    row = slot_row(conn, name)
    assert row is not None
    return pglistener.parse_lsn(row[1])


# -- what emit() sends ----------------------------------------------------------------------


def test_payloads_arrive_byte_exact_in_commit_order(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    binary = bytes(range(256)) * 400                 # 100 KiB with NUL: past NOTIFY's limit
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        worker = sup.worker()
        sub = worker.subscribe("bin", source="wal", timeout=30)
        js = worker.subscribe_json("bin", source="wal", timeout=30)
        lsn = pglistener.emit(pg, "bin", binary)
        pglistener.emit(pg, "bin", "héllo ✓")
        with pg.transaction():
            pglistener.emit(pg, "bin", b"kept", transactional=False)
            pglistener.emit(pg, "bin", b"rolled back")
            raise psycopg.Rollback()
        pglistener.emit_json(pg, "bin", {"n": 1})
        items = read(sub, 4)
        assert [i.data for i in items] == [binary, "héllo ✓".encode(), b"kept", b'{"n":1}']
        assert items[0].lsn == lsn and items[0].commit_lsn >= lsn
        assert items[2].commit_lsn == items[2].lsn - 1           # sent as it was decoded
        assert all(isinstance(i, Notification) and i.pid == 0 for i in items)
        assert [i.position for i in items] == sorted(i.position for i in items)
        assert read(js, 1) == [{"n": 1}]   # JSON: what is not JSON is logged and skipped
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.5)    # the rolled-back transactional message never comes


def test_every_read_path_and_asyncio(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    async def main(worker: pglistener.Worker) -> list[int | str]:
        async with worker.subscribe_async("a", source="wal", timeout=30) as sub:
            conn = await psycopg.AsyncConnection.connect(logical_cluster.dsn, autocommit=True)
            async with conn:
                for i in range(3):
                    await pglistener.emit(conn, "a", str(i))
            got = [await sub.get(timeout=30) for _ in range(3)]
        return numbers(got)

    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        assert asyncio.run(main(sup.worker())) == [0, 1, 2]
        sub = sup.worker().subscribe("a", source="wal", timeout=30)
        emit_many(pg, "a", 0, 100)
        got = sub.get_many(10, timeout=30)
        for item in sub:
            got.append(item)
            if len(got) == 100:
                break
        assert numbers(got) == list(range(100))


def test_bad_source_and_after_are_refused_before_anything_is_sent(
    logical_cluster: Cluster, slot: str, dsn: str
) -> None:
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        with pytest.raises(ValueError, match="source is 'notify'"):
            worker.subscribe("a", source="kafka")
        with pytest.raises(ValueError, match="source='wal'"):
            worker.subscribe("a", after=5)
        with pytest.raises(ValueError, match="Supervisor\\(dsn, slot='name'\\)"):
            worker.subscribe("a", source="wal", timeout=10)
        with pytest.raises(TypeError, match="after="):
            worker.subscribe("a", source="wal", after="0/10")
    with pytest.raises(ValueError, match="lower-case"):
        Supervisor(dsn, slot="Bad-Name")
    with pytest.raises(ValueError, match="give slot= too"):
        Supervisor(dsn, slot_dsn=dsn)


# -- promise 1: no gap on reconnect -----------------------------------------------------------


@pytest.mark.every_server
def test_killed_walsender_loses_nothing_and_repeats_nothing(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    total = 30_000
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        worker = sup.worker()
        subs = [worker.subscribe("k", source="wal", timeout=30),
                worker.subscribe("k", source="wal", timeout=30, overflow="block",
                                 ring_bytes=16 * 1024)]
        sent = threading.Event()

        def produce() -> None:
            with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
                emit_many(conn, "k", 0, total, transactions=60)
            sent.set()

        producer = threading.Thread(target=produce)
        producer.start()
        got: list[list[Any]] = [[], []]
        kills = 0
        while len(got[1]) < total:
            for i, sub in enumerate(subs):
                got[i] += sub.get_many(4096, timeout=30)
            if kills < 4 and len(got[1]) > (kills + 1) * total // 6:
                pg.execute("SELECT pg_terminate_backend(%s)", (walsender(sup),))
                kills += 1
        producer.join()
        while len(got[0]) < total:
            got[0] += subs[0].get_many(4096, timeout=30)
        for items in got:
            assert numbers(items) == list(range(total))
        stats = sup.stats()
        assert stats.wal_reconnects >= kills == 4
        assert stats.reconnects == 0        # the LISTEN connection was not touched


@pytest.mark.every_server
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_loses_nothing(
    logical_cluster: Cluster, slot: str, mode: str
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        worker = sup.worker()
        wal = worker.subscribe("r", source="wal", timeout=30)
        note = worker.subscribe("r", timeout=30)
        with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
            emit_many(conn, "r", 0, 1000, transactions=4)
        logical_cluster.restart(mode)
        with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
            emit_many(conn, "r", 1000, 1000, transactions=4)
        assert numbers(read(wal, 2000)) == list(range(2000))
        with pytest.raises(TimeoutError):
            wal.get(timeout=1)      # a crash may make the server send some again: not us
        # The NOTIFY subscription beside it is told what NOTIFY cannot keep.
        assert numbers(read(note, 1)) == ["GAP:reconnect"]


def test_a_frozen_stream_is_replaced_and_loses_nothing(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    proxy = Proxy(*upstream_of(logical_cluster.dsn))
    try:
        with Supervisor(logical_cluster.dsn, slot=slot, slot_dsn=proxied(
                logical_cluster.dsn, proxy), liveness_timeout=2, **FAST).start() as sup:
            sub = sup.worker().subscribe("f", source="wal", timeout=30)
            emit_many(pg, "f", 0, 100)
            assert numbers(read(sub, 100)) == list(range(100))
            proxy.freeze()
            emit_many(pg, "f", 100, 100)
            wait_for(lambda: sup.stats().wal_reconnects >= 1, "the frozen stream to be left")
            assert numbers(read(sub, 100)) == list(range(100, 200))
            assert proxy.accepted >= 2
    finally:
        proxy.close()


# -- promise 2: held by readers ---------------------------------------------------------------


def test_the_slot_waits_for_what_a_reader_has_not_consumed(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        sub = sup.worker().subscribe("h", source="wal", timeout=30)
        other = sup.worker().subscribe("h", source="wal", timeout=30)
        pglistener.emit(pg, "h", "1")
        first = sub.get(timeout=30)
        pglistener.emit(pg, "h", "2")
        second = sub.get(timeout=30)        # first is consumed for `sub`, not for `other`
        time.sleep(1)                       # feedback had time to go out
        assert confirmed(pg, slot) <= first.commit_lsn
        assert numbers(read(other, 2)) == [1, 2]
        with pytest.raises(TimeoutError):
            other.get(timeout=0.2)          # asked for more: both are done with there
        wait_for(lambda: confirmed(pg, slot) > first.commit_lsn, "the slot to pass the first")
        time.sleep(0.5)
        assert confirmed(pg, slot) <= second.commit_lsn     # `sub` still holds the second
        sub.unsubscribe()                   # closed: done with
        wait_for(lambda: confirmed(pg, slot) > second.commit_lsn, "the slot to pass both")


def test_a_blocking_reader_loses_nothing_and_the_wal_holds_the_backlog(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    total = 20_000
    with Supervisor(logical_cluster.dsn, slot=slot, block_timeout=0.2).start() as sup:
        sub = sup.worker().subscribe("b", source="wal", timeout=30, overflow="block",
                                     ring_bytes=16 * 1024)
        pg.execute("SELECT pg_logical_emit_message(true, 'b', lpad(i::text, 200)) "
                   "FROM generate_series(0, %s) i", (total - 1,))
        # Far past block_timeout (a WAL hold has no limit), and past this cluster's
        # wal_sender_timeout (5 s): while the stream is held, feedback still goes out.
        time.sleep(7)
        got = []
        while len(got) < total:
            got += sub.get_many(256, timeout=30)
            time.sleep(0.0005)
        assert [int(i.payload) for i in got] == list(range(total))
        stats = sup.stats()
        assert stats.readers[0].missed == 0 and stats.readers[0].held_seconds > 5
        assert stats.wal_reconnects == 0


# -- promise 3: crashes -------------------------------------------------------------------------


@pytest.mark.every_server
def test_a_killed_supervisor_resumes_after_the_last_handled_message(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    sup = Supervisor(logical_cluster.dsn, slot=slot).start()
    try:
        sub = sup.worker().subscribe("s", source="wal", timeout=30)
        emit_many(pg, "s", 0, 1000)
        handled = read(sub, 400)
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
    finally:
        sup.stop()
    emit_many(pg, "s", 1000, 500)
    with Supervisor(logical_cluster.dsn, slot=slot).start() as again:
        worker = again.worker()
        resumed = worker.subscribe("s", source="wal", after=handled[-1], timeout=30)
        fresh = worker.subscribe("s", source="wal", timeout=30)
        assert numbers(read(resumed, 1100)) == list(range(400, 1500))
        pglistener.emit(pg, "s", "1500")
        assert numbers(read(fresh, 1)) == [1500]    # without after=: what commits from now


@pytest.mark.parametrize("members", [1, 2])
def test_a_group_member_resumes_after_its_own_position_across_a_killed_supervisor(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, members: int
) -> None:
    """The README's pattern in a consumer group: each member saves its last item's position
    and comes back with after= it, to a new supervisor (the old one SIGKILLed halfway
    through a 10,000-message transaction). The group's kept place and each member's after=
    compose: what stands at or before a member's after= does not come to it again; what is
    at or before every member's goes to none (each had what came to it, in order), the rest
    to one of them. One member: exactly once. Two: nothing lost, and a message comes twice
    only between the two members' after= (one had it, the other may not have)."""
    sup = Supervisor(logical_cluster.dsn, slot=slot).start()
    try:
        worker = sup.worker()
        subs = [worker.subscribe("g", source="wal", group="billing", timeout=30)
                for _ in range(members)]
        emit_many(pg, "g", 0, 10_000)
        handled: list[list[Any]] = [[] for _ in subs]
        while sum(map(len, handled)) < 5_000:
            for i, sub in enumerate(subs):
                # A member may have nothing for a while: the other may have it all.
                with contextlib.suppress(TimeoutError):
                    handled[i] += sub.get_many(100, timeout=0.05)
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
    finally:
        sup.stop()
    emit_many(pg, "g", 10_000, 100)
    had = [numbers(h) for h in handled]
    with Supervisor(logical_cluster.dsn, slot=slot).start() as again:
        worker = again.worker()
        back = [worker.subscribe("g", source="wal", group="billing", after=h[-1], timeout=30)
                for h in handled]
        got: list[list[Any]] = [[] for _ in back]
        while set(range(10_100)) - {n for items in had + [numbers(g) for g in got]
                                    for n in items}:
            for i, sub in enumerate(back):
                with contextlib.suppress(TimeoutError):
                    got[i] += sub.get_many(1000, timeout=0.05)
        for i, sub in enumerate(back):
            with pytest.raises(TimeoutError):
                got[i].append(sub.get(timeout=0.5))
    after = [numbers(g) for g in got]
    for i, items in enumerate(after):
        assert items == sorted(items), "a member's stream is in order"
        assert all(isinstance(n, int) and n > had[i][-1] for n in items)
    everything = sorted(n for items in had + after for n in items)
    assert set(everything) == set(range(10_100))
    twice = [n for n, count in collections.Counter(everything).items() if count > 1]
    if members == 1:
        assert not twice
    else:
        low, high = sorted(h[-1] for h in had)
        assert all(low < n <= high for n in twice)


def test_resume_across_a_restart_gives_a_gap_only_where_something_may_be_missing(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """Two readers have everything, and the slot is confirmed past both (a third channel
    moved it); the supervisor is SIGKILLed. Back with after= their last items on a new one:
    the reader whose channel had nothing since gets no Gap (the supervisor before kept, in
    pglistener_positions, what it saw on each channel); the one that resumes from earlier
    than its last item, on a channel that had more since, gets Gap("slot")."""
    sup = Supervisor(logical_cluster.dsn, slot=slot).start()
    try:
        worker = sup.worker()
        quiet = worker.subscribe("quiet", source="wal", timeout=30)
        busy = worker.subscribe("busy", source="wal", timeout=30)
        mover = worker.subscribe("mover", source="wal", timeout=30)
        emit_many(pg, "quiet", 0, 100)
        emit_many(pg, "busy", 0, 100)
        had_quiet, had_busy = read(quiet, 100), read(busy, 100)
        emit_many(pg, "mover", 0, 10)
        moved = read(mover, 10)
        for sub in (quiet, busy, mover):
            with pytest.raises(TimeoutError):
                sub.get(timeout=0.2)        # asked past the last: the slot may move on
        wait_for(lambda: pg.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE "
            "slot_name = %s", (pglistener.format_lsn(moved[-1].commit_lsn), slot)
        ).fetchone() == (True,), "the slot to be confirmed past every reader")
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
    finally:
        sup.stop()
    with Supervisor(logical_cluster.dsn, slot=slot).start() as again:
        worker = again.worker()
        quiet = worker.subscribe("quiet", source="wal", after=had_quiet[-1], timeout=30)
        busy = worker.subscribe("busy", source="wal", after=had_busy[49], timeout=30)
        emit_many(pg, "quiet", 100, 5)
        emit_many(pg, "busy", 100, 5)
        assert numbers(read(quiet, 5)) == list(range(100, 105))
        assert numbers(read(busy, 6)) == ["GAP:slot", *range(100, 105)]


def test_what_the_server_says_beside_a_result_is_logged_not_printed(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The supervisor's queries on its LISTEN connection may draw a NOTICE (here: the table
    it keeps positions in, made again "IF NOT EXISTS"). libpq prints those to the process's
    stderr, the user's terminal, unless the connection has a notice receiver: it goes to the
    log instead, at debug level (a WARNING would be a warning)."""
    caplog.set_level(logging.DEBUG, logger="pglistener")
    pg.execute("CREATE TABLE IF NOT EXISTS pglistener_positions (slot text, channel bytea, "
               "since_commit bigint, since_lsn bigint, last_commit bigint, last_lsn bigint, "
               "PRIMARY KEY (slot, channel))")
    pg.commit()
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        sub = sup.worker().subscribe("said", source="wal", timeout=30)
        emit_many(pg, "said", 0, 10)
        assert numbers(read(sub, 10)) == list(range(10))     # traffic: positions are kept
        wait_for(lambda: "already exists, skipping" in caplog.text,
                 "the supervisor's log to say what the server noticed")
    said = [r for r in caplog.records if "already exists, skipping" in r.getMessage()]
    assert said[0].levelno == logging.DEBUG and "(NOTICE)" in said[0].getMessage()
    assert "already exists, skipping" not in capfd.readouterr().err


def test_resume_in_the_middle_of_a_transaction_that_overlapped_another(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """A wrote 0..299 before B committed and 300..599 after: the stream is B, then A, and
    A's LSNs are not in stream order. A resume after A's 150th message gets exactly the rest,
    by its position; by its LSN too, while the slot holds A's transaction."""
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        worker = sup.worker()
        holder = worker.subscribe("o", source="wal", timeout=30)    # holds the slot
        pglistener.emit(pg, "o", "-1")
        sub = worker.subscribe("o", source="wal", timeout=30)
        with psycopg.connect(logical_cluster.dsn) as a:
            emit_many(a, "o", 0, 300)
            emit_many(pg, "o", 1000, 300)                         # B: commits first
            emit_many(a, "o", 300, 300)
            a.commit()
        got = read(sub, 450)
        assert numbers(got) == list(range(1000, 1300)) + list(range(150))
        assert got[300].lsn < got[0].lsn       # A's first write came before B's
        sub.unsubscribe()
        by_position = worker.subscribe("o", source="wal", after=got[-1], timeout=30)
        by_lsn = worker.subscribe("o", source="wal", after=got[-1].lsn, timeout=30)
        rest = list(range(150, 600))
        assert numbers(read(by_position, 450)) == rest
        assert numbers(read(by_lsn, 450)) == rest
        for s in (by_position, by_lsn):
            with pytest.raises(TimeoutError):
                s.get(timeout=0.5)
        assert numbers(read(holder, 1)) == [-1]


def test_a_consumer_group_shares_the_source(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        worker = sup.worker()
        members = [worker.subscribe("g", source="wal", group="jobs", timeout=30)
                   for _ in range(3)]
        emit_many(pg, "g", 0, 3000, transactions=30)
        got: list[int | str] = []
        deadline = time.monotonic() + 30
        while len(got) < 3000 and time.monotonic() < deadline:
            for m in members:
                with contextlib.suppress(TimeoutError):
                    got += numbers(m.get_many(512, timeout=0.05))
        assert sorted(got) == list(range(3000))     # each exactly once, across the group


# -- promise 5: what the server must be told ----------------------------------------------------


def test_wal_level_replica_fails_the_first_subscribe(cluster: Cluster) -> None:
    with Supervisor(cluster.dsn, slot="never", **FAST).start() as sup:
        with pytest.raises(WalSourceError, match="wal_level = logical"):
            sup.worker().subscribe("x", source="wal", timeout=30)
        assert sup.worker().subscribe("x", timeout=30)      # NOTIFY goes on
        stats = sup.stats()
        assert stats.wal_state != "streaming" and "wal_level" in str(stats.wal_last_error)


def test_postgresql_19_decodes_with_wal_level_replica(replica19: Cluster) -> None:
    """From 19 on, the first logical slot turns logical decoding on: no restart needed."""
    slot = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(replica19.dsn, autocommit=True) as pg:
        assert pg.execute("SELECT current_setting('wal_level'), "
                          "current_setting('effective_wal_level')").fetchone() == \
            ("replica", "replica")
        try:
            with Supervisor(replica19.dsn, slot=slot, **FAST).start() as sup:
                sub = sup.worker().subscribe("r19", source="wal", timeout=30)
                emit_many(pg, "r19", 1, 100)
                assert numbers(read(sub, 100)) == list(range(1, 101))
                assert pg.execute("SELECT current_setting('effective_wal_level')"
                                  ).fetchone() == ("logical",)
        finally:
            drop_slot(pg, slot)


def test_a_role_without_replication_fails_the_first_subscribe(
    logical_cluster: Cluster, pg: psycopg.Connection
) -> None:
    pg.execute("DROP ROLE IF EXISTS plain")
    pg.execute("CREATE ROLE plain LOGIN")
    dsn = logical_cluster.dsn.replace("user=postgres", "user=plain")
    with Supervisor(dsn, slot="never", **FAST).start() as sup:
        with pytest.raises(WalSourceError, match="REPLICATION"):
            sup.worker().subscribe("x", source="wal", timeout=30)


def test_two_supervisors_on_one_slot_get_an_error_not_a_fight(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot).start() as first:
        sub = first.worker().subscribe("t", source="wal", timeout=30)
        with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as second:
            with pytest.raises(WalSourceError, match="in use"):
                second.worker().subscribe("t", source="wal", timeout=30)
            # It goes on trying, and says why in last_error, not in wal_last_error alone.
            stats = second.stats()
            assert stats.wal_state != "streaming"
            assert "WAL source: " in str(stats.last_error) and "in use" in str(stats.last_error)
        pglistener.emit(pg, "t", "1")
        assert numbers(read(sub, 1)) == [1]
        assert first.stats().wal_reconnects == 0


def test_an_invalidated_slot_is_made_again_and_says_so(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection,
    caplog: pytest.LogCaptureFixture
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        sub = sup.worker().subscribe("i", source="wal", timeout=30)
        pglistener.emit(pg, "i", "1")
        assert numbers(read(sub, 1)) == [1]         # taken, not consumed: the slot waits
        pg.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        pg.execute("SELECT pg_reload_conf()")
        try:
            pg.execute("CREATE TABLE IF NOT EXISTS junk (t text)")
            for _ in range(4):
                pg.execute("INSERT INTO junk SELECT repeat('x', 900) "
                           "FROM generate_series(1, 5000)")
                pg.execute("SELECT pg_switch_wal()")
                pg.execute("CHECKPOINT")
            wait_for(lambda: sup.stats().wal_reconnects >= 1, "the invalidated slot to be left")
        finally:
            pg.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            pg.execute("SELECT pg_reload_conf()")
            pg.execute("DROP TABLE IF EXISTS junk")
        wait_for(lambda: sup.stats().wal_state == "streaming", "the slot to be made again")
        pglistener.emit(pg, "i", "2")
        assert numbers(read(sub, 2)) == ["GAP:slot", 2]
    # The log names the server's own reason (PostgreSQL 17+), and what it means.
    assert "invalidated it (wal_removed)" in caplog.text
    assert "max_slot_wal_keep_size" in caplog.text


@on_server("18")
def test_an_idle_timeout_invalidation_is_a_gap_that_names_its_reason(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection,
    caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL 18 invalidates a slot unread for idle_replication_slot_timeout (at a
    checkpoint): here while the supervisor is frozen and its walsender gone."""
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        sub = sup.worker().subscribe("it", source="wal", timeout=30)
        emit_many(pg, "it", 1, 10)
        assert numbers(read(sub, 10)) == list(range(1, 11))
        pg.execute("ALTER SYSTEM SET idle_replication_slot_timeout = '1s'")
        pg.execute("SELECT pg_reload_conf()")

        def invalidated() -> bool:
            time.sleep(0.2)
            pg.execute("CHECKPOINT")
            return pg.execute("SELECT invalidation_reason FROM pg_replication_slots "
                              "WHERE slot_name = %s", (slot,)).fetchone() == ("idle_timeout",)

        try:
            with frozen(sup, pg, slot):
                emit_many(pg, "it", 11, 10)          # lost with the slot
                wait_for(invalidated, "the server to invalidate the idle slot", timeout=60)
        finally:
            pg.execute("ALTER SYSTEM RESET idle_replication_slot_timeout")
            pg.execute("SELECT pg_reload_conf()")
        made_again_after_one_gap(sup, sub, pg, "it", 21, 10)
    assert "invalidated it (idle_timeout)" in caplog.text
    assert "idle_replication_slot_timeout" in caplog.text


# -- promise 6: feedback --------------------------------------------------------------------------


def test_feedback_keeps_the_walsender_and_moves_an_idle_slot(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """wal_sender_timeout is 5 s on this cluster: a client that said nothing for that long
    would be dropped."""
    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        sub = sup.worker().subscribe("idle", source="wal", timeout=30)
        pid = walsender(sup)
        start = confirmed(pg, slot)
        pg.execute("CREATE TABLE IF NOT EXISTS busy (n int)")
        for _ in range(12):
            pg.execute("INSERT INTO busy SELECT generate_series(1, 1000)")
            time.sleep(1)
        stats = sup.stats()
        assert stats.wal_reconnects == 0 and stats.wal_backend_pid == pid
        assert confirmed(pg, slot) > start      # unrelated writes: the slot moves on
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.1)
        pg.execute("DROP TABLE busy")


# -- seeing and dropping slots -------------------------------------------------------------------


def test_slot_list_and_drop(logical_cluster: Cluster, slot: str, pg: psycopg.Connection,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """A slot in use is listed and not dropped; once free it is dropped with the positions
    its supervisor kept (pglistener_positions), so a slot made again under the name does not
    judge a resume by them."""
    from pglistener.__main__ import main

    def kept() -> int:
        """The slot's rows in the table, once the supervisor has made it."""
        count = 0
        made = pg.execute("SELECT to_regclass('pglistener_positions') IS NOT NULL").fetchone()
        if made == (True,):
            row = pg.execute("SELECT count(*) FROM pglistener_positions WHERE slot = %s",
                             (slot,)).fetchone()
            count = row[0] if row else 0
        pg.commit()
        return count

    with Supervisor(logical_cluster.dsn, slot=slot).start() as sup:
        sub = sup.worker().subscribe("l", source="wal", timeout=30)
        emit_many(pg, "l", 0, 10)
        assert numbers(read(sub, 10)) == list(range(10))
        wait_for(lambda: kept() > 0, "the supervisor to keep what it saw on channel l")
        assert main(["slot", "list", "--dsn", logical_cluster.dsn]) == 0
        listed = capsys.readouterr().out
        assert slot in listed and "pgoutput" in listed and "yes" in listed
        assert main(["slot", "drop", slot, "--dsn", logical_cluster.dsn]) == 1
        assert "in use" in capsys.readouterr().err
        stats = sup.stats()
        assert stats.slot == slot and stats.wal_state == "streaming"
        assert stats.slot_lag_bytes is None or stats.slot_lag_bytes >= 0
    assert main(["slot", "drop", slot, "--dsn", logical_cluster.dsn]) == 0
    assert "position(s) kept for it" in capsys.readouterr().out
    assert kept() == 0
    assert main(["slot", "drop", slot, "--dsn", logical_cluster.dsn]) == 1
    assert "no replication slot" in capsys.readouterr().err


# -- the benchmark and the soak run end to end on this source ------------------------------------


def test_bench_wal_scenarios_run_and_account(logical_cluster: Cluster, tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pglistener.bench", "--quick", "--workers", "2", "--no-progress",
         "--dsn", logical_cluster.dsn, "--scenario", "produce", "--scenario", "wal-drain",
         "--scenario", "wal-latency", "--scenario", "wal-group", "--scenario", "wal-hosts",
         "--scenario", "changes-drain", "--scenario", "changes-group",
         "--notifications", "2000",
         "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    produce = {system: rounds[0]["tps"] for system, rounds in data["results"]["produce"].items()}
    assert set(produce) == {"insert+notify", "insert+emit", "notify", "emit", "emit-nontx"}
    assert all(tps > 0 for tps in produce.values())
    for scenario in ("wal-drain", "changes-drain"):
        for system, rounds in data["results"][scenario].items():
            assert (rounds[0]["received"], rounds[0]["exact"]) == (2000, 1.0), system
            # the walsender's CPU for every reader, the peers' own slots too (from /proc)
            assert rounds[0]["cpu_backend_ns"] > 0, system
    assert set(data["results"]["changes-drain"]) == {"raw-changes", "psycopg2-changes",
                                                     "pglistener-changes-for"}
    group = data["results"]["changes-group"]["pglistener-changes-group"][0]
    assert (group["received"], group["exact"], group["processes"]) == (2000, 1.0, 2)
    for system in ("pglistener-wal", "psycopg2-wal"):   # the slot's latency, and a plain client's
        assert data["results"]["wal-latency"][system][0]["samples"] > 0, system
    assert data["results"]["wal-group"]["pglistener-wal-group"][0]["exact"] == 1.0
    hosts = data["results"]["wal-hosts"]
    assert set(hosts) == {f"pglistener{w}-x{k}" for w in ("", "-wal") for k in (1, 2, 4)}
    for system, rounds in hosts.items():     # each supervisor's reader got every one once
        assert (rounds[0]["received"], rounds[0]["exact"]) == (2000 * rounds[0]["hosts"],
                                                               1.0), system
        assert rounds[0]["cpu_backend_ns"] > 0, system      # the walsenders, from /proc
    names = {t["target"] for t in data["targets"]}
    assert "produce: INSERT+emit >= 1.8x INSERT+NOTIFY (tx/s)" in names
    with psycopg.connect(logical_cluster.dsn) as conn:     # the bench's slot went with it
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                            "'pglistener_bench'").fetchone() == (0,)


def test_soak_accounts_for_both_sources(logical_cluster: Cluster) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pglistener.bench", "soak", "--seconds", "8", "--kill-every",
         "2", "--drop-slot-every", "3", "--dsn", logical_cluster.dsn],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every notification and message accounted for" in proc.stdout
    assert "the walsender 2x" in proc.stdout or "the walsender 1x" in proc.stdout
    assert "dropped the slot 1x" in proc.stdout or "dropped the slot 2x" in proc.stdout


# -- promise 4: reading from a standby ----------------------------------------------------------


def test_reading_from_a_standby_restarted_and_promoted(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """slot_dsn names a hot standby (PostgreSQL 16): messages emitted on the primary arrive;
    the standby restarted loses nothing; promoted, the slot goes on and so do the readers."""
    standby = logical_cluster.standby(f"standby_{slot}", logical_cluster.port + 1)
    if pg.info.server_version < 160000:
        # PostgreSQL 15 decodes on a primary only: said, as a setting to change.
        try:
            with Supervisor(logical_cluster.dsn, slot=slot, slot_dsn=standby.dsn,
                            **FAST).start() as sup:
                with pytest.raises(WalSourceError, match="from PostgreSQL 16 on"):
                    sup.worker().subscribe("sb", source="wal", timeout=60)
                assert sup.worker().subscribe("sb", timeout=30)     # NOTIFY goes on
        finally:
            standby.stop("immediate")
        return
    try:
        with Supervisor(logical_cluster.dsn, slot=slot, slot_dsn=standby.dsn,
                        **FAST).start() as sup:
            sub = sup.worker().subscribe("sb", source="wal", timeout=60)
            assert sup.stats().wal_state == "streaming"
            with psycopg.connect(standby.dsn) as s:     # read there, not on the primary
                assert s.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                assert slot_row(s, slot)[0] is not None     # type: ignore[index]
            assert slot_row(pg, slot) is None
            emit_many(pg, "sb", 0, 500, transactions=5)
            assert numbers(read(sub, 500)) == list(range(500))
            # What the slot holds is sampled where it lives: on the standby.
            wait_for(lambda: sup.stats().slot_lag_bytes is not None, "the standby's slot lag")
            assert sup.stats().slot_lag_bytes >= 0      # type: ignore[operator]
            standby.restart("fast")
            emit_many(pg, "sb", 500, 500, transactions=5)
            assert numbers(read(sub, 500)) == list(range(500, 1000))
            emit_many(pg, "sb", 1000, 200)
            standby.promote()
            with psycopg.connect(standby.dsn, autocommit=True) as promoted:
                wait_for(lambda: promoted.execute("SELECT pg_is_in_recovery()").fetchone()
                         == (False,), "the promotion")
                emit_many(promoted, "sb", 1200, 300)    # producers write on the new primary
            assert numbers(read(sub, 500)) == list(range(1000, 1500))
            with pytest.raises(TimeoutError):
                sub.get(timeout=1)
            assert sup.stats().wal_reconnects >= 1         # the restart, at least
    finally:
        standby.stop("immediate")


# -- promise 3: consumer groups on this source ----------------------------------------------------


def _killed_member(sup: Supervisor, group: str) -> tuple[list[int], Any]:
    """A member of `group` in a process of its own, that handles five messages and is
    SIGKILLed holding the rest of its batch: what it handled."""
    import multiprocessing

    from workers import slow_member

    ctx = multiprocessing.get_context("forkserver")
    ready, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=slow_member, args=(sup.worker(), "grp", ready, out, group, "wal"))
    child.start()
    ready.get(timeout=60)
    return child, out


def test_a_wal_group_keeps_its_place_while_it_has_no_member(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, group_hold=60).start() as sup:
        child, out = _killed_member(sup, "durable")
        emit_many(pg, "grp", 0, 1000, transactions=10)
        handled = out.get(timeout=60)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        wait_for(lambda: not [r for r in sup.stats().readers if r.group == "durable"],
                 "the dead member to drop out")
        emit_many(pg, "grp", 1000, 1000, transactions=10)     # while it has no member
        time.sleep(0.5)
        member = sup.worker().subscribe("grp", source="wal", group="durable", timeout=30)
        got: list[int] = []
        while len(set(got) | set(handled)) < 2000:
            got += numbers(member.get_many(4096, timeout=30))   # type: ignore[arg-type]
        assert got == sorted(got) and set(got) | set(handled) == set(range(2000))
        assert sup.stats().orphaned == 0


def test_a_group_s_hold_ends_after_group_hold(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, group_hold=0.5).start() as sup:
        child, out = _killed_member(sup, "brief")
        emit_many(pg, "grp", 0, 100)
        out.get(timeout=60)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        # What it had not consumed: the 100, less those of batches it had asked past (at
        # most the 5 it handled: it asks past a batch only once it handed all of it out).
        wait_for(lambda: sup.stats().orphaned > 0, "the hold to end, its messages counted")
        assert 95 <= sup.stats().orphaned <= 100
        member = sup.worker().subscribe("grp", source="wal", group="brief", timeout=30)
        emit_many(pg, "grp", 100, 10)
        assert numbers(read(member, 10)) == list(range(100, 110))     # only what is new


# -- loss is said: where the slot cannot go on from where a stream stood --------------------------


@contextlib.contextmanager
def frozen(sup: Supervisor, pg: psycopg.Connection, slot: str) -> Iterator[None]:
    """The supervisor stopped (SIGSTOP) and its walsender ended, so that the slot is free
    for what the block does to it; resumed (SIGCONT) after."""
    pid = walsender(sup)
    assert sup.pid is not None
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: slot_row(pg, slot)[0] is None,  # type: ignore[index]
                 "the slot to be released")
        yield
    finally:
        os.kill(sup.pid, signal.SIGCONT)


def made_again_after_one_gap(sup: Supervisor, sub: Any, pg: psycopg.Connection, channel: str,
                             first: int, count: int) -> None:
    """The supervisor saw the slot lost once and made it again: what is sent now comes after
    one Gap("slot"), and nothing else."""
    wait_for(lambda: sup.stats().slot_losses == 1, "the supervisor to see the loss")
    wait_for(lambda: sup.stats().wal_state == "streaming", "the slot to be made again")
    emit_many(pg, channel, first, count)
    assert numbers(read(sub, count + 1)) == ["GAP:slot"] + list(range(first, first + count))
    with pytest.raises(TimeoutError):
        sub.get(timeout=0.5)


@pytest.mark.every_server
def test_a_slot_dropped_under_a_frozen_supervisor_is_a_gap(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        sub = sup.worker().subscribe("d", source="wal", timeout=30)
        emit_many(pg, "d", 1, 100)
        assert numbers(read(sub, 100)) == list(range(1, 101))
        with frozen(sup, pg, slot):
            pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            emit_many(pg, "d", 101, 100)          # nobody keeps these: lost
        made_again_after_one_gap(sup, sub, pg, "d", 201, 100)


def test_a_slot_advanced_by_someone_else_is_a_gap(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        sub = sup.worker().subscribe("v", source="wal", timeout=30)
        held = sup.worker().subscribe("v", source="wal", timeout=30)    # holds the slot
        emit_many(pg, "v", 1, 10)
        assert numbers(read(sub, 10)) == list(range(1, 11))
        with frozen(sup, pg, slot):
            emit_many(pg, "v", 11, 10)
            pg.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())",
                       (slot,))
        emit_many(pg, "v", 21, 10)
        # What it had is there; what the slot skipped is not, and the Gap says where.
        assert numbers(read(sub, 11)) == ["GAP:slot"] + list(range(21, 31))
        assert numbers(read(held, 21)) == list(range(1, 11)) + ["GAP:slot"] + \
            list(range(21, 31))
        assert sup.stats().slot_losses == 1


def test_after_a_position_the_slot_has_passed_is_a_gap(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        worker = sup.worker()
        keeper = worker.subscribe("p", source="wal", timeout=30)     # keeps reading "p"
        sub = worker.subscribe("p", source="wal", timeout=30)
        emit_many(pg, "p", 0, 100, transactions=10)
        got = read(sub, 100)
        assert numbers(read(keeper, 100)) == list(range(100))
        sub.unsubscribe()
        with pytest.raises(TimeoutError):
            keeper.get(timeout=0.2)         # asked past everything: the slot moves on
        wait_for(lambda: confirmed(pg, slot) > got[-1].commit_lsn, "the slot to pass them")
        # Saved progress every 50: 50..99 are confirmed away. Said, then what is new.
        behind = worker.subscribe("p", source="wal", after=got[49], timeout=30)
        # Saved the last one: nothing was missed, and nothing is said.
        exact = worker.subscribe("p", source="wal", after=got[-1], timeout=30)
        by_lsn = worker.subscribe("p", source="wal", after=got[-1].lsn, timeout=30)
        pglistener.emit(pg, "p", "100")
        assert numbers(read(behind, 2)) == ["GAP:slot", 100]
        assert numbers(read(exact, 1)) == [100]
        assert numbers(read(by_lsn, 1)) == [100]
        assert numbers(read(keeper, 1)) == [100]


def test_after_on_a_channel_nobody_read_meanwhile(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """The channel's last reader went; the supervisor goes on watching it: a resume with
    nothing sent meanwhile is exact, one that something was sent past is told."""
    with Supervisor(logical_cluster.dsn, slot=slot, **FAST).start() as sup:
        worker = sup.worker()
        sub = worker.subscribe("q", source="wal", timeout=30)
        emit_many(pg, "q", 0, 10)
        got = read(sub, 10)
        sub.unsubscribe()
        pglistener.emit(pg, "other", "x")       # the stream, and the slot, move on
        wait_for(lambda: confirmed(pg, slot) > got[-1].commit_lsn, "the slot to pass them")
        again = worker.subscribe("q", source="wal", after=got[-1], timeout=30)
        pglistener.emit(pg, "q", "10")
        assert numbers(read(again, 1)) == [10]
        again.unsubscribe()
        emit_many(pg, "q", 11, 5)               # read by nobody: the slot passes them
        last = pglistener.emit(pg, "other", "y")
        wait_for(lambda: confirmed(pg, slot) > last, "the slot to pass what nobody reads")
        late = worker.subscribe("q", source="wal", after=got[-1], timeout=30)
        pglistener.emit(pg, "q", "16")
        assert numbers(read(late, 2)) == ["GAP:slot", 16]


def test_a_wal_group_new_to_a_supervisor_starts_where_the_slot_is(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """The supervisor killed under a group's member: the next supervisor's first member of
    that group gets what the group had not consumed, and everything after (at least once)."""
    sup = Supervisor(logical_cluster.dsn, slot=slot).start()
    try:
        member = sup.worker().subscribe("gr", source="wal", group="durable", timeout=30)
        emit_many(pg, "gr", 0, 1000, transactions=10)
        handled = numbers(member.get_many(100, timeout=30))
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
    finally:
        sup.stop()
    emit_many(pg, "gr", 1000, 500, transactions=5)
    with Supervisor(logical_cluster.dsn, slot=slot).start() as again:
        worker = again.worker()
        fresh = worker.subscribe("gr", source="wal", timeout=30)     # no group: from now
        joined = worker.subscribe("gr", source="wal", group="durable", timeout=30)
        got: list[int | str] = []
        while 1499 not in got:
            got += numbers(joined.get_many(4096, timeout=30))
        assert got == sorted(got)                       # in order, each once
        assert set(got) | set(handled) == set(range(1500))
        assert got[0] <= handled[-1] + 1                # what it had not consumed, again
        pglistener.emit(pg, "gr", "1500")
        assert numbers(read(fresh, 1)) == [1500]
