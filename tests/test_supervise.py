"""One supervisor for a process tree: `python -m pglistener supervise`, Worker.from_env()
and Worker.from_address(), as an app server's workers would use them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Supervisor, SupervisorGone, Worker

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

READER = textwrap.dedent("""
    import sys
    from pglistener import Worker
    sub = Worker.from_env().subscribe("sv", timeout=30)
    print("ready", flush=True)
    print(sub.get(timeout=30).payload, flush=True)
    sys.exit(3)
""")

# Sleeps in steps: a signal that comes between print() and a single long sleep() would leave
# its handler pending for the whole sleep (Python runs handlers between bytecodes, and the
# sleep's system call began after the signal: seen on 3.14 under load).
WAITER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    print("ready", flush=True)
    for _ in range(600):
        time.sleep(0.1)
""")


def supervise(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pglistener", "supervise", "--dsn", dsn,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_command_reads_through_the_supervisor_and_its_status_is_passed_on(
    dsn: str, conn: psycopg.Connection
) -> None:
    proc = supervise(dsn, "--", sys.executable, "-c", READER)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", proc.stderr and proc.stderr.read()
        notify(conn, "sv", ["through one connection"])
        assert proc.stdout.readline() == "through one connection\n"
        assert proc.wait(30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_is_forwarded_to_the_command(dsn: str) -> None:
    proc = supervise(dsn, "--", sys.executable, "-c", WAITER)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 7
    finally:
        proc.kill()
        proc.wait()


def test_a_sidecar_serves_workers_at_its_socket_until_sigterm(
    dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    address = tmp_path / "pglistener.sock"
    proc = supervise(dsn, "--socket", str(address))
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == f"pglistener: supervising at {address}\n"
        worker = Worker.from_address(str(address))
        assert worker.address == str(address)
        with worker.subscribe("side", timeout=30) as sub:
            notify(conn, "side", ["hello"])
            assert sub.get(timeout=30).payload == "hello"
        with pytest.raises(FileExistsError, match="already listens"):
            Supervisor(dsn, address=str(address)).start()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: not address.exists(), "the socket to be removed")
        assert tmp_path.is_dir()            # the directory is the user's: left alone
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_socket_is_replaced(dsn: str, tmp_path: Path) -> None:
    address = tmp_path / "stale.sock"
    import socket

    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    leftover.bind(str(address))
    leftover.close()                        # what a supervisor killed with SIGKILL leaves
    with Supervisor(dsn, address=str(address)).start() as sup:
        assert sup.worker().address == str(address)
        Worker.from_address(str(address)).subscribe("x", timeout=30).unsubscribe()
    assert not address.exists()


def test_from_env_and_from_address_say_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGLISTENER_ADDRESS", raising=False)
    with pytest.raises(LookupError, match="pglistener supervise"):
        Worker.from_env()
    monkeypatch.setenv("PGLISTENER_ADDRESS", str(tmp_path / "nobody-here"))
    with pytest.raises(SupervisorGone, match="no supervisor listens"):
        Worker.from_env()


def test_sidecar_without_a_socket_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "pglistener", "supervise"],
                          capture_output=True, text=True, timeout=60, env={**os.environ})
    assert proc.returncode == 2 and "--socket" in proc.stderr
