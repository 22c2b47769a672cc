"""examples/sse_changes.py in a real browser (Debian's chromium and chromedriver, driven by
selenium; scripts/browser installs them): the page open, rows changed, the app server
restarted mid-stream with rows changed while it is down, more rows changed: the page's log
ends with every change once, in order, and its table with the table's rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from fix_apps import ROOT, answers, free_port
from fix_cluster import Cluster

from fix_supervisor import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium under selenium, as this machine runs it (no network but loopback)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    assert not missing, f"{missing} missing: run scripts/browser (Debian's chromium and " \
                        f"chromium-driver)"
    profile = tempfile.mkdtemp(prefix="pglistener-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def app_server(port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.sse_changes:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", "1"],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        wait_for(lambda: answers(port) or proc.poll() is not None, "the app to answer")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def page_log(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#log li')].map(li => li.textContent)")


def page_rows(driver: Any) -> list[list[str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#rows tbody tr')]"
        ".map(tr => [...tr.children].map(td => td.textContent))")


def logged(op: str, row: dict[str, Any]) -> str:
    return f"{op} {json.dumps(row, separators=(',', ':'))}"


def test_a_live_page_loses_nothing_across_an_app_restart(
    logical_cluster: Cluster, browser: Any
) -> None:
    table = f"sse_items_{uuid.uuid4().hex[:8]}"
    slot = f"sse_{uuid.uuid4().hex[:8]}"
    env = {"PGLISTENER_DSN": logical_cluster.dsn, "SSE_TABLE": table, "SSE_SLOT": slot}
    pg = psycopg.connect(logical_cluster.dsn, autocommit=True)
    pg.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text, qty int)")
    pg.execute(f"INSERT INTO {table} (name, qty) VALUES ('apple', 1), ('pear', 2)")
    port = free_port()
    expected: list[str] = []
    try:
        with app_server(port, env):
            browser.get(f"http://127.0.0.1:{port}/")
            wait_for(lambda: len(page_rows(browser)) == 2, "the page to show the table")
            pg.execute(f"INSERT INTO {table} (name, qty) VALUES ('fig', 3)")
            pg.execute(f"UPDATE {table} SET qty = 10 WHERE name = 'apple'")
            pg.execute(f"DELETE FROM {table} WHERE name = 'pear'")
            expected += [logged("insert", {"id": 3, "name": "fig", "qty": 3}),
                         logged("update", {"id": 1, "name": "apple", "qty": 10}),
                         logged("delete", {"id": 2})]
            wait_for(lambda: len(page_log(browser)) == 3, "the first changes on the page")
            assert page_log(browser) == expected
        # The app is down (its supervisor too): these wait in the slot for the page.
        pg.execute(f"INSERT INTO {table} (name, qty) VALUES ('kiwi', 4)")
        pg.execute(f"UPDATE {table} SET qty = qty + 1 WHERE name = 'fig'")
        expected += [logged("insert", {"id": 4, "name": "kiwi", "qty": 4}),
                     logged("update", {"id": 3, "name": "fig", "qty": 4})]
        with app_server(port, env):
            wait_for(lambda: len(page_log(browser)) >= 5, "the page to reconnect and catch up",
                     timeout=60)
            pg.execute(f"INSERT INTO {table} (name, qty) VALUES ('lime', 5)")
            expected.append(logged("insert", {"id": 5, "name": "lime", "qty": 5}))
            wait_for(lambda: len(page_log(browser)) >= 6, "the last change on the page")
            assert page_log(browser) == expected            # each once, in order
            rows = [[str(v) for v in row] for row in
                    pg.execute(f"SELECT id, name, qty FROM {table} ORDER BY id")]
            assert page_rows(browser) == rows
    finally:
        wait_for(lambda: pg.execute("SELECT count(*) FROM pg_replication_slots WHERE "
                                    "slot_name = %s AND active", (slot,)).fetchone() == (0,),
                 "the slot to be released")
        pg.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                   "WHERE slot_name = %s", (slot,))
        pg.execute(f"DROP TABLE {table}")
        pg.close()
