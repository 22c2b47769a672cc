"""A running Supervisor per test, stopped afterwards whatever happened."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pglistener import Supervisor, Worker


@pytest.fixture
def supervisor(dsn: str) -> Iterator[Supervisor]:
    sup = Supervisor(dsn).start()
    try:
        yield sup
    finally:
        sup.stop()


@pytest.fixture
def worker(supervisor: Supervisor) -> Worker:
    return supervisor.worker()
