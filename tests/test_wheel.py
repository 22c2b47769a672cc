"""The binary wheel as a user on a slim image gets it: built by scripts/wheel (auditwheel,
libpq and what it links inside), installed with pglistener[binary] into a bare Debian 12
root (python3 and venv: no compiler, no pg_config, no libpq; scripts/sidroot --bare makes it
once per machine), and the README's first example run there against a server on
127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

from fix_cluster import _cluster

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = '''
import sys
import psycopg
from pglistener import Gap, Supervisor, notify
from pglistener._core.dispatch import libpq_version, built_libpq_version

def main(dsn):
    with Supervisor(dsn).start() as sup:
        worker = sup.worker()
        with worker.subscribe("orders") as sub:
            with psycopg.connect(dsn, autocommit=True) as conn:
                notify(conn, "orders", "42")
            for item in sub:
                assert not isinstance(item, Gap)
                print(item.channel, item.payload, psycopg.pq.__impl__,
                      libpq_version() // 10000, built_libpq_version() // 10000)
                break

if __name__ == "__main__":
    main(sys.argv[1])
'''


def run(*cmd: str | Path, timeout: float = 900, **env: str) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_wheel_installs_with_binary_and_runs_where_nothing_compiles(tmp_path: Path) -> None:
    bare = Path(run(ROOT / "scripts/sidroot", "--bare").split()[-1])
    inside = ["scripts/sidroot", "--bare", "run"]
    assert run(*inside, "sh", "-c", "command -v cc gcc pg_config || echo none").split() == \
        ["none"], "the bare root has a compiler or pg_config"
    version = run(*inside, "python3", "-c",
                  "import sys; print('%d.%d' % sys.version_info[:2])").strip()

    dist = tmp_path / "dist"
    run(ROOT / "scripts/wheel", PGLISTENER_PYTHONS=version, OUT=str(dist))
    (wheel,) = dist.glob("pglistener-*.whl")
    assert "manylinux" in wheel.name and f"cp{version.replace('.', '')}" in wheel.name

    work = Path("/tmp") / f"pglistener-wheel-{uuid.uuid4().hex[:8]}"     # in the root
    here = bare / work.relative_to("/")                                   # and from here
    here.mkdir()
    try:
        shutil.copy(wheel, here / wheel.name)
        (here / "example.py").write_text(EXAMPLE)
        venv = work / "venv"
        run(*inside, "python3", "-m", "venv", venv)
        run(*inside, venv / "bin/pip", "install", "--quiet", f"{work / wheel.name}[binary]")
        with contextlib.contextmanager(_cluster)(
                free_port(), {"listen_addresses": "'127.0.0.1'"}, "16") as server:
            dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
            out = run(*inside, venv / "bin/python", work / "example.py", dsn, timeout=120)
        channel, payload, impl, runs, built = out.split()
        assert (channel, payload, impl) == ("orders", "42", "binary")
        assert runs == built        # the libpq it runs is the one it was built against
        # ... and it is the wheel's own copy, not one from the system (it has none).
        libs = run(*inside, "sh", "-c", f"ldd {venv}/lib/python{version}/site-packages/"
                   f"pglistener/_core/dispatch*.so")
        (libpq,) = [line for line in libs.splitlines() if "libpq" in line]
        assert "/site-packages/pglistener/_core/../../pglistener.libs/libpq-" in libpq
        assert "not found" not in libs
    finally:
        shutil.rmtree(here, ignore_errors=True)
