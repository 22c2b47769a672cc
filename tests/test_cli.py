"""python -m pglistener listen, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from fix_pg import notify, sessions
from fix_supervisor import wait_for

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python


def start_listen(dsn: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "pglistener", "listen", "--dsn", dsn, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("listening on"), line + proc.stderr.read()
    return proc


def test_json_lines_then_a_clean_stop_on_sigterm(dsn: str, conn: psycopg.Connection) -> None:
    app = f"cli-{uuid.uuid4().hex[:8]}"
    proc = start_listen(make_conninfo(dsn, application_name=app), "--json", "cli a", "cli_b")
    try:
        notify(conn, "cli a", ['{"x": 1}', "é"])
        notify(conn, "cli_b", ["b"])
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
        pid = conn.info.backend_pid
        # In order within each channel; the two channels may interleave.
        assert [d for d in lines if d["channel"] == "cli a"] == [
            {"channel": "cli a", "payload": '{"x": 1}', "pid": pid},
            {"channel": "cli a", "payload": "é", "pid": pid}]
        assert [d for d in lines if d["channel"] == "cli_b"] == [
            {"channel": "cli_b", "payload": "b", "pid": pid}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    # Its supervisor closed the connection on the way out.
    wait_for(lambda: sessions(conn, app) == 0, "the listening connection to close")


def test_text_lines_like_psql_and_sigint(dsn: str, conn: psycopg.Connection) -> None:
    proc = start_listen(dsn, "Cli")
    try:
        notify(conn, "Cli", ["hello"])
        assert proc.stdout is not None
        assert proc.stdout.readline() == (
            f'Asynchronous notification "Cli" with payload "hello" received from server '
            f"process with PID {conn.info.backend_pid}.\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_channel_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "pglistener", "listen", "x" * 64],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "at most 63 bytes" in proc.stderr


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stops_on_a_signal_while_it_cannot_connect(signum: int) -> None:
    """Nothing listens on port 1: the supervisor retries, and SIGINT or SIGTERM still ends
    the tool at once, its supervisor and every other process of its group with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pglistener", "listen", "--dsn",
         "host=127.0.0.1 port=1 connect_timeout=2", "x"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()       # the first failed attempt, logged
        assert "Connection refused" in line, line
        time.sleep(1.0)                     # retrying now, its subscribe still waiting
        proc.send_signal(signum)
        assert proc.wait(30) == 0
        wait_for(lambda: _group_gone(proc.pid), "the supervisor to exit with the tool")
        assert "leaked" not in proc.stderr.read()
    finally:
        if not _group_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_refused_database_ends_it_with_one_clear_line(dsn: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pglistener", "listen", "--dsn",
         make_conninfo(dsn, dbname="no_such_db"), "x"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pglistener:")]
    assert len(lines) == 1, proc.stderr
    assert 'database "no_such_db" does not exist' in lines[0] and "not retrying" in lines[0]
