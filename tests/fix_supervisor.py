"""A running Supervisor per test, stopped afterwards whatever happened."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from pglistener import Supervisor, Worker


@pytest.fixture
def supervisor(dsn: str) -> Iterator[Supervisor]:
    sup = Supervisor(dsn).start()
    try:
        yield sup
    finally:
        sup.stop()


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll until predicate() is true; fail saying `what` did not happen within timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True when pid has exited (no such process, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def worker(supervisor: Supervisor) -> Worker:
    return supervisor.worker()
