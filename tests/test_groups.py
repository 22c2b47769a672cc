"""Consumer groups on a real server: each notification handled once across the group."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import psycopg
import pytest

from fix_supervisor import wait_for
from pglistener import Supervisor, Worker
from workers import group_member, slow_member


def flood(conn: psycopg.Connection, channel: str, start: int, n: int) -> None:
    conn.execute("SELECT pg_notify(%s, i::text) FROM generate_series(%s::int, %s::int) AS i",
                 (channel, start, start + n - 1))


def collect(out: Any, got: dict[int, list[int]], until: int) -> None:
    """Take reports until `until` numbers in all came in."""
    while sum(len(v) for v in got.values()) < until:
        pid, numbers = out.get(timeout=60)
        assert numbers != "gap", f"member {pid} saw a gap in a lossless group"
        got.setdefault(pid, []).extend(numbers)


def test_a_pool_sharing_a_group_handles_each_notification_once(
        dsn: str, conn: psycopg.Connection) -> None:
    """4 processes from sup.spawn(group=...), overflow="block", 100k notifications: each
    handled exactly once across the group, each member's share in order; a subscriber
    outside the group gets all of them. Then a member is SIGKILLed mid-way: the others take
    over what is sent after it."""
    n = 100_000
    ctx = multiprocessing.get_context("forkserver")
    ready, out = ctx.Queue(), ctx.Queue()
    with Supervisor(dsn).start() as sup:
        pool = sup.spawn(group_member, "jobs", ready, out, processes=4, group="workers",
                         start_method="forkserver")
        pids = [ready.get(timeout=60) for _ in range(4)]
        outside = sup.worker().subscribe("jobs", timeout=30)
        flood(conn, "jobs", 0, n)
        got: dict[int, list[int]] = {}
        collect(out, got, n)
        every = sorted(x for v in got.values() for x in v)
        assert every == list(range(n))                      # once each: none twice, none lost
        for pid, share in got.items():
            assert share == sorted(share), f"member {pid} out of order"
        assert len(got) == 4 and min(len(v) for v in got.values()) > 0
        seen: list[int] = []
        while len(seen) < n:
            seen += [int(i.payload) for i in outside.get_many(10_000, timeout=30)]
        assert seen == list(range(n))
        stats = sup.stats()
        members = [r for r in stats.readers if r.group == "workers"]
        assert len(members) == 4 and {r.overflow for r in members} == {"block"}
        assert sum(r.delivered for r in members) == n

        # A member dies: the rest take over at once, nothing sent after it goes unhandled.
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len([r for r in sup.stats().readers if r.group == "workers"]) == 3,
                 "the dead member to drop out")
        flood(conn, "jobs", n, 20_000)
        after: dict[int, list[int]] = {}
        collect(out, after, 20_000)
        assert pids[0] not in after
        assert sorted(x for v in after.values() for x in v) == list(range(n, n + 20_000))
        pool.stop()
        outside.unsubscribe()


def test_what_a_leaving_member_left_unread_goes_to_the_others(
        dsn: str, conn: psycopg.Connection) -> None:
    """Its share, read or not, is handed over (at least once: a batch in its hands counts as
    not consumed); only the last member's is counted in orphaned, having no one to go to.
    Closed, a member has consumed what it took; killed, it has not (the next test)."""
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        a = worker.subscribe("chores", group="g", timeout=30)
        b = worker.subscribe("chores", group="g", timeout=30)
        flood(conn, "chores", 0, 10)
        wait_for(lambda: sup.stats().received == 10, "delivery")
        taken = [int(i.payload) for i in a.get_many(100, timeout=5)]
        assert 0 < len(taken) < 10
        b.unsubscribe()                 # leaves without reading its share
        taken += [int(i.payload) for i in a.get_many(100, timeout=30)]
        assert sorted(taken) == list(range(10)) and sup.stats().orphaned == 0
        flood(conn, "chores", 10, 5)
        assert [int(i.payload) for i in a.get_many(100, timeout=30)] == list(range(10, 15))
        flood(conn, "chores", 15, 3)
        wait_for(lambda: sup.stats().received == 18, "delivery")
        a.unsubscribe()                 # the last member: nobody to hand over to
        assert sup.stats().orphaned == 3    # closed: what it took is consumed


@pytest.mark.parametrize("leave", ["unsubscribe", "drop"])
def test_what_a_leaving_member_took_and_never_handed_out_goes_to_the_others(
        leave: str, dsn: str, conn: psycopg.Connection) -> None:
    """A stream takes a batch off its ring and hands it out an item at a time: a member that
    leaves after one get() has handled one, and the rest of its batch goes to the member
    left, each exactly once (it was lost: consumed with the stream)."""
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        a = worker.subscribe("errands", group="g", timeout=30)
        b = worker.subscribe("errands", group="g", timeout=30)
        flood(conn, "errands", 0, 100)
        wait_for(lambda: sup.stats().received == 100, "delivery")
        handled = [int(a.get(timeout=30).payload)]
        if leave == "unsubscribe":
            a.unsubscribe()
        else:
            del a                       # released when dropped, without waiting
        while len(handled) < 100:
            handled += [int(i.payload) for i in b.get_many(1000, timeout=30)]
        assert sorted(handled) == list(range(100)) and sup.stats().orphaned == 0
        b.unsubscribe()


def test_a_killed_member_s_unconsumed_share_goes_to_the_others(
        dsn: str, conn: psycopg.Connection) -> None:
    """SIGKILL in the middle of a batch: what it had not asked past goes to the member left,
    so every notification is handled at least once across the group."""
    ctx = multiprocessing.get_context("forkserver")
    ready, out = ctx.Queue(), ctx.Queue()
    with Supervisor(dsn).start() as sup:
        keeper = sup.worker().subscribe("work", group="w", overflow="block", timeout=30)
        child = ctx.Process(target=slow_member, args=(sup.worker(), "work", ready, out))
        child.start()
        ready.get(timeout=60)
        flood(conn, "work", 0, 2000)
        handled_by_child = out.get(timeout=60)      # it handled a few, then stalls
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        got: list[int] = []
        while len(set(got) | set(handled_by_child)) < 2000:
            got += [int(i.payload) for i in keeper.get_many(4096, timeout=30)]
        assert set(got) | set(handled_by_child) == set(range(2000))
        assert sup.stats().orphaned == 0
        keeper.unsubscribe()


def test_groups_are_per_channel_set_and_name(worker: Worker, conn: psycopg.Connection) -> None:
    """Same name on other channels, or another name on the same channel: not the same group."""
    g1 = worker.subscribe("x", group="g", timeout=30)
    g2 = worker.subscribe(["x", "y"], group="g", timeout=30)
    h = worker.subscribe("x", group="h", timeout=30)
    flood(conn, "x", 0, 3)
    for sub in (g1, g2, h):
        got: list[Any] = []
        while len(got) < 3:
            got += sub.get_many(10, timeout=30)
        assert [int(i.payload) for i in got] == [0, 1, 2]
        sub.unsubscribe()


@pytest.mark.parametrize("group, error", [(7, TypeError), ("", ValueError)])
def test_a_bad_group_name_is_refused(worker: Worker, group: Any, error: type) -> None:
    with pytest.raises(error, match="group"):
        worker.subscribe("x", group=group, timeout=30)

