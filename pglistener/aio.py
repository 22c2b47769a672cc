"""asyncio readers: the event loop watches each subscription's eventfd, no thread, no polling.

An item that is already in the ring is returned without the event loop: `await sub.get()`
completes at once and `async for` takes the next item without a future or a task; only an
empty ring goes through the loop. A get() takes an item off the ring only when it returns it,
so cancelling a pending get() (or a timeout) loses nothing. Closing never awaits: `async with`
and `unsubscribe()` release the subscription even when the surrounding task is being cancelled
(anyio cancels every await in a cancelled scope, cleanup included). A supervisor that dies is
seen through one extra control connection per event loop that never carries a request: it
becomes readable only at EOF.
"""

from __future__ import annotations

import asyncio
import json
import socket
import weakref
from collections.abc import Sequence
from typing import Any, TypeVar

from ._control import Control
from ._dispatch import EMPTY, AsyncStream
from ._stream import check_group, check_overflow, open_stream
from .errors import SubscriptionClosed

_A = TypeVar("_A", bound="AsyncSubscription")


async def open_async(cls: type[_A], path: str, channel: str | Sequence[str],
                     timeout: float | None, ring_bytes: int | None, restarted: bool,
                     overflow: str = "gap", group: str | None = None) -> _A:
    """cls._open() in the loop's executor (the subscribe waits for LISTEN to be committed)."""
    loop = asyncio.get_running_loop()
    check_overflow(overflow)        # here, not in the executor: a bad one costs no trip
    check_group(group)
    opening = loop.run_in_executor(None, open_stream, cls, path, channel, timeout, ring_bytes,
                                   restarted, overflow, group)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The request goes on in its thread: release what it brings back.
        opening.add_done_callback(_release_late)
        raise


def _release_late(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()._release(False)


class _HangupWatch:
    """Wakes every waiting get() of one event loop when the supervisor hangs up."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _HangupWatch]] = (
        weakref.WeakKeyDictionary())

    @classmethod
    def get(cls, loop: asyncio.AbstractEventLoop, ctl: Control) -> _HangupWatch:
        watches = cls._by_loop.setdefault(loop, {})
        watch = watches.get(ctl.path)
        if watch is None or watch.ctl is not ctl:   # a fork child, or a new connection
            watch = watches[ctl.path] = cls(loop, ctl)
        return watch

    def __init__(self, loop: asyncio.AbstractEventLoop, ctl: Control) -> None:
        self.ctl = ctl
        self.pid = ctl.pid
        self.waiters: set[asyncio.Future[None]] = set()
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(ctl.path)
        except OSError:
            self.sock.close()
            ctl.gone = True
            return
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            if self.sock.recv(1):
                return              # the supervisor never sends here; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.ctl.gone = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


class AsyncSubscription(AsyncStream):
    """One subscription's ordered stream, read from asyncio: `await sub.get()`,
    `async for item in sub`, `await sub.unsubscribe()`, `async with`.

    Belongs to the process that made it, and to one event loop at a time; several tasks may
    read it (each item goes to one of them). Released when dropped, like Subscription.
    """

    # The one future that the waiting tasks share while the ring is empty (None when nobody
    # waits), and how many tasks wait on it.
    _waiter: asyncio.Future[None] | None = None
    _waiting = 0
    _watched_fd = -1
    _watch: _HangupWatch | None = None

    async def get(self, timeout: float | None = None) -> Any:
        """The next Notification or Gap, in order. Raises TimeoutError after `timeout`
        seconds, SupervisorGone once the supervisor is gone and everything it delivered has
        been read, SubscriptionClosed after unsubscribe()."""
        item = self._take_ready()
        if item is not EMPTY:
            return item
        return await self._get_slow(timeout)

    async def _get_slow(self, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        while True:
            item = self._take_ready()
            if item is not EMPTY:
                return item
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"nothing on {self.channel!r} within {timeout} s")
            await self._readable(loop, deadline)

    async def get_many(self, max_items: int = 1024, timeout: float | None = None) -> list[Any]:
        """Up to max_items items in order: waits like get() for the first, then takes what
        is already there."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        first = await self.get(timeout)
        return [first, *self._take_many(max_items - 1)]

    # `async for`: __aiter__ and __anext__ are compiled (AsyncStream); an item already in the
    # ring is returned without the event loop, an empty ring comes here.

    async def _anext_wait(self) -> Any:
        try:
            return await self._get_slow(None)
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    # -- waiting ----------------------------------------------------------------------------

    async def _readable(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Until the eventfd is readable, the supervisor hangs up, unsubscribe(), or the
        deadline; the caller looks again in every case. Cancelling it loses nothing and
        leaves the other waiters waiting."""
        waiter = self._waiter
        if waiter is None:
            if not self._prepare_sleep():
                return              # data came meanwhile
            waiter = self._waiter = loop.create_future()
            self._watched_fd = self.fileno()
            loop.add_reader(self._watched_fd, self._on_readable)
            watch = self._watch = _HangupWatch.get(loop, self._control)
            watch.waiters.add(waiter)
            if watch.ctl.gone:
                self._stop_waiting(loop)
                return
        self._waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            # asyncio.wait() neither cancels the shared future on a timeout nor when this
            # task is cancelled.
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            self._waiting -= 1
            if self._waiting == 0 and self._waiter is waiter:
                self._stop_waiting(loop)     # nobody waits: nothing stays registered

    def _on_readable(self) -> None:
        self._stop_waiting(asyncio.get_running_loop())

    def _stop_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            return
        loop.remove_reader(self._watched_fd)
        self._end_sleep()
        if self._watch is not None:
            self._watch.waiters.discard(waiter)
        if not waiter.done():
            waiter.set_result(None)

    # -- closing ----------------------------------------------------------------------------

    async def unsubscribe(self) -> None:
        """Stop delivery and free the ring; a pending get() raises SubscriptionClosed.
        Idempotent. Never awaits, so it runs to the end even in a cancelled task; the
        supervisor is told without waiting for its answer."""
        self._close_now()

    def _close_now(self) -> None:
        if self.closed:
            return
        if self._waiter is not None:
            self._stop_waiting(asyncio.get_running_loop())
        self._release(False)

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._close_now()


class AsyncJsonSubscription(AsyncSubscription):
    """An AsyncSubscription whose get() and `async for` give each payload decoded as JSON
    (and Gap items); payloads that are not JSON are logged and skipped."""

    decoder = staticmethod(json.loads)
