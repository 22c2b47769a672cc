"""python -m pglistener.bench: pglistener side by side with the other ways to listen.
(python -m pglistener.bench soak --seconds S: both sources under backend kills, accounted.)

Scenarios (--scenario, default all): drain, fanout, spread, payload200, latency, live, burst,
group, idle; and for the WAL source (a server with wal_level = logical; the embedded one is
set so): produce, wal-drain, wal-tx, wal-latency, wal-fanout, wal-group, wal-hosts,
changes-drain, changes-group.
Systems, all on the same server with the same workload:

  raw                  a C loop on one connection (PQconsumeInput + PQnotifies): the ceiling
  pglistener           the supervisor and one worker process per reader: sub.get_many(4096)
  pglistener-for       the same, read as the README's first example: for item in sub
  pglistener-callback  the same, read by worker.subscribe(channel, callback)
  pglistener-async     the same, read by async for item in sub (asyncio)
  pglistener-dispatch  a reader that consumes raw records in batches: the supervisor's own rate
  psycopg              psycopg 3 conn.notifies() in one process
  asyncpg              asyncpg add_listener callbacks in one process
  conn-per-worker      one process per reader, each with its own connection (psycopg)
  mp-queue             one psycopg listener fanning out through multiprocessing.Queue
  pglistener-gap/-block  burst: a 64 KiB ring, overflow="gap" (the default) or "block"
  pglistener-group     group: one process per reader, all in one consumer group ("block")
  skip-locked          group: one psycopg listener per reader, each woken by every
                       notification, claiming a job with FOR UPDATE SKIP LOCKED
  raw-wal              a C loop on a replication connection of its own (a temporary pgoutput
                       slot): the WAL source's ceiling
  pglistener-wal(-for) subscribe(..., source="wal") read by get_many, or by for item in sub
  pglistener-wal-group a consumer group on the WAL source
  psycopg2-wal         psycopg2's LogicalReplicationConnection.consume_stream()
  raw-changes          changes-drain: the C loop counting inserted rows ('I'), decoding nothing
  pglistener-changes-for  subscribe_changes() read by for change in sub, each row decoded
  pglistener-changes-group  changes-group: 4 members of a keyed group (key=True)
  psycopg2-changes     consume_stream() with a Python pgoutput decoder, each row decoded
  pglistener(-wal)-xK  wal-hosts: K supervisors, each with a reader (for item in sub) of
                       NOTIFY, or of a slot of its own (-wal)
  insert+notify, insert+emit, notify, emit, emit-nontx
                       produce: pgbench, 16 clients, each transaction an INSERT and a NOTIFY
                       or a pg_logical_emit_message, or the announcement alone

The WAL peers (raw-wal, psycopg2-wal, raw-changes, psycopg2-changes) read their backlog in
a database of their own, so that the supervisor's slot (in the bench's database) does not
decode it.

Rounds interleave the systems so that drift on a noisy machine hits all of them alike; each
figure is the median over rounds with min and max, and ratios are taken round by round.

What it needs beyond pglistener comes with `pip install 'pglistener[bench]'`: pgserver (the
embedded server used when no --dsn is given), asyncpg and psycopg2 (their systems),
matplotlib (--plot) and rich (the progress bar). Without the extra, pass --dsn: systems whose
package is missing are skipped and marked so in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import psycopg

from pglistener import Supervisor
from pglistener._core import dispatch as _dispatch
from pglistener._dsn import describe as describe_dsn

from . import report, systems
from .pg import caught_up, drop_slot, pgbench, start_server, wait_streaming, wal_unusable
from .scenarios import (
    ONE_PROCESS,
    PEER_SYSTEMS,
    PRODUCE_SQL,
    SCENARIOS,
    WAL_SYSTEMS,
    Scenario,
    channel_names,
    expected,
    make_rows_table,
    produce_backlog,
    produce_changes,
    produce_changes_updates,
    produce_flat_out,
    produce_jobs,
    produce_paced,
    produce_wal_backlog,
    produce_wal_jobs,
    shares,
)
from .systems import Job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pglistener.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="server to use (default: the PG* environment if PGHOST or "
                   "PGDATABASE is set, else an embedded PostgreSQL from pgserver)")
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help="run this scenario (repeat for several; default: all)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    p.add_argument("--notifications", type=int,
                   help="backlog size of the count scenarios (default: per scenario)")
    p.add_argument("--workers", type=int, default=4,
                   help="readers in fanout, spread and live (default 4)")
    p.add_argument("--channels", type=int, help="channels of the spread scenario (default 100)")
    p.add_argument("--payload-bytes", type=int,
                   help="payload size of drain and fanout (default 16; payload200 keeps 200)")
    p.add_argument("--ring-bytes", type=int, default=64 << 20,
                   help="pglistener ring per subscription (default 64 MiB)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: the smallest backlogs the bench can still time, 1 s "
                   "producers, 1 round")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="draw the figures (matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when a target is missed (for CI)")
    args = p.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot needs matplotlib: {EXTRA}")
    if args.quick:
        args.rounds = 1
    if args.rounds < 1 or args.workers < 1:
        p.error("--rounds and --workers must be at least 1")
    if args.notifications is not None and args.notifications < args.workers:
        p.error("--notifications must be at least --workers")
    if args.payload_bytes is not None and not 8 <= args.payload_bytes <= 7999:
        p.error("--payload-bytes must be from 8 to 7999")
    if args.channels is not None and args.channels < args.workers:
        p.error("--channels must be at least --workers")
    return args


def shaped(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """The scenario with the command line's sizes."""
    changes: dict[str, Any] = {}
    if scenario.kind in ("count", "hosts"):
        changes["notifications"] = args.notifications or (
            scenario.quick_notifications if args.quick else scenario.notifications)
        if args.payload_bytes and scenario.name != "payload200":
            changes["payload_bytes"] = args.payload_bytes
        if args.channels and scenario.channels > 1:
            changes["channels"] = args.channels
    if scenario.kind in ("latency", "live", "produce") and args.quick:
        changes["seconds"] = 1.0 if scenario.kind != "produce" else 2.0
    return Scenario(**{**scenario.__dict__, **changes})


EXTRA = "pip install 'pglistener[bench]'"

#: Systems that need a package pglistener itself does not depend on.
NEEDS = {"asyncpg": "asyncpg", "psycopg2-wal": "psycopg2", "psycopg2-changes": "psycopg2"}

#: The slot the bench's supervisor reads, and the WAL peers' own database.
BENCH_SLOT = "pglistener_bench"
PEER_DB = "pglistener_bench_peers"


def missing_systems(wal: str | None = None) -> dict[str, str]:
    """Systems that cannot run here, and why (wal: why the WAL source cannot, if so)."""
    reasons: dict[str, list[str]] = {}
    for system, module in NEEDS.items():
        if importlib.util.find_spec(module) is None:
            reasons.setdefault(system, []).append(f"{module} is not installed ({EXTRA})")
    if pgbench() is None:
        for system in PRODUCE_SQL:
            reasons.setdefault(system, []).append("no pgbench (PostgreSQL's client tools)")
    if wal is not None:
        for system in (*WAL_SYSTEMS, *PRODUCE_SQL):
            reasons.setdefault(system, []).append(wal)
    return {system: "; ".join(why) for system, why in reasons.items()}


#: pglistener's systems: one spawned worker process per reader, differing only in how it reads.
WORKER_READERS: dict[str, Callable[..., None]] = {
    "pglistener": systems.pglistener_reader,
    "pglistener-for": systems.pglistener_for_reader,
    "pglistener-callback": systems.pglistener_callback_reader,
    "pglistener-async": systems.pglistener_async_reader,
    "pglistener-dispatch": systems.pglistener_dispatch_reader,
    # overflow="gap" (the default) and "block", in the burst scenario
    "pglistener-gap": systems.pglistener_reader,
    "pglistener-block": systems.pglistener_reader,
    "pglistener-wal": systems.pglistener_reader,
    "pglistener-wal-for": systems.pglistener_for_reader,
}


class Bench:
    def __init__(self, dsn: str, args: argparse.Namespace, stack: ExitStack,
                 wal: bool = False) -> None:
        self.dsn = dsn
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
        self.peer_dsn = dsn
        make_rows_table(self.conn)     # wal-latency's rows (the peers': _wal_setup)
        if wal:
            self.peer_dsn = _wal_setup(self.conn, dsn, stack)
        # NOTIFY's systems run on a supervisor without a slot, as their users run it: a slot
        # being read costs a walsender's CPU on the server (on a 2-core machine, everyone's).
        self.sup = stack.enter_context(Supervisor(
            dsn, ring_bytes=args.ring_bytes, max_ring_bytes=args.ring_bytes).start())
        self.worker = self.sup.worker()

    # -- one system in one scenario, one round ----------------------------------------------

    def run(self, scenario: Scenario, system: str) -> dict[str, Any]:
        """One round of one system. pglistener's WAL systems, and the producers that emit,
        run beside a supervisor that reads the bench's slot, started for the round."""
        if scenario.kind == "hosts":
            return self._hosts(scenario, system)
        if (system in WAL_SYSTEMS and system.startswith("pglistener")) or "emit" in system:
            # group_hold=0: a supervisor that finds the slot holds it where it found it for
            # group_hold after it starts (for the groups of the one before it); a round,
            # seconds after its supervisor starts, is to measure one that has run for long,
            # not WAL kept back (a hold costs nothing measurable per message: RESULTS.md).
            with Supervisor(self.dsn, ring_bytes=self.args.ring_bytes,
                            max_ring_bytes=self.args.ring_bytes, slot=BENCH_SLOT,
                            group_hold=0).start() as sup:
                wait_streaming(sup)
                caught_up(sup, self.conn)
                return self._run(scenario, system, sup)
        return self._run(scenario, system, self.sup)

    def _hosts(self, scenario: Scenario, system: str) -> dict[str, Any]:
        """k supervisors on this server, as k hosts would run them, each with one reader of
        a backlog: per slot (-wal) or per listening connection, the server's CPU per message
        (each walsender decodes all of it), each supervisor's, and what a reader gets."""
        k = int(system.rsplit("-x", 1)[1])
        wal = system in WAL_SYSTEMS
        n = scenario.notifications
        with ExitStack() as stack:
            sups = []
            for i in range(k):
                slot = f"{BENCH_SLOT}_h{i}" if wal else None
                if slot is not None:
                    stack.callback(drop_slot, self.dsn, slot)
                sups.append(stack.enter_context(Supervisor(
                    self.dsn, ring_bytes=self.args.ring_bytes,
                    max_ring_bytes=self.args.ring_bytes, slot=slot).start()))
            watch: dict[str, int | None] = {}
            for i, sup in enumerate(sups):
                if wal:
                    wait_streaming(sup)
                    caught_up(sup, self.conn)
                watch[f"supervisor-{i}"] = sup.pid
                watch[f"backend-{i}"] = (sup.stats().wal_backend_pid if wal
                                         else sup.wait_connected().backend_pid)
            deadline = time.monotonic() + 120.0
            job = Job(channel_names(scenario), n, "count", deadline,
                      source="wal" if wal else "notify")
            targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
                (systems.pglistener_for_reader, (sup.worker(), job)) for sup in sups]
            plain = Scenario(**{**scenario.__dict__, "kind": "count"})
            reports, _produced, cpu = self._drive(plain, targets, watch, system)
        got = report.figures(plain, reports, None, k, False, {})
        backends = [cpu[f"backend-{i}"] for i in range(k)]
        supervisors = [cpu[f"supervisor-{i}"] for i in range(k)]
        return {**got, "hosts": k,
                "cpu_backend_ns": (None if None in backends
                                   else sum(b or 0 for b in backends) / k / n),
                "cpu_supervisor_ns": (None if None in supervisors
                                      else sum(c or 0 for c in supervisors) / k / n)}

    def _run(self, scenario: Scenario, system: str, sup: Supervisor) -> dict[str, Any]:
        if system == "pglistener-changes-group":     # what its producer writes for about n
            scenario = Scenario(**{**scenario.__dict__, "notifications":
                                   systems.changes_group_total(scenario.notifications)})
        if scenario.kind == "hosts":
            return self._hosts(scenario, system)
        if scenario.kind == "idle":
            return self._idle(scenario)
        if scenario.kind == "produce":
            return self._produce(scenario, system)
        worker = sup.worker()
        readers = self.args.workers if scenario.many_readers else 1
        channels = channel_names(scenario)
        share = shares(channels, readers)
        grace = 60.0 if scenario.kind == "count" else scenario.seconds + 10.0
        deadline = time.monotonic() + grace + 30.0
        mode = scenario.kind

        def job(chans: list[str], fan: int = 1, route: dict[str, int] | None = None) -> Job:
            n = (expected(scenario, scenario.notifications, chans) if mode == "count"
                 else int(scenario.rate * scenario.seconds))
            return Job(chans, n, mode, deadline, fan, route or {}, scenario.pause_s,
                       scenario.ring_bytes or None,
                       "block" if system == "pglistener-block" else "gap",
                       "wal" if system in WAL_SYSTEMS else "notify")

        targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        in_process = system in ONE_PROCESS and readers > 1
        if system in ("pglistener-group", "pglistener-wal-group"):
            total = self.ctx.Value("q", 0)      # what the group handled, in all
            targets = [(systems.pglistener_group_reader, (worker, job(c), total))
                       for c in share]
        elif system == "pglistener-changes-group":
            total = self.ctx.Value("q", 0)
            targets = [(systems.pglistener_changes_group_reader, (worker, job(c), total))
                       for c in share]
        elif system in WORKER_READERS:
            targets = [(WORKER_READERS[system], (worker, job(c))) for c in share]
        elif system == "conn-per-worker":
            targets = [(systems.psycopg_reader, (self.dsn, job(c))) for c in share]
        elif system == "skip-locked":
            targets = [(systems.skip_locked_reader, (self.dsn, job(c))) for c in share]
        elif system == "raw-wal":
            targets = [(systems.raw_wal_reader, (self.peer_dsn, job(channels)))]
        elif system == "psycopg2-wal":
            targets = [(systems.psycopg2_wal_reader, (self.peer_dsn, job(channels)))]
        elif system == "raw-changes":
            targets = [(systems.raw_changes_reader, (self.peer_dsn, job(channels)))]
        elif system == "psycopg2-changes":
            targets = [(systems.psycopg2_changes_reader, (self.peer_dsn, job(channels)))]
        elif system == "pglistener-changes-for":
            targets = [(systems.pglistener_changes_reader, (worker, job(channels)))]
        elif system in ONE_PROCESS:
            fn = {"raw": systems.raw_reader, "psycopg": systems.psycopg_reader,
                  "asyncpg": systems.asyncpg_reader}[system]
            if system == "raw" or not in_process:
                one = job(channels)
            elif len(channels) > 1:
                one = job(channels, route={c: k for k, cs in enumerate(share) for c in cs})
            else:
                one = job(channels, fan=readers)
            targets = [(fn, (self.dsn, one))]
        elif system == "mp-queue":
            queues = [self.ctx.Queue() for _ in share]
            route = {c: k for k, cs in enumerate(share) for c in cs} if len(channels) > 1 else {}
            listener = job(channels, route=route)
            targets = [(systems.mp_queue_listener, (self.dsn, listener, queues))]
            targets += [(systems.mp_queue_reader, (q, job(c))) for q, c in zip(queues, share,
                                                                                 strict=True)]
        else:
            raise ValueError(system)
        # The supervisor and its server backend are timed from here; a reader times itself.
        watch: dict[str, int | None] = {}
        if system.startswith("pglistener"):
            backend = sup.wait_connected().backend_pid
            if system in WAL_SYSTEMS:       # the walsender that decodes for the slot
                backend = sup.stats().wal_backend_pid
            watch = {"supervisor": sup.pid, "backend": backend}
        reports, produced, cpu = self._drive(scenario, targets, watch, system)
        if system == "pglistener-changes-group":    # each row at one member only
            rows = [row for r in reports for row in r.pop("rows")]
            if len(rows) != len(set(rows)):
                raise RuntimeError("changes-group: a row's changes went to two members")
        return report.figures(scenario, reports, produced, readers, in_process, cpu)

    def _drive(self, scenario: Scenario, targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
               watch: dict[str, int | None], system: str = ""
               ) -> tuple[list[dict[str, Any]], tuple[float, float, int] | None,
                          dict[str, int | None]]:
        ready, out = systems.Ready(self.ctx.Queue()), systems.Out(self.ctx.Queue())
        procs = [self.ctx.Process(target=fn, args=(*a, ready, out), daemon=True)
                 for fn, a in targets]
        for p in procs:
            p.start()
        try:
            for _ in procs:
                _get(ready, procs, 120)
            before = {name: _cpu(pid) for name, pid in watch.items()}
            produced = None
            channel = channel_names(scenario)[0]
            wal = system in WAL_SYSTEMS
            conn = self.conn
            if system in PEER_SYSTEMS:      # they read their own database
                conn = psycopg.connect(self.peer_dsn, autocommit=True)
            if system == "pglistener-changes-group":
                produce_changes_updates(conn, scenario.notifications)
            elif scenario.source == "changes":
                produce_changes(conn, scenario.notifications)
            elif scenario.shared:
                (produce_wal_jobs if wal else produce_jobs)(
                    conn, scenario, scenario.notifications, len(procs))
            elif scenario.kind == "count":
                (produce_wal_backlog if wal else produce_backlog)(
                    conn, scenario, scenario.notifications)
            elif scenario.kind == "latency":
                produce_paced(conn, channel, scenario.rate, scenario.seconds, wal,
                              scenario.with_row)
            else:
                produced = produce_flat_out(self.conn, channel, scenario.seconds)
            if conn is not self.conn:
                conn.close()
            reports = [_get(out, procs, 300) for _ in procs]
            after = {name: _cpu(pid) for name, pid in watch.items()}
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
                    p.join()
        cpu: dict[str, int | None] = {}
        for name in watch:
            start, end = before[name], after[name]
            cpu[name] = None if start is None or end is None else end - start
        return [r for r in reports if "listener" not in r], produced, cpu

    def _produce(self, scenario: Scenario, system: str) -> dict[str, Any]:
        """pgbench with 16 clients for scenario.seconds on one script: transactions/s."""
        import re
        import subprocess

        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_produce "
                          "(id bigint GENERATED ALWAYS AS IDENTITY, v int)")
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(PRODUCE_SQL[system])
        try:
            tool = pgbench()
            assert tool is not None
            result = subprocess.run(
                [tool, "-n", "-c", "16", "-j", "2", "-T", str(max(1, int(scenario.seconds))),
                 "-f", script.name, self.dsn], capture_output=True, text=True, timeout=300,
                check=False)
        finally:
            os.unlink(script.name)
        found = re.search(r"tps = ([0-9.]+)", result.stdout)
        if result.returncode != 0 or found is None:
            raise RuntimeError(f"pgbench failed: {result.stderr.strip()[-500:]}")
        self.conn.execute("TRUNCATE bench_produce")
        return {"tps": float(found.group(1)), "readers": 0, "processes": 16,
                "in_process": False, "received": 0, "missed": 0}

    def _idle(self, scenario: Scenario) -> dict[str, Any]:
        """CPU used by the supervisor and by a reader blocked in get(), nothing sent."""
        ready, out = self.ctx.Queue(), self.ctx.Queue()
        job = Job(channel_names(scenario), 1, "count", time.monotonic() + scenario.seconds + 1)
        p = self.ctx.Process(target=systems.pglistener_idle_reader,
                             args=(self.worker, job, ready, out), daemon=True)
        p.start()
        ready.get(timeout=120)
        time.sleep(0.2)
        assert self.sup.pid is not None and p.pid is not None
        before = [_cpu(self.sup.pid), _cpu(p.pid)]
        time.sleep(scenario.seconds)
        after = [_cpu(self.sup.pid), _cpu(p.pid)]
        out.get(timeout=60)
        p.join(10)
        supervisor, reader = ((b - a) / 1e9 / scenario.seconds * 100
                              if a is not None and b is not None else None
                              for a, b in zip(before, after, strict=True))
        return {"supervisor_cpu_percent": supervisor, "reader_cpu_percent": reader}


def _get(queue: Any, procs: list[Any], timeout: float) -> Any:
    """The next message, or an error as soon as one of the processes died without one."""
    import queue as queues

    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=0.5)
        except queues.Empty:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a benchmark process failed (exit code "
                                   f"{failed[0].exitcode}); its traceback is above") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no report within {timeout} s") from None


def _cpu(pid: int | None) -> int | None:
    return None if pid is None else systems.cpu_ns(pid)


def _wal_setup(conn: psycopg.Connection[Any], dsn: str, stack: ExitStack) -> str:
    """The WAL peers' database (with the publication pgoutput needs) and the bench slot's
    removal at the end; returns the peers' DSN."""
    from psycopg.conninfo import make_conninfo

    if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PEER_DB,)).fetchone() is None:
        conn.execute(f"CREATE DATABASE {PEER_DB}")
    peer = make_conninfo(dsn, dbname=PEER_DB)
    for db in (dsn, peer):      # the changes table: in the peers' publication of its own
        with psycopg.connect(db, autocommit=True) as pc:
            pc.execute(f"CREATE TABLE IF NOT EXISTS {systems.CHANGES_TABLE} "
                       f"(id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n int)")
    with psycopg.connect(peer, autocommit=True) as pc:
        make_rows_table(pc)
        found = pc.execute("SELECT 1 FROM pg_publication WHERE pubname = 'pglistener'")
        if found.fetchone() is None:
            pc.execute("CREATE PUBLICATION pglistener")
        found = pc.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                           [systems.CHANGES_PUBLICATION])
        if found.fetchone() is None:
            pc.execute(f"CREATE PUBLICATION {systems.CHANGES_PUBLICATION} "
                       f"FOR TABLE {systems.CHANGES_TABLE}")

    stack.callback(drop_slot, dsn, BENCH_SLOT)     # runs after the supervisor has stopped
    return peer


def header(dsn: str) -> dict[str, Any]:
    import platform

    try:
        import asyncpg
        asyncpg_version = asyncpg.__version__
    except ImportError:
        asyncpg_version = "not installed"
    with psycopg.connect(dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.system()}",
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "asyncpg": asyncpg_version,
        "server": server,
        "pglistener extension": f"built against libpq {_dispatch.built_libpq_version()}, "
                                f"running libpq {_dispatch.libpq_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["soak"]:
        from . import soak

        return soak.main(given[1:])
    args = parse_args(argv)
    chosen = [shaped(SCENARIOS[name], args) for name in (args.scenario or SCENARIOS)]
    with ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            dsn = "" if (os.environ.get("PGHOST") or os.environ.get("PGDATABASE")) else None
        if dsn is None:
            if importlib.util.find_spec("pgserver") is None:
                print(f"no server: pass --dsn, or {EXTRA} for an embedded PostgreSQL",
                      file=sys.stderr)
                return 2
            print("starting an embedded PostgreSQL (pgserver)...", file=sys.stderr)
            dsn = start_server(stack)
        info = header(dsn)
        for key, value in info.items():
            print(f"{key:>22}: {value}")
        print(f"{'command':>22}: python -m pglistener.bench {' '.join(_safe_argv(argv))}")
        wants_wal = any(set(s.systems) & {*WAL_SYSTEMS, *PRODUCE_SQL} for s in chosen)
        why_not_wal = wal_unusable(dsn) if wants_wal else None
        skipped = missing_systems(why_not_wal)
        for system, why in skipped.items():
            print(f"{'skipped':>22}: {system}: {why}")
        sys.stdout.flush()
        bench = Bench(dsn, args, stack, wal=wants_wal and why_not_wal is None)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            s.name: {system: [] for system in s.systems if system not in skipped}
            for s in chosen}
        steps = [(r, s, system) for r in range(args.rounds) for s in chosen
                 for system in results[s.name]]
        with report.Progress(len(steps), enabled=not args.no_progress) as progress:
            for r, scenario, system in steps:
                progress.step(f"round {r + 1}/{args.rounds}: {scenario.name} / {system}")
                results[scenario.name][system].append(bench.run(scenario, system))
    summary = report.summarize(chosen, results)
    targets = report.targets(results)
    report.print_tables(chosen, results, summary, args, skipped)
    report.print_targets(targets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": info, "args": {**vars(args), "dsn": _safe_dsn(args.dsn)},
                       "scenarios": {s.name: s.__dict__ for s in chosen},
                       "skipped": skipped,
                       "results": results, "summary": summary, "targets": targets}, f, indent=2)
    if args.plot:
        report.plot(chosen, summary, args.plot)
        print(f"\nplot written to {args.plot}")
    missed = [t["target"] for t in targets if t["met"] is False]
    if args.check and missed:
        print(f"\n--check: {len(missed)} target(s) missed", file=sys.stderr)
        return 1
    return 0


def _safe_dsn(dsn: str | None) -> str | None:
    return None if dsn is None else describe_dsn(dsn)


def _safe_argv(argv: list[str] | None) -> list[str]:
    """The command line as given, with any DSN shown without its password."""
    out = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(out):
        if arg == "--dsn" and i + 1 < len(out):
            out[i + 1] = repr(describe_dsn(out[i + 1]))
        elif arg.startswith("--dsn="):
            out[i] = f"--dsn={describe_dsn(arg[6:])!r}"
    return out


if __name__ == "__main__":
    sys.exit(main())
