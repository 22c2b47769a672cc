from __future__ import annotations

import pytest
from fix_cluster import (  # noqa: F401 - fixtures
    VERSIONS,
    cluster,
    logical_cluster,
    replica15,
    replica19,
)
from fix_proxy import proxy  # noqa: F401 - fixtures
from fix_wal import pg, slot  # noqa: F401 - fixtures

from fix_pg import conn, dsn  # noqa: F401 - fixtures
from fix_supervisor import supervisor, worker  # noqa: F401 - fixtures


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked every_server runs on a logical_cluster of each version we claim; the
    rest of the WAL tests on fix_cluster.DEFAULT's alone."""
    if "logical_cluster" in metafunc.fixturenames and \
            metafunc.definition.get_closest_marker("every_server") is not None:
        metafunc.parametrize("logical_cluster", VERSIONS, indirect=True, scope="module",
                             ids=[f"pg{v}" for v in VERSIONS])
