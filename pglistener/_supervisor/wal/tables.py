"""Table changes, the supervisor's side: a subscribe_changes() names tables; this finds each
one (an error when it does not exist), adds to the slot's publication those it lacks (one
conversation: find_tables()), and gives the routes its changes come by.

A change is routed by the key "\\0", its op letter and its table's oid (what wal/decoder.pyx
writes): no message prefix has a NUL, so changes and messages never share a route.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..._checks import OPS
from ..conversation import Command, Conversation

#: What subscribe_changes(ops=) takes, and the letter of each in pgoutput.


def route_key(op: str, oid: int) -> str:
    """The route of `op`'s changes to the table `oid`."""
    return f"\0{OPS[op]}{oid}"


def literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    if "\0" in text:
        raise ValueError(f"a table name cannot contain NUL: {text!r}")
    return "'" + text.replace("'", "''") + "'"


def bytea(text: str) -> str:
    """A SQL bytea literal of text's UTF-8 (a route key has a NUL, which text cannot hold)."""
    return f"'\\x{text.encode().hex()}'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def find_query(publication: str, names: Sequence[str]) -> bytes:
    """Each name's table: oid, schema, name, kind, whether the publication has it (its
    FOR ALL TABLES and FOR TABLES IN SCHEMA count), whether it has a replica identity
    (without one, PostgreSQL refuses UPDATE and DELETE on a published table), whether that
    is FULL, and its primary key's columns (hex of each name, comma-separated). NULLs where
    no such table exists."""
    values = ", ".join(f"({literal(name)}, {i})" for i, name in enumerate(names))
    return (
        f"SELECT c.oid, n.nspname, c.relname, c.relkind, "
        f"EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = {literal(publication)}"
        f" AND t.schemaname = n.nspname AND t.tablename = c.relname), "
        f"c.relreplident = 'f' OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index x "
        f"WHERE x.indrelid = c.oid AND x.indisprimary)) OR (c.relreplident = 'i' AND EXISTS "
        f"(SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisreplident)), "
        f"c.relreplident = 'f', (SELECT string_agg(encode(convert_to(a.attname::text, "
        f"'UTF8'), 'hex'), ',') FROM pg_index x JOIN pg_attribute a ON a.attrelid = "
        f"x.indrelid AND a.attnum = ANY (x.indkey) WHERE x.indrelid = c.oid AND "
        f"x.indisprimary) "
        f"FROM (VALUES {values}) AS w(name, i) "
        f"LEFT JOIN pg_class c ON c.oid = to_regclass(w.name) "
        f"LEFT JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY w.i").encode()


#: Every domain's base type (a domain over a domain to the type under both): pgoutput names
#: a column's declared type, where a SELECT's result names the base type. (An array of a
#: domain is named as itself by both: psycopg gives its text, and so do we.)
DOMAINS_QUERY = (
    b"WITH RECURSIVE d(oid, base) AS (SELECT oid, typbasetype FROM pg_catalog.pg_type "
    b"WHERE typtype = 'd' UNION ALL SELECT d.oid, t.typbasetype FROM d JOIN pg_catalog.pg_type "
    b"t ON t.oid = d.base WHERE t.typtype = 'd') "
    b"SELECT d.oid, d.base FROM d JOIN pg_catalog.pg_type b ON b.oid = d.base "
    b"AND b.typtype <> 'd'")


def primary_key(names: bytes | None) -> list[str]:
    """find_query()'s primary key columns, as names."""
    return [bytes.fromhex(n).decode() for n in (names or b"").decode().split(",") if n]


def base_types(rows: Sequence[tuple[bytes | None, ...]]) -> dict[int, int]:
    """DOMAINS_QUERY's rows as {domain oid: base oid}."""
    return {int(oid or 0): int(base or 0) for oid, base in rows}


def table_oids(routes: Sequence[str]) -> list[int]:
    """The tables whose changes these routes (channels and route_key()s) carry."""
    return sorted({int(r[2:]) for r in routes if r.startswith("\0") and r[2:].isdigit()})


def remake_query(publication: str, oids: Sequence[int]) -> bytes:
    """Make the publication again, with these tables (by oid), if it does not exist: it was
    dropped under the supervisor's subscriptions to their changes."""
    adds = "" if not oids else (
        f" FOR r IN SELECT oid::regclass AS t FROM pg_class WHERE oid IN "
        f"({', '.join(str(int(o)) for o in oids)}) LOOP EXECUTE format('ALTER PUBLICATION %s "
        f"ADD TABLE %s', {literal(ident(publication))}, r.t); END LOOP;")
    return (f"DO $pglistener$DECLARE r record; BEGIN IF NOT EXISTS (SELECT 1 FROM "
            f"pg_publication WHERE pubname = {literal(publication)}) THEN CREATE PUBLICATION "
            f"{ident(publication)};{adds} END IF; END$pglistener$").encode()


def add_statement(publication: str, tables: Sequence[str]) -> str:
    """What adds `tables` (schema-qualified, quoted) to the publication."""
    return f"ALTER PUBLICATION {ident(publication)} ADD TABLE {', '.join(tables)}"


def add_query(publication: str, tables: Sequence[str]) -> bytes:
    """add_statement() for each table, after making the publication if it does not exist yet
    (the WAL source may be making it at the same time), in one transaction. A table another
    subscribe added meanwhile, or the publication made meanwhile, is no error (by SQLSTATE,
    whatever the server's language); a role that may not add one fails it."""
    pub = ident(publication)
    adds = " ".join(f"BEGIN ALTER PUBLICATION {pub} ADD TABLE {table}; EXCEPTION WHEN "
                    f"duplicate_object THEN NULL; END;" for table in tables)
    return (f"DO $pglistener$BEGIN BEGIN CREATE PUBLICATION {pub}; EXCEPTION WHEN "
            f"duplicate_object OR unique_violation THEN NULL; END; {adds} END$pglistener$"
            ).encode()


class TableError(Exception):
    """A subscribe_changes() that cannot be served as asked: said to its caller."""


@dataclass
class Found:
    """The tables a subscribe_changes() named, as the server has them."""

    oids: list[int]                 # in the order named
    base_types: dict[int, int]      # every domain's base type, as DOMAINS_QUERY gives them
    # REPLICA IDENTITY FULL with a primary key: a keyed group keeps a row's order by its
    # primary key's columns, by table oid.
    key_columns: dict[int, list[str]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)   # added to the publication (quoted)


def find_tables(publication: str, names: Sequence[str],
                learned: Callable[[Found], None]) -> Conversation[Found]:
    """subscribe_changes()'s tables (schema-qualified names), one conversation on a plain
    connection: each found (TableError when one does not exist, is not a table or has no
    replica identity), what was learned of them handed to learned() before the publication
    changes (domains made since the stream began, primary keys), then those the publication
    lacks added to it. Returns what was found."""
    answer = yield Command(find_query(publication, names) + b"; " + DOMAINS_QUERY)
    if answer.error is not None or len(answer.results) < 2:
        raise TableError(f"looking for the tables {', '.join(names)} failed: {answer.error}")
    rows = answer.results[-2]
    missing = [n for n, row in zip(names, rows, strict=True) if row[0] is None]
    if missing:
        raise TableError(f"no such table: {', '.join(missing)} (a table that does not exist "
                         f"cannot be subscribed to: create it first)")
    odd = [n for n, row in zip(names, rows, strict=True) if row[3] not in (b"r", b"p")]
    if odd:
        raise TableError(f"not a table: {', '.join(odd)} (only tables have row changes in a "
                         f"publication)")
    found = Found([int(row[0] or 0) for row in rows], base_types(answer.results[-1]),
                  {int(row[0] or 0): primary_key(row[7]) for row in rows
                   if row[6] == b"t" and row[7]})
    learned(found)
    blind = [n for n, row in zip(names, rows, strict=True) if row[4] != b"t" and row[5] != b"t"]
    if blind:
        raise TableError(f"{', '.join(blind)} has no replica identity (no primary key): in a "
                         f"publication, PostgreSQL would refuse its UPDATEs and DELETEs. Give "
                         f"it a primary key, or run ALTER TABLE ... REPLICA IDENTITY FULL (or "
                         f"USING INDEX), then subscribe again")
    lacking = [f"{ident((row[1] or b'').decode())}.{ident((row[2] or b'').decode())}"
               for row in rows if row[4] != b"t"]
    if lacking:
        answer = yield Command(add_query(publication, lacking))
        if answer.error is not None:
            raise TableError(f"the publication {publication!r} lacks {', '.join(lacking)}, "
                             f"and adding them failed: {answer.error.strip()} (run as the "
                             f"tables' owner: {add_statement(publication, lacking)};)")
        found.added = lacking
    return found
