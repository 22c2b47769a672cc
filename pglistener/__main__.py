"""python -m pglistener listen [--dsn DSN] [--json] CHANNEL [CHANNEL ...]

Prints notifications as they arrive, through a supervisor and a worker: a psql-like
debugging tool for pglistener's own path. Without --dsn the usual PG* environment applies.
SIGINT or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from . import Gap, Supervisor, SupervisorGone, Worker
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
    listen.add_argument("channels", nargs="+", metavar="CHANNEL")
    args = parser.parse_args(argv)
    for channel in args.channels:
        try:
            channel_bytes(channel)
        except InvalidChannelName as exc:
            parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="pglistener: %(message)s")
    try:
        sup = Supervisor(args.dsn)
    except ValueError as exc:
        parser.error(str(exc))
    with sup.start():
        try:
            asyncio.run(_listen(sup.worker(), list(dict.fromkeys(args.channels)), args.json))
        except SupervisorGone as exc:
            print(f"pglistener: {exc}", file=sys.stderr)
            return 1
    return 0


async def _listen(worker: Worker, channels: list[str], as_json: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    subs = [await worker.subscribe_async(ch) for ch in channels]
    print(f"listening on {', '.join(channels)}", file=sys.stderr, flush=True)
    readers = [asyncio.ensure_future(_print_all(sub, as_json)) for sub in subs]
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([stopping, *readers], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()       # a reader that ended raises why (SupervisorGone)
    finally:
        for task in (stopping, *readers):
            task.cancel()
        for sub in subs:
            await sub.unsubscribe()


async def _print_all(sub: Any, as_json: bool) -> None:
    async for item in sub:
        print(_format(sub.channel, item, as_json), flush=True)


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
