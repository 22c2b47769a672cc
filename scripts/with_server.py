"""Runs a command with PGLISTENER_TEST_DSN naming an embedded PostgreSQL (pgserver), started
here and removed afterwards; a DSN already in the environment is used as it is. For the
suites of Pythons that pgserver has no wheel for (scripts/test runs this with .venv)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit("usage: with_pgserver.py COMMAND [ARGS ...]")
    if os.environ.get("PGLISTENER_TEST_DSN"):
        return subprocess.call(argv)
    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pglistener-pg-") as datadir:
        server = pgserver.get_server(datadir, cleanup_mode="stop")
        try:
            env = {**os.environ, "PGLISTENER_TEST_DSN": server.get_uri()}
            return subprocess.call(argv, env=env)
        finally:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
