"""python -m pglistener listen, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from fix_pg import notify, sessions
from fix_supervisor import wait_for


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
