"""python -m pglistener listen [--dsn DSN] [--json] [--retry] CHANNEL [CHANNEL ...]
python -m pglistener supervise [--dsn DSN] [--socket PATH] [--slot NAME] [-- COMMAND ...]
python -m pglistener slot list|drop NAME [--dsn DSN]

listen prints notifications as they arrive, through a supervisor and a worker: a psql-like
debugging tool for pglistener's own path. SIGINT or SIGTERM stops it cleanly, connected or
not. A server that refuses the credentials, the role or the database ends it with that
error, unless --retry.

supervise runs one supervisor for a whole process tree. With a command, it runs the command
with PGLISTENER_ADDRESS in its environment (Worker.from_env() in any process under it:
uvicorn or gunicorn workers, Celery, Django), forwards SIGINT and SIGTERM to it, stops when
it exits and exits with its status. Without one it runs until SIGINT or SIGTERM, as a
sidecar listening at --socket. --slot reads the WAL source from that replication slot too.

slot list shows the server's replication slots with the WAL each one holds; slot drop NAME
drops one (a forgotten slot keeps WAL until the disk is full). A slot in use is not dropped.

Without --dsn the usual PG* environment applies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from . import Gap, Supervisor, SupervisorGone, Worker
from ._supervisor.listen import SLOT_LAG, is_permanent
from .channels import channel_bytes
from .errors import InvalidChannelName


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pglistener", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listen = commands.add_parser("listen", help="print notifications as they arrive")
    listen.add_argument("--dsn", default="",
                        help="libpq connection string or URI (default: the PG* environment)")
    listen.add_argument("--json", action="store_true",
                        help="one JSON object per line: channel, payload, pid (a gap: "
                             "channel, gap, missed)")
    listen.add_argument("--retry", action=argparse.BooleanOptionalAction, default=False,
                        help="keep retrying when the server refuses the credentials, the role "
                             "or the database (default: exit with its error; a server that "
                             "cannot be reached is always retried)")
    listen.add_argument("channels", nargs="+", metavar="CHANNEL")
    supervise = commands.add_parser(
        "supervise", help="one supervisor for a process tree, or as a sidecar")
    supervise.add_argument("--dsn", default="",
                           help="libpq connection string or URI (default: the PG* environment)")
    supervise.add_argument("--socket", metavar="PATH",
                           help="listen for workers here (default: a private directory; "
                                "required without a command)")
    supervise.add_argument("--slot", metavar="NAME",
                           help="read the WAL source from this replication slot too")
    supervise.add_argument("--slot-dsn", metavar="DSN",
                           help="read the slot from this server (a standby; default: --dsn)")
    supervise.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                           help="run this with PGLISTENER_ADDRESS set, then stop")
    slot = commands.add_parser("slot", help="list or drop replication slots")
    slot.add_argument("action", choices=("list", "drop"))
    slot.add_argument("name", nargs="?", metavar="NAME", help="the slot to drop")
    slot.add_argument("--dsn", default="",
                      help="libpq connection string or URI (default: the PG* environment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="pglistener: %(message)s")
    if args.command == "supervise":
        return _supervise(parser, args)
    if args.command == "slot":
        return _slot(parser, args)
    for channel in args.channels:
        try:
            channel_bytes(channel)
        except InvalidChannelName as exc:
            parser.error(str(exc))
    if not args.retry:      # that error is reported once, below, as the reason to exit
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: not is_permanent(r.getMessage()))
    try:
        sup = Supervisor(args.dsn)
    except ValueError as exc:
        parser.error(str(exc))
    with sup.start():
        return asyncio.run(_listen(sup, list(dict.fromkeys(args.channels)), args.json,
                                   args.retry))


def _supervise(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = args.run[1:] if args.run[:1] == ["--"] else args.run
    if not command and not args.socket:
        parser.error("supervise needs --socket PATH to run as a sidecar, or -- COMMAND")
    try:
        sup = Supervisor(args.dsn, address=args.socket, slot=args.slot,
                         slot_dsn=args.slot_dsn)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        if child is not None:
            child.send_signal(signum)       # its own process group: it gets it once, here
        else:
            stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        sup.start()
    except FileExistsError as exc:
        print(f"pglistener: {exc}", file=sys.stderr)
        return 1
    with sup:
        address = sup.worker().address
        if not command:
            print(f"pglistener: supervising at {address}", file=sys.stderr, flush=True)
            while not stop.wait(1.0):
                pass
            return 0
        if stop.is_set():
            return 0            # asked to stop before the command was started
        env = {**os.environ, Worker.ENV: address}
        try:
            # In its own process group, so that a signal meant for the whole group (Ctrl-C)
            # reaches it once, forwarded (process_group= is 3.11+; a session does on 3.10).
            if sys.version_info >= (3, 11):
                child = subprocess.Popen(command, env=env, process_group=0)
            else:
                child = subprocess.Popen(command, env=env, start_new_session=True)
        except OSError as exc:
            print(f"pglistener: cannot run {command[0]!r}: {exc}", file=sys.stderr)
            return 127
        if stop.is_set():       # a signal came while it was being started
            child.send_signal(signal.SIGTERM)
        # Waited for in short steps: a signal that comes just before a blocking waitpid()
        # leaves its Python handler (the forward) pending until this thread runs Python
        # again, which a plain wait() would not do before the command exits.
        while True:
            try:
                status = child.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                pass
    return status if status >= 0 else 128 - status


_SLOTS = f"""
    SELECT slot_name, plugin, slot_type, database, active, active_pid, {SLOT_LAG},
           wal_status, confirmed_flush_lsn::text
    FROM pg_replication_slots ORDER BY slot_name"""


def _slot(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import psycopg

    if args.action == "drop" and not args.name:
        parser.error("slot drop needs the NAME of the slot")
    if args.action == "list" and args.name:
        parser.error("slot list takes no NAME")
    try:
        with psycopg.connect(args.dsn, autocommit=True, connect_timeout=10) as conn:
            if args.action == "drop":
                row = conn.execute("SELECT active_pid FROM pg_replication_slots "
                                   "WHERE slot_name = %s", (args.name,)).fetchone()
                if row is None:
                    print(f"pglistener: no replication slot {args.name!r}", file=sys.stderr)
                    return 1
                if row[0] is not None:
                    print(f"pglistener: slot {args.name!r} is in use by server process "
                          f"{row[0]}: stop its reader first", file=sys.stderr)
                    return 1
                conn.execute("SELECT pg_drop_replication_slot(%s)", (args.name,))
                forgot = _forget_positions(conn, args.name)
                print(f"dropped slot {args.name}"
                      + (f" and the {forgot} position(s) kept for it" if forgot else ""))
                return 0
            rows = conn.execute(_SLOTS).fetchall()
    except psycopg.Error as exc:
        print(f"pglistener: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    header = ("slot", "plugin", "type", "database", "active", "pid", "holds", "wal_status",
              "confirmed")
    table = [header] + [(name, plugin or "", kind, db or "", "yes" if active else "no",
                         "" if pid is None else str(pid), _bytes(held), status or "",
                         confirmed or "")
                        for name, plugin, kind, db, active, pid, held, status, confirmed in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _forget_positions(conn: Any, slot: str) -> int:
    """Delete what supervisors kept for `slot` (their table of positions, see the README's
    resume across a restart): a slot made again under the name starts from nothing kept.
    On a standby (read-only), or where no supervisor kept anything, nothing is done."""
    from ._supervisor.wal.setup import KEEP_TABLE

    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL AND NOT pg_is_in_recovery()",
                       (KEEP_TABLE,)).fetchone()
    if row is None or not row[0]:
        return 0
    return int(conn.execute(f"DELETE FROM {KEEP_TABLE} WHERE slot = %s",  # noqa: S608
                            (slot,)).rowcount)


def _bytes(n: int | None) -> str:
    """A size as people read it: 512 B, 3.4 MB."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


async def _listen(sup: Supervisor, channels: list[str], as_json: bool, retry: bool) -> int:
    """Until SIGINT or SIGTERM (0), the supervisor's end (1), or, without retry, a refusal
    that retrying will not mend (1). Stops at any moment, connected or not."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks: dict[asyncio.Future[Any], str] = {
        asyncio.ensure_future(stop.wait()): "stop",
        asyncio.ensure_future(_print_all(sup.worker(), channels, as_json)): "work",
    }
    if not retry:
        tasks[asyncio.ensure_future(_refused(sup))] = "refused"
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if tasks[task] == "refused":
                print(f"pglistener: {task.result()} (not retrying: see --retry)",
                      file=sys.stderr)
                return 1
            if tasks[task] == "work":
                task.result()       # raises why it ended (SupervisorGone)
        return 0
    except SupervisorGone as exc:
        print(f"pglistener: {exc}", file=sys.stderr)
        return 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # stop() waits for the supervisor process to end: not on the event loop.
        await loop.run_in_executor(None, sup.stop)


async def _print_all(worker: Worker, channels: list[str], as_json: bool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(await worker.subscribe_async(ch))
                for ch in channels]
        print(f"listening on {', '.join(channels)}", file=sys.stderr, flush=True)
        await asyncio.gather(*(_print_one(sub, as_json) for sub in subs))


async def _print_one(sub: Any, as_json: bool) -> None:
    async for item in sub:
        print(_format(sub.channel, item, as_json), flush=True)


async def _refused(sup: Supervisor) -> str:
    """The supervisor's last error, once it is one that retrying alone will not mend."""
    loop = asyncio.get_running_loop()
    while True:
        stats = await loop.run_in_executor(None, sup.stats)
        if stats.last_error and stats.last_error_permanent:
            return stats.last_error
        await asyncio.sleep(0.5)


def _format(channel: str, item: Any, as_json: bool) -> str:
    if isinstance(item, Gap):
        if as_json:
            return json.dumps({"channel": channel, "gap": item.reason, "missed": item.missed})
        missed = "an unknown number" if item.missed is None else str(item.missed)
        return f'Gap on "{channel}" ({item.reason}): {missed} notifications may be missing.'
    if as_json:
        return json.dumps({"channel": item.channel, "payload": item.payload, "pid": item.pid},
                          ensure_ascii=False)
    return (f'Asynchronous notification "{item.channel}" with payload "{item.payload}" '
            f"received from server process with PID {item.pid}.")


if __name__ == "__main__":
    sys.exit(main())
