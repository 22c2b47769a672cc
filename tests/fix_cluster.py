"""A PostgreSQL cluster that the tests own, to stop, restart and turn into a standby.

The session server (fix_pg.py) may be one we must not restart (PGLISTENER_TEST_DSN), so the
tests that take a server down get their own, made with the PostgreSQL 16 binaries that the
pgserver wheel ships. PostgreSQL refuses to run as root: then the cluster runs as pgserver's
own system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _binaries() -> Path:
    """pgserver's PostgreSQL 16, or (where pgserver has no wheel, as on Python 3.13) the
    server binaries next to the system's pg_config."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
        return Path(POSTGRES_BIN_PATH)
    except ImportError as exc:
        missing = exc
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        bindir = Path(subprocess.check_output([pg_config, "--bindir"], text=True).strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    pytest.fail(f"the fault tests run their own PostgreSQL: no pgserver ({missing}) and no "
                f"server binaries beside pg_config (Debian: apt-get install postgresql)")


def _run_as() -> int | None:
    """PostgreSQL refuses root: run it as pgserver's user, or the system's postgres."""
    if os.getuid() != 0:
        return None
    try:
        from pgserver.utils import ensure_user_exists
    except ImportError:
        return pwd.getpwnam("postgres").pw_uid
    entry = ensure_user_exists("pgserver")
    assert entry is not None
    return entry.pw_uid


class Cluster:
    """One data directory and its server, on a Unix socket only."""

    def __init__(self, root: Path, name: str, port: int) -> None:
        self.bin = _binaries()
        self.uid = _run_as()
        self.data = root / name
        self.sock = root / f"{name}-sock"
        self.port = port
        self.log = root / f"{name}.log"
        self.settings: dict[str, str] = {}     # more -c options for the server
        for d in (self.data, self.sock):
            d.mkdir(mode=0o700)
            if self.uid is not None:
                os.chown(d, self.uid, -1)
        if self.uid is not None:
            self.log.touch()
            os.chown(self.log, self.uid, -1)

    @property
    def dsn(self) -> str:
        return f"host={self.sock} port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([str(self.bin / tool), *args], user=self.uid, cwd="/",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{tool} {' '.join(args)} failed:\n{result.stdout}"

    def init(self) -> Cluster:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        return self

    def start(self) -> None:
        options = (f"-h '' -k {self.sock} -p {self.port} -c fsync=off "
                   f"-c full_page_writes=off -c synchronous_commit=off"
                   + "".join(f" -c {k}={v}" for k, v in self.settings.items()))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str) -> None:
        self.stop(mode)
        self.start()

    def standby(self, name: str, port: int) -> Cluster:
        """A hot standby of this (running) cluster, started, with its settings."""
        standby = Cluster(self.data.parent, name, port)
        standby.settings = dict(self.settings)
        self._run("pg_basebackup", "-h", str(self.sock), "-p", str(self.port), "-U",
                  "postgres", "-D", str(standby.data), "-R", "--no-sync", "--checkpoint=fast")
        standby.start()
        return standby

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")


#: What the WAL source needs of a server (and a short wal_sender_timeout, so that a test
#: sees a client that stops giving feedback dropped in seconds). Commits are flushed, so
#: that an immediate stop loses no transaction the tests were told had committed.
LOGICAL = {"wal_level": "logical", "max_wal_senders": "10", "max_replication_slots": "10",
           "wal_sender_timeout": "5s", "hot_standby_feedback": "on",
           "synchronous_commit": "on"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from _cluster(5432, {})


@pytest.fixture(scope="module")
def logical_cluster() -> Iterator[Cluster]:
    """A cluster with wal_level = logical, for the WAL source."""
    yield from _cluster(5442, LOGICAL)


def _cluster(port: int, settings: dict[str, str]) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="pglistener-cluster-"))
    root.chmod(0o755)
    made: list[Cluster] = []
    try:
        primary = Cluster(root, "primary", port).init()
        primary.settings = dict(settings)
        made.append(primary)
        primary.start()
        yield primary
    finally:
        for c in made:
            subprocess.run([str(c.bin / "pg_ctl"), "-D", str(c.data), "-m", "immediate",
                            "stop"], user=c.uid, cwd="/", capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
