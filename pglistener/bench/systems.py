"""The listeners under test, as reader processes (spawned, so everything here is importable).

Every reader gets a Job: what to listen to, how many notifications it should account for,
and how to treat payloads. It says "ready" once it listens, reads, and reports a dict:

  first, end   CLOCK_MONOTONIC (one clock for every process here) of its first and last
               notification
  received     notifications it took
  missed       notifications reported missing by a Gap (pglistener only; never hidden)
  deliveries   handler calls (differs from received only for in-process fan-out)
  lat_ns       in "latency" and "live" modes: arrival minus the send time in the payload
  cpu_ns       its own CPU (user+sys, all threads) from saying "ready" to its report, added
               by the Out queue; backend_cpu_ns, for a reader with its own connection (raw),
               its server backend's over the same span

The queues a reader gets are Ready and Out, which time its CPU; cpu_ns() reads another
process's from /proc (the supervisor's, a server backend's on this machine).

Modes: "count" reads until `expect` are accounted for; "latency" too, keeping each latency;
"live" reads until the payload "end" (or the deadline), keeping each latency.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

END = "end"


def cpu_ns(pid: int) -> int | None:
    """CPU time (user+sys) of a process so far, in ns: the sum of its threads' run time in
    /proc (schedstat, ns resolution), else its clock ticks; None where /proc cannot tell (a
    server on another machine)."""
    total = 0
    try:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with open(path) as f:
                total += int(f.read().split()[0])
        if total:
            return total
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


#: This reader process's CPU when it said ready (see Ready).
_cpu_at_ready = 0


class Ready:
    """The queue a reader says "ready" on: its CPU count starts then."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def put(self, value: Any) -> None:
        global _cpu_at_ready
        _cpu_at_ready = time.process_time_ns()
        self.queue.put(value)

    def get(self, timeout: float | None = None) -> Any:
        return self.queue.get(timeout=timeout)


class Out:
    """The queue a reader reports on: the report gains its CPU since it said ready."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def put(self, report: Any) -> None:
        if isinstance(report, dict):
            report = {**report, "cpu_ns": time.process_time_ns() - _cpu_at_ready}
        self.queue.put(report)

    def get(self, timeout: float | None = None) -> Any:
        return self.queue.get(timeout=timeout)


@dataclass
class Job:
    channels: list[str]
    expect: int                     # "count"/"latency": notifications to account for
    mode: str = "count"
    deadline: float = 0.0           # CLOCK_MONOTONIC; give up then (a slow system in "live")
    fan: int = 1                    # in-process handlers each notification goes to
    route: dict[str, int] = field(default_factory=dict)   # spread: channel -> its handler
    pause: float = 0.0              # sleep this long after each 1000 taken (burst)
    ring_bytes: int | None = None   # pglistener: this subscription's ring
    overflow: str = "gap"           # pglistener: its policy
    source: str = "notify"          # pglistener: "notify" or "wal"


class Tally:
    """What one reader saw. take() is the per-notification work every system does alike:
    count it and hand it to the in-process handlers, if any; only the latency and live modes
    read the clock per notification."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.received = self.missed = self.deliveries = 0
        self.first = self.end = 0.0
        self.lat_ns: list[int] = []
        self.timed = job.mode in ("latency", "live")
        # One reader, no in-process handlers: the reader loops count and nothing else.
        self.plain = job.mode == "count" and job.fan == 1 and not job.route and not job.pause
        self.handled = [0] * max(job.fan, *(k + 1 for k in job.route.values()), 1)

    def take(self, channel: str, payload: str) -> bool:
        """Count one notification; False once the reader is done."""
        if self.timed:
            if payload == END:
                return False
            now = time.monotonic_ns()
            self.lat_ns.append(now - int(payload.split(":", 1)[0]))
            self.end = now / 1e9
        self.received += 1
        if self.received == 1:
            self.first = time.monotonic()
        if self.job.pause and self.received % 1000 == 0:
            time.sleep(self.job.pause)
        if self.job.route:                      # spread, fanned out in one process
            self.handled[self.job.route[channel]] += 1
            self.deliveries += 1
        else:
            for i in range(self.job.fan):       # every handler gets it
                self.handled[i] += 1
            self.deliveries += self.job.fan
        return self._going()

    def gap(self, missed: int | None) -> bool:
        self.missed += missed or 0
        return self._going()

    def _going(self) -> bool:
        if self.job.mode == "live" or self.received + self.missed < self.job.expect:
            return True
        if not self.timed:
            self.end = time.monotonic()
        return False

    def finish(self, received: int, missed: int = 0) -> None:
        """A plain count is over: its figures, ended now."""
        self.end = time.monotonic()
        self.received = self.deliveries = received
        self.missed = missed

    def timed_out(self) -> bool:
        return time.monotonic() >= self.job.deadline

    def report(self) -> dict[str, Any]:
        return {"first": self.first, "end": self.end, "received": self.received,
                "missed": self.missed, "deliveries": self.deliveries, "lat_ns": self.lat_ns}


# -- pglistener ------------------------------------------------------------------------------

def pglistener_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """One process, one subscription covering its channels, read in batches."""
    from pglistener import Gap

    sub = worker.subscribe(job.channels, timeout=60, ring_bytes=job.ring_bytes,
                           overflow=job.overflow, source=job.source)
    tally = Tally(job)
    ready.put(True)
    if tally.plain:
        _count_pglistener(sub, tally)
        out.put(tally.report())
        sub.unsubscribe()
        return
    going = True
    while going and not tally.timed_out():
        try:
            items = sub.get_many(4096, timeout=1.0)
        except TimeoutError:
            continue
        for item in items:
            if isinstance(item, Gap):
                going = tally.gap(item.missed)
            else:
                going = tally.take(item.channel, item.payload)
            if not going:
                break
    out.put(tally.report())
    sub.unsubscribe()


def _count_pglistener(sub: Any, tally: Tally) -> None:
    """The least a reader does per item: look at it (a Notification or a Gap) and count."""
    from pglistener import Gap

    received = missed = 0
    expect = tally.job.expect
    while received + missed < expect and not tally.timed_out():
        try:
            items = sub.get_many(4096, timeout=1.0)
        except TimeoutError:
            continue
        if not received:
            tally.first = time.monotonic()
        for item in items:
            if type(item) is Gap:
                missed += item.missed or 0
            else:
                received += 1
    tally.finish(received, missed)


def read_for(items: Iterable[Any], tally: Tally,
             check: Callable[[Any, int], None] | None = None) -> None:
    """The one `for item in sub` loop of the bench's readers, as the README writes it:
    counting each item, or a Gap's missed, until the job's count; `check(item, n)` looks at
    each item that is not a Gap (the n-th of the stream) where the scenario checks what it
    reads."""
    from pglistener import Gap

    received = missed = 0
    expect = tally.job.expect
    for item in items:
        if not received and not missed:
            tally.first = time.monotonic()
        if type(item) is Gap:
            missed += item.missed or 0
        else:
            received += 1
            if check is not None:
                check(item, received + missed)
        if received + missed >= expect:
            break
    tally.finish(received, missed)


def pglistener_for_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """The README's first example: `for item in sub`, counting."""
    tally = Tally(job)
    assert tally.plain, "pglistener-for runs only the plain count scenarios"
    with worker.subscribe(job.channels, timeout=60, source=job.source) as sub:
        ready.put(True)
        read_for(sub, tally)
    out.put(tally.report())


def pglistener_callback_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """worker.subscribe(channel, callback, on_gap=...): a reader thread calls back, counting."""
    import threading

    tally = Tally(job)
    assert tally.plain, "pglistener-callback runs only the plain count scenarios"
    counts = [0, 0]         # received, missed
    done = threading.Event()

    def on_note(_note: Any) -> None:
        if not counts[0] and not counts[1]:
            tally.first = time.monotonic()
        counts[0] += 1
        if counts[0] + counts[1] >= job.expect:
            done.set()

    def on_gap(gap: Any) -> None:
        counts[1] += gap.missed or 0
        if counts[0] + counts[1] >= job.expect:
            done.set()

    sub = worker.subscribe(job.channels, on_note, on_gap=on_gap, timeout=60)
    ready.put(True)
    done.wait(max(0.0, job.deadline - time.monotonic()))
    tally.finish(*counts)
    out.put(tally.report())
    sub.unsubscribe()


def pglistener_async_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """`async with await worker.subscribe_async(...)` and `async for item in sub`, counting."""
    from pglistener import Gap

    tally = Tally(job)
    assert tally.plain, "pglistener-async runs only the plain count scenarios"

    async def main() -> tuple[int, int]:
        received = missed = 0
        async with await worker.subscribe_async(job.channels, timeout=60) as sub:
            ready.put(True)
            async for item in sub:
                if not received and not missed:
                    tally.first = time.monotonic()
                if type(item) is Gap:
                    missed += item.missed or 0
                else:
                    received += 1
                if received + missed >= job.expect:
                    break
        return received, missed

    tally.finish(*asyncio.run(main()))
    out.put(tally.report())


def pglistener_idle_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """Subscribes and blocks in get() until the deadline: what an idle reader costs."""
    sub = worker.subscribe(job.channels, timeout=60)
    ready.put(True)
    try:
        sub.get(timeout=max(0.0, job.deadline - time.monotonic()))
    except TimeoutError:
        pass
    out.put({})
    sub.unsubscribe()


def pglistener_dispatch_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """Consumes raw records in batches without building objects, looking every 0.2 ms: the
    supervisor's own socket-to-ring rate, with the reader out of its way."""
    sub = worker.subscribe(job.channels, timeout=60)
    tally = Tally(job)
    ready.put(True)
    reader = sub.ring
    while tally.received + tally.missed < job.expect and not tally.timed_out():
        n, missed = reader.discard(1 << 20)
        if n or missed:
            if not tally.received:
                tally.first = time.monotonic()
            tally.received += n
            tally.missed += missed
            tally.end = time.monotonic()
        else:
            # Look again shortly rather than ask to be woken: the supervisor then never
            # pays for a wake-up, and this process stays off the CPU it needs.
            time.sleep(0.0002)
    tally.deliveries = tally.received
    out.put(tally.report())
    sub.unsubscribe()


# -- one connection per process ---------------------------------------------------------------

def _listen(conn: Any, channels: list[str]) -> None:
    from psycopg import sql

    conn.execute(sql.SQL("; ").join(sql.SQL("LISTEN {}").format(sql.Identifier(c))
                                    for c in channels))


def raw_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """The C loop of _raw on a libpq connection of its own: no routing, no IPC, no Python
    objects."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from pglistener.bench._raw import Listener

    listen = "; ".join(sql.SQL("LISTEN {}").format(sql.Identifier(c)).as_string(None)
                       for c in job.channels)
    conn = Listener(make_conninfo(dsn).encode(), listen.encode())
    backend = conn.backend_pid
    backend_cpu = cpu_ns(backend)
    ready.put(True)
    timeout_ms = int(max(0.0, job.deadline - time.monotonic()) * 1000)
    n, first_ns, end_ns, lat = conn.drain(job.expect, timeout_ms, job.mode == "latency")
    backend_end = cpu_ns(backend)
    del conn
    out.put({"first": first_ns / 1e9, "end": end_ns / 1e9, "received": n, "missed": 0,
             "deliveries": n, "lat_ns": lat or [],
             "backend_cpu_ns": None if backend_cpu is None or backend_end is None
             else backend_end - backend_cpu})


class WalsenderClock:
    """The CPU a peer's walsender spent between two calls with its pid (from /proc: a
    walsender exits with its connection, so its reader times it before closing)."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.end: int | None = None

    def __call__(self, pid: int) -> None:
        if self.start is None:
            self.start = cpu_ns(pid)
        else:
            self.end = cpu_ns(pid)

    @property
    def ns(self) -> int | None:
        return None if self.start is None or self.end is None else self.end - self.start


def raw_wal_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """The C loop of _raw on a replication connection of its own (a temporary slot): the
    ceiling of the WAL source on this machine."""
    from psycopg.conninfo import make_conninfo

    from pglistener.bench._raw import wal_drain

    timeout_ms = int(max(0.0, job.deadline - time.monotonic()) * 1000)
    walsender = WalsenderClock()
    n, first_ns, end_ns = wal_drain(make_conninfo(dsn, replication="database").encode(),
                                    b"pglistener", job.expect, timeout_ms,
                                    lambda: ready.put(True), walsender=walsender)
    out.put({"first": first_ns / 1e9, "end": end_ns / 1e9, "received": n, "missed": 0,
             "deliveries": n, "lat_ns": [], "backend_cpu_ns": walsender.ns})


def psycopg2_stream(dsn: str, job: Job, ready: Any, out: Any, slot: str,
                    options: dict[str, str], take: Callable[[bytes], int]) -> None:
    """psycopg2's LogicalReplicationConnection and consume_stream() on a temporary pgoutput
    slot: take(payload) for each pgoutput message, returning how many it counted (0 or 1),
    until job.expect were counted."""
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    cur.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT")
    cur.start_replication(slot_name=slot, decode=False, options=options)
    tally = Tally(job)
    walsender = WalsenderClock()
    walsender(conn.get_backend_pid())
    ready.put(True)
    received = 0

    def consume(msg: Any) -> None:
        nonlocal received
        if tally.timed:         # latency: each message's content carries its send time
            if ((msg.payload[:1] == b"M" and not tally.take("", _message_content(msg.payload)))
                    or tally.timed_out()):
                raise psycopg2.extras.StopReplication
            return
        if take(msg.payload):
            if not received:
                tally.first = time.monotonic()
            received += 1
            if received >= job.expect:
                raise psycopg2.extras.StopReplication
        if tally.timed_out():
            raise psycopg2.extras.StopReplication

    try:
        cur.consume_stream(consume)
    except psycopg2.extras.StopReplication:
        pass
    if not tally.timed:
        tally.finish(received)
    walsender(conn.get_backend_pid())
    conn.close()
    out.put({**tally.report(), "backend_cpu_ns": walsender.ns})


def _message_content(payload: bytes) -> str:
    """The content of a pgoutput logical decoding message (protocol 1: 'M', flags, LSN, the
    prefix and a NUL, the content's length, the content)."""
    end = payload.index(b"\0", 10)
    return payload[end + 5:].decode()


def psycopg2_wal_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """psycopg2's consume_stream(), the Python peer for the WAL source: counting logical
    decoding messages (in wal-latency, timing each: the latency of a plain client of the
    slot, beside a plain client's of NOTIFY)."""
    psycopg2_stream(dsn, job, ready, out, "pglistener_bench_pg2", {
        "proto_version": "1", "publication_names": "pglistener", "messages": "true"},
        lambda payload: payload[:1] == b"M")


#: The table the changes scenarios insert into (its changes: one per row, in order).
CHANGES_TABLE = "bench_changes"
#: The peers' publication of it, in their own database.
CHANGES_PUBLICATION = "pglistener_changes"


def raw_changes_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """The C loop of _raw counting the inserted rows ('I') of the changes publication: what
    the slot can deliver on this machine, decoding nothing."""
    from psycopg.conninfo import make_conninfo

    from pglistener.bench._raw import wal_drain

    timeout_ms = int(max(0.0, job.deadline - time.monotonic()) * 1000)
    walsender = WalsenderClock()
    n, first_ns, end_ns = wal_drain(make_conninfo(dsn, replication="database").encode(),
                                    CHANGES_PUBLICATION.encode(), job.expect, timeout_ms,
                                    lambda: ready.put(True), b"I", walsender)
    out.put({"first": first_ns / 1e9, "end": end_ns / 1e9, "received": n, "missed": 0,
             "deliveries": n, "lat_ns": [], "backend_cpu_ns": walsender.ns})


class PgoutputDecoder:
    """The peers' way (pypgoutput, Supabase's and Debezium's Python ports): pgoutput parsed
    in Python, each row a dict of column name to value, by the column's type for the
    common ones (int, bool, numeric, text)."""

    CASTS: dict[int, Any] = {20: int, 21: int, 23: int, 26: int, 16: lambda t: t == "t",
                             700: float, 701: float, 25: str, 1043: str}

    def __init__(self) -> None:
        self.relations: dict[int, tuple[str, list[tuple[str, Any]]]] = {}

    def relation(self, m: bytes) -> None:
        import struct

        relid = struct.unpack_from(">I", m, 1)[0]
        at = 5
        nsp_end = m.index(b"\0", at)
        rel_end = m.index(b"\0", nsp_end + 1)
        name = f"{m[at:nsp_end].decode()}.{m[nsp_end + 1:rel_end].decode()}"
        at = rel_end + 2
        (ncols,) = struct.unpack_from(">h", m, at)
        at += 2
        columns = []
        for _ in range(ncols):
            end = m.index(b"\0", at + 1)
            column = m[at + 1:end].decode()
            oid = struct.unpack_from(">I", m, end + 1)[0]
            columns.append((column, self.CASTS.get(oid, str)))
            at = end + 9
        self.relations[relid] = (name, columns)

    def insert(self, m: bytes) -> tuple[str, dict[str, Any]]:
        import struct

        relid = struct.unpack_from(">I", m, 1)[0]
        name, columns = self.relations[relid]
        at = 6
        (ncols,) = struct.unpack_from(">h", m, at)
        at += 2
        row: dict[str, Any] = {}
        for i in range(ncols):
            kind = m[at]
            at += 1
            column, cast = columns[i]
            if kind == 0x74:        # 't'
                (length,) = struct.unpack_from(">i", m, at)
                at += 4
                row[column] = cast(m[at:at + length].decode())
                at += length
            else:
                row[column] = None
        return name, row


def psycopg2_changes_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """psycopg2's consume_stream() with a Python pgoutput decoder over the changes
    publication: each inserted row decoded to a dict, its order checked."""
    decoder = PgoutputDecoder()
    counted = [0]

    def take(payload: bytes) -> int:
        kind = payload[:1]
        if kind == b"I":
            _table, row = decoder.insert(payload)
            counted[0] += 1
            if row["n"] != counted[0]:
                raise RuntimeError(f"psycopg2-changes: row {row['n']} came as {counted[0]}")
            return 1
        if kind == b"R":
            decoder.relation(payload)
        return 0

    psycopg2_stream(dsn, job, ready, out, "pglistener_bench_pg2c", {
        "proto_version": "1", "publication_names": CHANGES_PUBLICATION}, take)


def pglistener_changes_reader(worker: Any, job: Job, ready: Any, out: Any) -> None:
    """The README's table changes loop: `for change in sub`, each row decoded (change.new),
    its order checked."""

    def in_order(change: Any, n: int) -> None:
        if change.new["n"] != n:
            raise RuntimeError(f"pglistener-changes: row {change.new['n']} came as {n}")

    tally = Tally(job)
    with worker.subscribe_changes(CHANGES_TABLE, ops="insert", timeout=60,
                                  ring_bytes=job.ring_bytes) as sub:
        ready.put(True)
        read_for(sub, tally, in_order)
    out.put(tally.report())


def psycopg_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """psycopg 3's conn.notifies(), the usual way to listen with psycopg."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        _listen(conn, job.channels)
        tally = Tally(job)
        ready.put(True)
        if tally.plain:
            received = 0
            while received < job.expect and not tally.timed_out():
                for _note in conn.notifies(timeout=1.0, stop_after=job.expect - received):
                    if not received:
                        tally.first = time.monotonic()
                    received += 1
            tally.finish(received)
            out.put(tally.report())
            return
        going = True
        while going and not tally.timed_out():
            for note in conn.notifies(timeout=1.0):
                going = tally.take(note.channel, note.payload)
                if not going:
                    break
    out.put(tally.report())


def asyncpg_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """asyncpg's add_listener callbacks on its event loop."""
    import asyncpg

    async def main() -> dict[str, Any]:
        conn = await asyncpg.connect(_asyncpg_dsn(dsn))
        tally = Tally(job)
        done = asyncio.Event()

        def on_note(_conn: Any, _pid: int, channel: str, payload: str) -> None:
            if not done.is_set() and not tally.take(channel, payload):
                done.set()

        def count(_conn: Any, _pid: int, _channel: str, _payload: str) -> None:
            if not tally.received:
                tally.first = time.monotonic()
            tally.received += 1
            if tally.received == job.expect:
                tally.finish(tally.received)
                done.set()

        for channel in job.channels:
            await conn.add_listener(channel, count if tally.plain else on_note)
        ready.put(True)
        try:
            await asyncio.wait_for(done.wait(), max(0.1, job.deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            pass
        await conn.close()
        return tally.report()

    out.put(asyncio.run(main()))


def _asyncpg_dsn(dsn: str) -> str:
    """asyncpg takes URIs only; pgserver gives a URI with the socket directory as ?host=."""
    if dsn.startswith(("postgres://", "postgresql://")):
        return dsn
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
    return f"postgresql:///?{query}"


# -- one listener fanning out through multiprocessing.Queue ----------------------------------

def mp_queue_listener(dsn: str, job: Job, queues: list[Any], ready: Any, out: Any) -> None:
    """psycopg notifies() in one process, each notification put on its readers' queues."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        _listen(conn, job.channels)
        ready.put(True)
        sent = 0
        going = True
        while going and time.monotonic() < job.deadline:
            for note in conn.notifies(timeout=1.0):
                item = (note.channel, note.payload)
                if job.route:
                    queues[job.route[note.channel]].put(item)
                else:
                    for q in queues:
                        q.put(item)
                sent += 1
                if (job.mode == "live" and note.payload == END) or (
                        job.mode != "live" and sent >= job.expect):
                    going = False
                    break
    out.put({"listener": True})


def mp_queue_reader(queue: Any, job: Job, ready: Any, out: Any) -> None:
    import queue as queues

    tally = Tally(job)
    ready.put(True)
    going = True
    while going and not tally.timed_out():
        try:
            channel, payload = queue.get(timeout=1.0)
        except queues.Empty:
            continue
        if tally.plain:         # count only, as the other readers do
            if not tally.received:
                tally.first = time.monotonic()
            tally.received += 1
            going = tally.received < job.expect
            if not going:
                tally.finish(tally.received)
        else:
            going = tally.take(channel, payload)
    out.put(tally.report())


# -- work queues: a consumer group against SKIP LOCKED claims ---------------------------------

#: The table the group scenario's jobs live in (made and emptied by the producer).
JOBS = "bench_jobs"


def read_group(sub: Any, job: Job, total: Any, mine: Callable[[Any], bool]) -> Tally:
    """The one loop of a consumer group's member: what it receives, `mine(item)` says
    whether it is a job it handled (and checks it, where the scenario does); the members add
    up what they handled in `total` (a shared counter, once per batch) and stop when the
    group has handled them all."""
    from pglistener import Gap

    tally = Tally(job)
    claimed = 0
    while not tally.timed_out():
        try:
            items = sub.get_many(4096, timeout=0.05)
        except TimeoutError:
            items = []
        handled = 0
        for item in items:
            if type(item) is Gap:
                tally.missed += item.missed or 0
            elif mine(item):
                handled += 1
        if handled:
            if not claimed:
                tally.first = time.monotonic()
            claimed += handled
            tally.end = time.monotonic()
        with total.get_lock():
            total.value += handled
            if total.value >= job.expect:
                break
    sub.unsubscribe()
    tally.received = tally.deliveries = claimed
    return tally


def pglistener_group_reader(worker: Any, job: Job, total: Any, ready: Any, out: Any) -> None:
    """One member of a consumer group (overflow="block"): each notification it receives is
    a job it alone handles."""
    sub = worker.subscribe(job.channels, group="bench", overflow="block", timeout=60,
                           source=job.source)
    ready.put(True)
    out.put(read_group(sub, job, total, lambda note: note.payload != END).report())


#: changes-group: the rows the producer updates over and over (each a key of the group).
CHANGES_GROUP_ROWS = 1000


def changes_group_total(n: int) -> int:
    """What the changes-group producer writes for about n changes: the rows inserted, then
    updated a whole number of times."""
    rounds = max(1, n // CHANGES_GROUP_ROWS - 1)
    return CHANGES_GROUP_ROWS * (rounds + 1)


def pglistener_changes_group_reader(worker: Any, job: Job, total: Any, ready: Any,
                                    out: Any) -> None:
    """One member of a keyed consumer group on the changes table (key=True, overflow=
    "block"): checks that each row's changes come to it in order, and reports the rows it
    had, so that the bench can check no row went to two members."""
    last: dict[int, int] = {}

    def in_order(change: Any) -> bool:
        if change.op == "truncate":
            return False
        row, n = change.new["id"], change.new["n"]
        if n <= last.get(row, -1):
            raise RuntimeError(f"changes-group: row {row} came with n={n} after n={last[row]}")
        last[row] = n
        return True

    sub = worker.subscribe_changes(CHANGES_TABLE, group="bench", key=True, overflow="block",
                                   ring_bytes=job.ring_bytes, timeout=60)
    ready.put(True)
    out.put({**read_group(sub, job, total, in_order).report(), "rows": sorted(last)})


def skip_locked_reader(dsn: str, job: Job, ready: Any, out: Any) -> None:
    """The usual way: every listener wakes on every notification and races the others for
    one job with `FOR UPDATE SKIP LOCKED`; after the end marker it claims until none is
    left. Counts the jobs it claimed."""
    import psycopg

    claim = (f"UPDATE {JOBS} SET claimed = true WHERE id = (SELECT id FROM {JOBS} "  # noqa: S608
             f"WHERE NOT claimed ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id")
    tally = Tally(job)
    with psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(dsn, autocommit=True) as work:
        _listen(conn, job.channels)
        ready.put(True)
        claimed = 0
        ended = False
        while not ended and not tally.timed_out():
            for note in conn.notifies(timeout=1.0):
                if note.payload == END:
                    ended = True
                    break
                if work.execute(claim).fetchone() is not None:
                    if not claimed:
                        tally.first = time.monotonic()
                    claimed += 1
        while not tally.timed_out() and work.execute(claim).fetchone() is not None:
            claimed += 1
    tally.finish(claimed)
    out.put(tally.report())
