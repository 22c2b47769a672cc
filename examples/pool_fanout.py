"""A pool of reader processes fanning out: every child gets every notification on the
channel (cache invalidation, say), over the one connection of the supervisor.

    python examples/pool_fanout.py "dbname=app" invalidations 4

The children run `invalidate` (module level: they import it); one that crashes is started
again and its stream begins with Gap("restart"). SIGINT or SIGTERM stops the pool (each child
finishes the item in hand), then the supervisor. To share work instead, give the pool a
consumer group, sup.spawn(invalidate, channel, processes=4, group="workers"): each
notification then goes to one child (with overflow="block" in the children's subscribe, a
lossless work queue).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from pglistener import Gap, Supervisor, Worker


def invalidate(worker: Worker, channel: str) -> None:
    for item in worker.subscribe(channel, timeout=30):
        if isinstance(item, Gap):
            say(f"notifications may be missing ({item.reason}): clear all")
        else:
            say(f"invalidate {item.payload}")


def say(what: str) -> None:
    # One write per line: the children share stdout, and print() writes the line and its
    # end separately when Python runs unbuffered.
    sys.stdout.write(f"{os.getpid()}: {what}\n")
    sys.stdout.flush()


def main(dsn: str, channel: str, processes: int) -> None:
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    with Supervisor(dsn).start() as sup:
        pool = sup.spawn(invalidate, channel, processes=processes)
        print("children", *pool.pids, flush=True)
        while not stop.wait(1.0):
            pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
