"""The worker side: subscribing, and reading a subscription's ring in order."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import _protocol
from ._dispatch import Gap, Notification, RingReader, WaitStatus
from ._sizes import check_ring_bytes
from .channels import channel_bytes
from .errors import (
    InvalidChannelName,
    PGListenerError,
    SubscriptionClosed,
    SupervisorGone,
    TooManySubscriptions,
)

if TYPE_CHECKING:
    from .aio import AsyncSubscription

log = logging.getLogger("pglistener.worker")

#: What a subscription yields.
Item = Notification | Gap

_S = TypeVar("_S", bound="Subscription")

#: How long a reader polls its ring before it sleeps on the eventfd: a notification that comes
#: within this window skips the wake-up syscall pair. Short, because the machines we run on
#: may have fewer cores than readers.
SPIN_US = 20

_ERRORS: dict[str, type[Exception]] = {
    "InvalidChannelName": InvalidChannelName,
    "TooManySubscriptions": TooManySubscriptions,
    "ValueError": ValueError,
}


class _Control:
    """This process's control connection to the supervisor (one per process and supervisor).

    Requests may come from many threads; one thread at a time reads the socket and hands each
    reply to the thread that waits for it.
    """

    _lock = threading.Lock()
    _by_path: dict[str, _Control] = {}

    @classmethod
    def get(cls, path: str) -> _Control:
        with cls._lock:
            ctl = cls._by_path.get(path)
            if ctl is None:
                ctl = cls._by_path[path] = cls(path)
            return ctl

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise SupervisorGone(f"no supervisor listens at {path}") from None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._replies: dict[int, tuple[dict[str, Any], list[int]]] = {}
        self._abandoned: set[int] = set()
        self._ids = itertools.count(1)
        self.gone = False

    def request(
        self, message: dict[str, Any], timeout: float | None
    ) -> tuple[dict[str, Any], list[int]]:
        req = next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.send({**message, "req": req})
        with self._cond:
            while req not in self._replies:
                if self.gone:
                    raise SupervisorGone("the supervisor process is gone")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    # Tell the supervisor to drop it; a reply that crossed this in flight is
                    # undone when it arrives (see _file).
                    self._abandoned.add(req)
                    self.send({"op": "cancel", "of": req})
                    raise TimeoutError
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    got = self._read(remaining)
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if got is not None:
                    self._file(*got)
            return self._replies.pop(req)

    def send(self, message: dict[str, Any]) -> None:
        try:
            with self._send_lock:
                _protocol.send(self.sock, message)
        except OSError:
            self.gone = True
            raise SupervisorGone("the supervisor process is gone") from None

    def _read(self, timeout: float | None) -> tuple[dict[str, Any], list[int]] | None:
        self.sock.settimeout(timeout)
        try:
            got = _protocol.recv(self.sock)
        except TimeoutError:
            return None
        except OSError:
            got = None
        if got is None:
            self.gone = True
        return got

    def _file(self, message: dict[str, Any], fds: list[int]) -> None:
        req = message.get("req")
        if isinstance(req, int) and req in self._abandoned:
            # A reply to a request whose caller timed out: undo what it did.
            self._abandoned.discard(req)
            for fd in fds:
                os.close(fd)
            if message.get("ok") and "sub" in message:
                self.send({"op": "unsubscribe", "sub": message["sub"]})
            return
        if isinstance(req, int):
            self._replies[req] = (message, fds)


#: Set in a pool worker asked to stop (SIGTERM): get() raises SubscriptionClosed from then
#: on, so a reader finishes the item in hand and its loop ends.
_stop_requested = threading.Event()
_open_subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()


def request_stop() -> None:
    """End every subscription's reading in this process after the current item: the next
    get() (or iteration step) raises SubscriptionClosed; blocked ones wake up for it. Safe to
    call from a signal handler."""
    _stop_requested.set()
    for sub in list(_open_subscriptions):
        if sub._closed or sub._pid != os.getpid():
            continue
        try:
            os.eventfd_write(sub._efd, 1)
        except OSError:
            pass        # closed meanwhile


def _forget_after_fork() -> None:
    # A fork child may inherit the lock held by a parent thread, and its parent's
    # connections: start afresh (the parent's sockets stay open in the parent).
    _Control._lock = threading.Lock()
    inherited, _Control._by_path = _Control._by_path, {}
    for ctl in inherited.values():
        ctl.sock.close()


os.register_at_fork(after_in_child=_forget_after_fork)


class Worker:
    """A handle on a running supervisor, for subscribing. Picklable: give it to child
    processes, started by fork or spawn; each process opens its own control connection."""

    def __init__(self, path: str, restarted: bool = False) -> None:
        self._path = path
        # A pool worker started again after a crash: every stream it opens begins with
        # Gap("restart"), since what was sent while no one read for it is gone.
        self._restarted = restarted

    def __repr__(self) -> str:
        return f"<Worker {self._path}{' restarted' if self._restarted else ''}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Worker, (self._path, self._restarted))

    def subscribe(
        self,
        channel: str | Sequence[str],
        callback: Callable[[Notification], Any] | None = None,
        *,
        timeout: float | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        ring_bytes: int | None = None,
    ) -> Subscription:
        """Subscribe to `channel` (or to several channels, read as one stream in the server's
        order); returns once the supervisor's LISTEN is committed.

        Without a callback, read the subscription: sub.get(), iteration, sub.get_many().
        With one, a reader thread calls callback(notification) for each notification in
        order; exceptions it raises are logged, never fatal. Gaps go to on_gap, or are logged
        as warnings. Raises TimeoutError when the LISTEN is not committed within `timeout`.
        ring_bytes sizes this subscription's ring (default: the Supervisor's ring_bytes; at
        most its max_ring_bytes).
        """
        sub = Subscription._open(self._path, channel, timeout, ring_bytes, self._restarted)
        if callback is not None:
            sub._start_thread(callback, on_gap)
        return sub

    async def subscribe_async(
        self,
        channel: str | Sequence[str],
        *,
        timeout: float | None = None,
        ring_bytes: int | None = None,
    ) -> AsyncSubscription:
        """subscribe() for asyncio: the returned AsyncSubscription is read with
        `await sub.get()` and `async for`; the event loop watches its eventfd."""
        from .aio import AsyncSubscription

        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(
            None, Subscription._open, self._path, channel, timeout, ring_bytes, self._restarted)
        try:
            sub = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The request goes on in its thread: close what it brings back.
            opening.add_done_callback(_close_late)
            raise
        return AsyncSubscription(sub)

    def subscribe_json(
        self,
        channel: str | Sequence[str],
        callback: Callable[[Any], Any] | None = None,
        *,
        timeout: float | None = None,
        on_gap: Callable[[Gap], Any] | None = None,
        ring_bytes: int | None = None,
    ) -> JsonSubscription:
        """Like subscribe(), with each payload decoded as JSON: get() and iteration give the
        decoded values (and Gap items), the callback gets the decoded value. Payloads that are
        not JSON are logged and skipped."""
        sub = JsonSubscription._open(self._path, channel, timeout, ring_bytes, self._restarted)
        if callback is not None:
            sub._start_thread(callback, on_gap)
        return sub


class Subscription:
    """One subscription's ordered stream of Notification and Gap items.

    Belongs to the process (and thread-safe within it) that made it; a fork child subscribes
    on its own.
    """

    #: The channels this subscription receives, in the order given.
    channels: tuple[str, ...]
    #: The channel, or the channels joined by ", " (for messages and logs).
    channel: str

    @classmethod
    def _open(cls: type[_S], path: str, channel: str | Sequence[str], timeout: float | None,
              ring_bytes: int | None, restarted: bool = False) -> _S:
        channels = _channel_list(channel)
        message: dict[str, Any] = {"op": "subscribe", "channels": list(channels)}
        if restarted:
            message["restart"] = True
        if ring_bytes is not None:
            message["ring_bytes"] = check_ring_bytes(ring_bytes)
        ctl = _Control.get(path)
        try:
            reply, fds = ctl.request(message, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"LISTEN {', '.join(channels)!r} was not committed within {timeout} s (is the "
                f"database reachable? see the pglistener log)") from None
        if not reply.get("ok"):
            error = _ERRORS.get(str(reply.get("error")), PGListenerError)
            raise error(reply.get("message", "subscribe failed"))
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise PGListenerError("the supervisor sent a malformed subscription")
        memfd, efd = fds
        try:
            reader = RingReader(memfd, efd, ctl.sock.fileno())
        except BaseException:
            os.close(efd)
            ctl.send({"op": "unsubscribe", "sub": reply["sub"]})
            raise
        finally:
            os.close(memfd)     # the mapping stays; the descriptor is not needed
        return cls(ctl, channels, int(reply["sub"]), reader, efd)

    def __init__(self, ctl: _Control, channels: tuple[str, ...], sub_id: int, reader: RingReader,
                 efd: int):
        self.channels = channels
        self.channel = ", ".join(channels)
        self._ctl = ctl
        self._id = sub_id
        self._reader = reader
        self._efd = efd
        self._pid = os.getpid()
        self._read_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        _open_subscriptions.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.channel!r} {state}>"

    # -- reading ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Item:
        """The next Notification or Gap, in order. Blocks (without spinning a core) up to
        `timeout` seconds, then raises TimeoutError; raises SupervisorGone once the supervisor
        is gone and everything it delivered has been read, SubscriptionClosed after
        unsubscribe()."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            while True:
                self._check_open()
                item = self._reader.get_nowait()
                if item is not None:
                    return item
                if self._ctl.gone:
                    raise SupervisorGone("the supervisor process is gone")
                if deadline is None:
                    wait_ms = -1
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"nothing on {self.channel!r} within {timeout} s")
                    wait_ms = max(1, int(remaining * 1000))
                status = self._reader.wait(wait_ms, SPIN_US)
                if status == WaitStatus.WAIT_PEER_GONE:
                    self._ctl.gone = True

    def get_many(self, max_items: int = 1024, timeout: float | None = None) -> list[Any]:
        """Up to max_items items in order: waits like get() for the first, then takes what is
        already there without waiting."""
        first = self.get(timeout)
        with self._read_lock:
            self._check_open()
            return [first, *self._reader.get_many(max_items - 1)]

    def __iter__(self) -> Iterator[Item]:
        """Blocking iteration; ends after unsubscribe(), raises SupervisorGone."""
        while True:
            try:
                yield self.get()
            except SubscriptionClosed:
                return

    def _check_open(self) -> None:
        if self._closed:
            raise SubscriptionClosed(f"the subscription to {self.channel!r} was closed")
        if _stop_requested.is_set():
            raise SubscriptionClosed("this worker process is stopping")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "a subscription belongs to the process that made it: subscribe again in the "
                "child (pass the Worker, not the Subscription)")

    # -- closing ------------------------------------------------------------------------------

    def unsubscribe(self) -> None:
        """Stop delivery and free the ring. Idempotent; a thread blocked in get() wakes and
        gets SubscriptionClosed (iteration ends)."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        os.eventfd_write(self._efd, 1)      # wake a reader blocked in wait()
        with self._read_lock:               # it leaves the ring before we unmap it
            self._close_ring()
        self._tell_supervisor()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _close_ring(self) -> None:
        self._reader.close()
        os.close(self._efd)

    def _tell_supervisor(self) -> None:
        if not self._ctl.gone:
            try:
                self._ctl.request({"op": "unsubscribe", "sub": self._id}, timeout=10.0)
            except (SupervisorGone, TimeoutError):
                pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    # -- callback style -----------------------------------------------------------------------

    def _start_thread(
        self, callback: Callable[[Any], Any], on_gap: Callable[[Gap], Any] | None
    ) -> None:
        self._thread = threading.Thread(
            target=self._deliver, args=(callback, on_gap),
            name=f"pglistener-{self.channel}", daemon=True)
        self._thread.start()

    def _deliver(self, callback: Callable[[Any], Any], on_gap: Callable[[Gap], Any] | None) -> None:
        try:
            for item in self:
                if isinstance(item, Gap):
                    if on_gap is None:
                        log.warning("%r: notifications may be missing (%r)", self.channel, item)
                        continue
                    handler: Callable[[Any], Any] = on_gap
                else:
                    handler = callback
                try:
                    handler(item)
                except Exception:
                    log.exception("error in the pglistener handler for %r", self.channel)
        except SupervisorGone:
            log.error("the supervisor is gone: %r receives nothing more", self.channel)


_SKIP = object()


class JsonSubscription(Subscription):
    """A subscription whose get() and iteration give each payload decoded as JSON."""

    def get(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            value = self._decode(super().get(_remaining(deadline)))
            if value is not _SKIP:
                return value

    def get_many(self, max_items: int = 1024, timeout: float | None = None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            items = super().get_many(max_items, _remaining(deadline))
            values = [v for v in map(self._decode, items) if v is not _SKIP]
            if values:
                return values

    def _decode(self, item: Any) -> Any:
        if isinstance(item, Gap):
            return item
        try:
            return json.loads(item.payload)
        except ValueError:
            log.error("skipped a payload on %r that is not JSON: %.200r",
                      self.channel, item.payload)
            return _SKIP


def _channel_list(channel: str | Sequence[str]) -> tuple[str, ...]:
    """One or more valid channel names, in order, without repeats (checked here so that a bad
    one fails without a trip; the supervisor checks again)."""
    names = (channel,) if isinstance(channel, str) else tuple(channel)
    if not names:
        raise InvalidChannelName("subscribe to at least one channel")
    for name in names:
        channel_bytes(name)
    return tuple(dict.fromkeys(names))


def _close_late(opening: asyncio.Future[Subscription]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        asyncio.get_running_loop().run_in_executor(None, opening.result().unsubscribe)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
