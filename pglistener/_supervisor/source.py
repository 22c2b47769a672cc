"""What every source of the supervisor is: what one kind of stream needs in Python, as one
object each.

A source holds its connection shell, its registry and its compiled dispatcher (the decoder on
the dispatch core), carries out what its registry decides, and gives its part of stats() and
of a worker's "state" question. The Server (server.py) holds them by name (sources.py's
table, the one place that names them) and drives them alike: step() and fds() before the
loop waits, polled() for the core's run(), on_bad() and on_result() after it, apply() for a
registry's actions, check(), position() and subscribed() (or subscribe_changes()) for a
subscribe, cancel() and worker_gone() for what a worker drops. What every source shares
(rings, routes, hand-over, answers, the subscription ids, the plain connection one source
lends the others) is the Server's, and a source sees the Server only as a Host: the narrow
interface below, checked by the type checker. Each source lives in a folder of its own, its
Python shell and its decoder side by side: notify/ (LISTEN/NOTIFY), wal/ (a logical slot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .._core.dispatch import Dispatcher, PGConnection
from .connection import Timing
from .listen import ListenConnection
from .registry import Actions, Registry, Sub

if TYPE_CHECKING:
    from .control_server import Client
    from .server import Config

log = logging.getLogger("pglistener.supervisor")

Rows = list[list[tuple[bytes | None, ...]]]


class Host(Protocol):
    """What a source may use of the server (server.Server), and nothing more: what every
    source shares."""

    config: Config
    ids: Iterator[int]                  # subscription (ring) ids, one sequence for all
    sources: dict[str, Source]          # every source, by name (sources.py's order)
    stopping: bool
    orphaned: int                       # left unread by groups whose last member went

    def plain(self) -> ListenConnection:
        """The plain connection a source before the asking one lends."""

    def carry_out(self, source: Source, act: Actions) -> None:
        """Routes, rings to free, refusals, gaps and answers: what every source does
        alike."""

    def subscribe_options(self, message: dict[str, Any]) -> tuple[int, str, str | None, bool]:
        """A subscribe's ring size, overflow policy, group and key=, checked."""

    def open_subscription(self, client: Client, req: Any, message: dict[str, Any],
                          source: Source, channels: list[str],
                          position: tuple[int, int, int] | None) -> None:
        """A subscription of `source` on these routes: its ring made, then placed."""

    def reply(self, client: Client, message: dict[str, Any],
              fds: tuple[int, ...] = ()) -> None:
        """Answer a worker."""

    def reply_error(self, client: Client, req: Any, exc: Exception) -> None:
        """Fail a worker's request with exc (its class name is the worker's error)."""


def timing(config: Config) -> Timing:
    return Timing(config.connect_timeout, config.liveness_timeout, config.backoff_initial,
                  config.backoff_max, config.backoff_reset_after)


class Source:
    """What the Server asks of every source."""

    name: str                   # ReaderStats.source, and the subscribe request's `source`
    shell: ListenConnection
    registry: Registry
    dispatcher: Dispatcher
    #: A route kept with no entries when its last reader leaves (set_route(keep=)).
    keeps_routes = False
    #: This source's fields of Stats, and of the answer to a worker's "state" question, for
    #: a supervisor that runs without it.
    off_stats: dict[str, Any] = {}
    off_state: dict[str, Any] = {}

    def __init__(self, server: Host) -> None:
        self.server = server
        self.config = server.config

    @classmethod
    def enabled(cls, config: Config) -> bool:
        """Whether a supervisor with this config runs this source."""
        return True

    @classmethod
    def absent(cls, changes: bool) -> str:
        """What a subscribe naming this source is told by a supervisor without it (changes:
        it asked for table changes)."""
        return f"source={cls.name!r} is not read by this supervisor"

    def lends(self) -> ListenConnection | None:
        """The plain connection this source lends the sources after it, for what their own
        cannot ask (sources.py's order)."""
        return None

    def step(self, now: float) -> float:
        """Do what is due; the seconds the loop may wait before asking again."""
        return self.shell.step(now)

    def shells(self) -> list[ListenConnection]:
        """The connections being made that the loop waits on (fds(), advance())."""
        return [self.shell]

    def polled(self) -> tuple[Dispatcher, PGConnection | None, bool]:
        """This source's part of the core's run()."""
        conn = self.shell.conn
        return self.dispatcher, conn, conn is not None and self.shell.busy

    #: Why the connection went, when libpq does not say.
    ended = "the server closed the connection"

    def on_bad(self) -> None:
        """run() said the connection failed (or its stream ended)."""
        conn = self.shell.conn
        if conn is not None:
            self.shell.lose_now(conn.error_message or final_error(conn) or self.ended)

    def on_result(self) -> None:
        self.shell.on_result(time.monotonic())

    def apply(self, act: Actions) -> None:
        """Carry out what the registry decided, in its order."""
        self.server.carry_out(self, act)

    def routed(self, channel: str, routed: bool) -> None:
        """A channel's route changed (routed: somebody reads it)."""

    def subscribed(self, sub: Sub, position: tuple[int, int, int] | None) -> None:
        """A new subscription, its ring made: register it and answer it (or have it wait)."""
        self.apply(self.registry.add(sub))

    def orphan(self, sub: Sub) -> bool:
        """A group's last member left: whether its ring is kept (waits for a member)."""
        return False

    def check(self, message: dict[str, Any]) -> None:
        """Raises what a well-formed subscribe request that this source cannot take now is
        answered with."""

    def subscribe_changes(self, client: Client, req: Any, message: dict[str, Any],
                          changes: Any) -> None:
        """subscribe_changes(): find the tables, then subscribe to their changes' routes (the
        answer, or its error, is this source's to send)."""
        raise ValueError(f"source={self.name!r} has no table changes")

    def cancel(self, client: Client, req: Any) -> bool:
        """The worker gave up waiting for subscribe `req`: dropped, if it is this source's
        (True; the server answers it)."""
        sub, act = self.registry.cancel(client, req)
        if sub is None:
            return False
        self.apply(act)
        return True

    def worker_gone(self, client: Client) -> None:
        """A worker's connection went: its subscriptions of this source go too."""
        self.apply(self.registry.worker_gone(client))

    def position(self, message: dict[str, Any]) -> tuple[int, int, int] | None:
        """Where a subscribe request resumes: (commit LSN, LSN, seek LSN), None without
        after= (or for a source without positions)."""
        return None

    def query_connected(self) -> None:
        """The LISTEN connection is new: what this source asks on it, it asks now."""

    def query_lost(self) -> None:
        """The LISTEN connection went, with what this source had asked on it."""

    def stats(self, fields: dict[str, Any]) -> None:
        """This source's fields of Stats, into `fields` (those of the sources before it are
        there already)."""

    def state(self) -> dict[str, Any]:
        """This source's fields of the answer to a worker's "state" question."""
        return {}

    def close(self) -> None:
        self.shell.close()


def final_error(conn: PGConnection) -> str | None:
    """Why the server ended a COPY stream: its error result, when it has come already (a
    walsender's ERROR, e.g. from pgoutput), without waiting for one."""
    if conn.consume():
        got = conn.get_result()
        if got is not None and not got[0]:
            return got[2]
    return None


def group_key(sub: Sub) -> tuple[tuple[str, ...], str]:
    """What makes subscriptions members of one consumer group (Registry.entries)."""
    return tuple(sorted(sub.channels)), str(sub.group)
