"""Starting, stopping, dying, idling, and what must never leak."""

from __future__ import annotations

import gc
import glob
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fix_pg import notify, sessions
from fix_supervisor import process_gone, wait_for
from pglistener import Supervisor, SupervisorGone, Worker
from workers import block_in_get

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shm_mapped(*pids: int | None) -> set[str]:
    """The /dev/shm entries these processes map now (a POSIX semaphore or shared memory
    segment is mapped while it is open): what is theirs, among what other processes on
    the machine make and remove meanwhile."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.split(maxsplit=5)[-1].strip()
                    if path.startswith("/dev/shm/"):
                        names.add(path.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
        except OSError:
            pass
    return names


def test_stop_frees_everything_and_blocked_readers_get_supervisor_gone(dsn: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()      # (their semaphores are the test's, not ours)
    shm_before = set(os.listdir("/dev/shm"))
    sup = Supervisor(dsn).start()
    sock_dir = os.path.dirname(sup.worker()._path)
    assert oct(os.stat(sock_dir).st_mode & 0o777) == "0o700"
    child = ctx.Process(target=block_in_get, args=(sup.worker(), ready, out))
    child.start()
    ready.get(timeout=60)
    pid = sup.pid
    ours = shm_mapped(os.getpid(), pid, child.pid)
    sup.stop()
    sup.stop()      # idempotent
    assert out.get(timeout=30) == "SupervisorGone"
    child.join(30)
    assert not os.path.exists(sock_dir)
    assert process_gone(pid)
    gc.collect()     # the log queue's semaphores are unlinked when it is collected
    # Ours only: another process on the machine (a server, a bench) makes its own meanwhile.
    assert (set(os.listdir("/dev/shm")) - shm_before) & ours == set()


def test_subscribe_after_stop_raises_supervisor_gone(dsn: str) -> None:
    sup = Supervisor(dsn).start()
    w = sup.worker()
    sub = w.subscribe("x", timeout=30)
    sup.stop()
    with pytest.raises(SupervisorGone):
        sub.get(timeout=30)
    with pytest.raises(SupervisorGone):
        for _ in sub:
            pass
    with pytest.raises(SupervisorGone):
        w.subscribe("y", timeout=30)
    sub.unsubscribe()


def test_killed_supervisor_is_noticed_by_blocked_readers(dsn: str) -> None:
    sup = Supervisor(dsn).start()
    try:
        sub = sup.worker().subscribe("k", timeout=30)
        result: list[str] = []

        def read() -> None:
            try:
                sub.get()
            except SupervisorGone:
                result.append("gone")

        t = threading.Thread(target=read)
        t.start()
        time.sleep(0.2)
        os.kill(sup.pid, signal.SIGKILL)
        t.join(30)
        assert result == ["gone"]
    finally:
        sup.stop()


def test_items_delivered_before_the_supervisor_stops_are_still_read(
    dsn: str, conn: psycopg.Connection
) -> None:
    sup = Supervisor(dsn).start()
    sub = sup.worker().subscribe("last", timeout=30)
    notify(conn, "last", ["one", "two"])
    wait_for(lambda: sup.stats().received == 2, "delivery")
    sup.stop()
    assert [sub.get(timeout=5).payload for _ in range(2)] == ["one", "two"]
    with pytest.raises(SupervisorGone):
        sub.get(timeout=5)


def test_idle_supervisor_and_reader_use_no_cpu(dsn: str) -> None:
    with Supervisor(dsn).start() as sup:
        ctx = multiprocessing.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=block_in_get, args=(sup.worker(), ready, out))
        child.start()
        ready.get(timeout=60)
        time.sleep(0.5)       # let start-up work settle
        before = cpu_seconds(sup.pid), cpu_seconds(child.pid)
        time.sleep(3)
        after = cpu_seconds(sup.pid), cpu_seconds(child.pid)
        child.kill()
        child.join()
    # A spinning or polling process would burn most of the 3 s; allow scheduler noise.
    assert after[0] - before[0] < 0.1, "the idle supervisor is using CPU"
    assert after[1] - before[1] < 0.1, "an idle reader blocked in get() is using CPU"


def test_application_name_defaults_and_the_dsn_wins(dsn: str, conn: psycopg.Connection) -> None:
    with Supervisor(dsn).start() as sup:
        sup.wait_connected()
        name = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                            (sup.backend_pid,)).fetchone()
        assert name == ("pglistener",)
    custom = make_conninfo(dsn, application_name="my-service")
    with Supervisor(custom).start() as sup:
        sup.wait_connected()
        name = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                            (sup.backend_pid,)).fetchone()
        assert name == ("my-service",)


def test_password_never_shows(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55word"
    with_password = make_conninfo(dsn, password=secret)
    assert conninfo_to_dict(with_password)["password"] == secret
    # A DSN that cannot connect, so that failures get logged with their cause.
    unreachable = make_conninfo(with_password, host="127.0.0.1", port="9", connect_timeout="1")
    with caplog.at_level(logging.DEBUG, logger="pglistener"):
        for target in (with_password, unreachable):
            sup = Supervisor(target, backoff_initial=0.1, backoff_max=0.2).start()
            try:
                w = sup.worker()
                shown = [repr(sup), repr(w), str(pickle.dumps(w)), str(sup.stats())]
                with open(f"/proc/{sup.pid}/cmdline", "rb") as f:
                    shown.append(f.read().decode(errors="replace"))
                with open(f"/proc/{sup.pid}/environ", "rb") as f:
                    shown.append(f.read().decode(errors="replace"))
                if target is unreachable:
                    with pytest.raises(TimeoutError):
                        w.subscribe("c", timeout=1.5)
            finally:
                sup.stop()
            assert all(secret not in s for s in shown)
    assert "cannot connect" in caplog.text, "the connection failure was not logged"
    assert secret not in caplog.text


def test_supervisor_logs_reach_this_process(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pglistener"):
        sup = Supervisor(dsn).start()
        pid, supervisor_pid = sup.wait_connected().backend_pid, sup.pid
        sup.stop()
    records = [r for r in caplog.records if r.name == "pglistener.supervisor"]
    assert any(f"backend pid {pid}" in r.getMessage() for r in records)
    assert {r.process for r in records} == {supervisor_pid}


def test_starts_from_a_thread_of_a_threaded_parent(dsn: str, conn: psycopg.Connection) -> None:
    stop = threading.Event()
    busy = [threading.Thread(target=stop.wait) for _ in range(4)]
    for t in busy:
        t.start()
    result: list[object] = []

    def run() -> None:
        with Supervisor(dsn).start() as sup:
            with sup.worker().subscribe("threaded", timeout=30) as sub:
                notify(conn, "threaded", ["hi"])
                result.append(sub.get(timeout=30).payload)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    stop.set()
    for b in busy:
        b.join()
    assert result == ["hi"]


def test_database_down_at_start_then_subscribe_times_out_with_the_cause(dsn: str) -> None:
    unreachable = make_conninfo(dsn, host="127.0.0.1", port="9", connect_timeout="1")
    with Supervisor(unreachable, backoff_initial=0.1, backoff_max=0.5).start() as sup:
        assert sup.backend_pid is None
        with pytest.raises(TimeoutError, match="not committed"):
            sup.worker().subscribe("never", timeout=1)
        assert "cannot connect" in sup.stats().last_error
        # The abandoned subscribe is dropped, not kept waiting for the database.
        wait_for(lambda: sup.stats().subscriptions == 0, "the cancelled subscribe to go")
        assert sup.stats().channels == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"ring_bytes": 1000}, "power of two"), ({"ring_bytes": 3 << 20}, "power of two"),
     ({"backoff_initial": 0}, "positive"), ({"backoff_initial": 5, "backoff_max": 1}, "at least"),
     ({"max_subscriptions_per_worker": 0}, "at least 1"),
     ({"max_channels_per_worker": 0}, "at least 1")],
)
def test_bad_options_are_refused_with_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor("", **kwargs)


def test_bad_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="invalid DSN") as info:
        Supervisor("host=x password=hunter2 = nonsense")
    assert "hunter2" not in str(info.value)


def test_worker_limit_is_enforced_with_a_clear_error(dsn: str) -> None:
    from pglistener import TooManySubscriptions

    with Supervisor(dsn, max_subscriptions_per_worker=2).start() as sup:
        w = sup.worker()
        a, b = w.subscribe("l", timeout=30), w.subscribe("l", timeout=30)
        with pytest.raises(TooManySubscriptions, match="max_subscriptions_per_worker"):
            w.subscribe("l", timeout=30)
        a.unsubscribe()
        w.subscribe("l", timeout=30).unsubscribe()
        b.unsubscribe()


def test_channel_limit_counts_every_channel_of_every_subscription(dsn: str) -> None:
    from pglistener import TooManySubscriptions

    with Supervisor(dsn, max_channels_per_worker=3).start() as sup:
        w = sup.worker()
        two = w.subscribe(["k1", "k2"], timeout=30)
        with pytest.raises(TooManySubscriptions, match="max_channels_per_worker"):
            w.subscribe(["k3", "k4"], timeout=30)
        w.subscribe("k3", timeout=30).unsubscribe()      # one more fits
        two.unsubscribe()
        assert sup.stats().channels == ()


def test_subscription_does_not_cross_fork(worker: Worker) -> None:
    sub = worker.subscribe("f", timeout=30)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        try:
            sub.get(timeout=1)
            out.put("read the parent's ring")
        except RuntimeError as exc:
            out.put(str(exc))

    p = ctx.Process(target=child)
    p.start()
    assert "subscribe again in the child" in out.get(timeout=30)
    p.join(30)
    sub.unsubscribe()


def test_no_ring_segments_in_the_file_system(worker: Worker) -> None:
    subs = [worker.subscribe(f"fs{i}", timeout=30) for i in range(5)]
    assert not [p for p in glob.glob("/dev/shm/*") if "pglistener" in p]
    for s in subs:
        s.unsubscribe()


def test_a_dropped_supervisor_is_cleaned_up(dsn: str) -> None:
    sup = Supervisor(dsn).start()
    sock_dir = os.path.dirname(sup.worker()._path)
    pid = sup.pid
    del sup
    gc.collect()
    assert not os.path.exists(sock_dir)
    assert process_gone(pid)


FORK_EXIT_SCRIPT = """
import os, sys
from pglistener import Supervisor

if __name__ == "__main__":
    with Supervisor(sys.argv[1]).start() as sup:
        worker = sup.worker()
        sub = worker.subscribe("parent", timeout=30)
        pid = os.fork()
        if pid == 0:
            # A forked child (a web server's worker, say) that uses pglistener itself, then
            # exits normally: atexit handlers and finalizers run.
            with worker.subscribe("child", timeout=30):
                pass
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        with __import__("psycopg").connect(sys.argv[1], autocommit=True) as conn:
            conn.execute("NOTIFY parent, 'still here'")
        print(sub.get(timeout=30).payload, sup.backend_pid is not None)
"""


def test_a_fork_child_that_exits_leaves_the_parents_supervisor_alone(
    dsn: str, tmp_path
) -> None:
    script = tmp_path / "fork_exit.py"
    script.write_text(FORK_EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), dsn], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["still", "here", "True"]


OWNER_SCRIPT = """
import sys, time
from pglistener import Supervisor

if __name__ == "__main__":
    sup = Supervisor(sys.argv[1]).start()
    sub = sup.worker().subscribe("orphan", timeout=30)
    print(sup.pid, sup.worker()._path, flush=True)
    for _ in range(6000):       # in steps: a SIGINT just before one long sleep would wait it out
        time.sleep(0.1)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_signalled_owner_leaves_nothing_behind(dsn: str, conn: psycopg.Connection, tmp_path,
                                                  signum: int) -> None:
    """SIGINT unwinds the owner and runs stop(); after SIGTERM or SIGKILL nothing runs there,
    so the supervisor notices the hang-up itself: either way it closes its connection and
    removes its socket and directory."""
    app = f"owner-{signum}"
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    target = make_conninfo(dsn, application_name=app)
    owner = subprocess.Popen([sys.executable, str(script), target],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdout is not None
        supervisor_pid, path = owner.stdout.readline().split()
        assert os.path.exists(path)
        owner.send_signal(signum)
        owner.wait(30)
        wait_for(lambda: process_gone(int(supervisor_pid)), "the orphaned supervisor to stop")
        assert not os.path.exists(os.path.dirname(path))
        wait_for(lambda: sessions(conn, app) == 0, "the listening connection to close")
    finally:
        owner.kill()
        owner.wait()


def test_ring_size_per_subscription_within_the_supervisors_limit(worker: Worker) -> None:
    with worker.subscribe("sized", timeout=30, ring_bytes=64 * 1024) as sub:
        assert sub.ring.capacity == 64 * 1024
    with pytest.raises(ValueError, match="power of two"):
        worker.subscribe("sized", timeout=30, ring_bytes=100_000)
    # The worker checks only the absolute bounds; the supervisor enforces its own limit.
    with pytest.raises(ValueError, match=r"max_ring_bytes"):
        worker.subscribe("sized", timeout=30, ring_bytes=256 * 1024 * 1024)
    with worker.subscribe("sized", timeout=30) as sub:     # and it still serves
        assert sub.ring.capacity == 4 * 1024 * 1024


def test_a_subscribe_timeout_quotes_why_the_supervisor_cannot_listen(dsn: str) -> None:
    with Supervisor(make_conninfo(dsn, dbname="no_such_db")).start() as sup:
        with pytest.raises(TimeoutError, match='database "no_such_db" does not exist'):
            sup.worker().subscribe("x", timeout=3)
        stats = sup.stats()
        assert stats.state == "disconnected" and stats.last_error_permanent


def test_a_script_read_from_stdin_is_told_why_it_cannot_start(dsn: str) -> None:
    script = ("from pglistener import Supervisor\n"
              "if __name__ == '__main__':\n"
              f"    Supervisor({dsn!r}).start()\n")
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "standard input" in proc.stderr and "save the script to a file" in proc.stderr
    assert "__main__" not in proc.stderr.splitlines()[-1]     # not the guard it already has


def test_a_clean_exit_with_a_callback_subscription_logs_no_error(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="pglistener"):
        with Supervisor(dsn).start() as sup:
            sup.worker().subscribe("cb-exit", lambda _n: None, timeout=30)
        wait_for(lambda: not [t for t in threading.enumerate()
                              if t.name == "pglistener-cb-exit"], "the callback thread to end")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "callbacks end" in caplog.text
