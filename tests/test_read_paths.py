"""Every way of reading a subscription, held the way users hold it: order and gaps in place
through each path, threads with their own timeouts, concurrent unsubscribes, subscriptions
dropped without unsubscribe(), loops left by break, tasks cancelled by anyio."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
import uvloop

from fix_pg import notify, notifying
from fix_supervisor import wait_for
from pglistener import Gap, SubscriptionClosed, Supervisor, Worker

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

RING = 16 * 1024          # the smallest ring: a few hundred short notifications overflow it
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def open_fds() -> set[tuple[str, str]]:
    """This process's descriptors, each with what it points to. Compared as sets: a
    descriptor that an earlier test's thread closes meanwhile is no leak of this one."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:
            pass        # the one listdir used
    return fds


def fds_after_connecting(worker: Worker) -> set[tuple[str, str]]:
    """Open descriptors once this process has its control connection to the supervisor (the
    first subscribe opens it, and it stays)."""
    worker.subscribe("warm-up", timeout=30).unsubscribe()
    return open_fds()


def readers(sup: Supervisor) -> int:
    return len(sup.stats().readers)


def send_numbers(conn: psycopg.Connection, channel: str, start: int, n: int) -> None:
    """Payloads start .. start+n-1 (a number's text is its JSON too), in one transaction."""
    conn.execute("SELECT count(pg_notify(%s, i::text)) FROM generate_series(%s::int, %s::int) i",
                 (channel, start, start + n - 1))


def check_stream(items: list[Any], total: int) -> None:
    """Numbers 0..total-1 in order, every missing run marked by one overflow Gap at its
    place with its exact count: seen + missed == sent."""
    expect = 0
    for item in items:
        if isinstance(item, Gap):
            assert item.reason == "overflow" and item.missed, item
            expect += item.missed
        else:
            value = int(item if isinstance(item, int) else item.payload)
            assert value == expect, f"expected {expect}, got {value}"
            expect += 1
    assert expect == total
    assert any(isinstance(i, Gap) for i in items), "no overflow: the test proved nothing"


# -- every path: order and gaps in place ------------------------------------------------------

BATCHES = (3000, 50, 3000, 50)    # overflow, fits, overflow, fits: gaps between the batches


def _sync_read(path: str, sub: Any, n: int) -> list[Any]:
    """Read until n numbers are accounted for, the way `path` reads."""
    got: list[Any] = []

    def accounted() -> int:
        return sum((i.missed or 0) if isinstance(i, Gap) else 1 for i in got)

    if path == "for":
        for item in sub:
            got.append(item)
            if accounted() >= n:
                break
    elif path == "get":
        while accounted() < n:
            got.append(sub.get(timeout=30))
    else:
        while accounted() < n:
            got.extend(sub.get_many(7, timeout=30))
    return got


@pytest.mark.parametrize("path", ["for", "get", "get_many"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_sync_paths_keep_order_and_gaps(path: str, as_json: bool, worker: Worker,
                                        conn: psycopg.Connection) -> None:
    subscribe = worker.subscribe_json if as_json else worker.subscribe
    got: list[Any] = []
    with subscribe("paths", timeout=30, ring_bytes=RING) as sub:
        start = 0
        for n in BATCHES:
            send_numbers(conn, "paths", start, n)
            start += n
            got += _sync_read(path, sub, n)
    check_stream(got, sum(BATCHES))


def test_callback_path_keeps_order_and_gaps(supervisor: Supervisor,
                                            conn: psycopg.Connection) -> None:
    got: list[Any] = []
    counted = [0]
    lock = threading.Lock()
    # The callbacks wait while a batch comes, as a slow handler would: the big batches
    # overflow the ring however fast this machine reads (the other paths read after sending).
    gate = threading.Event()

    def take(item: Any) -> None:
        gate.wait()
        with lock:
            got.append(item)
            counted[0] += (item.missed or 0) if isinstance(item, Gap) else 1

    sub = supervisor.worker().subscribe("paths-cb", take, on_gap=take, timeout=30,
                                        ring_bytes=RING)
    try:
        start = 0
        for n in BATCHES:
            gate.clear()
            send_numbers(conn, "paths-cb", start, n)
            start += n
            wait_for(lambda s=start: supervisor.stats().received >= s, f"{start} received")
            gate.set()
            wait_for(lambda s=start: counted[0] >= s, f"{start} accounted for")
    finally:
        gate.set()
        sub.unsubscribe()
    check_stream(got, sum(BATCHES))


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("path", ["async for", "await get"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_async_paths_keep_order_and_gaps(loop_name: str, path: str, as_json: bool,
                                         worker: Worker, conn: psycopg.Connection) -> None:
    async def main() -> list[Any]:
        subscribe = worker.subscribe_json_async if as_json else worker.subscribe_async
        got: list[Any] = []
        async with await subscribe("paths-aio", timeout=30, ring_bytes=RING) as sub:
            start = 0
            for n in BATCHES:
                send_numbers(conn, "paths-aio", start, n)
                start += n
                while sum((i.missed or 0) if isinstance(i, Gap) else 1 for i in got) < start:
                    if path == "await get":
                        got.append(await sub.get(timeout=30))
                        continue
                    async for item in sub:
                        got.append(item)
                        break
        return got

    loop = LOOPS[loop_name]()
    try:
        got = loop.run_until_complete(main())
    finally:
        loop.close()
    check_stream(got, sum(BATCHES))


def test_ring_space_is_given_back_per_batch(
    supervisor: Supervisor, worker: Worker, conn: psycopg.Connection
) -> None:
    def lag() -> int:
        (r,) = supervisor.stats().readers
        return r.lag_bytes

    with worker.subscribe("space", timeout=30, ring_bytes=RING) as sub:
        notify(conn, "space", [str(i) for i in range(20)])
        wait_for(lambda: lag() > 0, "the notifications in the ring")
        it = iter(sub)
        assert next(it).payload == "0"
        # The reader took the 20 in one pass and holds 19 of them: the ring has their space
        # back already, and what it holds still comes in order.
        assert lag() == 0
        assert [sub.get(timeout=30).payload for _ in range(19)] == [str(i) for i in
                                                                      range(1, 20)]
        assert lag() == 0


# -- threads ------------------------------------------------------------------------------


def test_each_thread_keeps_its_own_timeout(worker: Worker, conn: psycopg.Connection) -> None:
    """A get(timeout=0.5) beside a thread blocked in get() without one times out on its own,
    long before the notification that ends the other's wait."""
    with worker.subscribe("two-threads", timeout=30) as sub:
        blocked: list[Any] = []
        t = threading.Thread(target=lambda: blocked.append(sub.get()))
        t.start()
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            sub.get(timeout=0.5)
        waited = time.monotonic() - start
        notify(conn, "two-threads", ["for the blocked one"])
        t.join(30)
        assert blocked and blocked[0].payload == "for the blocked one"
    # Before the fix the timed get waited for the lock until the notification came (here
    # never, as it is sent only after): any bound well short of "forever" tells them apart.
    assert 0.5 <= waited < 5.0


def test_threads_reading_one_subscription_get_distinct_items_in_order(
    worker: Worker, conn: psycopg.Connection
) -> None:
    total = 20_000
    with worker.subscribe("shared", timeout=30) as sub:
        per_thread: list[list[int]] = [[] for _ in range(4)]

        def read(mine: list[int], use_many: bool) -> None:
            while True:
                try:
                    items = sub.get_many(64, timeout=1.0) if use_many else [sub.get(timeout=1.0)]
                except TimeoutError:
                    if sum(map(len, per_thread)) >= total:
                        return
                    continue
                mine.extend(int(i.payload) for i in items)

        threads = [threading.Thread(target=read, args=(mine, k % 2 == 0))
                   for k, mine in enumerate(per_thread)]
        for t in threads:
            t.start()
        for start in range(0, total, 5000):
            send_numbers(conn, "shared", start, 5000)
        for t in threads:
            t.join(120)
    assert sorted(x for mine in per_thread for x in mine) == list(range(total))
    for mine in per_thread:
        assert mine == sorted(mine)
    assert sum(1 for mine in per_thread if mine) >= 2, "one thread took everything"


def test_concurrent_unsubscribes_are_safe(supervisor: Supervisor, worker: Worker) -> None:
    """Four threads unsubscribe at once while a fifth is blocked in get(): each round, one
    release, no error, the reader told, and nothing left over (a race here could close or
    write a descriptor number that already belongs to something else)."""
    fds = fds_after_connecting(worker)
    errors: list[BaseException] = []
    ended: list[str] = []
    for _ in range(1000):
        sub = worker.subscribe("unsub-race", timeout=30)
        go = threading.Barrier(5)

        def close(sub: Any = sub, go: threading.Barrier = go) -> None:
            go.wait()
            try:
                sub.unsubscribe()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def read(sub: Any = sub, go: threading.Barrier = go) -> None:
            go.wait()
            try:
                sub.get(timeout=30)
            except SubscriptionClosed:
                ended.append("closed")

        threads = [threading.Thread(target=close) for _ in range(4)]
        threads.append(threading.Thread(target=read))
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        with pytest.raises(SubscriptionClosed):
            sub.get(timeout=0)
    assert errors == []
    assert ended == ["closed"] * 1000
    assert readers(supervisor) == 0
    assert open_fds() - fds == set()


def test_a_signal_handler_interrupts_a_blocked_get_and_the_subscription_lives_on(
    worker: Worker, conn: psycopg.Connection
) -> None:
    class Interrupted(Exception):
        pass

    def handler(*_: Any) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with worker.subscribe("sig", timeout=30) as sub:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                sub.get()
            notify(conn, "sig", ["still here"])
            assert sub.get(timeout=30).payload == "still here"   # the lock was let go
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- dropped handles ----------------------------------------------------------------------


@pytest.fixture
def small_sup(dsn: str) -> Iterator[Supervisor]:
    """At most 8 subscriptions per worker: a leak shows up as TooManySubscriptions."""
    with Supervisor(dsn, max_subscriptions_per_worker=8).start() as sup:
        yield sup


def test_dropped_subscriptions_are_released(small_sup: Supervisor,
                                            conn: psycopg.Connection) -> None:
    worker = small_sup.worker()
    fds = fds_after_connecting(worker)
    for _ in range(40):                      # five times the limit
        worker.subscribe("dropped", timeout=30)  # and never unsubscribed
        gc.collect()
    wait_for(lambda: readers(small_sup) == 0, "the supervisor to free every dropped ring")
    assert open_fds() - fds == set()
    assert small_sup.stats().channels == ()      # UNLISTENed


def test_loops_left_by_break_or_exception_release_their_subscription(
    small_sup: Supervisor, conn: psycopg.Connection
) -> None:
    worker = small_sup.worker()

    def handle_until_break() -> None:
        for item in worker.subscribe("jobs", timeout=30):     # as the pool example writes it
            if item.payload == "stop":
                break

    def handle_until_error() -> None:
        for item in worker.subscribe("jobs", timeout=30):
            raise ValueError(item.payload)

    def handle_in_generator() -> Iterator[str]:
        for item in worker.subscribe("jobs", timeout=30):
            yield item.payload

    # A subscription is answered once its LISTEN is committed, which stats() does not show:
    # each payload is sent until the loop has it (one sent before the LISTEN is not heard).
    for _ in range(12):                       # more than the limit of 8
        t = threading.Thread(target=handle_until_break)
        with notifying(conn, "jobs", "stop"):
            t.start()
            t.join(30)
        assert not t.is_alive(), "the loop did not get 'stop'"
        with pytest.raises(ValueError), notifying(conn, "jobs", "boom"):
            handle_until_error()
        gen = handle_in_generator()
        with notifying(conn, "jobs", "one"):
            assert next(gen) == "one"
        gen.close()
        del gen
    wait_for(lambda: readers(small_sup) == 0, "every loop's subscription released")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_dropped_async_subscriptions_are_released(loop_name: str, small_sup: Supervisor) -> None:
    worker = small_sup.worker()

    async def main() -> None:
        for _ in range(20):
            sub = await worker.subscribe_async("adrop", timeout=30)
            with pytest.raises(TimeoutError):
                await sub.get(timeout=0.01)     # leaves nothing registered in the loop
            del sub
            gc.collect()

    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    wait_for(lambda: readers(small_sup) == 0, "every dropped async subscription released")


@pytest.mark.parametrize("backend_options", [{"use_uvloop": False}, {"use_uvloop": True}],
                         ids=["asyncio", "uvloop"])
def test_an_anyio_cancelled_sse_stream_releases_its_subscription(
    backend_options: dict[str, Any], small_sup: Supervisor, conn: psycopg.Connection
) -> None:
    """Starlette's StreamingResponse: the body (an async generator over the subscription) is
    consumed in an anyio task group whose scope is cancelled when the client goes away;
    every await in the cleanup is cancelled too."""
    worker = small_sup.worker()

    async def events() -> Any:      # the SSE endpoint, written the obvious way
        async with await worker.subscribe_async("sse", timeout=30) as sub:
            async for item in sub:
                yield f"data: {item.payload}\n\n"

    async def client(received: list[str]) -> None:
        async def stream() -> None:
            async for chunk in events():
                received.append(chunk)

        async def disconnect() -> None:
            while not received:
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            async def wrap(func: Callable[[], Any]) -> None:
                await func()
                tg.cancel_scope.cancel()
            tg.start_soon(wrap, stream)
            await wrap(disconnect)

    async def main() -> None:
        for i in range(24):                   # three times the limit of 8
            received: list[str] = []
            with notifying(conn, "sse", f"event {i}"), anyio.fail_after(30):
                await client(received)      # (sent until it is heard: more may come)
            assert received and set(received) == {f"data: event {i}\n\n"}

    anyio.run(main, backend="asyncio", backend_options=backend_options)
    wait_for(lambda: readers(small_sup) == 0, "every cancelled stream's subscription released")


def test_a_subscription_refuses_pickling_with_advice(worker: Worker) -> None:
    with worker.subscribe("pickle", timeout=30) as sub:
        with pytest.raises(TypeError, match="pass the Worker"):
            pickle.dumps(sub)


def test_json_async_subscription_decodes_and_skips(worker: Worker,
                                                   conn: psycopg.Connection) -> None:
    async def main() -> list[Any]:
        async with await worker.subscribe_json_async("ajs", timeout=30) as sub:
            notify(conn, "ajs", [json.dumps({"a": 1}), "not json", "null", json.dumps([2])])
            return [await sub.get(timeout=30) for _ in range(3)]

    assert asyncio.run(main()) == [{"a": 1}, None, [2]]


def test_json_over_several_channels_says_which_channel_sent_each(
    worker: Worker, conn: psycopg.Connection
) -> None:
    with worker.subscribe_json(["ja", "jb"], timeout=30) as sub:
        notify(conn, "jb", [json.dumps({"b": 1})])
        notify(conn, "ja", ["[1, 2]", "not json", "null"])
        assert [sub.get(timeout=30) for _ in range(3)] == [
            ("jb", {"b": 1}), ("ja", [1, 2]), ("ja", None)]

    async def main() -> list[Any]:
        async with await worker.subscribe_json_async(["ja", "jb"], timeout=30) as sub:
            notify(conn, "ja", ['"x"'])
            return [await sub.get(timeout=30)]

    assert asyncio.run(main()) == [("ja", "x")]
