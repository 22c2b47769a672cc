"""Opening a subscription, and stopping them all: what every kind of subscription shares
beside the compiled stream core (`_reader.Stream`), on which `Subscription` (worker.py) and
`AsyncSubscription` (aio.py) add only their way of waiting.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .. import _protocol
from .._checks import check_group, check_overflow, check_source, op_list, table_list
from .._core import reader as _reader
from .._core.reader import Change, Notification, RingReader
from .._sizes import check_ring_bytes
from ..channels import channel_bytes
from ..errors import (
    InvalidChannelName,
    InvalidChannelType,
    PGListenerError,
    ProtocolMismatch,
    TooManySubscriptions,
    WalSourceError,
)
from .control import Control

log = logging.getLogger("pglistener.worker")

_ERRORS: dict[str, type[Exception]] = {
    "InvalidChannelName": InvalidChannelName,
    "InvalidChannelType": InvalidChannelType,
    "ProtocolMismatch": ProtocolMismatch,
    "TooManySubscriptions": TooManySubscriptions,
    "ValueError": ValueError,
    "WalSourceError": WalSourceError,
}

_S = TypeVar("_S", bound=_reader.Stream)

#: Every open stream of this process, for request_stop().
_open: weakref.WeakSet[_reader.Stream] = weakref.WeakSet()


@dataclass(frozen=True)
class Request:
    """A checked subscribe request: the channels (or tables) it names, in order, and the
    message for the supervisor."""

    names: tuple[str, ...]
    message: dict[str, Any]

    @property
    def wal(self) -> bool:
        """Whether it reads the Supervisor's slot (its errors and timeouts say so)."""
        return self.message.get("source") == "wal"


@dataclass(frozen=True)
class Options:
    """What every subscribe* method takes beside its channels or tables, the Worker's defaults
    (group, source, restarted) filled in; request() and changes() check them and build the
    request, so that a bad argument costs no trip."""

    ring_bytes: int | None = None
    overflow: str = "gap"
    group: str | None = None
    source: str = "notify"
    after: Any = None
    key: Any = None
    restarted: bool = False

    def request(self, channel: str | Sequence[str]) -> Request:
        """The subscribe request for `channel` (one name or several)."""
        channels = channel_list(channel)
        key, source = self.key, self.source
        if key not in (None, True, False):
            raise ValueError(f"key=True sends every message of one key (emit(key=)) to one "
                             f"member of the group; not {key!r}")
        if key and (source != "wal" or self.group is None):
            raise ValueError("key=True orders a consumer group's WAL stream by key: give "
                             "group= and source='wal' too")
        message: dict[str, Any] = {"op": "subscribe", "channels": list(channels)}
        if self.restarted:
            message["restart"] = True
        if self.ring_bytes is not None:
            message["ring_bytes"] = check_ring_bytes(self.ring_bytes)
        if check_overflow(self.overflow) != "gap":
            message["overflow"] = self.overflow
        if check_group(self.group) is not None:
            message["group"] = self.group
        if check_source(source) == "wal":
            for name in channels:
                if "\x1f" in name:
                    raise InvalidChannelName(f"a WAL channel cannot contain \\x1f (it "
                                             f"separates a message's key, emit(key=)): "
                                             f"{name!r}")
            message["source"] = "wal"
            message.update(after_fields(self.after))
        elif self.after is not None:
            raise ValueError("after= resumes a WAL stream: give source='wal' too (NOTIFY "
                             "keeps nothing to resume from)")
        if key:
            message["key"] = True
        return Request(channels, message)

    def changes(self, tables: str | Sequence[str], ops: Any) -> Request:
        """The subscribe request for the row changes of `tables` (read from the slot)."""
        if self.key not in (None, True, False):
            raise ValueError(f"key=True sends every change of one row (its replica identity) "
                             f"to one member of the group; not {self.key!r}")
        if self.key and self.group is None:
            raise ValueError("key=True orders a consumer group's stream by key: give group= "
                             "too")
        names = table_list(tables)
        message = replace(self, source="wal", key=None).request(["changes"]).message
        del message["channels"]
        message["changes"] = {"tables": list(names), "ops": list(op_list(ops))}
        if self.key:
            message["key"] = True
        return Request(names, message)


def open_stream(cls: type[_S], path: str, request: Request, timeout: float | None) -> _S:
    """Subscribe over this process's control connection and wrap the ring in a `cls` (a
    Stream subclass; its `decoder` attribute, if any, decodes payloads). Returns once the
    supervisor has answered (LISTEN committed, the slot being read): a blocking call
    (asyncio's way is aio.open_async)."""
    ctl = Control.get(path)
    try:
        reply, fds = ctl.request(request.message, timeout)
    except TimeoutError:
        raise TimeoutError(timed_out(request, timeout, _why_not(ctl, request.wal))) from None
    return wrap_stream(cls, ctl, request.names, reply, fds)


def after_fields(after: Any) -> dict[str, Any]:
    """The subscribe request's fields for after=: a Notification of the WAL source (or its
    `position`, a (commit_lsn, lsn) pair) resumes exactly after it; an int LSN (a message's
    `lsn`) is sought in what the slot sends again."""
    if after is None:
        return {}
    if isinstance(after, Change):
        after = after.position
    elif isinstance(after, Notification):
        if after.position is None:
            raise ValueError("after= takes a WAL message (source='wal'); this notification "
                             "came from NOTIFY and has no position")
        after = after.position
    if isinstance(after, bool) or not isinstance(after, (int, tuple, list)):
        raise TypeError(f"after= is an LSN (int), a WAL Notification or Change or its "
                        f"position (commit_lsn, lsn), not {type(after).__name__}")
    if isinstance(after, int):
        if not 0 < after < 1 << 64:
            raise ValueError(f"after= is an LSN between 1 and 2**64 - 1, not {after}")
        return {"after_lsn": after}
    if (len(after) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                   and 0 < v < 1 << 64 for v in after)):
        raise ValueError(f"after= as a position is (commit_lsn, lsn), two LSNs, not {after!r}")
    return {"after": [after[0], after[1]]}


def wrap_stream(cls: type[_S], ctl: Any, channels: tuple[str, ...], reply: dict[str, Any],
                fds: list[int]) -> _S:
    """The stream of a subscribe's reply, which came over `ctl` (a Control, or aio's
    AsyncControl): the subscription belongs to that connection."""
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        error = _ERRORS.get(str(reply.get("error")), PGListenerError)
        raise error(reply.get("message", "subscribe failed"))
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise PGListenerError("the supervisor sent a malformed subscription")
    memfd, efd, wake = fds
    sub_id = int(reply["sub"])
    release = _protocol.encode({"op": "unsubscribe", "sub": sub_id})
    try:
        reader = RingReader(memfd, efd, ctl.sock.fileno(), wake)
    except BaseException:
        os.close(efd)
        os.close(wake)
        ctl.post(release)
        raise
    finally:
        os.close(memfd)     # the mapping stays; the descriptor is not needed
    decoder: Callable[[str], Any] | None = getattr(cls, "decoder", None)
    stream = cls(reader, efd, ctl, sub_id, channels, release, decoder,
                 _undecodable if decoder is not None else None)
    _open.add(stream)
    return stream


def request_stop() -> None:
    """End every subscription's reading in this process after the current item: the next
    get() (or iteration step) raises SubscriptionClosed; blocked ones wake up for it. Safe to
    call from a signal handler."""
    _reader.request_stop()
    for stream in list(_open):
        stream._wake()


def channel_list(channel: str | Sequence[str]) -> tuple[str, ...]:
    """One or more valid channel names, in order, without repeats (checked here so that a bad
    one fails without a trip; the supervisor checks again)."""
    if isinstance(channel, str):
        names: tuple[str, ...] = (channel,)
    elif isinstance(channel, (bytes, bytearray, memoryview)) or not isinstance(channel, Iterable):
        raise InvalidChannelType(
            f"channel is a str or a sequence of str, not {type(channel).__name__}: pass e.g. "
            f"'orders' or ['orders', 'refunds']")
    else:
        names = tuple(channel)
        for name in names:
            if not isinstance(name, str):
                raise InvalidChannelType(f"channel names are str, not {type(name).__name__} "
                                         f"({name!r}): pass e.g. ['orders', 'refunds']")
    if not names:
        raise InvalidChannelName("subscribe to at least one channel")
    for name in names:
        channel_bytes(name)
    return tuple(dict.fromkeys(names))


def _why_not(ctl: Control, wal: bool = False) -> str:
    """What the supervisor says keeps it from listening, for a subscribe that timed out."""
    try:
        state, _ = ctl.request({"op": "state"}, timeout=2.0)
    except (TimeoutError, PGListenerError):
        return "the supervisor does not answer"
    return why_not(state, wal)


def timed_out(request: Request, timeout: float | None, why: str) -> str:
    """What a subscribe that timed out says."""
    names = ", ".join(request.names)
    if request.wal:
        return (f"the WAL source did not start reading the slot within {timeout} s "
                f"(for {names!r}): {why}")
    return f"LISTEN {names!r} was not committed within {timeout} s: {why}"


def why_not(state: dict[str, Any], wal: bool = False) -> str:
    """The answer to a "state" request, said for a subscribe that timed out."""
    if wal and state.get("wal_last_error"):
        return f"the supervisor cannot read the slot: {state['wal_last_error']}"
    if wal:
        return "the replication connection is still being set up"
    if state.get("last_error"):
        return f"the supervisor cannot listen: {state['last_error']}"
    if not state.get("connected"):
        return "the supervisor is still connecting"
    return "the server has not answered the LISTEN yet"


def _undecodable(note: Notification) -> None:
    log.error("skipped a payload on %r that is not JSON: %.200r", note.channel, note.payload)
