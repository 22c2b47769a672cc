"""Declares the compiled extension; libpq's include and lib dirs come from pg_config."""

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


def libpq_version_num() -> int:
    # "PostgreSQL 15.18" -> 150018, the form PQlibVersion() returns.
    major, minor = pg_config("--version").split()[1].split(".")[:2]
    return int(major) * 10000 + int("".join(c for c in minor if c.isdigit()) or 0)


def libpq_extension(name: str, source: str) -> Extension:
    return Extension(
        name,
        [source],
        include_dirs=[pg_config("--includedir")],
        library_dirs=[pg_config("--libdir")],
        libraries=["pq"],
        define_macros=[("PGL_BUILT_LIBPQ_VERSION", str(libpq_version_num()))],
        extra_compile_args=["-O2", "-Wall"],
    )


extensions = [
    # The supervisor's side: the dispatch core (its connections, the rings' writing end, the
    # loop) and each source's decoder beside it.
    libpq_extension("pglistener._dispatch", "pglistener/_dispatch.pyx"),
    libpq_extension("pglistener._notify", "pglistener/_notify.pyx"),
    libpq_extension("pglistener._pgoutput", "pglistener/_pgoutput.pyx"),
    # The readers' side: no libpq, imported by every worker process.
    Extension("pglistener._reader", ["pglistener/_reader.pyx"],
              extra_compile_args=["-O2", "-Wall"]),
    # The benchmark's `raw` system: the C ceiling of one connection.
    libpq_extension("pglistener.bench._raw", "pglistener/bench/_raw.pyx"),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
