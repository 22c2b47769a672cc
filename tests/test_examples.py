"""The recipes in examples/, run as the README runs them: under uvicorn and gunicorn with
several workers, sharing one supervisor (one listening session on the server)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from fix_apps import ROOT, answers, free_port
from psycopg.conninfo import make_conninfo

from fix_pg import notify, sessions
from fix_supervisor import wait_for


@contextmanager
def serving(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run an app server until it answers on port; SIGTERM it afterwards, expecting a clean
    exit."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: answers(port) or proc.poll() is not None, "the server to answer")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def sse_client(port: int, channel: str) -> tuple[http.client.HTTPConnection, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/events/{channel}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline() == b": subscribed\n"     # its LISTEN is committed
    assert response.readline() == b"\n"
    return conn, response


def test_sse_under_uvicorn_workers_share_one_connection(dsn: str,
                                                        conn: psycopg.Connection) -> None:
    app_name = f"sse-{uuid.uuid4().hex[:8]}"
    port = free_port()
    cmd = [sys.executable, "-m", "pglistener", "supervise", "--dsn",
           make_conninfo(dsn, application_name=app_name), "--",
           sys.executable, "-m", "uvicorn", "examples.sse_starlette:app", "--workers", "2",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with serving(cmd, port):
        for round_ in range(5):          # clients come and go
            clients = [sse_client(port, "sse_ex") for _ in range(4)]
            notify(conn, "sse_ex", [f"event {round_}"])
            for _, response in clients:
                assert response.readline() == f'data: "event {round_}"\n'.encode()  # type: ignore[attr-defined]
            for client, _ in clients:
                client.close()
        # Two uvicorn workers, twenty clients: one listening session on the server.
        assert sessions(conn, app_name) == 1


def _get_next(port: int, channel: str, out: list[object]) -> None:
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    client.request("GET", f"/next/{channel}?timeout=30")
    response = client.getresponse()
    out.append((response.status, json.loads(response.read())))
    client.close()


def _wsgi_round(port: int, conn: psycopg.Connection, requests: int) -> list[object]:
    """Concurrent GET /next/gu, answered by notifications sent until every one is back
    (a request subscribes when a worker takes it, which the client cannot see)."""
    got: list[object] = []
    threads = [threading.Thread(target=_get_next, args=(port, "gu", got))
               for _ in range(requests)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        notify(conn, "gu", ["ping"])
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    return got


def test_gunicorn_under_supervise(dsn: str, conn: psycopg.Connection) -> None:
    app_name = f"gu-{uuid.uuid4().hex[:8]}"
    port = free_port()
    cmd = [sys.executable, "-m", "pglistener", "supervise", "--dsn",
           make_conninfo(dsn, application_name=app_name), "--",
           sys.executable, "-m", "gunicorn", "examples.wsgi_app:app", "-w", "2",
           "-b", f"127.0.0.1:{port}"]
    with serving(cmd, port):
        got = _wsgi_round(port, conn, 2)
        assert got == [(200, {"channel": "gu", "payload": "ping"})] * 2
        assert sessions(conn, app_name) == 1


def test_gunicorn_with_the_master_hook(dsn: str, conn: psycopg.Connection) -> None:
    app_name = f"guc-{uuid.uuid4().hex[:8]}"
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-c", "examples/gunicorn_conf.py",
           "examples.wsgi_app:app", "-b", f"127.0.0.1:{port}"]
    env = {"PGLISTENER_DSN": make_conninfo(dsn, application_name=app_name)}
    with serving(cmd, port, env):
        got = _wsgi_round(port, conn, 2)
        assert got == [(200, {"channel": "gu", "payload": "ping"})] * 2
        assert sessions(conn, app_name) == 1
    wait_for(lambda: sessions(conn, app_name) == 0, "on_exit to stop the supervisor")


def test_a_pool_fans_out_to_every_child(dsn: str, conn: psycopg.Connection) -> None:
    proc = subprocess.Popen([sys.executable, "examples/pool_fanout.py", dsn, "pool_ex", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline().split()
        assert header[:1] == ["children"] and len(header) == 3, header
        children = set(header[1:])
        answered: dict[str, str] = {}

        def read() -> None:         # until every child has answered, or the script ended
            assert proc.stdout is not None
            while set(answered) != children:
                line = proc.stdout.readline()
                if not line:
                    return
                pid, _, what = line.strip().partition(": ")
                answered[pid] = what

        reader = threading.Thread(target=read)
        reader.start()
        # A child prints nothing before it has subscribed: send until both have answered.
        deadline = time.monotonic() + 60
        while reader.is_alive() and time.monotonic() < deadline:
            notify(conn, "pool_ex", ["user:42"])
            reader.join(0.3)
        assert answered == {pid: "invalidate user:42" for pid in children}, (
            proc.stderr.read() if proc.poll() is not None and proc.stderr else answered)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_django_management_command_under_supervise(dsn: str,
                                                     conn: psycopg.Connection) -> None:
    cmd = [sys.executable, "-m", "pglistener", "supervise", "--dsn", dsn, "--",
           sys.executable, "-m", "django", "listen_orders", "orders_dj",
           "--settings=examples.django_site.settings"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "listening\n", proc.stderr and proc.stderr.read()
        notify(conn, "orders_dj", ["42"])
        assert proc.stdout.readline() == "order 42\n"
        proc.send_signal(signal.SIGTERM)        # forwarded: the command unsubscribes
        assert proc.wait(60) == 0
        assert proc.stdout.read() == "stopped\n"
    finally:
        proc.kill()
        proc.wait()
