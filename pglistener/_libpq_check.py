"""The one check that psycopg and our extension share a libpq."""

from __future__ import annotations

import psycopg

from . import _dispatch
from .errors import IncompatibleLibpq

FIX = (
    "pglistener calls libpq on psycopg's own connection, so both must use the system libpq: "
    "pip uninstall psycopg-binary && pip install 'psycopg[c]' (needs pg_config and libpq-dev), "
    "then rebuild pglistener against the same libpq"
)


def check_same_libpq() -> None:
    impl = psycopg.pq.__impl__
    if impl != "c":
        raise IncompatibleLibpq(f"psycopg uses its {impl!r} implementation, not 'c'. {FIX}")
    theirs = psycopg.pq.version()
    built = _dispatch.built_libpq_version()
    linked = _dispatch.libpq_version()
    if not theirs == built == linked:
        raise IncompatibleLibpq(
            f"psycopg runs libpq {theirs}, pglistener was built against {built} and runs "
            f"{linked}. {FIX}"
        )
