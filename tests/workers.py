"""Bodies of child processes used by the tests (importable, so spawn can run them)."""

from __future__ import annotations

from typing import Any

from pglistener import Gap, Worker


def read_channels(worker: Worker, channels: list[str], expect: int, ready: Any, out: Any) -> None:
    """Subscribe to every channel, say ready, read `expect` items from each, report them."""
    subs = [worker.subscribe(ch, timeout=30) for ch in channels]
    ready.put(len(subs))
    result: dict[str, list[Any]] = {}
    for sub in subs:
        got = []
        while len(got) < expect:
            item = sub.get(timeout=60)
            got.append(("gap", item.reason, item.missed) if isinstance(item, Gap) else item.payload)
        result[sub.channel] = got
        sub.unsubscribe()
    out.put(result)


def block_in_get(worker: Worker, ready: Any, out: Any) -> None:
    """Subscribe, then block in get() until something ends it; report how it ended."""
    sub = worker.subscribe("idle", timeout=30)
    ready.put(True)
    try:
        sub.get()
        out.put("item")
    except Exception as exc:  # noqa: BLE001 - the type is the result
        out.put(type(exc).__name__)


def read_forever(worker: Worker, channel: str, ready: Any) -> None:
    """Subscribe and read until killed."""
    sub = worker.subscribe(channel, timeout=30)
    ready.put(True)
    for _ in sub:
        pass


def agent(worker: Worker, conn: Any) -> None:
    """Obey the test's commands over a Pipe, one reply each: subscribe, unsubscribe, read."""
    subs: dict[int, Any] = {}
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "subscribe":
                key = len(subs) and max(subs) + 1
                subs[key] = worker.subscribe(args[0], timeout=30)
                conn.send(("ok", key))
            elif cmd == "unsubscribe":
                subs.pop(args[0]).unsubscribe()
                conn.send(("ok", None))
            elif cmd == "read":
                # Exactly n items, then whatever else is there (there should be nothing).
                sub, n = subs[args[0]], args[1]
                items = [sub.get(timeout=30) for _ in range(n)]
                while True:
                    try:
                        items.append(sub.get(timeout=0))
                    except TimeoutError:
                        break
                conn.send(("ok", [f"GAP:{i.reason}" if isinstance(i, Gap) else i.payload
                                  for i in items]))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            conn.send(("error", repr(exc)))


def pool_reader(worker: Worker, channel: str, out: Any, seconds_per_item: float = 0.0) -> None:
    """A pool child: report ("ready", pid), then every item as (pid, payload or "GAP:reason"),
    and ("done", pid, payload) after handling each, taking seconds_per_item."""
    import os
    import time

    sub = worker.subscribe(channel, timeout=30)
    out.put(("ready", os.getpid()))
    for item in sub:
        out.put((os.getpid(), f"GAP:{item.reason}" if isinstance(item, Gap) else item.payload))
        time.sleep(seconds_per_item)
        if not isinstance(item, Gap):
            out.put(("done", os.getpid(), item.payload))


def crash_on_start(worker: Worker, out: Any) -> None:
    """A pool child whose handler fails at once: report the start, then raise."""
    import os
    import time

    out.put((time.monotonic(), os.getpid()))
    raise RuntimeError("this handler fails on start")


def group_member(worker: Worker, channel: str, ready: Any, out: Any) -> None:
    """A consumer-group member (the group comes from sup.spawn(group=...)): reports what it
    takes, batch by batch, as (pid, [numbers]); a Gap is reported as an error."""
    import os

    with worker.subscribe(channel, overflow="block", timeout=30) as sub:
        ready.put(os.getpid())
        while True:
            try:
                items = sub.get_many(500, timeout=0.5)
            except TimeoutError:
                continue
            if any(isinstance(i, Gap) for i in items):
                out.put((os.getpid(), "gap"))
            out.put((os.getpid(), [int(i.payload) for i in items if not isinstance(i, Gap)]))


def slow_member(worker: Worker, channel: str, ready: Any, out: Any, group: str = "w",
                source: str = "notify") -> None:
    """A consumer-group member (overflow="block") that handles five items, reports them, and
    then stalls holding the rest of its batch, to be killed."""
    import time

    sub = worker.subscribe(channel, group=group, overflow="block", timeout=30, source=source)
    ready.put(True)
    handled = [int(sub.get(timeout=60).payload) for _ in range(5)]
    out.put(handled)
    time.sleep(600)
