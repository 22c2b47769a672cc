"""What Supervisor.stats() reports: the connection, the server's queue, and every reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReaderStats:
    """One subscription's ring, as the supervisor sees it."""

    subscription: int       # its id in the supervisor
    channels: tuple[str, ...]
    pid: int                # the worker process that reads it
    delivered: int          # notifications written into the ring
    missed: int             # notifications counted into overflow gaps
    ring_bytes: int         # the ring's capacity
    lag_bytes: int          # written and not read yet
    overflow: str = "gap"   # its policy: "gap" or "block"
    held_seconds: float = 0.0   # time it held the connection waiting for room ("block")
    group: str | None = None    # its consumer group, if any

    @property
    def fill(self) -> float:
        """How full the ring is, 0.0 to 1.0; at 1.0 what comes next is missed."""
        return self.lag_bytes / self.ring_bytes


@dataclass(frozen=True)
class Stats:
    """A snapshot of the supervisor."""

    state: str                  # "listening", "connecting" or "disconnected"
    backend_pid: int | None     # the listening connection's server process, when listening
    reconnects: int             # outages of a working connection so far
    outage_seconds: float       # total time spent in outages (from the loss of a working
                                # connection to every LISTEN back), the current one too
    last_error: str | None      # the cause of the current outage, if any
    last_error_permanent: bool  # it is one that retrying alone will not mend (bad
                                # credentials, an unknown role or database)
    queue_usage: float | None   # the server's pg_notification_queue_usage(), 0.0 to 1.0,
                                # sampled at each heartbeat (liveness_timeout / 3)
    received: int               # notifications taken off the connection
    unrouted: int               # of those, on a channel nobody subscribed to any more
    workers: int                # connected worker processes
    readers: tuple[ReaderStats, ...]
    subscriptions: int = 0      # subscriptions held, answered or waiting for their LISTEN
    channels: tuple[str, ...] = ()  # channels somebody subscribes to, sorted
    held_seconds: float = 0.0   # time overflow="block" readers held the connection, in all
    orphaned: int = 0           # notifications left unread in the rings of consumer-group
                                # members that left (a reader's batch in hand not counted)

    @property
    def connected(self) -> bool:
        """Listening, with every LISTEN in place: streams are whole."""
        return self.state == "listening"

    @classmethod
    def _from_reply(cls, reply: dict[str, Any]) -> Stats:
        fields = {k: reply[k] for k in cls.__dataclass_fields__
                  if k not in ("readers", "channels")}
        readers = tuple(ReaderStats(**{**r, "channels": tuple(r["channels"])})
                        for r in reply["readers"])
        return cls(**fields, readers=readers, channels=tuple(reply["channels"]))
