"""Reader processes of the benchmark, one function per system (spawned, so importable).

Each says "ready" once it listens, reads until `expect` notifications are accounted for
(received, or reported missed by a Gap), and reports when it finished (CLOCK_MONOTONIC is one
clock for every process on the machine).
"""

from __future__ import annotations

import time
from typing import Any

from pglistener import Gap, Worker


def pglistener_reader(worker: Worker, channel: str, expect: int, ready: Any, out: Any) -> None:
    sub = worker.subscribe(channel, timeout=60)
    ready.put(True)
    received = missed = 0
    while received + missed < expect:
        for item in sub.get_many(4096, timeout=120):
            if isinstance(item, Gap):
                missed += item.missed or 0
            else:
                received += 1
    out.put({"end": time.monotonic(), "received": received, "missed": missed})
    sub.unsubscribe()


def psycopg_reader(dsn: str, channel: str, expect: int, ready: Any, out: Any) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        ready.put(True)
        received = 0
        for _ in conn.notifies():
            received += 1
            if received == expect:
                break
        out.put({"end": time.monotonic(), "received": received, "missed": 0})
