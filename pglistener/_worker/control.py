"""A process's control connection to the supervisor: requests with replies, and posts.

One connection per process and supervisor, shared by every thread and every subscription of
the process. Its hang-up is how a reader learns that the supervisor is gone.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import threading
import time
from typing import Any

from .. import _protocol
from ..errors import ProtocolMismatch, SupervisorGone

#: How long a new control connection waits for the supervisor's hello (its loop never waits
#: on anything, so it answers in milliseconds).
HELLO_TIMEOUT = 30.0


def check_hello(reply: dict[str, Any]) -> None:
    """Raise ProtocolMismatch unless the supervisor's answer to our hello agrees."""
    if reply.get("ok") and reply.get("protocol") == _protocol.PROTOCOL:
        return
    if reply.get("error") == "ProtocolMismatch":
        raise ProtocolMismatch(str(reply.get("message")))
    if reply.get("ok"):
        raise ProtocolMismatch(_protocol.mismatch(reply.get("protocol"), reply.get("version"),
                                                  "supervisor"))
    # A supervisor from before hellos answers "unknown operation 'hello'".
    raise ProtocolMismatch(_protocol.mismatch(None, None, "supervisor"))


class Control:
    """Requests may come from many threads; one thread at a time reads the socket and hands
    each reply to the thread that waits for it. Posts (records that get no reply) may come
    from anywhere, a finalizer included, and never wait for a lock."""

    _lock = threading.Lock()
    _by_path: dict[str, Control] = {}

    @classmethod
    def get(cls, path: str) -> Control:
        with cls._lock:
            ctl = cls._by_path.get(path)
            if ctl is None or ctl.gone:
                # A connection the supervisor dropped (its streams ended with it) is not kept:
                # the next request opens a new one, or finds the supervisor gone.
                ctl = cls(path)
                cls._by_path[path] = ctl
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
        self._posts: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._reading = False
        self._replies: dict[int, tuple[dict[str, Any], list[int]]] = {}
        self._abandoned: set[int] = set()
        self._ids = itertools.count(1)
        self.gone = False
        self.stopped_by_owner = False
        try:
            reply, _ = self.request(_protocol.hello(), HELLO_TIMEOUT)
        except BaseException:
            self.sock.close()
            raise
        check_hello(reply)

    @classmethod
    def stopping(cls, path: str) -> None:
        """The owner of the supervisor at `path` is stopping it: for this process's readers
        its hang-up is the end they were told of, not an outage."""
        with cls._lock:
            ctl = cls._by_path.get(path)
        if ctl is not None:
            ctl.stopped_by_owner = True

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
        self._flush_posts()

    def post(self, data: bytes) -> None:
        """Send an encoded message that gets no reply, now or with the next send: never
        blocks on a lock, so a finalizer may call it whatever the thread was doing."""
        self._posts.append(data)
        self._flush_posts()

    def _flush_posts(self) -> None:
        # Whoever holds the send lock last flushes: a post that finds it taken is sent by
        # the holder, which looks again after letting go.
        while self._posts and self._send_lock.acquire(blocking=False):
            try:
                while self._posts:
                    data = self._posts[0]
                    try:
                        self.sock.send(data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        return          # the supervisor is busy: the next send tries again
                    except OSError:
                        self._posts.clear()     # gone: so are its subscriptions
                        return
                    self._posts.popleft()
            finally:
                self._send_lock.release()

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
                self.post(_protocol.encode({"op": "unsubscribe", "sub": message["sub"]}))
            return
        if isinstance(req, int):
            self._replies[req] = (message, fds)


def forget_after_fork() -> None:
    # A fork child may inherit the lock held by a parent thread, and its parent's
    # connections: start afresh (the parent's sockets stay open in the parent).
    Control._lock = threading.Lock()
    inherited, Control._by_path = Control._by_path, {}
    for ctl in inherited.values():
        ctl.sock.close()


os.register_at_fork(after_in_child=forget_after_fork)
