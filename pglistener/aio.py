"""asyncio readers: the event loop watches each subscription's eventfd, no thread, no polling.

An item that is already in the ring is returned without the event loop: `await sub.get()`
completes at once and `async for` takes the next item without a future or a task; only an
empty ring goes through the loop. A get() takes an item off the ring only when it returns it,
so cancelling a pending get() (or a timeout) loses nothing. Closing never awaits: `async with`
and `unsubscribe()` release the subscription even when the surrounding task is being cancelled
(anyio cancels every await in a cancelled scope, cleanup included).

Subscribing needs no thread either: each event loop has its own control connection
(AsyncControl), whose replies the loop reads; a subscribe is a future waiting for its reply.
Its hang-up is also how the loop learns that the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import itertools
import json
import os
import socket
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from . import _protocol
from ._core.reader import EMPTY, AsyncStream, compiled_iteration
from ._worker.control import check_hello
from ._worker.stream import Request, timed_out, why_not, wrap_stream
from .errors import SubscriptionClosed, SupervisorGone

_A = TypeVar("_A", bound="AsyncSubscription")


class AsyncControl:
    """A process's control connection for one event loop: requests go out and replies come
    in on the loop (add_reader), each request a future. Cancelled or timed-out requests are
    cancelled in the supervisor too, and a reply that crossed the cancel in flight is undone.
    Posts (a dropped subscription's release, from a finalizer in any thread) are sent when the
    socket takes them."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncControl]] = (
        weakref.WeakKeyDictionary())

    @classmethod
    def get(cls, loop: asyncio.AbstractEventLoop, path: str) -> AsyncControl:
        controls = cls._by_loop.setdefault(loop, {})
        ctl = controls.get(path)
        if ctl is None or ctl.gone or ctl.pid != os.getpid():
            ctl = controls[path] = cls(loop, path)
        return ctl

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        # Weakly: _by_loop's entry, this object and its socket go with the loop.
        self._loop = weakref.ref(loop)
        self.path = path
        self.pid = os.getpid()
        self.gone = False
        self.stopped_by_owner = False
        self._thread = threading.get_ident()
        self._futures: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._abandoned: set[int] = set()
        self._ids = itertools.count(1)
        self._out: collections.deque[dict[str, Any] | bytes] = collections.deque()
        self._writing = False
        # Every get() of this loop waiting on an empty ring: woken when the supervisor goes.
        self.waiters: set[asyncio.Future[None]] = set()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)      # a local socket: connects or fails at once
        except OSError:
            self.sock.close()
            self.gone = True
            raise SupervisorGone(f"no supervisor listens at {path}") from None
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_readable)
        hello = next(self._ids)
        # The hello's answer; the future is dropped once it came (it holds the loop).
        self._hello: asyncio.Future[Any] | None = loop.create_future()
        self._futures[hello] = self._hello
        self._greeting: dict[str, Any] | None = None
        self._send({**_protocol.hello(), "req": hello})

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    async def request(self, message: dict[str, Any], timeout: float | None
                      ) -> tuple[dict[str, Any], list[int]]:
        """The reply to `message` and the descriptors that came with it. TimeoutError after
        `timeout` s; either that or a cancel withdraws the request from the supervisor."""
        if self._greeting is None:
            hello = self._hello
            assert hello is not None
            try:
                await asyncio.wait_for(asyncio.shield(hello), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            self._greeting = hello.result()[0]
            self._hello = None
        check_hello(self._greeting)
        if self.gone:
            raise SupervisorGone("the supervisor process is gone")
        req = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._futures[req] = future
        self._send({**message, "req": req})
        try:
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if self._futures.pop(req, None) is not None and not self.gone:
                # Tell the supervisor to drop it; a reply already on its way is undone when
                # it arrives (_on_reply).
                self._abandoned.add(req)
                self._send({"op": "cancel", "of": req})
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise TimeoutError from None

    def post(self, data: bytes) -> None:
        """Send an encoded message that gets no reply, from any thread."""
        self._out.append(data)
        if threading.get_ident() == self._thread:
            self._flush()
            return
        loop = self.loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            pass        # the loop is closed, and with it this connection's use

    def _send(self, message: dict[str, Any]) -> None:
        self._out.append(message)
        self._flush()

    def _flush(self) -> None:
        while self._out and not self.gone:
            item = self._out[0]
            try:
                if isinstance(item, bytes):
                    self.sock.send(item)
                else:
                    _protocol.send(self.sock, item)
            except BlockingIOError:
                loop = self.loop
                if not self._writing and loop is not None:  # the supervisor is busy: when
                    self._writing = True                    # it takes more
                    loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError:
                self._hang_up()
                return
            self._out.popleft()

    def _on_writable(self) -> None:
        self._writing = False
        loop = self.loop
        if loop is not None:
            loop.remove_writer(self.sock.fileno())
        self._flush()

    def _on_readable(self) -> None:
        while True:
            try:
                got = _protocol.recv(self.sock)
            except BlockingIOError:
                return
            except (OSError, ValueError):
                got = None
            if got is None:
                self._hang_up()
                return
            self._on_reply(*got)

    def _on_reply(self, message: dict[str, Any], fds: list[int]) -> None:
        req = message.get("req")
        future = self._futures.pop(req, None) if isinstance(req, int) else None
        if future is not None and not future.done():
            future.set_result((message, fds))
            return
        for fd in fds:      # nobody waits for it
            os.close(fd)
        if isinstance(req, int) and req in self._abandoned:
            self._abandoned.discard(req)
            if message.get("ok") and "sub" in message:
                self.post(_protocol.encode({"op": "unsubscribe", "sub": message["sub"]}))

    def _hang_up(self) -> None:
        if self.gone:
            return
        self.gone = True
        fd = self.sock.fileno()
        loop = self.loop
        if fd >= 0 and loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
            if self._writing:
                loop.remove_writer(fd)
        # The socket stays open while streams hold its fd (RingReader's ctrl_fd); it goes
        # with this object.
        for future in self._futures.values():
            if not future.done():
                future.set_exception(SupervisorGone("the supervisor process is gone"))
                if future is self._hello:
                    future.exception()      # said to whoever asks next, never logged
        self._futures.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


async def open_async(cls: type[_A], path: str, build: Callable[[], Request],
                     timeout: float | None) -> _A:
    """open_stream() on the running loop's control connection: the request (built here, so
    that a bad argument raises where the coroutine is awaited) and its reply go through the
    event loop; returns once the supervisor has answered."""
    request = build()
    ctl = AsyncControl.get(asyncio.get_running_loop(), path)
    try:
        reply, fds = await ctl.request(request.message, timeout)
    except TimeoutError:
        raise TimeoutError(timed_out(request, timeout,
                                     await _why_not(ctl, request.wal))) from None
    return wrap_stream(cls, ctl, request.names, reply, fds)


async def _why_not(ctl: AsyncControl, wal: bool = False) -> str:
    try:
        state, _ = await ctl.request({"op": "state"}, timeout=2.0)
    except (TimeoutError, SupervisorGone):
        return "the supervisor does not answer"
    return why_not(state, wal)


class Opening(collections.abc.Coroutine[Any, Any, _A], Generic[_A]):
    """What subscribe_async() returns: a coroutine (await it, or give it to create_task or
    asyncio.run) that is also an async context manager, so that both
    `async with worker.subscribe_async(...) as sub` and `async with await ...` work."""

    __slots__ = ("_coro", "_sub")

    def __init__(self, coro: collections.abc.Coroutine[Any, Any, _A]) -> None:
        self._coro = coro
        self._sub: _A | None = None

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, _A]:
        return self._coro.__await__()

    async def __aenter__(self) -> _A:
        self._sub = await self._coro
        return self._sub

    async def __aexit__(self, *exc: Any) -> None:
        if self._sub is not None:
            self._sub._close_now()


@compiled_iteration
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
    _watch: AsyncControl | None = None

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
            watch = self._watch = self._hangup_watch(loop)
            if watch is not None:
                watch.waiters.add(waiter)
            if watch is None or watch.gone:
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

    def _hangup_watch(self, loop: asyncio.AbstractEventLoop) -> AsyncControl | None:
        """This loop's control connection: its hang-up wakes the waiters (the stream's own
        connection, unless the stream moved to another loop). None: the supervisor is gone."""
        ctl = self._control
        if isinstance(ctl, AsyncControl) and ctl.loop is loop and ctl.pid == os.getpid():
            return ctl
        try:
            return AsyncControl.get(loop, ctl.path)
        except SupervisorGone:
            ctl.gone = True
            return None

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


@compiled_iteration
class AsyncJsonSubscription(AsyncSubscription):
    """An AsyncSubscription whose get() and `async for` give each payload decoded as JSON
    (and Gap items); payloads that are not JSON are logged and skipped."""

    decoder = staticmethod(json.loads)
