"""What Supervisor.stats() reports: the connection, the server's queue, and every reader.

These dataclasses are the schema, declared once: the supervisor fills them (its control reply
is `dataclasses.asdict` of a Stats; no field has a default, so it cannot leave one out),
Supervisor.stats() rebuilds them from that reply, and pglistener.prometheus exports every
field from the metadata given here (`metric`, `label`). A figure added here reaches every view
of it; tests/test_stats.py fails for one that does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COUNTER = "counter"     # only grows: Prometheus adds _total
GAUGE = "gauge"
INFO = "info"           # a string: a gauge of 1 labelled with its value
LABEL = "label"         # a reader's identity: a label on every per-reader metric
SIZE = "size"           # a tuple: exported as its length


def metric(kind: str, help: str, name: str | None = None) -> Any:
    """A field with how Prometheus shows it (as `name`, when not the field's own)."""
    return dataclasses.field(metadata={"kind": kind, "help": help, "name": name})


def label(name: str) -> Any:
    """A reader's field that labels its metrics, as `name`."""
    return dataclasses.field(metadata={"kind": LABEL, "label": name})


def nested() -> Any:
    """A field of other dataclasses (Stats.readers): exported by their own fields."""
    return dataclasses.field()


@dataclass(frozen=True)
class ReaderStats:
    """One subscription's ring, as the supervisor sees it."""

    subscription: int = label("subscription")         # its id in the supervisor
    channels: tuple[str, ...] = label("channels")
    pid: int = label("pid")                           # the worker process that reads it
    delivered: int = metric(COUNTER, "Notifications written into a reader's ring")
    missed: int = metric(COUNTER, "Notifications a reader missed (counted in overflow gaps)")
    ring_bytes: int = metric(GAUGE, "The capacity of a reader's ring")
    lag_bytes: int = metric(GAUGE, "Bytes written into a reader's ring and not read yet")
    overflow: str = label("policy")                   # "gap" or "block"
    held_seconds: float = metric(
        COUNTER, "Time a reader held the connection waiting for room (overflow='block')")
    group: str | None = label("group")                # its consumer group, if any
    source: str = label("source")                     # "notify" or "wal"

    @property
    def fill(self) -> float:
        """How full the ring is, 0.0 to 1.0; at 1.0 what comes next is missed."""
        return self.lag_bytes / self.ring_bytes


@dataclass(frozen=True)
class Stats:
    """A snapshot of the supervisor."""

    # "listening", "connecting" or "disconnected"
    state: str = metric(INFO, "The listening connection's state")
    # the listening connection's server process, when listening
    backend_pid: int | None = metric(GAUGE, "The listening connection's server pid")
    reconnects: int = metric(COUNTER, "Outages of a working connection")
    # total time spent in outages (from the loss of a working connection to every LISTEN
    # back), the current one too
    outage_seconds: float = metric(COUNTER, "Time spent in outages")
    # the listening connection's, and the WAL source's while it fails ("WAL source: ...":
    # held until its stream has run for a second, so a stream that fails over and over
    # says why all the while)
    last_error: str | None = metric(INFO, "The cause of the current outage")
    # it is one that retrying alone will not mend (bad credentials, an unknown role or
    # database)
    last_error_permanent: bool = metric(GAUGE, "1 when retrying alone will not mend the error")
    # the server's pg_notification_queue_usage(), 0.0 to 1.0, sampled at each heartbeat
    # (liveness_timeout / 3)
    queue_usage: float | None = metric(GAUGE, "pg_notification_queue_usage() of the server",
                                       name="server_queue_usage")
    received: int = metric(COUNTER, "Notifications taken off the connection")
    # of those, on a channel nobody subscribed to any more
    unrouted: int = metric(COUNTER, "Notifications on channels nobody subscribes to")
    workers: int = metric(GAUGE, "Worker processes connected")
    readers: tuple[ReaderStats, ...] = nested()
    # subscriptions held, answered or waiting for their LISTEN
    subscriptions: int = metric(GAUGE, "Subscriptions held")
    # channels somebody subscribes to, sorted
    channels: tuple[str, ...] = metric(SIZE, "Channels somebody subscribes to")
    # time overflow="block" readers held the connection, in all
    held_seconds: float = metric(COUNTER, "Time blocking readers held the connection")
    # notifications a consumer group had no member for: what the last member of a NOTIFY
    # group had not consumed when it left (of a WAL group, once group_hold passed), and
    # what a leaving member's mates had no room for (what a member leaves goes to its mates)
    orphaned: int = metric(COUNTER, "Notifications left unread by group members that left")
    # control connections: a process has one, and one more per asyncio event loop
    connections: int = metric(GAUGE, "Control connections of worker processes")
    # -- the WAL source (Supervisor(slot=...)); None or 0 without one
    slot: str | None = metric(INFO, "The replication slot the WAL source reads")
    # "streaming", "connecting" or "disconnected"
    wal_state: str | None = metric(INFO, "The replication connection's state")
    wal_backend_pid: int | None = metric(GAUGE, "The replication connection's server pid")
    wal_reconnects: int = metric(COUNTER, "Outages of a working replication connection")
    wal_last_error: str | None = metric(INFO, "Why the WAL source is not streaming")
    wal_received: int = metric(COUNTER, "Logical decoding messages read from the slot")
    wal_unrouted: int = metric(COUNTER, "Messages read from the slot that nobody subscribes to")
    # the LSN the slot may be confirmed to: every reader is done with what comes before
    wal_confirmed_lsn: int = metric(GAUGE, "LSN the supervisor confirmed to the slot")
    # bytes of WAL the slot keeps (its server's WAL position - restart_lsn), sampled with a
    # heartbeat on the server the slot lives on (with slot_dsn, by a probe connection
    # there); None without a slot, or until sampled
    slot_lag_bytes: int | None = metric(GAUGE, "Bytes of WAL the replication slot holds")
    # times the stream could not go on from where it stood (the slot gone, made again,
    # invalidated, advanced by someone else, or on another cluster): each a Gap("slot")
    slot_losses: int = metric(COUNTER, "Times the replication slot was lost (a Gap('slot'))")
    # the slot is a failover slot (PostgreSQL 17+), when the setup has seen it
    slot_failover: bool | None = metric(GAUGE, "1 when the replication slot is a failover slot")
    # a failover keeps the slot: a failover slot, the primary names in
    # synchronized_standby_slots physical slots that exist and are in use, and where the DSN
    # names the standbys (several hosts), each holds a synchronised copy of the slot that a
    # promotion keeps (synced, not temporary) (False: a failover loses the slot, see
    # failover_reason; None: not known, or read on a standby)
    failover_ready: bool | None = metric(
        GAUGE, "1 when a failover of the primary keeps the replication slot")
    # why failover_ready is False: what is missing, or, where the DSN names the standbys,
    # which of them holds no copy of the slot that a promotion keeps yet
    failover_reason: str | None = metric(INFO, "Why a failover would not keep the slot")

    @property
    def connected(self) -> bool:
        """Listening, with every LISTEN in place: streams are whole."""
        return self.state == "listening"

    def to_dict(self) -> dict[str, Any]:
        """The control reply's form (JSON): every field, readers as dicts."""
        return dataclasses.asdict(self)

    @classmethod
    def _from_reply(cls, reply: dict[str, Any]) -> Stats:
        fields = {f.name: reply[f.name] for f in dataclasses.fields(cls)}
        fields["readers"] = tuple(ReaderStats(**{**r, "channels": tuple(r["channels"])})
                                  for r in reply["readers"])
        fields["channels"] = tuple(reply["channels"])
        return cls(**fields)
