"""asyncio readers, under the default loop and uvloop, on a real server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
import uvloop

from fix_pg import notify
from pglistener import (
    AsyncSubscription,
    Gap,
    Notification,
    SubscriptionClosed,
    Supervisor,
    SupervisorGone,
    Worker,
)

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    def run(main: Awaitable[Any]) -> Any:
        loop = LOOPS[request.param]()
        try:
            return loop.run_until_complete(main)
        finally:
            loop.close()
    return run


def test_get_iterate_and_unsubscribe_in_order(
    run: Callable[..., Any], worker: Worker, conn: psycopg.Connection
) -> None:
    async def main() -> list[Any]:
        async with await worker.subscribe_async("aio", timeout=30) as sub:
            assert isinstance(sub, AsyncSubscription)
            notify(conn, "aio", [str(i) for i in range(100)])
            first = await sub.get(timeout=30)
            rest = await sub.get_many(9, timeout=30)
            got = [first, *rest]
            async for item in sub:
                got.append(item)
                if len(got) == 100:
                    break
            return got

    got = run(main())
    assert [n.payload for n in got] == [str(i) for i in range(100)]
    assert {n.pid for n in got} == {conn.info.backend_pid}


def test_cancelled_and_timed_out_gets_lose_nothing(
    run: Callable[..., Any], worker: Worker, conn: psycopg.Connection
) -> None:
    """get() is cancelled again and again while notifications pour in: each one still
    arrives exactly once, in order."""
    total = 3000

    async def main() -> list[str]:
        sub = await worker.subscribe_async("cancel", timeout=30)
        sender = threading.Thread(target=lambda: [
            notify(conn, "cancel", [str(i) for i in range(start, start + 100)])
            for start in range(0, total, 100)])
        sender.start()
        got: list[str] = []
        cancelled = 0
        while len(got) < total:
            task = asyncio.ensure_future(sub.get())
            await asyncio.sleep(0)          # let it start, maybe park
            if not task.done():
                task.cancel()
                cancelled += 1
            try:
                got.append((await task).payload)
            except asyncio.CancelledError:
                pass
            try:
                got.append((await sub.get(timeout=0.0005)).payload)
            except TimeoutError:
                pass
        sender.join()
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.2)
        await sub.unsubscribe()
        assert cancelled > 0, "no get() was ever cancelled: the test proved nothing"
        return got

    assert run(main()) == [str(i) for i in range(total)]


def test_unsubscribe_wakes_a_pending_get_and_ends_iteration(
    run: Callable[..., Any], worker: Worker
) -> None:
    async def main() -> None:
        sub = await worker.subscribe_async("aio-close", timeout=30)
        pending = asyncio.ensure_future(sub.get())
        iterating = asyncio.ensure_future(_collect(sub))
        await asyncio.sleep(0.1)
        assert not pending.done()
        await sub.unsubscribe()
        with pytest.raises(SubscriptionClosed):
            await asyncio.wait_for(pending, 10)
        assert await asyncio.wait_for(iterating, 10) == []
        await sub.unsubscribe()          # idempotent

    run(main())


async def _collect(sub: AsyncSubscription) -> list[Any]:
    return [item async for item in sub]


def test_a_stopped_supervisor_ends_pending_gets(run: Callable[..., Any], dsn: str) -> None:
    sup = Supervisor(dsn).start()

    async def main() -> None:
        sub = await sup.worker().subscribe_async("aio-gone", timeout=30)
        pending = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0.1)
        await asyncio.get_running_loop().run_in_executor(None, sup.stop)
        with pytest.raises(SupervisorGone):
            await asyncio.wait_for(pending, 10)

    try:
        run(main())
    finally:
        sup.stop()


def test_many_subscriptions_share_the_loop_without_threads(
    run: Callable[..., Any], worker: Worker, conn: psycopg.Connection
) -> None:
    async def main() -> list[list[Any]]:
        subs = [await worker.subscribe_async(f"aio{i}", timeout=30) for i in range(2)]
        threads = threading.active_count()
        subs += [await worker.subscribe_async(f"aio{i}", timeout=30) for i in range(2, 20)]
        # No thread per subscription (the subscribe requests themselves borrow the loop's
        # default executor, which may have grown by a thread or two).
        assert threading.active_count() < threads + 5
        for i in range(20):
            notify(conn, f"aio{i}", [f"{i}-a", f"{i}-b"])
        results = await asyncio.gather(*(s.get_many(2, timeout=30) for s in subs))
        # get_many may return one when the second is not there yet: top up.
        for s, items in zip(subs, results, strict=True):
            if len(items) < 2:
                items.append(await s.get(timeout=30))
            await s.unsubscribe()
        return results

    results = run(main())
    assert [[n.payload for n in items] for items in results] == [
        [f"{i}-a", f"{i}-b"] for i in range(20)]


def test_gaps_come_through_in_place(run: Callable[..., Any], dsn: str,
                                    conn: psycopg.Connection) -> None:
    with Supervisor(dsn).start() as sup:
        async def main() -> list[Any]:
            sub = await sup.worker().subscribe_async("aio-gap", timeout=30)
            notify(conn, "aio-gap", ["before"])
            first = await sub.get(timeout=30)
            old = sup.backend_pid
            conn.execute("SELECT pg_terminate_backend(%s)", (old,))
            while sup.backend_pid in (None, old):
                await asyncio.sleep(0.05)
            notify(conn, "aio-gap", ["after"])
            rest = [await sub.get(timeout=30), await sub.get(timeout=30)]
            await sub.unsubscribe()
            return [first, *rest]

        pid = conn.info.backend_pid
        assert run(main()) == [Notification("aio-gap", "before", pid), Gap("reconnect"),
                               Notification("aio-gap", "after", pid)]


def test_pending_subscribes_take_no_thread_and_cancelling_them_leaves_nothing(
        run: Callable[..., Any]) -> None:
    """An outage (nothing listens on the port): 1000 subscribes wait at once, on the event
    loop alone. Cancelled, none of them stays registered in the supervisor."""
    with Supervisor("host=127.0.0.1 port=9 dbname=x", backoff_initial=0.05,
                    backoff_max=0.2).start() as sup:
        worker = sup.worker()
        threads = threading.active_count()

        async def main() -> None:
            tasks = [asyncio.ensure_future(worker.subscribe_async(f"pend{i}", timeout=60))
                     for i in range(1000)]
            while sup.stats().subscriptions < 1000:
                await asyncio.sleep(0.05)
            assert threading.active_count() == threads, "a pending subscribe took a thread"
            assert not any(t.done() for t in tasks)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            for _ in range(200):
                if sup.stats().subscriptions == 0:
                    break
                await asyncio.sleep(0.05)
            assert sup.stats().subscriptions == 0, "cancelled subscribes stayed registered"

            t0 = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError, match="was not committed within 0.3 s: the "
                                                   "supervisor cannot listen"):
                await worker.subscribe_async("pend-timeout", timeout=0.3)
            assert asyncio.get_running_loop().time() - t0 < 5
            assert threading.active_count() == threads

        run(main())
        assert sup.stats().subscriptions == 0


def test_async_with_without_await_and_with_it(run: Callable[..., Any], worker: Worker,
                                              conn: psycopg.Connection) -> None:
    async def main() -> None:
        async with worker.subscribe_async("aw-plain", timeout=30) as sub:
            assert isinstance(sub, AsyncSubscription)
            notify(conn, "aw-plain", ["1"])
            assert (await sub.get(timeout=10)).payload == "1"
        assert sub.closed
        async with await worker.subscribe_async("aw-await", timeout=30) as sub2:
            notify(conn, "aw-await", ["2"])
            assert (await sub2.get(timeout=10)).payload == "2"
        assert sub2.closed
        # Still a coroutine for the APIs that take only coroutines.
        sub3 = await asyncio.create_task(worker.subscribe_json_async("aw-task", timeout=30))
        await sub3.unsubscribe()

    run(main())


def test_an_event_loops_control_connection_goes_with_the_loop(
        run: Callable[..., Any], dsn: str) -> None:
    """One control connection per event loop, for its subscribes and its hang-up watch:
    once the loop is closed and dropped, the connection is closed too (web test suites and
    asyncio.run() make many loops)."""
    import gc

    from fix_supervisor import wait_for

    with Supervisor(dsn).start() as sup:
        worker = sup.worker()

        async def main() -> None:
            async with worker.subscribe_async("aloop", timeout=30) as sub:
                assert not sub.closed
            assert sup.stats().connections == 1

        for _ in range(3):
            run(main())
            gc.collect()    # a closed loop sits in reference cycles until a collection
            wait_for(lambda: sup.stats().connections == 0, "the loop's connection to close")
