"""Runs a command with PGLISTENER_TEST_DSN naming a PostgreSQL started here and removed
afterwards; a DSN already in the environment is used as it is. The server is pgserver's where
it is installed, else one made with the server binaries beside pg_config (in the sid root:
PostgreSQL 19 from Debian's experimental suite), run as the `postgres` user when we are root.
For the suites of the Pythons that pgserver has no wheel for (scripts/test runs this); needs
nothing but the standard library."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit("usage: with_server.py COMMAND [ARGS ...]")
    if os.environ.get("PGLISTENER_TEST_DSN"):
        return subprocess.call(argv)
    try:
        import pgserver
    except ImportError:
        return with_initdb(argv)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pglistener-pg-") as datadir:
        server = pgserver.get_server(datadir, cleanup_mode="stop")
        try:
            return run(argv, server.get_uri())
        finally:
            server.cleanup()


def run(argv: list[str], dsn: str) -> int:
    return subprocess.call(argv, env={**os.environ, "PGLISTENER_TEST_DSN": dsn})


def with_initdb(argv: list[str]) -> int:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        sys.exit("with_server.py: no pgserver and no pg_config: no PostgreSQL to start")
    bindir = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
    if not (bindir / "initdb").exists():
        sys.exit(f"with_server.py: no pgserver, and no server binaries in {bindir} (Debian: "
                 f"apt-get install postgresql)")
    user = pwd.getpwnam("postgres").pw_uid if os.getuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="pglistener-pg-"))
    root.chmod(0o755)
    data, sock, logs = root / "data", root / "sock", root / "logs"
    for d in (data, sock, logs):
        d.mkdir(mode=0o700)
        if user is not None:
            os.chown(d, user, -1)
    port = 5432     # it names the socket in a directory of its own: no TCP, no clash

    def tool(*args: str) -> None:
        subprocess.run([str(bindir / args[0]), *args[1:]], user=user, cwd="/", check=True,
                       stdout=subprocess.DEVNULL)

    try:
        tool("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
             "--no-sync")
        tool("pg_ctl", "-D", str(data), "-l", str(logs / "server.log"), "-w", "-o",
             f"-h '' -k {sock} -p {port} -c fsync=off -c max_connections=300", "start")
        try:
            return run(argv, f"host={sock} port={port} user=postgres dbname=postgres")
        finally:
            tool("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
