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
