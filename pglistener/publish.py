"""Sending notifications: pglistener.notify() and notify_json() on psycopg connections, and
WAL messages: emit() and emit_json().

The same checks as subscribe(), before anything is sent, so that a bad channel or a payload
the server would refuse fails here with a message that says what to do; the query is always
parameterised (pg_notify), never built from strings.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, overload

import psycopg

from ._core.reader import parse_lsn
from .channels import channel_bytes
from .errors import InvalidChannelName, PayloadTooLarge

#: PostgreSQL takes payloads shorter than BLCKSZ - NAMEDATALEN - 128 bytes: 8000 with the
#: default 8 KiB blocks, so at most 7999.
MAX_PAYLOAD_BYTES = 7999

_NOTIFY = "SELECT pg_notify(%s, %s)"


@overload
def notify(conn: psycopg.Connection[Any], channel: str, payload: str = "", *,
           max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None: ...


@overload
def notify(conn: psycopg.AsyncConnection[Any], channel: str, payload: str = "", *,
           max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> Coroutine[Any, Any, None]: ...


def notify(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    channel: str,
    payload: str = "",
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> Coroutine[Any, Any, None] | None:
    """NOTIFY `channel` with `payload` on a psycopg connection; with an AsyncConnection,
    await the result. Sent at once in autocommit mode, else when the transaction commits.

    Raises InvalidChannelName, or PayloadTooLarge when the payload's bytes (in the
    connection's encoding) would be refused by the server; max_payload_bytes is for servers
    built with another block size. Identical notifications in one transaction may be folded
    into one by the server."""
    params = (_checked_channel(channel), _checked_payload(conn, payload, max_payload_bytes))
    if isinstance(conn, psycopg.AsyncConnection):
        return _notify_async(conn, params)
    conn.execute(_NOTIFY, params)
    return None


@overload
def notify_json(conn: psycopg.Connection[Any], channel: str, value: Any, *,
                max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None: ...


@overload
def notify_json(conn: psycopg.AsyncConnection[Any], channel: str, value: Any, *,
                max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> Coroutine[Any, Any, None]: ...


def notify_json(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    channel: str,
    value: Any,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> Coroutine[Any, Any, None] | None:
    """notify() with `value` encoded as compact JSON (read it with subscribe_json())."""
    payload = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return notify(conn, channel, payload,
                  max_payload_bytes=max_payload_bytes)


async def _notify_async(conn: psycopg.AsyncConnection[Any], params: tuple[str, str]) -> None:
    await conn.execute(_NOTIFY, params)


def _checked_channel(channel: str) -> str:
    channel_bytes(channel)
    return channel


def _checked_payload(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
                     payload: object, max_payload_bytes: int) -> str:
    if not isinstance(payload, str):
        raise TypeError(f"a payload is a str, not {type(payload).__name__} "
                        f"(notify_json() sends other values as JSON)")
    if "\x00" in payload:
        raise ValueError("a payload cannot contain NUL: PostgreSQL text cannot hold it "
                         "(send binary data base64-encoded)")
    size = len(payload.encode(conn.info.encoding, errors="replace"))
    if size > max_payload_bytes:
        raise PayloadTooLarge(
            f"the payload is {size} bytes in {conn.info.encoding} and the server takes at "
            f"most {max_payload_bytes}: send a key (an id) and keep the data in a table")
    return payload


# -- the WAL source -------------------------------------------------------------------------------

_EMIT = "SELECT pg_logical_emit_message(%s::boolean, %s::text, %s::bytea)::text"

#: Between a channel and a message's key in its prefix: the supervisor routes by what comes
#: before it, so readers of the channel get keyed messages as any other.
KEY_SEPARATOR = "\x1f"
#: The longest key the supervisor keeps in a message's record (wal/decoder.pyx).
MAX_KEY_BYTES = 1024


def _prefix(channel: str, key: str | None) -> str:
    _checked_channel(channel)
    if KEY_SEPARATOR in channel:
        raise InvalidChannelName(f"a channel emitted to cannot contain \\x1f (it separates a "
                                 f"message's key): {channel!r}")
    if key is None:
        return channel
    if not isinstance(key, str) or not key or "\x00" in key:
        raise ValueError(f"a message's key is a non-empty str without NUL, not {key!r}")
    if len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        raise ValueError(f"a message's key is at most {MAX_KEY_BYTES} bytes in UTF-8: send an "
                         f"id, not {key[:20]!r}...")
    return f"{channel}{KEY_SEPARATOR}{key}"


@overload
def emit(conn: psycopg.Connection[Any], channel: str, payload: str | bytes = b"", *,
         transactional: bool = True, key: str | None = None) -> int: ...


@overload
def emit(conn: psycopg.AsyncConnection[Any], channel: str, payload: str | bytes = b"", *,
         transactional: bool = True, key: str | None = None) -> Coroutine[Any, Any, int]: ...


def emit(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    channel: str,
    payload: str | bytes = b"",
    *,
    transactional: bool = True,
    key: str | None = None,
) -> Coroutine[Any, Any, int] | int:
    """Send `payload` to subscribe(channel, source="wal") readers: a logical decoding
    message (pg_logical_emit_message) with the channel as its prefix. Returns its LSN (an
    int; with an AsyncConnection, await it).

    Transactional (the default): delivered if and when the transaction commits, in commit
    order, with the transaction's other messages. transactional=False: delivered as soon as
    the server decodes it, even if the transaction rolls back.

    No cluster-wide lock at commit, unlike NOTIFY, and no 8000-byte limit: bytes go as
    they are, a str as UTF-8. Raises InvalidChannelName for a channel subscribe() refuses.

    key: the message's key (a str), for a keyed consumer group (subscribe(..., group=,
    key=True)): every message of one key goes to one member while it lives. It travels in
    the prefix after the channel and a \\x1f; readers get it as Notification.key."""
    params = (bool(transactional), _prefix(channel, key), _content(payload))
    if isinstance(conn, psycopg.AsyncConnection):
        return _emit_async(conn, params)
    row = conn.execute(_EMIT, params).fetchone()
    assert row is not None
    return parse_lsn(row[0])


@overload
def emit_json(conn: psycopg.Connection[Any], channel: str, value: Any, *,
              transactional: bool = True, key: str | None = None) -> int: ...


@overload
def emit_json(conn: psycopg.AsyncConnection[Any], channel: str, value: Any, *,
              transactional: bool = True,
              key: str | None = None) -> Coroutine[Any, Any, int]: ...


def emit_json(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    channel: str,
    value: Any,
    *,
    transactional: bool = True,
    key: str | None = None,
) -> Coroutine[Any, Any, int] | int:
    """emit() with `value` encoded as compact JSON (read it with subscribe_json())."""
    payload = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return emit(conn, channel, payload, transactional=transactional, key=key)


async def _emit_async(conn: psycopg.AsyncConnection[Any], params: tuple[bool, str, bytes]) -> int:
    cur = await conn.execute(_EMIT, params)
    row = await cur.fetchone()
    assert row is not None
    return parse_lsn(row[0])


def _content(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        # surrogateescape: a payload read back from a WAL Notification goes out byte-exact.
        return payload.encode("utf-8", "surrogateescape")
    raise TypeError(f"a payload is bytes or str, not {type(payload).__name__} "
                    f"(emit_json() sends other values as JSON)")
