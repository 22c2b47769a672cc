"""pglistener: PostgreSQL LISTEN/NOTIFY for many worker processes over one connection.

A supervisor process owns the connection; its compiled loop writes each notification into the
shared-memory ring of every subscription on that channel; workers in any process read their
rings in order. Loss is never silent: a full ring or a reconnect shows up as a Gap in the
stream, at the place where notifications may be missing.
"""

__version__ = "0.1.0"

from ._core.reader import (
    UNCHANGED,
    Change,
    Gap,
    Notification,
    RawRows,
    Table,
    format_lsn,
    parse_lsn,
)
from .aio import AsyncJsonSubscription, AsyncSubscription
from .channels import MAX_CHANNEL_BYTES
from .errors import (
    IncompatibleLibpq,
    InvalidChannelName,
    InvalidChannelType,
    PayloadTooLarge,
    PGListenerError,
    ProtocolMismatch,
    SubscriptionClosed,
    SupervisorGone,
    TooManySubscriptions,
    WalSourceError,
)
from .pool import Pool, SlotStats
from .publish import MAX_PAYLOAD_BYTES, emit, emit_json, notify, notify_json
from .snapshot import Snapshot
from .stats import ReaderStats, Stats
from .supervisor import Supervisor
from .worker import JsonSubscription, Subscription, Worker

__all__ = [
    "AsyncJsonSubscription",
    "AsyncSubscription",
    "Change",
    "Gap",
    "IncompatibleLibpq",
    "InvalidChannelName",
    "InvalidChannelType",
    "JsonSubscription",
    "MAX_CHANNEL_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Notification",
    "PayloadTooLarge",
    "Pool",
    "RawRows",
    "PGListenerError",
    "ProtocolMismatch",
    "ReaderStats",
    "SlotStats",
    "Snapshot",
    "Stats",
    "Subscription",
    "SubscriptionClosed",
    "Supervisor",
    "Table",
    "SupervisorGone",
    "TooManySubscriptions",
    "UNCHANGED",
    "WalSourceError",
    "Worker",
    "__version__",
    "emit",
    "emit_json",
    "format_lsn",
    "notify",
    "notify_json",
    "parse_lsn",
]
