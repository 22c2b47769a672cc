"""Table changes from the slot (subscribe_changes) on a real server: each row change of the
publication's tables arrives once, in commit order, decoded by its columns' types, through
everything that can happen to the replication connection, the server and the supervisor."""

from __future__ import annotations

import datetime
import decimal
import itertools
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
from fix_wal import FAST, drop_slot, on_server, read, walsender

import pglistener
from fix_supervisor import wait_for
from pglistener import UNCHANGED, Change, Gap, Supervisor, WalSourceError


def Sup(cluster: Cluster, slot: str, **options: Any) -> Supervisor:
    """A supervisor reading `slot` with a publication of the same name (each test's own)."""
    return Supervisor(cluster.dsn, slot=slot, publication=slot, **options)


@pytest.fixture
def table(logical_cluster: Cluster) -> Iterator[str]:
    """A fresh table `public.<name>` (id serial key, n int, note text)."""
    name = f"orders_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, n int, note text)")
    yield name
    with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:   # a server restart
        conn.execute(f"DROP TABLE IF EXISTS {name}")                     # ends the others


def ns(items: list[Any]) -> list[Any]:
    """Each change as (op, new n or old id), a Gap as its reason."""
    out: list[Any] = []
    for i in items:
        if isinstance(i, Gap):
            out.append(f"GAP:{i.reason}")
        elif i.op == "insert":
            out.append(i.new["n"])
        else:
            out.append((i.op, (i.new or i.old or {}).get("n", (i.old or {}).get("id"))))
    return out


def insert_many(dsn: str, table: str, first: int, count: int, transactions: int = 1) -> None:
    per = -(-count // transactions)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(first, first + count, per):
            stop = min(start + per, first + count)
            conn.execute(f"INSERT INTO {table} (n) SELECT generate_series(%s::int, %s::int)",
                         (start, stop - 1))


def take_rows(sub: Any, log: list[tuple[int, int, int]], done: threading.Event,
              problems: list[str], clock: Iterator[int], pause: float = 0.0) -> None:
    """A keyed group member's reader, for a thread: each change as (id, n, when handled)
    into log until done (or the subscription closes), what is not a change into problems."""
    try:
        while not done.is_set():
            try:
                item = sub.get(timeout=0.2)
            except TimeoutError:
                continue
            if not isinstance(item, Change):
                problems.append(f"{item!r}")
                continue
            log.append((item.new["id"], item.new["n"], next(clock)))
            time.sleep(pause)               # a reader with work to do
    except pglistener.SubscriptionClosed:
        pass


def stop_readers(done: threading.Event, readers: list[threading.Thread]) -> None:
    """take_rows() threads told to stop, and gone."""
    done.set()
    for t in readers:
        t.join()


# -- what a change says -----------------------------------------------------------------------


@pytest.mark.every_server
def test_every_kind_of_change_with_its_rows(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    with Sup(logical_cluster, slot).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        published = pg.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = %s "
                               "AND tablename = %s", (slot, table)).fetchone()
        assert published == (1,)            # added by the supervisor
        pg.execute(f"INSERT INTO {table} (n, note) VALUES (1, 'one'), (2, NULL)")
        pg.execute(f"UPDATE {table} SET n = 10 WHERE n = 1")
        pg.execute(f"UPDATE {table} SET id = 100 WHERE n = 2")      # the key changes
        pg.execute(f"DELETE FROM {table} WHERE n = 10")
        pg.execute(f"TRUNCATE {table}")
        items = read(sub, 6)
        assert all(isinstance(i, Change) and i.table == f"public.{table}" for i in items)
        assert [i.op for i in items] == ["insert", "insert", "update", "update", "delete",
                                         "truncate"]
        one, two, up, moved, gone, cut = items
        assert one.new == {"id": 1, "n": 1, "note": "one"} and one.old is None
        assert two.new == {"id": 2, "n": 2, "note": None}
        assert up.new == {"id": 1, "n": 10, "note": "one"}
        assert up.old is None           # REPLICA IDENTITY DEFAULT, key unchanged: none sent
        assert moved.old == {"id": 2} and moved.new["id"] == 100
        assert gone.old == {"id": 1} and gone.new is None      # the key's columns only
        assert cut.new is None and cut.old is None
        assert one.raw.new == {"id": "1", "n": "1", "note": "one"}
        assert one.commit_lsn == two.commit_lsn and one.lsn < two.lsn   # one transaction
        assert [i.position for i in items] == sorted({i.position for i in items})
        assert all(i.xid for i in items)
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.3)


def test_values_by_type_unchanged_toast_and_a_new_column(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    name = f"typed_{uuid.uuid4().hex[:8]}"
    pg.execute(f"""CREATE TABLE {name} (id int PRIMARY KEY, big bigint, num numeric,
                   t text, b bytea, ok bool, j jsonb, js json, at timestamptz, u uuid,
                   arr int[], tags text[], nothing int)""")
    pg.execute(f"ALTER TABLE {name} ALTER COLUMN t SET STORAGE EXTERNAL")   # TOASTed as is
    try:
        with Sup(logical_cluster, slot).start() as sup:
            sub = sup.worker().subscribe_changes([f"public.{name}"], timeout=30)
            at = datetime.datetime(2026, 12, 3, 15, 0, 1, 250000, tzinfo=datetime.timezone.utc)
            u = uuid.uuid4()
            long_text = "x" * 100_000
            pg.execute(f"INSERT INTO {name} VALUES (1, 9007199254740993, 1.10, %s, %s, true, "
                       f"%s, %s, %s, %s, %s, %s, NULL)",
                       (long_text, b"\x00\xff", psycopg.types.json.Jsonb({"a": [1, 2]}),
                        psycopg.types.json.Json([1]), at, u, [1, None, 3], ["a", "b c"]))
            pg.execute(f"UPDATE {name} SET big = 2 WHERE id = 1")   # t not changed: TOASTed
            pg.execute(f"ALTER TABLE {name} ADD COLUMN extra text DEFAULT 'e'")
            pg.execute(f"ALTER TABLE {name} DROP COLUMN nothing")
            pg.execute(f"UPDATE {name} SET big = 3, extra = 'f' WHERE id = 1")
            first, second, third = read(sub, 3)
            assert first.new == {"id": 1, "big": 9007199254740993,
                                 "num": decimal.Decimal("1.10"), "t": long_text,
                                 "b": b"\x00\xff", "ok": True, "j": {"a": [1, 2]}, "js": [1],
                                 "at": at, "u": u, "arr": [1, None, 3], "tags": ["a", "b c"],
                                 "nothing": None}
            assert second.new["t"] is UNCHANGED and second.new["big"] == 2
            assert second.raw.new["t"] is UNCHANGED and second.raw.new["num"] == "1.10"
            assert "extra" not in second.new
            assert third.new["extra"] == "f" and "nothing" not in third.new
            assert third.new["t"] is UNCHANGED
            assert repr(UNCHANGED) == "pglistener.UNCHANGED"
    finally:
        pg.execute(f"DROP TABLE {name}")


#: A database as one migrated from elsewhere may have it: each of these changes the text a
#: walsender writes a value in (it takes the database's settings), TimeZone the offset.
ODD_SETTINGS = {"DateStyle": "SQL, DMY", "IntervalStyle": "sql_standard",
                "extra_float_digits": "0", "bytea_output": "escape",
                "TimeZone": "Pacific/Kiritimati"}

#: Each column: its type and the value written, as SQL.
TYPED = {
    "i2": ("int2", "-32768"), "i4": ("int4", "2147483647"), "i8": ("int8", "-9007199254740993"),
    "num": ("numeric", "'123456789.000000001'"), "num_nan": ("numeric", "'NaN'"),
    "f4": ("float4", "'0.1'"), "f4_max": ("float4", "'3.4028235e38'"),
    "f8": ("float8", "0.1::float8 + 0.2::float8"), "f8_sub": ("float8", "'5e-324'"),
    "f8_17": ("float8", "'0.30000000000000004'"), "f8_nan": ("float8", "'NaN'"),
    "f8_inf": ("float8", "'-Infinity'"), "t": ("text", "E'quote \" back\\\\slash \\t'"),
    "b": ("bytea", "'\\x00ff5c27'"), "ok": ("bool", "false"),
    "js": ("json", "'{\"a\": [1, 2.5, null]}'"), "jb": ("jsonb", "'{\"b\": {\"c\": \"d\"}}'"),
    "d": ("date", "'2026-03-04'"), "tm": ("time", "'23:59:59.999999'"),
    "tz": ("timetz", "'12:34:56+05:30'"), "ts": ("timestamp", "'1999-12-31 23:59:59.5'"),
    "tstz": ("timestamptz", "'2026-03-04 05:06:07.08+00'"),
    "tstz_old": ("timestamptz", "'1850-01-01 00:00:00+00'"),
    "iv": ("interval", "'-1 year 2 mons -3 days 04:05:06.7'"), "u": ("uuid", "gen_random_uuid()"),
    "ip": ("inet", "'2001:db8::1/64'"), "cash": ("money", "'1234.56'"),
    "arr": ("int[]", "ARRAY[1, NULL, 3]"), "tarr": ("text[]", "ARRAY['a \"q\"', NULL, 'NULL']"),
    "mood": ("mood", "'happy'"), "dom": ("pos", "7"), "dom2": ("pos2", "8"),
    "doms": ("pos[]", "ARRAY[1, 2]::pos[]"),
    "pair": ("pair", "ROW(1, 'x y')"), "r": ("int4range", "'[1,5)'"),
    "tr": ("tstzrange", "'[2026-01-01 00:00+00, 2026-02-01 00:00+00)'"),
    "num_inf": ("numeric", "'Infinity'"), "nothing": ("int", "NULL"),
}


def same(a: Any, b: Any) -> bool:
    """Equal, with a NaN equal to a NaN (float or Decimal)."""
    if isinstance(a, (float, decimal.Decimal)) and type(a) is type(b) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


@pytest.mark.every_server
def test_values_are_the_values_written_whatever_the_databases_settings(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """A database whose settings change the text of a value (ODD_SETTINGS): every change's
    values are what psycopg's own SELECT of the row gives (a SELECT with settings psycopg
    can read: it parses neither another DateStyle's timestamps nor another IntervalStyle),
    a domain's by its base type's loader; a timestamp psycopg cannot hold comes as its text,
    the rest of the row loaded."""
    db = f"odd_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE DATABASE {db}")
    for name, value in ODD_SETTINGS.items():
        pg.execute(f"ALTER DATABASE {db} SET {name} = '{value}'")
    dsn = logical_cluster.dsn.replace("dbname=postgres", f"dbname={db}")
    readable = "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=1"
    try:
        with psycopg.connect(dsn, autocommit=True) as odd, \
                psycopg.connect(dsn, autocommit=True, options=readable) as plain:
            assert odd.execute("SHOW DateStyle").fetchone() == ("SQL, DMY",)
            odd.execute("CREATE TYPE mood AS ENUM ('sad', 'happy'); "
                        "CREATE DOMAIN pos AS int CHECK (VALUE > 0); CREATE DOMAIN pos2 AS pos; "
                        "CREATE TYPE pair AS (a int, b text)")
            columns = ", ".join(f"{c} {t}" for c, (t, _v) in TYPED.items())
            odd.execute(f"CREATE TABLE vals (id int PRIMARY KEY, {columns}, long text, "
                        f"ts_inf timestamp, tstz_inf timestamptz)")
            odd.execute("ALTER TABLE vals ALTER COLUMN long SET STORAGE EXTERNAL")
            with Supervisor(dsn, slot=slot, publication=slot).start() as sup:
                sub = sup.worker().subscribe_changes("vals", timeout=30)
                values = ", ".join(v for _t, v in TYPED.values())
                odd.execute(f"INSERT INTO vals VALUES (1, {values}, repeat('x', 100000), "
                            f"'infinity', '-infinity')")
                odd.execute("UPDATE vals SET i4 = 1 WHERE id = 1")     # long: unchanged
                inserted, updated = read(sub, 2)
                with plain.cursor(row_factory=psycopg.rows.dict_row) as cur:
                    row = cur.execute(f"SELECT id, {', '.join(TYPED)}, long FROM vals").fetchone()
                    assert row is not None
                    with pytest.raises(psycopg.DataError):      # psycopg cannot hold them
                        cur.execute("SELECT ts_inf FROM vals").fetchone()
                for column, value in row.items():
                    if column == "i4":
                        assert inserted.new[column] == 2147483647 and updated.new[column] == 1
                        continue
                    assert same(inserted.new[column], value), (column, inserted.new[column],
                                                               value)
                    if column != "long":
                        assert same(updated.new[column], value), column
                assert updated.new["long"] is UNCHANGED
                assert inserted.new["dom"] == 7 and inserted.new["dom2"] == 8
                assert inserted.new["f8"] == 0.1 + 0.2 and inserted.new["f8_sub"] == 5e-324
                assert inserted.new["d"] == datetime.date(2026, 3, 4)
                assert inserted.new["b"] == b"\x00\xff\\'"
                # What psycopg cannot load comes as its text, as the server wrote it.
                assert inserted.new["ts_inf"] == "infinity"
                assert inserted.new["tstz_inf"] == "-infinity"
                assert inserted.raw.new["ts_inf"] == "infinity"
                assert inserted.raw.new["d"] == "2026-03-04"        # what raw gives: ISO text
                assert inserted.raw.new["tstz"] == "2026-03-04 05:06:07.08+00"      # in UTC
                assert inserted.raw.new["iv"] == "-10 mons -3 days +04:05:06.7"
    finally:
        drop_slot(pg, slot)
        pg.execute(f"DROP DATABASE {db} WITH (FORCE)")


@on_server("18")
def test_generated_columns_come_as_the_server_sends_them(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """PostgreSQL 18 makes generated columns virtual by default, and never publishes those;
    a stored one is published once the publication says publish_generated_columns."""
    name = f"gen_{uuid.uuid4().hex[:8]}"
    pg.execute(f"""CREATE TABLE {name} (id int PRIMARY KEY, a int,
                   v int GENERATED ALWAYS AS (a * 2) VIRTUAL,
                   s int GENERATED ALWAYS AS (a * 3) STORED)""")
    try:
        with Sup(logical_cluster, slot).start() as sup:
            sub = sup.worker().subscribe_changes(name, timeout=30)
            pg.execute(f"INSERT INTO {name} (id, a) VALUES (1, 5)")
            pg.execute(f"ALTER PUBLICATION {slot} SET (publish_generated_columns = stored)")
            pg.execute(f"INSERT INTO {name} (id, a) VALUES (2, 7)")
            pg.execute(f"UPDATE {name} SET a = 8 WHERE id = 2")
            first, second, third = read(sub, 3)
            assert first.new == {"id": 1, "a": 5}
            assert second.new == {"id": 2, "a": 7, "s": 21}
            assert third.new == {"id": 2, "a": 8, "s": 24}
            assert second.raw.new == {"id": "2", "a": "7", "s": "21"}
    finally:
        pg.execute(f"DROP TABLE {name}")


def test_replica_identity_full_gives_the_whole_old_row(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    pg.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    with Sup(logical_cluster, slot).start() as sup:
        sub = sup.worker().subscribe_changes(table, ops={"update", "delete"}, timeout=30)
        pg.execute(f"INSERT INTO {table} (n, note) VALUES (1, 'a')")
        pg.execute(f"UPDATE {table} SET note = 'b'")
        pg.execute(f"DELETE FROM {table}")
        up, gone = read(sub, 2)        # ops=: the insert is not sent here
        assert (up.op, up.old, up.new) == ("update", {"id": 1, "n": 1, "note": "a"},
                                           {"id": 1, "n": 1, "note": "b"})
        assert (gone.op, gone.old) == ("delete", {"id": 1, "n": 1, "note": "b"})


def test_several_tables_one_stream_in_commit_order_beside_messages(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    other = f"{table}_b"
    pg.execute(f"CREATE TABLE {other} (id int PRIMARY KEY, n int)")
    try:
        with Sup(logical_cluster, slot).start() as sup:
            worker = sup.worker()
            both = worker.subscribe_changes([table, other], timeout=30)
            only = worker.subscribe_changes(other, ops="insert", timeout=30)
            messages = worker.subscribe(table, source="wal", timeout=30)
            with pg.transaction():
                pg.execute(f"INSERT INTO {other} VALUES (1, 1)")
                pglistener.emit(pg, table, "between")
                pg.execute(f"INSERT INTO {table} (n) VALUES (2)")
            pg.execute(f"INSERT INTO {table} (n) VALUES (3)")
            pg.execute(f"TRUNCATE {table}, {other}")
            got = read(both, 5)
            assert [(c.table.split(".")[1], c.op) for c in got] == [
                (other, "insert"), (table, "insert"), (table, "insert"),
                (table, "truncate"), (other, "truncate")]
            assert got[3].commit_lsn == got[4].commit_lsn and got[3].lsn < got[4].lsn
            assert [c.new["n"] for c in read(only, 1)] == [1]
            assert [m.payload for m in read(messages, 1)] == ["between"]  # a message apart
            with pytest.raises(TimeoutError):
                only.get(timeout=0.3)       # its truncate was not asked for
    finally:
        pg.execute(f"DROP TABLE {other}")


def test_bad_tables_and_ops_are_errors_that_say_what_to_do(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    with Sup(logical_cluster, slot).start() as sup:
        worker = sup.worker()
        with pytest.raises(WalSourceError, match="no such table: public.nope"):
            worker.subscribe_changes(["nope", table], timeout=30)
        pg.execute("CREATE OR REPLACE VIEW a_view AS SELECT 1 AS x")
        with pytest.raises(WalSourceError, match="not a table: public.a_view"):
            worker.subscribe_changes("a_view", timeout=30)
        with pytest.raises(ValueError, match="subset of"):
            worker.subscribe_changes(table, ops={"upsert"})
        with pytest.raises(ValueError, match="at least one table"):
            worker.subscribe_changes([])
        with pytest.raises(ValueError, match="give group= too"):
            worker.subscribe_changes(table, key=True)
        keyed = worker.subscribe_changes(table, group="k", key=True, timeout=30)
        with pytest.raises(ValueError, match="group 'k' is keyed"):    # said once the
            worker.subscribe_changes(table, group="k", timeout=30)     # table is found
        keyed.unsubscribe()
        with pytest.raises(ValueError, match="max_ring_bytes"):
            worker.subscribe_changes(table, ring_bytes=1 << 30, timeout=30)
        # A role that may not add the table to the publication is told what to run.
        role = f"r_{uuid.uuid4().hex[:8]}"
        pg.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
        pg.execute(f"GRANT SELECT ON {table} TO {role}")
        try:
            dsn = psycopg.conninfo.make_conninfo(logical_cluster.dsn, user=role)
            with Supervisor(dsn, slot=f"{slot}_r", publication=f"{slot}_p").start() as weak:
                with pytest.raises(WalSourceError, match=f"ALTER PUBLICATION .* ADD TABLE "
                                                         f"\"public\".\"{table}\""):
                    weak.worker().subscribe_changes(table, timeout=30)
                sub = sup.worker().subscribe_changes(table, timeout=30)   # the owner's works
                pg.execute(f"INSERT INTO {table} (n) VALUES (7)")
                assert ns(read(sub, 1)) == [7]
        finally:
            pg.execute(f"SELECT pg_drop_replication_slot('{slot}_r') FROM pg_replication_slots "
                       f"WHERE slot_name = '{slot}_r'")
            pg.execute(f"DROP PUBLICATION IF EXISTS {slot}_p")
            pg.execute(f"DROP OWNED BY {role}")
            pg.execute(f"DROP ROLE {role}")


def test_without_a_slot_changes_are_refused(logical_cluster: Cluster, table: str) -> None:
    with Supervisor(logical_cluster.dsn).start() as sup:
        with pytest.raises(ValueError, match="table changes need a supervisor that reads a slot"):
            sup.worker().subscribe_changes(table, timeout=30)


def test_a_10_mb_row_arrives_whole(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    big = os.urandom(5 * 1024 * 1024).hex()       # 10 MiB of text
    with Sup(logical_cluster, slot, max_ring_bytes=64 << 20).start() as sup:
        sub = sup.worker().subscribe_changes(table, ring_bytes=32 << 20, timeout=30)
        pg.execute(f"INSERT INTO {table} (n, note) VALUES (1, %s)", (big,))
        (change,) = read(sub, 1)
        assert change.new["note"] == big


# -- what a slot promises -----------------------------------------------------------------------


@pytest.mark.every_server
def test_killed_walsender_loses_nothing_and_repeats_nothing(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    total = 20_000
    with Sup(logical_cluster, slot, **FAST).start() as sup:
        worker = sup.worker()
        subs = [worker.subscribe_changes(table, timeout=30),
                worker.subscribe_changes(table, timeout=30, overflow="block",
                                         ring_bytes=16 * 1024)]
        producer = threading.Thread(target=insert_many,
                                    args=(logical_cluster.dsn, table, 0, total, 40))
        producer.start()
        got: list[list[Any]] = [[], []]
        kills = 0
        while len(got[1]) < total:
            for i, sub in enumerate(subs):
                got[i] += sub.get_many(4096, timeout=30)
            if kills < 3 and len(got[1]) > (kills + 1) * total // 5:
                pg.execute("SELECT pg_terminate_backend(%s)", (walsender(sup),))
                kills += 1
        producer.join()
        while len(got[0]) < total:
            got[0] += subs[0].get_many(4096, timeout=30)
        for items in got:
            assert ns(items) == list(range(total))
        assert sup.stats().wal_reconnects >= kills == 3


@pytest.mark.every_server
def test_a_publication_made_again_is_a_gap_not_a_stall(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A migration drops the publication and makes it again, with a row written between:
    pgoutput cannot decode that row (15-17 fail the stream at it for good, 18 on skip it).
    Every subscription of the slot gets Gap("slot") where it stood, the log names the
    publication, and what is written once the publication is back arrives: at once on 18
    on, and on 15-17 where test_decoding is on the server (it finds the end of the row's
    transaction; pgserver's PostgreSQL 16 lacks it, and then the slot passes everything up
    to when the supervisor looked: the Gap covers what was written meanwhile)."""
    with pg.cursor() as cur:
        try:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding', true)",
                        (f"{slot}_probe",))
            exact = True
        except psycopg.errors.UndefinedFile:
            exact = False
    pg.execute(f"SELECT pg_drop_replication_slot('{slot}_probe')") if exact else None
    exact = exact or logical_cluster.version >= "18"
    with Sup(logical_cluster, slot, **FAST).start() as sup:
        worker = sup.worker()
        sub = worker.subscribe_changes(table, timeout=30)
        messages = worker.subscribe("acc", source="wal", timeout=30)
        insert_many(logical_cluster.dsn, table, 1, 10)
        pglistener.emit(pg, "acc", "before")
        assert ns(read(sub, 10)) == list(range(1, 11))
        assert [m.payload for m in read(messages, 1)] == ["before"]
        pg.execute(f"DROP PUBLICATION {slot}")
        insert_many(logical_cluster.dsn, table, 11, 1)
        pg.execute(f"CREATE PUBLICATION {slot} FOR TABLE {table}")
        insert_many(logical_cluster.dsn, table, 12, 9, transactions=9)
        pglistener.emit(pg, "acc", "after")
        assert ns(read(sub, 1)) == ["GAP:slot"]
        got = read(messages, 1)
        assert isinstance(got[0], Gap) and got[0].reason == "slot"
        if exact:
            assert ns(read(sub, 9)) == list(range(12, 21))
            assert [m.payload for m in read(messages, 1)] == ["after"]
        insert_many(logical_cluster.dsn, table, 21, 5, transactions=5)
        got = []
        while not got or got[-1] != 25:
            got += ns(read(sub, 1))
        # Without test_decoding: of what was written before the supervisor looked, none
        # or a tail (the Gap said so); all of what came after, each once and in order.
        assert got == list(range(26 - len(got), 26)) and len(got) >= 5
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.3)
        assert sup.stats().slot_losses >= 1
    assert f"publication {slot!r}" in caplog.text
    if not exact:
        assert "test_decoding" in caplog.text


@pytest.mark.parametrize("logical_cluster", ["17", "18"], indirect=True, ids=["pg17", "pg18"])
def test_a_publication_dropped_for_good_is_made_again_with_its_tables(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Dropped and not made again: 17 fails the stream at the next change, 18 skips every
    change from then on. After a grace (a migration may be making it again itself), the
    supervisor makes it again with the tables subscribed to; the streams get their Gap, and
    what is written after it is back arrives."""
    with Sup(logical_cluster, slot, **FAST).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        insert_many(logical_cluster.dsn, table, 1, 3)
        assert ns(read(sub, 3)) == [1, 2, 3]
        pg.execute(f"DROP PUBLICATION {slot}")
        insert_many(logical_cluster.dsn, table, 4, 1)
        assert ns(read(sub, 1)) == ["GAP:slot"]
        wait_for(lambda: pg.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname "
                                    "= %s AND tablename = %s", (slot, table)).fetchone() == (1,),
                 "the publication made again with the table", timeout=60)
        insert_many(logical_cluster.dsn, table, 5, 3, transactions=3)
        assert ns(read(sub, 3)) == [5, 6, 7]
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.3)
    assert f"publication {slot!r} is gone" in caplog.text


@pytest.mark.every_server
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_loses_nothing(
    logical_cluster: Cluster, slot: str, table: str, mode: str
) -> None:
    with Sup(logical_cluster, slot, **FAST).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        insert_many(logical_cluster.dsn, table, 0, 1000, transactions=4)
        logical_cluster.restart(mode)
        insert_many(logical_cluster.dsn, table, 1000, 1000, transactions=4)
        assert ns(read(sub, 2000)) == list(range(2000))
        with pytest.raises(TimeoutError):
            sub.get(timeout=1)


@pytest.mark.every_server
def test_a_killed_supervisor_resumes_after_the_last_handled_change(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    sup = Sup(logical_cluster, slot).start()
    try:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        insert_many(logical_cluster.dsn, table, 0, 1000)
        handled = read(sub, 400)
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
    finally:
        sup.stop()
    insert_many(logical_cluster.dsn, table, 1000, 500)
    with Sup(logical_cluster, slot).start() as again:
        worker = again.worker()
        resumed = worker.subscribe_changes(table, after=handled[-1], timeout=30)
        fresh = worker.subscribe_changes(table, timeout=30)
        assert ns(read(resumed, 1100)) == list(range(400, 1500))
        pg.execute(f"INSERT INTO {table} (n) VALUES (1500)")
        assert ns(read(fresh, 1)) == [1500]


def test_a_multi_row_insert_record_keeps_every_row(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    """COPY writes many rows in one WAL record (they share its LSN): none is taken for a
    repeat of the one before."""
    with Sup(logical_cluster, slot).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        with pg.cursor() as cur, cur.copy(f"COPY {table} (n) FROM STDIN") as copy:
            for n in range(500):
                copy.write_row((n,))
        items = read(sub, 500)
        assert ns(items) == list(range(500))
        assert len({i.position for i in items}) == 500


def test_asyncio_and_pickling(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    import asyncio
    import pickle

    async def main(worker: pglistener.Worker) -> list[Any]:
        async with worker.subscribe_changes_async(table, timeout=30) as sub:
            pg.execute(f"INSERT INTO {table} (n) VALUES (5)")
            return [await sub.get(timeout=30)]

    with Sup(logical_cluster, slot).start() as sup:
        (change,) = asyncio.run(main(sup.worker()))
        again = pickle.loads(pickle.dumps(change))
        assert again == change and again.new == {"id": 1, "n": 5, "note": None}
        assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED


def test_snapshot_then_stream_gives_every_change_once(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    """The README's way: subscribe, then read the table in a REPEATABLE READ snapshot, then
    apply the changes the snapshot does not see. A transaction that commits between the
    subscribe and the snapshot is in both (skipped); one in progress when the snapshot is
    taken commits after it (applied); writers run throughout."""
    pg.execute(f"INSERT INTO {table} (n) SELECT generate_series(0, 99)")
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
            i = 1000
            while not stop.is_set():
                conn.execute(f"INSERT INTO {table} (n) VALUES (%s)", (i,))
                conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = %s", (i % 100 + 1,))
                conn.execute(f"DELETE FROM {table} WHERE id = (SELECT min(id) FROM {table} "
                             f"WHERE n >= 1000)")
                i += 1

    with Sup(logical_cluster, slot).start() as sup:
        sub = sup.worker().subscribe_changes(table, timeout=30)
        writer = threading.Thread(target=write)
        writer.start()
        pg.execute(f"INSERT INTO {table} (n) VALUES (-1)")          # in both: skipped
        pending = psycopg.connect(logical_cluster.dsn)
        pending.execute(f"INSERT INTO {table} (n) VALUES (-2)")     # seen by neither yet
        with psycopg.connect(logical_cluster.dsn) as snap_conn:
            snap_conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snap = pglistener.Snapshot.of(snap_conn)
            state = {row[0]: row[1] for row in snap_conn.execute(f"SELECT id, n FROM {table}")}
            snap_conn.rollback()
        pending.commit()                                            # after it: applied
        pending.close()
        stop.set()
        writer.join()
        marker = pg.execute(f"INSERT INTO {table} (n) VALUES (-3) RETURNING id").fetchone()
        assert marker is not None
        skipped = applied = 0
        while True:
            change = sub.get(timeout=30)
            assert isinstance(change, Change)
            if snap.sees(change):
                skipped += 1
                continue
            applied += 1
            if change.op == "delete":
                del state[change.old["id"]]
            else:
                state[change.new["id"]] = change.new["n"]
            if change.new and change.new["id"] == marker[0]:
                break
        final = dict(pg.execute(f"SELECT id, n FROM {table}").fetchall())
        assert state == final
        assert skipped >= 1 and applied >= 2
        assert -1 in state.values() and -2 in state.values()


def test_a_table_without_replica_identity_is_not_added(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """Published without a key, a table's UPDATEs and DELETEs would fail for every writer:
    the supervisor says so instead of adding it, and adds it once it has an identity."""
    name = f"keyless_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE TABLE {name} (n int)")
    try:
        with Sup(logical_cluster, slot).start() as sup:
            with pytest.raises(WalSourceError, match="no replica identity"):
                sup.worker().subscribe_changes(name, timeout=30)
            pg.execute(f"INSERT INTO {name} VALUES (1)")
            pg.execute(f"UPDATE {name} SET n = 2")          # still allowed: not published
            pg.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
            sub = sup.worker().subscribe_changes(name, timeout=30)
            pg.execute(f"UPDATE {name} SET n = 3")
            (change,) = read(sub, 1)
            assert (change.old, change.new) == ({"n": 2}, {"n": 3})
    finally:
        pg.execute(f"DROP TABLE {name}")


def test_writes_while_the_slot_is_made_do_not_break_it(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    """pgoutput reads the publication as of each change it decodes: a change committed
    after the slot was made and before its publication would fail the stream for good
    ("publication ... does not exist"). The supervisor makes the publication first."""
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(logical_cluster.dsn, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(f"INSERT INTO {table} (n) VALUES (0)")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        with Sup(logical_cluster, slot).start() as sup:
            sub = sup.worker().subscribe("after-setup", source="wal", timeout=30)
            pglistener.emit(pg, "after-setup", "arrived")
            assert read(sub, 1)[0].payload == "arrived"
            assert sup.stats().wal_reconnects == 0
    finally:
        stop.set()
        writer.join()


@pytest.mark.parametrize("logical_cluster", ["16", "17"], indirect=True, ids=["pg16", "pg17"])
def test_reading_changes_on_a_standby_restarted_and_promoted(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    """slot_dsn names a hot standby: the table is added to the publication on the primary,
    its rows changed there arrive from the standby's slot, through a restart of the standby
    and its promotion, each once and in order."""
    standby = logical_cluster.standby(f"standby_{slot}", logical_cluster.port + 1)
    try:
        with Supervisor(logical_cluster.dsn, slot=slot, slot_dsn=standby.dsn, publication=slot,
                        **FAST).start() as sup:
            sub = sup.worker().subscribe_changes(table, timeout=60)
            with psycopg.connect(standby.dsn) as s:
                assert s.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                assert s.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name "
                                 "= %s", (slot,)).fetchone() == (1,)
            insert_many(logical_cluster.dsn, table, 0, 500, transactions=5)
            assert ns(read(sub, 500)) == list(range(500))
            standby.restart("fast")
            insert_many(logical_cluster.dsn, table, 500, 500, transactions=5)
            assert ns(read(sub, 500)) == list(range(500, 1000))
            standby.promote()
            with psycopg.connect(standby.dsn, autocommit=True) as promoted:
                wait_for(lambda: promoted.execute("SELECT pg_is_in_recovery()").fetchone()
                         == (False,), "the promotion")
            insert_many(standby.dsn, table, 1000, 300)      # writes go to the new primary
            assert ns(read(sub, 300)) == list(range(1000, 1300))
            with pytest.raises(TimeoutError):
                sub.get(timeout=1)
    finally:
        standby.stop("immediate")


def test_a_slot_on_a_standby_is_made_once_the_publication_is_there(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    """slot_dsn: the publication is made on the primary, the slot on the standby. While the
    standby has not replayed the publication, the supervisor waits for it before making the
    slot (a slot made first fails at what comes between); then every row arrives, no Gap."""
    caplog.set_level(logging.INFO, logger="pglistener")
    standby = logical_cluster.standby(f"standby_{slot}", logical_cluster.port + 1)
    try:
        with psycopg.connect(standby.dsn, autocommit=True) as s:
            s.execute("SELECT pg_wal_replay_pause()")
            with Supervisor(logical_cluster.dsn, slot=slot, slot_dsn=standby.dsn,
                            publication=slot, **FAST).start() as sup:
                worker = sup.worker()
                subs: list[Any] = []
                subscriber = threading.Thread(
                    target=lambda: subs.append(worker.subscribe_changes(table, timeout=60)))
                subscriber.start()
                wait_for(lambda: "to reach the standby" in caplog.text,
                         "the supervisor to wait for the publication")
                assert s.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name "
                                 "= %s", (slot,)).fetchone() == (0,)
                s.execute("SELECT pg_wal_replay_resume()")
                subscriber.join()
                insert_many(logical_cluster.dsn, table, 0, 100, transactions=4)
                assert ns(read(subs[0], 100)) == list(range(100))
                with pytest.raises(TimeoutError):
                    subs[0].get(timeout=0.3)
    finally:
        standby.stop("immediate")


def test_a_keyed_group_keeps_each_key_in_order_across_members(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """group=, key=True: every change of one row goes to one member while it lives, so each
    row's changes are handled in order across the group; a member that leaves hands its
    rows (and what it had not consumed) to the others, still in order."""
    import random

    table = f"kv_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)")
    keys, rounds = 40, 50
    try:
        with Sup(logical_cluster, slot).start() as sup:
            worker = sup.worker()
            members = [worker.subscribe_changes(table, group="g", key=True, timeout=30)
                       for _ in range(4)]
            logs: list[list[tuple[int, int, int]]] = [[] for _ in members]
            done = threading.Event()
            problems: list[str] = []
            clock = itertools.count()
            readers = [threading.Thread(target=take_rows, args=(members[k], logs[k], done,
                                                                problems, clock))
                       for k in range(4)]
            for t in readers:
                t.start()
            pg.execute(f"INSERT INTO {table} SELECT i, 0 FROM generate_series(1, {keys}) i")
            order = [k for k in range(1, keys + 1) for _ in range(rounds)]
            random.Random(7).shuffle(order)
            for i in range(0, len(order), 20):
                with pg.transaction():
                    for k in order[i:i + 20]:
                        pg.execute(f"UPDATE {table} SET n = n + 1 WHERE id = %s", (k,))
                if i == len(order) // 2:
                    members[3].unsubscribe()        # its rows go to the others
            total = keys * (rounds + 1)
            wait_for(lambda: sum(map(len, logs)) >= total, "every change to be handled")
            stop_readers(done, readers)
    finally:
        pg.execute(f"DROP TABLE {table}")
    assert not problems
    got = sorted((key, n) for log in logs for key, n, _at in log)
    assert got == [(k, n) for k in range(1, keys + 1) for n in range(rounds + 1)]  # once each
    holders = []
    for k in range(1, keys + 1):
        parts = sorted(([n for key, n, _at in log if key == k] for log in logs), key=lambda p:
                       p[0] if p else -1)
        parts = [p for p in parts if p]
        for p in parts:
            assert p == sorted(p), f"row {k} out of order at one member: {p}"
        for before, after in itertools.pairwise(parts):
            assert before[-1] < after[0], f"row {k} at two members at once: {parts}"
        holders.append(len(parts))
        if not any(key == k for key, _n, _at in logs[3]):
            assert len(parts) == 1, f"row {k} moved without its member leaving: {parts}"
    assert sum(1 for log in logs[:3] if log) >= 2         # the rows are spread
    assert any(n > 1 for n in holders)                    # some moved with member 3


def test_a_keyed_group_rebalances_as_members_join_under_load(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """Members join a keyed group one at a time while rows change, and one leaves: each that
    joins takes a share of the rows from the others, each row once its old member has
    handled what it had of it (so the row's order holds). Every change once, and each row's
    changes handled in order, by when they were handled. A row moves when its member has
    caught up with it: in the second round, after the first is handled, the members that
    joined have their share."""
    import random

    table = f"kr_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)")
    keys, rounds, second = 64, 40, 5
    clock = itertools.count()
    members: list[Any] = []
    logs: list[list[tuple[int, int, int]]] = []
    problems: list[str] = []
    done = threading.Event()
    readers: list[threading.Thread] = []

    def update(count: int, seed: int) -> None:
        order = [k for k in range(1, keys + 1) for _ in range(count)]
        random.Random(seed).shuffle(order)
        step = len(order) // 5
        for i in range(0, len(order), 32):
            with pg.transaction():
                for k in order[i:i + 32]:
                    pg.execute(f"UPDATE {table} SET n = n + 1 WHERE id = %s", (k,))
            if seed == 1 and i and i % step < 32:
                if len(members) < 4:
                    join()                      # takes its share from the others
                else:
                    members[1].unsubscribe()    # its rows go to the others

    try:
        with Sup(logical_cluster, slot).start() as sup:
            def join() -> None:
                members.append(sup.worker().subscribe_changes(table, group="g", key=True,
                                                              timeout=30))
                logs.append([])
                readers.append(threading.Thread(target=take_rows, args=(
                    members[-1], logs[-1], done, problems, clock, 0.0005)))
                readers[-1].start()

            join()
            pg.execute(f"INSERT INTO {table} SELECT i, 0 FROM generate_series(1, {keys}) i")
            update(rounds, 1)
            total = keys * (rounds + 1)
            wait_for(lambda: sum(map(len, logs)) >= total or problems, "the first round")
            marks = [len(log) for log in logs]
            update(second, 2)
            wait_for(lambda: sum(map(len, logs)) >= total + keys * second or problems,
                     "the second round")
            stop_readers(done, readers)
    finally:
        pg.execute(f"DROP TABLE {table}")
    assert not problems
    final = rounds + second
    got = sorted((k, n) for log in logs for k, n, _ in log)
    assert got == [(k, n) for k in range(1, keys + 1) for n in range(final + 1)]  # once each
    for k in range(1, keys + 1):
        handled = sorted((at, n) for log in logs for key, n, at in log if key == k)
        assert [n for _at, n in handled] == list(range(final + 1)), f"row {k} out of order"
    later = [{k for k, _n, _at in log[mark:]} for log, mark in zip(logs, marks, strict=True)]
    assert later[2] and later[3], f"rows per member in the second round: {later}"


def test_a_keyed_group_keeps_rows_of_a_full_identity_table_by_primary_key(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """REPLICA IDENTITY FULL sends the whole row as its identity, whose values change with
    each update: a keyed group routes such a table's rows by its primary key instead, so
    each row's changes stay with one member, in order."""
    table = f"kf_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int, note text)")
    pg.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    try:
        with Sup(logical_cluster, slot).start() as sup:
            members = [sup.worker().subscribe_changes(table, group="g", key=True, timeout=30)
                       for _ in range(3)]
            pg.execute(f"INSERT INTO {table} SELECT i, 0, 'x' FROM generate_series(1, 12) i")
            for _ in range(10):
                pg.execute(f"UPDATE {table} SET n = n + 1, note = md5(random()::text)")
            pg.execute(f"DELETE FROM {table} WHERE id <= 3")
            got: list[list[Any]] = [[] for _ in members]

            def drained() -> bool:
                for items, member in zip(got, members, strict=True):
                    try:
                        items += member.get_many(1000, timeout=0.05)
                    except TimeoutError:
                        pass        # nothing for this one yet: the others may have
                return sum(map(len, got)) >= 12 * 11 + 3

            wait_for(drained, "every change")
    finally:
        pg.execute(f"DROP TABLE {table}")
    holders: dict[int, set[int]] = {}
    for k, items in enumerate(got):
        for item in items:
            row = item.new or item.old
            holders.setdefault(row["id"], set()).add(k)
        for row_id in {(i.new or i.old)["id"] for i in items}:
            ns_ = [(i.new or i.old)["n"] for i in items if (i.new or i.old)["id"] == row_id]
            assert ns_ == sorted(ns_), f"row {row_id} out of order: {ns_}"
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len({next(iter(h)) for h in holders.values()}) >= 2     # the rows are spread


def test_keyed_messages_keep_each_key_in_order_in_a_group(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """emit(..., key=) with subscribe(..., group=, key=True): each key's messages go to one
    member, in order, also after a member leaves; a plain reader of the channel gets every
    message, its channel as emitted and its key beside it."""
    import random

    with Sup(logical_cluster, slot).start() as sup:
        worker = sup.worker()
        plain = worker.subscribe("jobs", source="wal", timeout=30)
        members = [worker.subscribe("jobs", source="wal", group="m", key=True, timeout=30)
                   for _ in range(3)]
        sent = [(f"k{k}", i) for i in range(30) for k in range(20)]
        random.Random(3).shuffle(sent)
        seq: dict[str, int] = {}
        ordered = []
        for key, _ in sent:
            seq[key] = seq.get(key, -1) + 1
            ordered.append((key, seq[key]))
        logs: list[list[tuple[str, int]]] = [[] for _ in members]

        def drain(of: range, total: int) -> None:
            """Read these members until `total` messages came to the group in all (what was
            sent so far: nothing more can come), however slow the machine is."""
            deadline = time.monotonic() + 60
            while sum(map(len, logs)) < total:
                assert time.monotonic() < deadline, f"{sum(map(len, logs))} of {total} came"
                for k in of:
                    try:
                        item = members[k].get(timeout=0.05)
                    except TimeoutError:
                        continue
                    key, n = item.payload.split(":")
                    assert item.key == key and item.channel == "jobs"
                    logs[k].append((key, int(n)))

        for i in range(0, len(ordered), 50):
            with pg.transaction():
                for key, n in ordered[i:i + 50]:
                    pglistener.emit(pg, "jobs", f"{key}:{n}", key=key)
            if i == 300:
                drain(range(3), i + 50)
                members[2].unsubscribe()
        drain(range(2), len(ordered))
        got_plain = read(plain, len(ordered))
        assert [(n.key, n.payload) for n in got_plain] == [(k, f"{k}:{n}") for k, n in ordered]
        assert {n.channel for n in got_plain} == {"jobs"}
        assert sorted(e for log in logs for e in log) == sorted(ordered)    # each once
        for key in seq:
            parts = [[n for k, n in log if k == key] for log in logs]
            parts = sorted((p for p in parts if p), key=lambda p: p[0])
            flat = [n for p in parts for n in p]
            assert flat == list(range(seq[key] + 1)), f"{key}: {parts}"
        with pytest.raises(pglistener.InvalidChannelName, match="x1f"):
            pglistener.emit(pg, "a\x1fb", "x")
        with pytest.raises(ValueError, match="give group= and source='wal'"):
            worker.subscribe("jobs", key=True)


def test_subscribe_json_takes_key_as_subscribe_does(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection
) -> None:
    """subscribe_json() and subscribe_json_async() take key= (they had drifted without it):
    each key's values go to one member of the group, decoded, in order."""
    import asyncio

    with Sup(logical_cluster, slot).start() as sup:
        worker = sup.worker()

        async def open_async() -> Any:
            return await worker.subscribe_json_async("jsonjobs", source="wal", group="j",
                                                     key=True, timeout=30)

        loop = asyncio.new_event_loop()
        try:
            members: list[Any] = [
                worker.subscribe_json("jsonjobs", source="wal", group="j", key=True,
                                      timeout=30),
                worker.subscribe_json("jsonjobs", source="wal", group="j", key=True,
                                      timeout=30),
                loop.run_until_complete(open_async())]
            with pg.transaction():
                for i in range(20):
                    for key in ("a", "b", "c", "d"):
                        pglistener.emit_json(pg, "jsonjobs", {"key": key, "n": i}, key=key)
            got: list[list[Any]] = [[] for _ in members]
            deadline = time.monotonic() + 60
            while sum(map(len, got)) < 80:
                assert time.monotonic() < deadline, f"{sum(map(len, got))} of 80 came"
                for k, member in enumerate(members):
                    try:
                        if k == 2:
                            value = loop.run_until_complete(member.get(timeout=0.05))
                        else:
                            value = member.get(timeout=0.05)
                    except TimeoutError:
                        continue
                    got[k].append(value)
            for key in "abcd":
                holders = [k for k, values in enumerate(got)
                           if any(v["key"] == key for v in values)]
                assert len(holders) == 1, (key, got)
                assert [v["n"] for v in got[holders[0]] if v["key"] == key] == list(range(20))
            with pytest.raises(ValueError, match="give group= and source='wal'"):
                worker.subscribe_json("jsonjobs", key=True)
            with pytest.raises(ValueError, match="give group= and source='wal'"):
                loop.run_until_complete(worker.subscribe_json_async("jsonjobs", group="j",
                                                                    key=True))
            loop.run_until_complete(members[2].unsubscribe())
        finally:
            loop.close()


def test_many_subscribes_to_a_new_table_at_once_all_succeed(
    logical_cluster: Cluster, slot: str, pg: psycopg.Connection, table: str
) -> None:
    """Each finds the table missing from the publication and adds it: the ones that lose
    the race ("already member of publication") are answered as subscribed all the same."""
    import asyncio

    async def main(worker: pglistener.Worker) -> list[Any]:
        subs = await asyncio.gather(*(worker.subscribe_changes_async(table, timeout=30)
                                      for _ in range(6)))
        pg.execute(f"INSERT INTO {table} (n) VALUES (9)")
        got = [await sub.get(timeout=30) for sub in subs]
        for sub in subs:
            await sub.unsubscribe()
        return got

    with Sup(logical_cluster, slot).start() as sup:
        got = asyncio.run(main(sup.worker()))
        assert [c.new["n"] for c in got] == [9] * 6
