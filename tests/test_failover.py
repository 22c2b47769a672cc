"""The WAL source across a failover of the primary, on real pairs of servers: PostgreSQL 17's
failover slots (kept by a standby that synchronises slots, read there once it is promoted),
and what a server that cannot keep a slot says instead."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fix_cluster import LOGICAL, Cluster, clusters
from fix_wal import FAST, emit_many, numbers, read

from fix_supervisor import wait_for
from pglistener import Supervisor, WalSourceError


def logical_primary(root: Path, made: list[Cluster], port: int, version: str) -> Cluster:
    """A started primary with what the WAL source needs, among those `made`."""
    primary = Cluster(root, "primary", port, version).init()
    made.append(primary)
    primary.settings = dict(LOGICAL)
    primary.start()
    return primary


@pytest.fixture
def pair() -> Iterator[tuple[Cluster, Cluster]]:
    """A PostgreSQL 17 primary and a streaming standby set up as a failover needs: the
    standby's physical slot named in synchronized_standby_slots, slot synchronisation on,
    a dbname in its primary_conninfo."""
    with clusters() as (root, made):
        primary = logical_primary(root, made, 5472, "17")
        primary.sql("SELECT pg_create_physical_replication_slot('standby1')")
        primary.sql("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        primary.sql("SELECT pg_reload_conf()")
        # -R writes the dbname of -d into primary_conninfo (PostgreSQL 17).
        standby = primary.standby_made("standby", 5473, "-S", "standby1", "-d", primary.dsn)
        made.append(standby)
        standby.settings.update(sync_replication_slots="on", hot_standby_feedback="on")
        standby.start()
        yield primary, standby


def both(*clusters: Cluster) -> str:
    """A DSN naming every server, that connects to the one that takes writes."""
    hosts = ",".join(str(c.sock) for c in clusters)
    ports = ",".join(str(c.port) for c in clusters)
    return (f"host={hosts} port={ports} user=postgres dbname=postgres "
            f"target_session_attrs=read-write")


def slot_on(cluster: Cluster, slot: str) -> tuple[bool, bool] | None:
    """(failover, synced) of the slot there: a synced slot that is still temporary (the
    standby has not caught up with it) is dropped at promotion, so it does not count."""
    with psycopg.connect(cluster.dsn) as conn:
        row = conn.execute("SELECT failover, synced FROM pg_replication_slots "
                           "WHERE slot_name = %s AND NOT temporary", (slot,)).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


def promote(standby: Cluster) -> psycopg.Connection:
    """Promote the standby, and let its logical readers go: the primary's
    synchronized_standby_slots came with its copy and names a slot it does not have (the
    supervisor warns of that stall). An open connection to it, taking writes."""
    standby.promote()
    conn = psycopg.connect(standby.dsn, autocommit=True)
    wait_for(lambda: conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,),
             "the promotion")
    conn.execute("ALTER SYSTEM RESET synchronized_standby_slots")
    conn.execute("SELECT pg_reload_conf()")
    return conn


def test_a_failover_slot_survives_a_failover_with_nothing_lost(
    pair: tuple[Cluster, Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    primary, standby = pair
    slot = f"f_{uuid.uuid4().hex[:12]}"
    with Supervisor(both(primary, standby), slot=slot, **FAST).start() as sup:
        sub = sup.worker().subscribe("fo", source="wal", timeout=60)
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            emit_many(conn, "fo", 0, 2000, transactions=20)
        assert numbers(read(sub, 2000)) == list(range(2000))
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.2)        # asked past the last: the slot may move on
        # Then a quiet primary: the supervisor asks the standby, and nudges the primary
        # until the standby's copy is one a promotion keeps. Ready means that.
        wait_for(lambda: sup.stats().failover_ready is True, "the slot to be failover-ready",
                 timeout=60)
        stats = sup.stats()
        assert stats.slot_failover is True and stats.slot_losses == 0
        assert stats.failover_reason is None
        assert slot_on(primary, slot) == (True, False)
        assert slot_on(standby, slot) == (True, True)
        primary.stop("immediate")
        with promote(standby) as conn:
            emit_many(conn, "fo", 2000, 2000, transactions=20)
        assert numbers(read(sub, 2000, timeout=60)) == list(range(2000, 4000))
        with pytest.raises(TimeoutError):
            sub.get(timeout=1)
        stats = sup.stats()
        assert stats.slot_losses == 0 and stats.wal_reconnects >= 1
        assert "read on a new timeline" in caplog.text      # from the point histories part


def test_table_changes_survive_a_failover_with_nothing_lost(
    pair: tuple[Cluster, Cluster]
) -> None:
    """The same failover slot carries row changes: those committed on the primary before it
    died and those on the promoted standby after, each once and in order."""
    primary, standby = pair
    slot = f"c_{uuid.uuid4().hex[:12]}"
    table = f"fo_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(primary.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, n int)")
    with Supervisor(both(primary, standby), slot=slot, publication=slot,
                    **FAST).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=60)
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            for start in range(0, 1000, 100):
                conn.execute(f"INSERT INTO {table} (n) SELECT generate_series(%s::int, "
                             f"%s::int)", (start, start + 99))
        assert [c.new["n"] for c in read(sub, 1000)] == list(range(1000))
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.2)
        wait_for(lambda: sup.stats().failover_ready is True, "the slot to be failover-ready",
                 timeout=60)
        assert slot_on(standby, slot) == (True, True)
        primary.stop("immediate")
        with promote(standby) as conn:
            conn.execute(f"UPDATE {table} SET n = -n WHERE n < 10")
            conn.execute(f"INSERT INTO {table} (n) SELECT generate_series(1000, 1999)")
        got = read(sub, 1010, timeout=60)
        assert [(c.op, c.new["n"]) for c in got[:10]] == [("update", -n) for n in range(10)]
        assert [c.new["n"] for c in got[10:]] == list(range(1000, 2000))
        with pytest.raises(TimeoutError):
            sub.get(timeout=1)
        assert sup.stats().slot_losses == 0


def test_a_failover_without_a_failover_slot_is_a_gap(pair: tuple[Cluster, Cluster]) -> None:
    """failover=False on the same pair: the promoted standby has no slot, and the stream says
    so before what it reads there."""
    primary, standby = pair
    slot = f"n_{uuid.uuid4().hex[:12]}"
    with Supervisor(both(primary, standby), slot=slot, failover=False, **FAST).start() as sup:
        sub = sup.worker().subscribe("nf", source="wal", timeout=60)
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            emit_many(conn, "nf", 0, 100)
        assert numbers(read(sub, 100)) == list(range(100))
        assert sup.stats().slot_failover is False and sup.stats().failover_ready is False
        primary.stop("immediate")
        with promote(standby) as conn:
            wait_for(lambda: sup.stats().slot_losses == 1, "the loss to be seen", timeout=60)
            wait_for(lambda: sup.stats().wal_state == "streaming",
                     "the slot made on the new primary")
            emit_many(conn, "nf", 100, 100)
        assert numbers(read(sub, 101, timeout=60)) == ["GAP:slot"] + list(range(100, 200))


def test_failover_true_where_the_server_cannot(logical_cluster: Cluster) -> None:
    slot = f"x_{uuid.uuid4().hex[:12]}"
    with Supervisor(logical_cluster.dsn, slot=slot, failover=True, **FAST).start() as sup:
        if logical_cluster.version >= "17":
            sub = sup.worker().subscribe("ft", source="wal", timeout=30)
            assert sub is not None and sup.stats().slot_failover is True
            assert slot_on(logical_cluster, slot) == (True, False)
            # Not ready: nothing names a standby's slot on this lone server.
            wait_for(lambda: sup.stats().failover_ready is False, "the failover check")
        else:
            needs = r"failover=True\) needs PostgreSQL 17 .* is 1[56]\."
            with pytest.raises(WalSourceError, match=needs):
                sup.worker().subscribe("ft", source="wal", timeout=30)
    logical_cluster.sql(f"SELECT pg_drop_replication_slot(slot_name) FROM "
                        f"pg_replication_slots WHERE slot_name = '{slot}'")
    with pytest.raises(TypeError, match="failover is True, False or None"):
        Supervisor(logical_cluster.dsn, slot=slot, failover="yes")  # type: ignore[arg-type]


def test_a_standby_s_slot_follows_a_new_primary() -> None:
    """slot_dsn on a PostgreSQL 16 standby (the slot lives there): its primary fails over to
    another standby, and the slot's standby follows the new primary (a new timeline). Every
    message arrives once, in order, with no Gap; the LISTEN connection follows the primary."""
    with clusters() as (root, made):
        primary = logical_primary(root, made, 5474, "16")
        reader = primary.standby_made("reader", 5475)      # the slot is read here
        made.append(reader.started())
        other = primary.standby_made("other", 5476)        # the one promoted
        made.append(other.started())
        slot = f"s_{uuid.uuid4().hex[:12]}"
        with Supervisor(both(primary, other), slot=slot, slot_dsn=reader.dsn,
                        **FAST).start() as sup:
            sub = sup.worker().subscribe("fl", source="wal", timeout=60)
            with psycopg.connect(primary.dsn, autocommit=True) as conn:
                emit_many(conn, "fl", 0, 500, transactions=5)
                end = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            assert numbers(read(sub, 500)) == list(range(500))
            assert sup.stats().failover_ready is None       # a standby's own slot
            for standby in (reader, other):     # both have all of it: either may lead
                with psycopg.connect(standby.dsn) as s:
                    wait_for(lambda s=s: s.execute(   # type: ignore[misc]
                        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", end).fetchone()
                        == (True,), "the standbys to replay everything")
            primary.stop("immediate")
            other.promote()
            with psycopg.connect(reader.dsn, autocommit=True) as s:
                s.execute(f"ALTER SYSTEM SET primary_conninfo = "
                          f"'host={other.sock} port={other.port} user=postgres'")
                s.execute("SELECT pg_reload_conf()")
            with psycopg.connect(other.dsn, autocommit=True) as conn:
                wait_for(lambda: conn.execute("SELECT pg_is_in_recovery()").fetchone()
                         == (False,), "the promotion")
                emit_many(conn, "fl", 500, 500, transactions=5)
            assert numbers(read(sub, 500, timeout=60)) == list(range(500, 1000))
            with pytest.raises(TimeoutError):
                sub.get(timeout=1)
            assert sup.stats().slot_losses == 0
            wait_for(lambda: sup.stats().connected, "LISTEN on the new primary", timeout=60)


def test_a_standby_slot_that_is_missing_or_unused_is_warned_of(
    caplog: pytest.LogCaptureFixture
) -> None:
    """synchronized_standby_slots naming a slot that does not exist, or one no standby
    uses, holds back every logical reader on the primary: said, and not failover-ready."""
    with clusters() as (root, made):
        primary = logical_primary(root, made, 5477, "17")
        primary.sql("ALTER SYSTEM SET synchronized_standby_slots = 'ghost'")
        primary.sql("SELECT pg_reload_conf()")
        slot = f"w_{uuid.uuid4().hex[:12]}"
        with Supervisor(primary.dsn, slot=slot, **FAST).start() as sup:
            sup.worker().subscribe("ws", source="wal", timeout=30)
            wait_for(lambda: "names ghost, which is not a physical slot" in caplog.text,
                     "the warning of a missing standby slot")
            assert sup.stats().failover_ready is False and sup.stats().slot_failover is True
        primary.sql("SELECT pg_create_physical_replication_slot('unused')")
        primary.sql("ALTER SYSTEM SET synchronized_standby_slots = 'unused'")
        primary.sql("SELECT pg_reload_conf()")
        with Supervisor(primary.dsn, slot=slot, **FAST).start() as sup:
            sup.worker().subscribe("ws", source="wal", timeout=30)
            wait_for(lambda: "the standby's slot unused (synchronized_standby_slots) is not "
                     "in use" in caplog.text, "the warning of an unused standby slot")
            assert sup.stats().failover_ready is False
