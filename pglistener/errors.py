"""Every exception pglistener raises, in one place."""

from __future__ import annotations


class PGListenerError(Exception):
    """Base class of pglistener's own errors."""


class InvalidChannelName(PGListenerError, ValueError):
    """A channel name PostgreSQL would reject or silently change."""


class InvalidChannelType(InvalidChannelName, TypeError):
    """A channel that is not a str (or channels that are not a sequence of str): a TypeError,
    and an InvalidChannelName for code that catches those."""


class PayloadTooLarge(PGListenerError, ValueError):
    """A notification payload longer than the server accepts (7999 bytes by default)."""


class SupervisorGone(PGListenerError):
    """The supervisor process has stopped or died; nothing more will arrive."""


class SubscriptionClosed(PGListenerError):
    """get() on a subscription that was unsubscribed."""


class TooManySubscriptions(PGListenerError):
    """A worker process asked for more subscriptions than the supervisor allows."""


class ProtocolMismatch(PGListenerError):
    """The worker and the supervisor are of pglistener versions that speak different control
    protocols; the message names both."""


class WalSourceError(PGListenerError):
    """A subscribe with source="wal" that the server cannot serve as it is set up: the message
    says what to change (wal_level, the REPLICATION attribute, the slot in use elsewhere)."""


class IncompatibleLibpq(PGListenerError, RuntimeError):
    """No longer raised: the extension owns its connections, so psycopg in any implementation
    (c, binary, python) works beside it. Kept so that code catching it still imports."""
