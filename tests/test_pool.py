"""Worker pools on a real server: start, restart with backoff, stop in order."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import psycopg
import pytest

from fix_pg import notify
from fix_supervisor import process_gone, wait_for
from pglistener import Supervisor
from workers import crash_on_start, pool_reader

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

_ctx = multiprocessing.get_context("forkserver")


def collect(out: Any, want: int, timeout: float = 60) -> list[Any]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        got.append(out.get(timeout=max(0.1, deadline - time.monotonic())))
    return got


def by_pid(messages: list[Any]) -> dict[int, list[str]]:
    streams: dict[int, list[str]] = {}
    for m in messages:
        if m[0] not in ("ready", "done"):
            streams.setdefault(m[0], []).append(m[1])
    return streams


def test_a_pool_of_three_receives_and_a_killed_child_comes_back_with_a_gap(
    dsn: str, conn: psycopg.Connection
) -> None:
    out = _ctx.Queue()
    with Supervisor(dsn).start() as sup:
        pool = sup.spawn(pool_reader, "jobs", out, processes=3)
        first = {pid for _, pid in collect(out, 3)}
        assert set(pool.pids) == first and len(first) == 3
        notify(conn, "jobs", [str(i) for i in range(20)])
        streams = by_pid([m for m in collect(out, 120) if m[0] != "done"])
        assert streams == {pid: [str(i) for i in range(20)] for pid in first}

        victim = sorted(first)[0]
        # A multiprocessing.Queue is not safe against SIGKILL: a writer killed while its
        # feeder thread holds the queue's lock blocks every other writer. So kill the victim
        # while it is idle (its last message is a moment old) and let it die before sending.
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: process_gone(victim), "the victim to die")
        notify(conn, "jobs", [str(i) for i in range(20, 30)])    # while it is down
        messages = []
        while not [m for m in messages if m[0] == "ready"]:       # back within the backoff
            messages += collect(out, 1)
        (_, newcomer), = [m for m in messages if m[0] == "ready"]
        assert newcomer not in first
        notify(conn, "jobs", [str(i) for i in range(30, 40)])
        # Survivors: 20 items and 20 "done" each; the newcomer: a gap, 10 items, 10 "done".
        messages += collect(out, 2 * 40 + 21 - (len(messages) - 1))
        streams = by_pid(messages)
        for pid in first - {victim}:
            assert streams[pid] == [str(i) for i in range(20, 40)]     # never missed one
        # The restarted child is told, first thing, that it missed what came meanwhile.
        assert streams[newcomer] == ["GAP:restart"] + [str(i) for i in range(30, 40)]
        assert set(pool.pids) == first - {victim} | {newcomer}
        (slot,) = [s for s in pool.stats() if s.pid == newcomer]
        assert (slot.starts, slot.restarts, slot.last_exit) == (2, 1, "signal SIGKILL")


def test_a_child_that_crashes_on_start_is_restarted_with_growing_delays(dsn: str) -> None:
    out = _ctx.Queue()
    with Supervisor(dsn, backoff_initial=0.2, backoff_max=1.0).start() as sup:
        pool = sup.spawn(crash_on_start, out, processes=1)
        window = 4.0
        started = time.monotonic()
        starts = []
        while time.monotonic() - started < window:
            try:
                starts.append(out.get(timeout=0.1)[0])
            except Exception:  # noqa: BLE001 - queue.Empty
                pass
        (slot,) = pool.stats()
        assert slot.last_exit == "code 1"       # the exception, logged, ended the child
        pool.stop()
    # At once, at once, then about 0.2, 0.4, 0.8, 1.0 s apart (times 0.5-1.0 jitter): a
    # handful in 4 s. In a tight loop it would be dozens.
    assert 4 <= len(starts) <= 10, starts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[-1] > gaps[1] + 0.1, gaps
    (slot,) = pool.stats()
    assert slot.restarts == slot.starts - 1 >= 3


def test_stop_lets_the_item_in_hand_finish_and_leaves_nothing(
    dsn: str, conn: psycopg.Connection
) -> None:
    out = _ctx.Queue()
    sup = Supervisor(dsn).start()
    sock_dir = os.path.dirname(sup.worker()._path)
    try:
        pool = sup.spawn(pool_reader, "slow", out, 1.0, processes=2)
        pids = {pid for _, pid in collect(out, 2)}
        notify(conn, "slow", ["in hand"])
        assert sorted(collect(out, 2)) == sorted((pid, "in hand") for pid in pids)
        sup.stop()              # stops the pool first: SIGTERM, each finishes its item
        assert sorted(collect(out, 2)) == sorted(("done", pid, "in hand") for pid in pids)
        assert all(process_gone(pid) for pid in pids)
        assert pool.pids == []
        assert {s.last_exit for s in pool.stats()} == {"code 0"}
        assert not os.path.exists(sock_dir)
    finally:
        sup.stop()


def test_pool_arguments_are_checked(dsn: str) -> None:
    with Supervisor(dsn).start() as sup:
        with pytest.raises(ValueError, match="importable"):
            sup.spawn(lambda worker: None)
        with pytest.raises(ValueError, match="at least 1"):
            sup.spawn(pool_reader, "x", None, processes=0)
    with pytest.raises(RuntimeError, match="start"):
        Supervisor(dsn).spawn(pool_reader, "x", None)


# Scripts run as their own program (a parent of its own to signal or fork): each starts a
# supervisor and a pool of 2 pool_reader children on channel argv[3], and waits for them.
PREAMBLE = """
import multiprocessing, os, sys, time
sys.path.insert(0, sys.argv[2])
import psycopg
from pglistener import Supervisor
from workers import pool_reader

if __name__ == "__main__":
    out = multiprocessing.get_context("forkserver").Queue()
    with Supervisor(sys.argv[1]).start() as sup:
        pool = sup.spawn(pool_reader, sys.argv[3], out, processes=2)
        for _ in range(2):
            out.get(timeout=60)
"""

POOL_OWNER = PREAMBLE + """
        print(sup.pid, sup.worker()._path, *pool.pids, flush=True)
        for _ in range(6000):   # in steps: a SIGINT just before one long sleep would wait it out
            time.sleep(0.1)
"""


def run_script(tmp_path: Any, text: str, dsn: str, channel: str) -> Any:
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.Popen([sys.executable, str(script), dsn, os.path.dirname(__file__),
                             channel], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_parent_ends_pool_and_supervisor(dsn: str, tmp_path: Any,
                                                          signum: int) -> None:
    """SIGINT unwinds the parent: stop() ends the pool, then the supervisor. SIGTERM kills
    it outright: the supervisor sees its owner gone and stops, and the pool's children, their
    supervisor gone, stop after the item in hand. Either way nothing is left."""
    owner = run_script(tmp_path, POOL_OWNER, dsn, "owned")
    try:
        assert owner.stdout is not None
        supervisor, path, *children = owner.stdout.readline().split()
        assert len(children) == 2
        owner.send_signal(signum)
        owner.wait(60)
        for pid in (supervisor, *children):
            wait_for(lambda pid=pid: process_gone(int(pid)), f"pid {pid} to end")
        assert not os.path.exists(os.path.dirname(path))
    finally:
        owner.kill()
        owner.wait()


FORK_EXIT = PREAMBLE + """
        before = sorted(pool.pids)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)         # a forked web worker that ends normally: exit handlers run
        os.waitpid(pid, 0)
        with psycopg.connect(sys.argv[1], autocommit=True) as conn:
            conn.execute("NOTIFY forked, 'still here'")
        got = []
        while len(got) < 2:
            message = out.get(timeout=30)
            if message[1] == "still here":
                got.append(message[0])
        print(before == sorted(pool.pids) == sorted(got))
"""


def test_a_fork_child_that_exits_leaves_the_pool_alone(dsn: str, tmp_path: Any) -> None:
    proc = run_script(tmp_path, FORK_EXIT, dsn, "forked")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.split() == ["True"]
