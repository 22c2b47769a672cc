"""Benchmark: a backlog of notifications on one channel, committed in one transaction, read
to the end by every reader; systems interleaved round by round on one server.

Systems:
  pglistener   the supervisor and W worker processes, each reading its ring in batches
  psycopg      psycopg 3 conn.notifies() in one process (the usual single-process listener)

The figure per system is notifications per second per reader, from the producer's commit to
the last reader's last notification (median over rounds, with min and max); deliveries/s
multiplies by the readers. Anything a pglistener reader missed (a full ring) is reported, not
hidden.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import psycopg

from pglistener import Supervisor, _dispatch
from pglistener.bench.readers import pglistener_reader, psycopg_reader

CHANNEL = "pglistener_bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pglistener.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="server to use (default: the PG* environment if PGHOST or "
                   "PGDATABASE is set, else an embedded PostgreSQL from pgserver)")
    p.add_argument("--notifications", type=int, default=200_000, help="per round (default 200000)")
    p.add_argument("--workers", type=int, default=4, help="pglistener reader processes (default 4)")
    p.add_argument("--payload-bytes", type=int, default=16, help="payload size (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    p.add_argument("--ring-bytes", type=int, default=64 << 20,
                   help="ring per subscription (default 64 MiB: the whole backlog fits)")
    p.add_argument("--quick", action="store_true", help="a short run: 20000 notifications, 1 round")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.notifications, args.rounds = 20_000, 1
    if args.notifications < 1 or args.workers < 1 or args.rounds < 1:
        p.error("--notifications, --workers and --rounds must be at least 1")
    if not 8 <= args.payload_bytes <= 7999:
        p.error("--payload-bytes must be from 8 to 7999")
    return args


def start_server(stack: ExitStack) -> str:
    import logging

    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    datadir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pglistener-bench-"))
    server = pgserver.get_server(datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
    stack.callback(server.cleanup)
    return str(server.get_uri())


def produce(conn: psycopg.Connection[Any], n: int, payload_bytes: int) -> float:
    """Commit n distinct notifications in one transaction; the moment the commit returned."""
    conn.execute(
        "SELECT count(pg_notify(%s, lpad(i::text, %s, '0'))) FROM generate_series(1, %s) i",
        (CHANNEL, payload_bytes, n))
    return time.monotonic()


def run_round(ctx: Any, start_readers: Callable[[Any, Any], list[Any]],
              conn: psycopg.Connection[Any], args: argparse.Namespace) -> dict[str, Any]:
    ready, out = ctx.Queue(), ctx.Queue()
    procs = start_readers(ready, out)
    for _ in procs:
        ready.get(timeout=120)
    t0 = produce(conn, args.notifications, args.payload_bytes)
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    seconds = max(r["end"] for r in reports) - t0
    return {
        "readers": len(procs),
        "seconds": seconds,
        "per_reader_per_s": args.notifications / seconds,
        "deliveries_per_s": args.notifications * len(procs) / seconds,
        "missed": sum(r["missed"] for r in reports),
    }


def header(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})",
        "server": server,
        "pglistener_extension": f"built against libpq {_dispatch.built_libpq_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            dsn = "" if (os.environ.get("PGHOST") or os.environ.get("PGDATABASE")) else None
        if dsn is None:
            print("starting an embedded PostgreSQL (pgserver)...", file=sys.stderr)
            dsn = start_server(stack)
        info = header(dsn)
        for key, value in info.items():
            print(f"{key:>22}: {value}")
        ctx = multiprocessing.get_context("spawn")
        sup = stack.enter_context(Supervisor(dsn, ring_bytes=args.ring_bytes).start())
        worker = sup.worker()
        conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))

        systems: dict[str, Callable[[Any, Any], list[Any]]] = {
            "pglistener": lambda ready, out: _start(ctx, [
                (pglistener_reader, (worker, CHANNEL, args.notifications, ready, out))
                for _ in range(args.workers)]),
            "psycopg": lambda ready, out: _start(ctx, [
                (psycopg_reader, (dsn, CHANNEL, args.notifications, ready, out))]),
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
        for r in range(args.rounds):
            for name, start in systems.items():        # interleaved: drift hits all alike
                print(f"round {r + 1}/{args.rounds}: {name}...", file=sys.stderr, flush=True)
                results[name].append(run_round(ctx, start, conn, args))

    print()
    print(f"drain: {args.notifications} notifications of {args.payload_bytes} bytes on one "
          f"channel, {args.rounds} round(s), median [min-max]")
    print(f"{'system':<12} {'readers':>7} {'per reader/s':>28} {'deliveries/s':>14} {'missed':>7}")
    summary = {}
    for name, rounds in results.items():
        rates = [x["per_reader_per_s"] for x in rounds]
        med = statistics.median(rates)
        summary[name] = med
        print(f"{name:<12} {rounds[0]['readers']:>7} {med:>12,.0f} "
              f"[{min(rates):>,.0f}-{max(rates):>,.0f}] "
              f"{statistics.median(x['deliveries_per_s'] for x in rounds):>14,.0f} "
              f"{sum(x['missed'] for x in rounds):>7}")
    ratios = [a["per_reader_per_s"] / b["per_reader_per_s"]
              for a, b in zip(results["pglistener"], results["psycopg"], strict=True)]
    print("\npglistener per reader / psycopg notifies(), round by round: "
          + ", ".join(f"{x:.2f}x" for x in ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": info, "args": vars(args), "results": results,
                       "ratios": {"pglistener/psycopg": ratios}}, f, indent=2)
    return 0


def _start(ctx: Any, targets: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[Any]:
    procs = [ctx.Process(target=fn, args=a) for fn, a in targets]
    for p in procs:
        p.start()
    return procs


if __name__ == "__main__":
    sys.exit(main())
