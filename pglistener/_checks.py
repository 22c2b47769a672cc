"""The checks of what users pass, shared by both sides: a worker checks its arguments before
the trip (so that a bad one costs none), the supervisor checks what comes over the control
socket again with the same code."""

from __future__ import annotations

from collections.abc import Sequence

#: subscribe_changes(ops=): each kind of change, and its letter in pgoutput.
OPS = {"insert": "I", "update": "U", "delete": "D", "truncate": "T"}

SOURCES = ("notify", "wal")


def check_source(source: object) -> str:
    """A valid source, or an error that names them."""
    if source not in SOURCES:
        raise ValueError(f"source is 'notify' (LISTEN/NOTIFY) or 'wal' (messages from "
                         f"pglistener.emit, read from the Supervisor's slot), not {source!r}")
    return str(source)


OVERFLOW_POLICIES = ("gap", "block")


def check_overflow(overflow: object) -> str:
    """A valid overflow policy, or an error that names them."""
    if not isinstance(overflow, str):
        raise TypeError(f"overflow is 'gap' or 'block' (a str), not {type(overflow).__name__}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow is 'gap' (miss what does not fit, and say so with a Gap) "
                         f"or 'block' (wait for room, up to block_timeout), not {overflow!r}")
    return overflow


def check_group(group: object) -> str | None:
    """A valid consumer group name (or None), or an error saying what one is."""
    if group is None:
        return None
    if not isinstance(group, str):
        raise TypeError(f"group is a name (a str) or None, not {type(group).__name__}")
    if not group or len(group) > 200:
        raise ValueError(f"a group name is 1 to 200 characters, not {len(group)}")
    return group


def qualified(name: object) -> str:
    """A table as subscribe_changes() takes it: "orders" is "public.orders"; a name with a
    dot is schema.table, each part as SQL reads it (unquoted parts fold to lower case,
    "Quoted" ones stay)."""
    if not isinstance(name, str):
        raise TypeError(f"a table is named by a str ('orders', 'public.orders'), not "
                        f"{type(name).__name__}")
    name = name.strip()
    if not name or "\0" in name:
        raise ValueError(f"not a table name: {name!r}")
    return name if "." in name else f"public.{name}"


def table_list(tables: str | Sequence[str]) -> tuple[str, ...]:
    names = (tables,) if isinstance(tables, str) else tuple(tables)
    if not names:
        raise ValueError("subscribe_changes() needs at least one table")
    return tuple(dict.fromkeys(qualified(name) for name in names))


def op_list(ops: object) -> tuple[str, ...]:
    """ops= as given (None: every kind), checked."""
    if ops is None:
        return tuple(OPS)
    names = (ops,) if isinstance(ops, str) else tuple(ops)     # type: ignore[arg-type]
    bad = [op for op in names if op not in OPS]
    if bad or not names:
        raise ValueError(f"ops is a subset of {set(OPS)}, not {ops!r}")
    return tuple(op for op in OPS if op in names)
