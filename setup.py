"""Declares the compiled extension; libpq's include and lib dirs come from pg_config."""

import re
import shutil
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def pg_config(flag: str) -> str:
    exe = shutil.which("pg_config")
    if exe is None:
        raise SystemExit(
            "pg_config not found: install the libpq headers (Debian: apt-get install libpq-dev)"
        )
    return subprocess.check_output([exe, flag], text=True).strip()


def version_num(text: str) -> int:
    """pg_config --version as PQlibVersion() gives it: "PostgreSQL 15.18" -> 150018; a
    pre-release counts as its major's first ("PostgreSQL 19rc1", "19beta2", "19devel" ->
    190000); the old three-part form keeps its first two ("PostgreSQL 9.6.24" -> 90006)."""
    found = re.search(r"PostgreSQL (\d+)(?:\.(\d+))?", text)
    if found is None:
        raise SystemExit(f"cannot read a PostgreSQL version from pg_config --version: {text!r}")
    return int(found[1]) * 10000 + int(found[2] or 0)


def libpq_version_num() -> int:
    return version_num(pg_config("--version"))


#: The ring's headers (_ring.h, _wire.h), included by every extension.
CORE = "pglistener/_core"


def libpq_extension(name: str, source: str) -> Extension:
    return Extension(
        name,
        [source],
        include_dirs=[CORE, pg_config("--includedir")],
        library_dirs=[pg_config("--libdir")],
        libraries=["pq"],
        define_macros=[("PGL_BUILT_LIBPQ_VERSION", str(libpq_version_num()))],
        extra_compile_args=["-O2", "-Wall"],
    )


def extensions() -> list[Extension]:
    return [
        # The compiled core: the dispatch core (the connections, the rings' writing end, the
        # loop), imported by the supervisor ...
        libpq_extension("pglistener._core.dispatch", "pglistener/_core/dispatch.pyx"),
        # ... and the readers' side: no libpq, imported by every worker process.
        Extension("pglistener._core.reader", ["pglistener/_core/reader.pyx"],
                  include_dirs=[CORE], extra_compile_args=["-O2", "-Wall"]),
        # Each source's decoder, beside its shell in the supervisor's folder for it.
        libpq_extension("pglistener._supervisor.notify.decoder",
                        "pglistener/_supervisor/notify/decoder.pyx"),
        libpq_extension("pglistener._supervisor.wal.decoder",
                        "pglistener/_supervisor/wal/decoder.pyx"),
        # The benchmark's `raw` system: the C ceiling of one connection.
        libpq_extension("pglistener.bench._raw", "pglistener/bench/_raw.pyx"),
    ]


if __name__ == "__main__":     # as setuptools runs it (a test imports version_num alone)
    setup(
        ext_modules=cythonize(
            extensions(),
            language_level=3,
            compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        )
    )
