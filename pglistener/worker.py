"""The worker side: subscribing, and reading a subscription's stream in order."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ._checks import check_group, check_source
from ._core.reader import BlockingStream, Change, Gap, Notification, compiled_iteration
from ._worker.control import Control
from ._worker.stream import Options, open_stream, request_stop
from .aio import AsyncJsonSubscription, AsyncSubscription, Opening, open_async
from .errors import SupervisorGone

log = logging.getLogger("pglistener.worker")

#: What a subscription yields.
Item = Notification | Change | Gap

__all__ = ["Item", "JsonSubscription", "Subscription", "Worker", "request_stop"]


class Worker:
    """A handle on a running supervisor, for subscribing. Picklable: give it to child
    processes, started by fork or spawn; each process opens its own control connection."""

    def __init__(self, path: str, restarted: bool = False, group: str | None = None,
                 source: str = "notify") -> None:
        self._path = path
        # The source its subscriptions read unless they name one (sup.spawn(source=)).
        self._source = check_source(source)
        # The consumer group its subscriptions join unless they name one (sup.spawn(group=)).
        self._group = check_group(group)
        # A pool worker started again after a crash: every stream it opens begins with
        # Gap("restart"), since what was sent while no one read for it is gone.
        self._restarted = restarted

    #: The environment variable `python -m pglistener supervise` hands the address down in.
    ENV = "PGLISTENER_ADDRESS"

    @classmethod
    def from_address(cls, address: str) -> Worker:
        """A Worker for the supervisor listening at `address` (a Unix socket path: see
        `worker.address`, Supervisor(address=...), `python -m pglistener supervise`), in any
        process of the same user. Connects at once: raises SupervisorGone when no supervisor
        answers there."""
        if not isinstance(address, str) or not address:
            raise TypeError(f"address is a socket path (str), not {address!r}")
        path = os.path.abspath(address)
        Control.get(path)
        return cls(path)

    @classmethod
    def from_env(cls) -> Worker:
        """from_address() of $PGLISTENER_ADDRESS, which `python -m pglistener supervise -- CMD`
        sets for CMD and everything it starts (uvicorn, gunicorn and their workers, ...)."""
        address = os.environ.get(cls.ENV)
        if not address:
            raise LookupError(
                f"{cls.ENV} is not set: start this program under `python -m pglistener "
                f"supervise -- COMMAND`, or export the address of a running supervisor "
                f"(Supervisor.worker().address)")
        return cls.from_address(address)

    @property
    def address(self) -> str:
        """Where the supervisor listens: give it to Worker.from_address() in any process of
        this user (or put it in PGLISTENER_ADDRESS for Worker.from_env())."""
        return self._path

    def __repr__(self) -> str:
        return (f"<Worker {self._path}{' restarted' if self._restarted else ''}"
                f"{f' group {self._group!r}' if self._group else ''}>")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Worker, (self._path, self._restarted, self._group, self._source))

    def _options(self, ring_bytes: int | None, overflow: str, group: str | None,
                 source: str | None, after: Any, key: Any) -> Options:
        """A subscribe* method's options, with this Worker's defaults for what it left out."""
        return Options(ring_bytes, overflow, self._group if group is None else group,
                       self._source if source is None else source, after, key,
                       self._restarted)

    def subscribe(
        self,
        channel: str | Sequence[str],
        callback: Callable[[Notification], Any] | None = None,
        *,
        timeout: float | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        ring_bytes: int | None = None,
        overflow: str = "gap",
        group: str | None = None,
        source: str | None = None,
        after: Any = None,
        key: Any = None,
    ) -> Subscription:
        """Subscribe to `channel` (or to several channels, read as one stream in the server's
        order); returns once the supervisor's LISTEN is committed.

        Without a callback, read the subscription: sub.get(), iteration, sub.get_many().
        With one, a reader thread calls callback(notification) for each notification in
        order; exceptions it raises are logged, never fatal. Gaps go to on_gap, or are logged
        as warnings. Raises TimeoutError when the LISTEN is not committed within `timeout`.
        ring_bytes sizes this subscription's ring (default: the Supervisor's ring_bytes; at
        most its max_ring_bytes).

        overflow: what happens when the ring is full. "gap" (the default): what does not fit
        is missed, and the stream says so with Gap("overflow", missed=N); the connection never
        waits for this reader. "block": nothing is missed for lack of room; the supervisor
        stops taking notifications off the connection until this reader makes room (the
        server's queue holds the rest; other subscriptions are delayed, never dropped), for
        at most Supervisor(block_timeout=...) at a time, past which it gets an overflow Gap
        with the exact count, as with "gap".

        group: a consumer group. Subscriptions on the same channels with the same group name
        share the stream: each notification goes to one member (the one with the least
        unread data; ties in turn), in any process; subscriptions outside the group still get
        every notification. Order holds per member, not across members. With
        overflow="block" on every member, a group is a lossless work queue.

        source: "notify" (LISTEN/NOTIFY, the default) or "wal": messages written with
        pglistener.emit(), read from the Supervisor's replication slot (Supervisor(slot=)).
        They come as Notifications with `lsn` and `commit_lsn`; no reconnect loses any, and
        the slot is never confirmed past what an open subscription has not consumed. after=
        (WAL only) resumes: a Notification (or its `position`) resumes exactly after it; an
        int LSN is sought in what the slot still holds (see the README, "Durable channels").
        Without after=, the stream begins with what commits from now on. In a consumer
        group whose place is kept (a member left within group_hold, or the supervisor
        started again), a new member takes that place and after= does not apply.

        key=True (source="wal", with group=): every message of one key (emit(..., key=))
        goes to the same member of the group while that member lives; messages without a key
        go to any. Readers outside the group, keyed or not, get every message of the
        channel, with `key` set.
        """
        options = self._options(ring_bytes, overflow, group, source, after, key)
        sub = open_stream(Subscription, self._path, options.request(channel), timeout)
        if callback is not None:
            sub._start_thread(callback, on_gap)
        return sub

    def subscribe_changes(
        self,
        tables: str | Sequence[str],
        callback: Callable[[Change], Any] | None = None,
        *,
        ops: Any = None,
        group: str | None = None,
        key: Any = None,
        after: Any = None,
        overflow: str = "gap",
        ring_bytes: int | None = None,
        timeout: float | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
    ) -> Subscription:
        """Subscribe to the row changes of `tables` ("orders" is "public.orders"; several
        are read as one stream, in commit order), read from the Supervisor's slot
        (Supervisor(slot=)): each item a Change (op, table, new, old, lsn, commit_lsn,
        position) or a Gap. `ops`: a subset of {"insert", "update", "delete", "truncate"}
        (default: all). The supervisor adds each table to its publication when it lacks it
        (ALTER PUBLICATION ... ADD TABLE, which needs the table's owner: else the error names
        the statement to run as the owner); a table that does not exist is an error here.

        What a slot promises messages, it promises changes: none is lost across a reconnect,
        a server restart or a failover (or a Gap says so where the slot cannot go on), each
        comes once, in commit order, and the slot is not confirmed past what an open
        subscription has not consumed. after= (a Change or its position) resumes exactly
        after it; without it, the stream begins with what commits from now on. overflow,
        ring_bytes, group, timeout, callback and on_gap are as for subscribe() (a change is
        a record of its row's size: give ring_bytes room for the largest row).

        key=True (with group=): every change of one row (its replica identity) goes to the
        same member while that member lives, so each row's changes are handled in order
        across the group; a member that leaves hands its rows to the others.
        """
        options = self._options(ring_bytes, overflow, group, "wal", after, key)
        sub = open_stream(Subscription, self._path, options.changes(tables, ops), timeout)
        if callback is not None:
            sub._start_thread(callback, on_gap)
        return sub

    def subscribe_changes_async(
        self,
        tables: str | Sequence[str],
        *,
        ops: Any = None,
        group: str | None = None,
        key: Any = None,
        after: Any = None,
        overflow: str = "gap",
        ring_bytes: int | None = None,
        timeout: float | None = None,
    ) -> Opening[AsyncSubscription]:
        """subscribe_changes() for asyncio: awaited or entered like subscribe_async()."""
        options = self._options(ring_bytes, overflow, group, "wal", after, key)
        return Opening(open_async(AsyncSubscription, self._path,
                                  lambda: options.changes(tables, ops), timeout))

    def subscribe_async(
        self,
        channel: str | Sequence[str],
        *,
        timeout: float | None = None,
        ring_bytes: int | None = None,
        overflow: str = "gap",
        group: str | None = None,
        source: str | None = None,
        after: Any = None,
        key: Any = None,
    ) -> Opening[AsyncSubscription]:
        """subscribe() for asyncio: `await` it for an AsyncSubscription, read with
        `await sub.get()` and `async for`; the event loop watches its eventfd. Or enter it:
        `async with worker.subscribe_async(...) as sub` (`async with await` works too).
        No thread: the request and its reply go through the event loop, and cancelling the
        await (or its timeout) withdraws the subscribe from the supervisor."""
        options = self._options(ring_bytes, overflow, group, source, after, key)
        return Opening(open_async(AsyncSubscription, self._path,
                                  lambda: options.request(channel), timeout))

    def subscribe_json_async(
        self,
        channel: str | Sequence[str],
        *,
        timeout: float | None = None,
        ring_bytes: int | None = None,
        overflow: str = "gap",
        group: str | None = None,
        source: str | None = None,
        after: Any = None,
        key: Any = None,
    ) -> Opening[AsyncJsonSubscription]:
        """subscribe_json() for asyncio: `await sub.get()` and `async for` give each payload
        decoded as JSON (and Gap items); payloads that are not JSON are logged and skipped.
        Awaited or entered like subscribe_async()."""
        options = self._options(ring_bytes, overflow, group, source, after, key)
        return Opening(open_async(AsyncJsonSubscription, self._path,
                                  lambda: options.request(channel), timeout))

    def subscribe_json(
        self,
        channel: str | Sequence[str],
        callback: Callable[[Any], Any] | None = None,
        *,
        timeout: float | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        ring_bytes: int | None = None,
        overflow: str = "gap",
        group: str | None = None,
        source: str | None = None,
        after: Any = None,
        key: Any = None,
    ) -> JsonSubscription:
        """Like subscribe(), with each payload decoded as JSON: get() and iteration give the
        decoded values (and Gap items), the callback gets the decoded value. Subscribed to
        several channels, each value comes as a (channel, value) pair. Payloads that are not
        JSON are logged and skipped. The other arguments are subscribe()'s (key= too)."""
        options = self._options(ring_bytes, overflow, group, source, after, key)
        sub = open_stream(JsonSubscription, self._path, options.request(channel), timeout)
        if callback is not None:
            sub._start_thread(callback, on_gap)
        return sub


@compiled_iteration
class Subscription(BlockingStream):
    """One subscription's ordered stream of Notification and Gap items: `for item in sub`,
    `sub.get(timeout)`, `sub.get_many(n)` (compiled, see _reader.Stream).

    Belongs to the process that made it, and is thread-safe within it: threads reading one
    subscription get distinct items, each with its own timeout. Released when dropped: a
    subscription nobody holds any more (a loop left by break, garbage collection) frees its
    ring and the supervisor's LISTEN, as unsubscribe() does. A subscription with a callback
    is held by its reader thread until unsubscribe().
    """

    _thread: threading.Thread | None = None

    def unsubscribe(self) -> None:
        """Stop delivery and free the ring; returns once the supervisor has dropped it.
        Idempotent and safe from any thread; a thread blocked in get() wakes and gets
        SubscriptionClosed (iteration ends)."""
        self._release(True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    # -- callback style -----------------------------------------------------------------------

    def _start_thread(
        self, callback: Callable[[Any], Any], on_gap: Callable[[Gap], Any] | None
    ) -> None:
        self._thread = threading.Thread(
            target=self._run_callbacks, args=(callback, on_gap),
            name=f"pglistener-{self.channel}", daemon=True)
        self._thread.start()

    def _run_callbacks(
        self, callback: Callable[[Any], Any], on_gap: Callable[[Gap], Any] | None
    ) -> None:
        try:
            self._deliver(callback, on_gap or self._log_gap, self._log_error)
        except SupervisorGone:
            if self._control.stopped_by_owner:     # sup.stop() in this process: a clean end
                log.debug("the supervisor stopped: %r's callbacks end", self.channel)
            else:
                log.error("the supervisor is gone: %r receives nothing more", self.channel)

    def _log_gap(self, gap: Gap) -> None:
        log.warning("%r: notifications may be missing (%r)", self.channel, gap)

    def _log_error(self, _item: Any) -> None:
        log.exception("error in the pglistener handler for %r", self.channel)


@compiled_iteration
class JsonSubscription(Subscription):
    """A subscription whose get() and iteration give each payload decoded as JSON (and Gap
    items); payloads that are not JSON are logged and skipped."""

    decoder = staticmethod(json.loads)
