"""The sdist, as `pip install pglistener` gets it: built, unpacked into a fresh venv (no
prebuilt wheel exists: the extension needs the system libpq), imported and run."""

from __future__ import annotations

import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pglistener

# Version-sensitive (see scripts/test): run on every supported Python.
pytestmark = pytest.mark.every_python

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str | Path, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_sdist_installs_in_a_fresh_venv_and_runs(tmp_path: Path, dsn: str) -> None:
    # From another directory: the repo's own build/ would shadow the `build` module.
    run(sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path / "dist", ROOT,
        cwd=tmp_path)
    (sdist,) = (tmp_path / "dist").glob("pglistener-*.tar.gz")
    assert sdist.name == f"pglistener-{pglistener.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {str(p.relative_to(ROOT)) for pattern in ("*.pyx", "*.pxd", "*.h")
               for p in (ROOT / "pglistener").rglob(pattern)}
    assert sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    assert {"LICENSE", "tests/conftest.py", "tests/fix_pg.py", "setup.py"} <= names
    assert not [n for n in names if n.endswith((".c", ".so"))], "build products in the sdist"

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", sdist, cwd=tmp_path, timeout=900)
    site = run(python, "-c", "import pglistener, pglistener._core.dispatch, "
               "pglistener._core.reader, pglistener._supervisor.notify.decoder, "
               "pglistener._supervisor.wal.decoder, "
               "pglistener.bench._raw; print(pglistener.__version__); "
               "print(pglistener.__file__)", cwd=tmp_path)
    version, where = site.split()
    assert version == pglistener.__version__
    package = Path(where).parent
    assert not list(package.rglob("*.c")), "generated C in the installed wheel"
    core = package / "_core"
    assert list(core.glob("dispatch*.so")) and list(core.glob("reader*.so"))
    assert (package / "py.typed").exists()
    licenses = list(Path(where).parents[1].glob("pglistener-*.dist-info/**/LICENSE*"))
    assert licenses, "no LICENSE in the wheel's metadata"

    # The CLI and the benchmark, as a plain install has them (no [bench] extra): without a
    # server it says what to do; with one, systems whose package is missing are skipped.
    assert "listen" in run(python, "-m", "pglistener", "--help", cwd=tmp_path)
    assert "pglistener[bench]" in run(python, "-m", "pglistener.bench", "--help", cwd=tmp_path)
    bare = subprocess.run([str(python), "-m", "pglistener.bench", "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2
    assert "pass --dsn, or pip install 'pglistener[bench]'" in bare.stderr
    secret = "SECRET-never-shown"       # trust authentication ignores it
    with_password = dsn + ("&" if "?" in dsn else " ") + f"password={secret}"
    out = run(python, "-m", "pglistener.bench", "--quick", "--scenario", "drain",
              "--rounds", "1", "--notifications", "2000", "--no-progress",
              "--dsn", with_password, "--json", tmp_path / "bench.json", cwd=tmp_path)
    assert "== drain" in out and "== targets" in out
    assert "skipped: asyncpg: asyncpg is not installed" in out
    assert secret not in out and secret not in (tmp_path / "bench.json").read_text()


def test_a_pre_release_libpq_builds() -> None:
    """setup.py reads pg_config's version as PQlibVersion() gives it, a pre-release too
    (wherever PostgreSQL 19's client is the newest installed it says "19rc1")."""
    version_num = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")["version_num"]
    assert version_num("PostgreSQL 15.18") == 150018
    assert version_num("PostgreSQL 18.6 (Debian 18.6-3)") == 180006
    assert version_num("PostgreSQL 19rc1 (Debian 19~rc1-1)") == 190000
    assert version_num("PostgreSQL 19beta2") == 190000
    assert version_num("PostgreSQL 19devel") == 190000
    assert version_num("PostgreSQL 9.6.24") == 90006
    with pytest.raises(SystemExit, match="cannot read a PostgreSQL version"):
        version_num("pg_config: command not found")
