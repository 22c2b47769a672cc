"""asyncio readers: the event loop watches each subscription's eventfd, no thread, no polling.

A get() takes an item off the ring only when it returns it, so cancelling a pending get()
(or a timeout) loses nothing. A supervisor that dies is seen through one extra control
connection per event loop that never carries a request: it becomes readable only at EOF.
"""

from __future__ import annotations

import asyncio
import os
import socket
import weakref
from typing import Any

from ._dispatch import Gap, Notification
from .errors import SubscriptionClosed, SupervisorGone
from .worker import Subscription, _Control

Item = Notification | Gap


class _HangupWatch:
    """Wakes every waiting get() of one event loop when the supervisor hangs up."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _HangupWatch]] = (
        weakref.WeakKeyDictionary())

    @classmethod
    def get(cls, loop: asyncio.AbstractEventLoop, ctl: _Control, path: str) -> _HangupWatch:
        watches = cls._by_loop.setdefault(loop, {})
        watch = watches.get(path)
        if watch is None or watch.pid != ctl.pid:       # a fork child watches on its own
            watch = watches[path] = cls(loop, ctl, path)
        return watch

    def __init__(self, loop: asyncio.AbstractEventLoop, ctl: _Control, path: str) -> None:
        self.ctl = ctl
        self.pid = ctl.pid
        self.waiters: set[asyncio.Future[None]] = set()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            ctl.gone = True
            return
        self.sock.setblocking(False)
        self.loop = loop
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


class AsyncSubscription:
    """One subscription's ordered stream, read from asyncio: `await sub.get()`,
    `async for item in sub`, `await sub.unsubscribe()`, `async with`.

    Belongs to the process that made it, and to one event loop at a time.
    """

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self.channels = sub.channels
        self.channel = sub.channel
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._sub._closed else "open"
        return f"<AsyncSubscription {self.channel!r} {state}>"

    async def get(self, timeout: float | None = None) -> Item:
        """The next Notification or Gap, in order. Raises TimeoutError after `timeout`
        seconds, SupervisorGone once the supervisor is gone and everything it delivered has
        been read, SubscriptionClosed after unsubscribe()."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._lock:
            while True:
                item = self._take()
                if item is not None:
                    return item
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError(f"nothing on {self.channel!r} within {timeout} s")
                reader = self._sub._reader
                if reader.prepare_sleep():
                    try:
                        await self._sleep(loop, deadline)
                    finally:
                        reader.end_sleep()

    async def get_many(self, max_items: int = 1024, timeout: float | None = None) -> list[Item]:
        """Up to max_items items in order: waits like get() for the first, then takes what
        is already there."""
        first = await self.get(timeout)
        self._sub._check_open()
        return [first, *self._sub._reader.get_many(max_items - 1)]

    def _take(self) -> Item | None:
        sub = self._sub
        sub._check_open()
        item = sub._reader.get_nowait()
        if item is None and sub._ctl.gone:
            raise SupervisorGone("the supervisor process is gone")
        return item

    async def _sleep(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Until the eventfd is readable, the supervisor hangs up, unsubscribe(), or the
        deadline; the caller looks again in every case."""
        watch = _HangupWatch.get(loop, self._sub._ctl, self._sub._ctl.path)
        waiter: asyncio.Future[None] = loop.create_future()
        efd = self._sub._efd
        loop.add_reader(efd, _wake, waiter)
        watch.waiters.add(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _wake, waiter)
        self._waiter = waiter
        try:
            if self._sub._ctl.gone:
                return
            await waiter
        finally:
            self._waiter = None
            watch.waiters.discard(waiter)
            if timer is not None:
                timer.cancel()
            if not self._sub._closed:
                loop.remove_reader(efd)

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Item:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        """Stop delivery and free the ring; a pending get() raises SubscriptionClosed.
        Idempotent."""
        sub = self._sub
        if sub._closed or os.getpid() != sub._pid:
            return
        sub._closed = True
        waiter = self._waiter
        if waiter is not None:
            # It is parked in _sleep(): nothing touches the ring until it runs again, and
            # then it sees _closed first.
            asyncio.get_running_loop().remove_reader(sub._efd)
            _wake(waiter)
        sub._close_ring()
        await asyncio.get_running_loop().run_in_executor(None, sub._tell_supervisor)

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.unsubscribe()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
