"""The benchmark's scenarios, as data, and the producers that drive them.

Every scenario runs every system that applies, on the same server with the same workload.
Systems that read in one process (raw, psycopg, asyncpg) take part with one reader, or fan out
in-process to the scenario's handlers where that is how they would be used ("in-process" in
the output); the others run one process per reader.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from .systems import CHANGES_GROUP_ROWS, CHANGES_TABLE, END, JOBS, changes_group_total

#: Systems, in the order the tables list them; the first is the reference of the ratios.
ONE_PROCESS = ("raw", "psycopg", "asyncpg")

#: pglistener read the ways a user writes it (the README's code): get_many, for, a callback,
#: async for.
READ_PATHS = ("pglistener", "pglistener-for", "pglistener-callback", "pglistener-async")


#: The produce scenario's systems: pgbench scripts, one transaction each.
PRODUCE_SQL = {
    "insert+notify": "BEGIN;\nINSERT INTO bench_produce (v) VALUES (1);\n"
                     "SELECT pg_notify('bench_produce', 'x');\nCOMMIT;\n",
    "insert+emit": "BEGIN;\nINSERT INTO bench_produce (v) VALUES (1);\n"
                   "SELECT pg_logical_emit_message(true, 'bench_produce', 'x');\nCOMMIT;\n",
    "notify": "SELECT pg_notify('bench_produce', 'x');\n",
    "emit": "SELECT pg_logical_emit_message(true, 'bench_produce', 'x');\n",
    "emit-nontx": "SELECT pg_logical_emit_message(false, 'bench_produce', 'x');\n",
}
PRODUCERS = tuple(PRODUCE_SQL)

#: Systems that read the WAL source; the others read NOTIFY.
#: wal-hosts: k supervisors on one server, each reading NOTIFY or (-wal) a slot of its own.
HOSTS = (1, 2, 4)
HOST_SYSTEMS = tuple(f"{kind}-x{k}" for k in HOSTS for kind in ("pglistener", "pglistener-wal"))

#: Table changes (the slot's publication): the C loop, psycopg2 with a Python pgoutput
#: decoder (the peers' way), and `for change in sub`.
CHANGES_SYSTEMS = ("raw-changes", "psycopg2-changes", "pglistener-changes-for")
#: The systems that read in a database of their own (a temporary slot each).
PEER_SYSTEMS = ("raw-wal", "psycopg2-wal", "raw-changes", "psycopg2-changes")

WAL_SYSTEMS = ("raw-wal", "psycopg2-wal", "pglistener-wal", "pglistener-wal-for",
               "pglistener-wal-group", *HOST_SYSTEMS[1::2], *CHANGES_SYSTEMS,
               "pglistener-changes-group")


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    kind: str                   # "count", "latency", "live" or "idle"
    systems: tuple[str, ...]
    channels: int = 1
    many_readers: bool = False  # --workers readers (else one)
    payload_bytes: int = 16
    notifications: int = 0      # count: the backlog
    quick_notifications: int = 0
    seconds: float = 0.0        # latency and live: how long the producer runs
    rate: int = 0               # latency: notifications per second
    ring_bytes: int = 0         # pglistener's ring for this scenario (0: the bench's)
    pause_s: float = 0.0        # readers sleep this long after each 1000: a bounded rate
    shared: bool = False        # the readers share the backlog (a work queue), not each all
    source: str = "notify"      # what the producer sends: "notify", "wal", or "both" (each
                                # system gets its own: a "-wal" system WAL messages), or
                                # "changes" (rows inserted into the changes table)
    per_transaction: bool = False   # count: one notification per transaction, not one for all
    with_row: bool = False      # latency: each transaction writes a row beside its announcement


SCENARIOS = {s.name: s for s in [
    Scenario("drain", "a backlog on one channel, one reader taking Notification objects",
             "count", ("raw", *READ_PATHS, "pglistener-dispatch", "psycopg", "asyncpg"),
             notifications=1_000_000, quick_notifications=500_000),
    Scenario("fanout", "a backlog on one channel, every reader gets all of it",
             "count", ("pglistener", "conn-per-worker", "mp-queue", "psycopg", "asyncpg"),
             many_readers=True, notifications=200_000, quick_notifications=200_000),
    Scenario("spread", "a backlog over 100 channels, each reader on its share of them",
             "count", ("raw", "pglistener", "conn-per-worker", "mp-queue", "psycopg", "asyncpg"),
             channels=100, many_readers=True, notifications=200_000,
             quick_notifications=200_000),
    Scenario("payload200", "like drain, with 200-byte payloads",
             "count", ("raw", *READ_PATHS, "pglistener-dispatch", "psycopg", "asyncpg"),
             payload_bytes=200, notifications=300_000, quick_notifications=300_000),
    Scenario("latency", "one NOTIFY per transaction at a steady rate: commit-to-reader",
             "latency", ("raw", "pglistener", "psycopg", "asyncpg"), seconds=3.0, rate=2000),
    Scenario("live", "a producer at full speed while every reader consumes",
             "live", ("pglistener", "conn-per-worker", "mp-queue", "psycopg"),
             many_readers=True, seconds=3.0),
    Scenario("burst", "a burst in one transaction to one reader with a 64 KiB ring that reads "
             "at a bounded rate (4 ms per 1000): missed, and the rate",
             "count", ("pglistener-gap", "pglistener-block", "psycopg"),
             notifications=1_000_000, quick_notifications=100_000, ring_bytes=64 * 1024,
             pause_s=0.004),
    Scenario("group", "a backlog of jobs, one notification each, for 4 processes to handle "
             "each once: a consumer group against listeners racing on SKIP LOCKED",
             "count", ("pglistener-group", "skip-locked"), many_readers=True, shared=True,
             notifications=20_000, quick_notifications=10_000),
    Scenario("idle", "CPU of the supervisor and of a reader blocked in get(), nothing sent",
             "idle", ("pglistener",), seconds=2.0),
    # -- the WAL source (a server with wal_level = logical) ----------------------------------
    Scenario("produce", "the producer ceiling: 16 clients, each transaction an INSERT and its "
             "announcement, or the announcement alone (pgbench, synchronous_commit on)",
             "produce", PRODUCERS, seconds=5.0),
    Scenario("wal-drain", "a backlog of logical decoding messages in one transaction, one "
             "reader: the replication protocol's C loop, pglistener, psycopg2",
             "count", ("raw-wal", "pglistener-wal-for", "pglistener-wal", "psycopg2-wal"),
             notifications=1_000_000, quick_notifications=300_000, source="wal"),
    # 200k: a round of 40k lasted half a second, short enough for one stall of the machine
    # to move it by a fifth (rounds 0.64 to 1.06x the C loop between full runs).
    Scenario("wal-tx", "messages one per transaction, as an application sends them, one "
             "reader: does it keep up with the server's decoding?",
             "count", ("raw-wal", "pglistener-wal-for"), notifications=200_000,
             quick_notifications=20_000, source="wal", per_transaction=True),
    # With a row in each transaction, as applications announce what they wrote: a transaction
    # that only NOTIFYs writes no WAL before its commit record, so its commit does not wait
    # for the WAL flush (fdatasync), which one that emits (or writes a row) does.
    Scenario("wal-latency", "a row and its announcement per transaction at a steady rate: "
             "commit-to-reader, NOTIFY beside the WAL source, and each for a plain client "
             "(psycopg's notifies(), psycopg2's consume_stream())", "latency",
             ("pglistener", "pglistener-wal", "psycopg", "psycopg2-wal"),
             seconds=3.0, rate=2000, source="both", with_row=True),
    Scenario("wal-fanout", "a backlog on one channel, every reader gets all of it: NOTIFY and "
             "the WAL source", "count", ("pglistener", "pglistener-wal"), many_readers=True,
             notifications=200_000, quick_notifications=200_000, source="both"),
    Scenario("wal-hosts", "1, 2 and 4 supervisors (as many hosts), each with its own slot and a "
             "reader of everything, beside as many NOTIFY supervisors: what each slot costs the "
             "server (its walsender's CPU) and what each supervisor delivers", "hosts",
             HOST_SYSTEMS, notifications=200_000, quick_notifications=50_000, source="both"),
    Scenario("changes-drain", "1M single-row inserts in one transaction, read as row changes "
             "from the slot, each row decoded: the C loop (decoding nothing), pglistener's "
             "`for change in sub`, psycopg2's consume_stream with a Python pgoutput decoder",
             "count", CHANGES_SYSTEMS, notifications=1_000_000, quick_notifications=200_000,
             source="changes"),
    Scenario("changes-group", "1000 rows updated over and over in one transaction, their "
             "changes shared by 4 processes in a keyed consumer group (key=True): each row's "
             "changes at one member, in order, each once", "count",
             ("pglistener-changes-group",), many_readers=True, shared=True,
             notifications=200_000, quick_notifications=50_000, source="changes"),
    Scenario("wal-group", "a backlog of jobs for 4 processes to handle each once, through a "
             "consumer group on the WAL source", "count", ("pglistener-wal-group",),
             many_readers=True, shared=True, notifications=100_000,
             quick_notifications=50_000, source="wal"),
]}

#: The figure each kind of scenario is judged by.
FIGURE = {"count": "deliveries_per_s", "latency": "p99_us", "live": "keep_up",
          "produce": "tps", "hosts": "per_reader_per_s"}


def channel_names(scenario: Scenario) -> list[str]:
    return [f"bench_{scenario.name}_{i}" for i in range(scenario.channels)]


def shares(channels: list[str], readers: int) -> list[list[str]]:
    """Each reader's channels: all of them with one channel, else an equal share."""
    if len(channels) == 1:
        return [channels] * readers
    return [channels[k::readers] for k in range(readers)]


def expected(scenario: Scenario, n: int, share: list[str]) -> int:
    """How many of n backlog notifications land on `share` (the i-th goes to channel
    i % channels)."""
    names = channel_names(scenario)
    if len(names) == 1:
        return n
    per, extra = divmod(n, len(names))
    return sum(per + (names.index(c) < extra) for c in share)


def produce_jobs(conn: psycopg.Connection[Any], scenario: Scenario, n: int,
                 readers: int) -> None:
    """n jobs in a fresh table and a notification for each, then an end marker per reader,
    in one transaction."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {JOBS} (id int PRIMARY KEY, "  # noqa: S608
                 f"claimed bool NOT NULL DEFAULT false)")
    # What a well-kept queue table has: the next unclaimed job found by index, not by a scan.
    conn.execute(f"CREATE INDEX IF NOT EXISTS {JOBS}_unclaimed ON {JOBS} (id) "  # noqa: S608
                 f"WHERE NOT claimed")
    channel = channel_names(scenario)[0]
    with conn.transaction():
        conn.execute(f"TRUNCATE {JOBS}")
        conn.execute(f"INSERT INTO {JOBS} (id) SELECT generate_series(1, %s)", [n])
        conn.execute("SELECT count(pg_notify(%s, i::text)) FROM generate_series(1, %s) i",
                     [channel, n])
        conn.execute("SELECT count(pg_notify(%s, %s)) FROM generate_series(1, %s)",
                     [channel, END, readers])


def produce_wal_jobs(conn: psycopg.Connection[Any], scenario: Scenario, n: int,
                     readers: int) -> None:
    """n jobs as logical decoding messages in one transaction, then an end marker per
    reader."""
    channel = channel_names(scenario)[0]
    with conn.transaction():
        conn.execute("SELECT count(pg_logical_emit_message(true, %s, i::text)) "
                     "FROM generate_series(1, %s) i", [channel, n])
        conn.execute("SELECT count(pg_logical_emit_message(true, %s, %s)) "
                     "FROM generate_series(1, %s)", [channel, END, readers])


def produce_wal_backlog(conn: psycopg.Connection[Any], scenario: Scenario, n: int) -> None:
    """n distinct logical decoding messages: in one transaction, or one per transaction
    (pipelined, 500 statements a batch)."""
    channel = channel_names(scenario)[0]
    if not scenario.per_transaction:
        conn.execute("SELECT count(pg_logical_emit_message(true, %s, lpad(i::text, %s, '0'))) "
                     "FROM generate_series(1, %s) i", [channel, scenario.payload_bytes, n])
        return
    with conn.cursor() as cur:
        for start in range(0, n, 500):
            cur.executemany("SELECT pg_logical_emit_message(true, %s, %s)",
                            [(channel, str(i).zfill(scenario.payload_bytes))
                             for i in range(start, min(n, start + 500))])


def produce_changes_updates(conn: psycopg.Connection[Any], n: int) -> None:
    """changes-group: the rows inserted, then every row updated (n + 1) a whole number of
    times, in one transaction: changes_group_total(n) changes."""
    rounds = changes_group_total(n) // CHANGES_GROUP_ROWS - 1
    conn.execute(f"TRUNCATE {CHANGES_TABLE} RESTART IDENTITY")
    with conn.transaction():
        conn.execute(f"INSERT INTO {CHANGES_TABLE} (n) SELECT 0 FROM generate_series(1, %s)",
                     [CHANGES_GROUP_ROWS])
        for _ in range(rounds):
            conn.execute(f"UPDATE {CHANGES_TABLE} SET n = n + 1")


def produce_changes(conn: psycopg.Connection[Any], n: int) -> None:
    """n rows inserted in one transaction (n = 1 .. n), each a row change; the table is
    emptied first (its truncate comes before them)."""
    conn.execute(f"TRUNCATE {CHANGES_TABLE} RESTART IDENTITY")
    conn.execute(f"INSERT INTO {CHANGES_TABLE} (n) SELECT generate_series(1, %s)", [n])


def produce_backlog(conn: psycopg.Connection[Any], scenario: Scenario, n: int) -> None:
    """n distinct notifications in one transaction."""
    names = channel_names(scenario)
    prefix = names[0].rsplit("_", 1)[0] + "_"
    channel = "%s || ((i - 1) %% %s)::text" if scenario.channels > 1 else "%s"
    params: list[Any] = [prefix, scenario.channels] if scenario.channels > 1 else [names[0]]
    conn.execute(
        f"SELECT count(pg_notify({channel}, lpad(i::text, %s, '0'))) "  # noqa: S608 - no input
        f"FROM generate_series(1, %s) i", [*params, scenario.payload_bytes, n])


#: The table wal-latency writes a row into with each announcement (in no publication).
ROWS_TABLE = "bench_rows"


def make_rows_table(conn: psycopg.Connection[Any]) -> None:
    """ROWS_TABLE in conn's database, where it is missing."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {ROWS_TABLE} "
                 f"(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)")


def produce_paced(conn: psycopg.Connection[Any], channel: str, rate: int, seconds: float,
                  wal: bool = False, with_row: bool = False) -> int:
    """One notification per transaction at `rate` per second (with `wal`, a logical decoding
    message), each carrying its send time (CLOCK_MONOTONIC ns) so that readers measure
    commit-to-reader latency; `with_row`: each transaction inserts a row into ROWS_TABLE
    too."""
    query = ("SELECT pg_logical_emit_message(true, %s, %s)" if wal
             else "SELECT pg_notify(%s, %s)")
    if with_row:
        query = f"WITH r AS (INSERT INTO {ROWS_TABLE} DEFAULT VALUES) {query}"
    total = int(rate * seconds)
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        conn.execute(query, (channel, f"{time.monotonic_ns()}:{i}"))
    return total


def produce_flat_out(conn: psycopg.Connection[Any], channel: str,
                     seconds: float) -> tuple[float, float, int]:
    """One NOTIFY per transaction, as an application sends them, as fast as one connection
    goes (pipelined, 500 statements per batch, each in its own transaction) for `seconds`;
    then the end marker. Payloads carry their batch's send time. Returns (first send, last
    commit, notifications produced)."""
    start = time.monotonic()
    produced = 0
    with conn.cursor() as cur:
        while time.monotonic() - start < seconds:
            sent = time.monotonic_ns()
            cur.executemany("SELECT pg_notify(%s, %s)",
                            [(channel, f"{sent}:{i}") for i in range(500)])
            produced += 500
    last = time.monotonic()
    conn.execute("SELECT pg_notify(%s, %s)", (channel, END))
    return start, last, produced
