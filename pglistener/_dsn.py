"""Reading a DSN without ever repeating its password: for errors, log lines, repr and the
benchmark's header."""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict


def parse(dsn: object) -> dict[str, Any]:
    """The DSN's parameters. Raises TypeError for what is not a str, and a ValueError that
    quotes no part of the DSN when libpq cannot parse it (its own message does: the whole
    URI, password and all)."""
    if not isinstance(dsn, str):
        raise TypeError(f"a DSN is a libpq connection string or URI (str), not "
                        f"{type(dsn).__name__}")
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid DSN: {_masked(str(exc).strip(), dsn)}") from None


def safe_target(params: dict[str, Any]) -> str:
    """Where a DSN connects, for log lines and repr: never the password."""
    host = params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or "default database"
    return f"{dbname} at {host}:{port}"


def describe(dsn: str) -> str:
    """safe_target() of a DSN, or a placeholder when it does not parse."""
    try:
        return safe_target(parse(dsn))
    except ValueError:
        return "<an invalid DSN>"


def _masked(message: str, dsn: str) -> str:
    # libpq quotes what it choked on; a quoted piece of the DSN may be the password.
    return re.sub(r'"([^"]*)"', lambda m: '"..."' if len(m[1]) > 2 and m[1] in dsn else m[0],
                  message)
