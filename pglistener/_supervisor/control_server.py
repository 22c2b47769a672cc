"""The supervisor's side of the control socket: accepting workers, reading their requests,
answering them; and the owner's channel (stats, stop).

A peer is served, never trusted: a request that fails is answered with an error; a message
that cannot be read drops that peer with one log line; a peer that does not read its replies
is cut off; out of descriptors, new peers are refused and the known ones served. What a
request means is the Server's business (its `handle(client, message)`): this module knows
the protocol (_protocol), the hello and the descriptors, nothing of subscriptions.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__, _protocol
from ..errors import PGListenerError, ProtocolMismatch, TooManySubscriptions

log = logging.getLogger("pglistener.supervisor")


@dataclass(eq=False)
class Client:
    """One worker process's control connection."""

    sock: socket.socket
    pid: int
    hello: bool = False             # it said hello in our protocol
    mismatch: str | None = None     # ... or this is what is wrong with it


class ControlServer:
    """`handle(client, message)` serves a request (raising PGListenerError, ValueError,
    KeyError or OSError fails it with that error); `detached(client)` is told when a worker's
    connection goes, however it goes."""

    def __init__(self, listen_sock: socket.socket, epoll: select.epoll, body_limit: int,
                 max_channels: int, handle: Callable[[Client, dict[str, Any]], None],
                 detached: Callable[[Client], None]) -> None:
        self.listen_sock = listen_sock
        self.epoll = epoll
        self.body_limit = body_limit
        self.max_channels = max_channels
        self.handle = handle
        self.detached = detached
        self.clients: dict[int, Client] = {}
        self.refused = 0                # connections refused for want of descriptors
        self.refused_logged = 0.0
        self.reserve_fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        listen_sock.setblocking(False)
        epoll.register(listen_sock.fileno(), select.EPOLLIN)

    def on_ready(self, fd: int) -> bool:
        """fd (from the epoll) is ours: serve it. False when it is not."""
        if fd == self.listen_sock.fileno():
            self._accept()
        elif fd in self.clients:
            self._on_client(self.clients[fd])
        else:
            return False
        return True

    def processes(self) -> int:
        """Worker processes connected (a process may hold several connections)."""
        return len({client.pid for client in self.clients.values()})

    # -- accepting ----------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.listen_sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._refuse_one(exc)
            else:       # that peer's trouble (it went away meanwhile), never ours
                log.warning("could not accept a control connection: %s", exc)
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("refused a control connection from uid %d (pid %d)", uid, pid)
                sock.close()
                return
            sock.setblocking(False)
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        except OSError as exc:
            log.warning("dropped a control connection: %s", exc)
            sock.close()
            return
        self.clients[sock.fileno()] = Client(sock, pid)

    def _refuse_one(self, exc: OSError) -> None:
        """Out of descriptors: the pending connection would wake us again and again. Take it
        with the descriptor kept in reserve for this, and close it at once (the way libuv
        and nginx do): that peer's connect fails, the supervisor serves on."""
        if self.reserve_fd is not None:
            os.close(self.reserve_fd)
            self.reserve_fd = None
        try:
            sock, _ = self.listen_sock.accept()
            sock.close()
        except OSError:
            pass
        try:
            self.reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass        # taken meanwhile: the next refusal tries again
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged >= 10:     # one line per burst, not one per peer
            log.warning("refused a control connection: %s (%d so far; raise the open-files "
                        "limit, or close idle connections to the supervisor)",
                        exc.strerror, self.refused)
            self.refused_logged = now

    # -- requests -----------------------------------------------------------------------------

    def _on_client(self, client: Client) -> None:
        try:
            got = _protocol.recv(client.sock, self.body_limit)
        except BlockingIOError:
            return
        except _protocol.MessageTooLarge as exc:
            # Answered, and the connection kept: nothing about it was wrong but the size.
            head = exc.head
            if head.get("op") == "subscribe":
                self.reply_error(client, head.get("req"), TooManySubscriptions(
                    f"this subscribe names more channels than max_channels_per_worker "
                    f"({self.max_channels}) allows ({exc})"))
            else:
                self.reply_error(client, head.get("req"), ValueError(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - malformed or hostile: drop that peer only
            log.warning("dropping worker pid %d: %s", client.pid,
                        " ".join(str(exc).split())[:200] or type(exc).__name__)
            got = None
        if got is None:
            self.detach(client)
            return
        message, fds = got
        for fd in fds:        # workers never send descriptors
            os.close(fd)
        if not client.hello and self._greet(client, message):
            return
        req = message.get("req")
        try:
            self.handle(client, message)
        except (PGListenerError, ValueError, KeyError, OSError) as exc:
            # One worker's bad or failed request (a bad name, out of descriptors) fails that
            # request only, never the supervisor.
            self.reply_error(client, req, exc)
        except Exception as exc:  # noqa: BLE001 - nor does a request we did not foresee
            log.exception("a request from worker pid %d failed", client.pid)
            self.reply_error(client, req, PGListenerError(
                f"the supervisor failed this request: {exc!r}"))

    def _greet(self, client: Client, message: dict[str, Any]) -> bool:
        """Until a worker has said hello in our protocol, answer its hello, and every other
        request with the mismatch (a worker from before hellos sends none). True when the
        message was handled here."""
        op = message.get("op")
        if op == "hello" and message.get("protocol") == _protocol.PROTOCOL:
            client.hello = True
            self.reply(client, {"req": message.get("req"), "ok": True,
                                "protocol": _protocol.PROTOCOL, "version": __version__})
            return True
        if client.mismatch is None:
            if op == "hello":
                client.mismatch = _protocol.mismatch(message.get("protocol"),
                                                     message.get("version"), "worker")
            else:
                client.mismatch = _protocol.mismatch(None, None, "worker")
            log.warning("worker pid %d: %s", client.pid, client.mismatch)
        if op != "cancel":
            self.reply_error(client, message.get("req"), ProtocolMismatch(client.mismatch))
        return True

    def reply_error(self, client: Client, req: Any, exc: Exception) -> None:
        """Fail request `req` with exc, whose class name the worker maps back
        (_worker/stream.py)."""
        self.reply(client, {"req": req, "ok": False, "error": type(exc).__name__,
                            # (a KeyError's str() is its repr)
                            "message": str(exc.args[0]) if isinstance(exc, KeyError)
                            and exc.args else str(exc)})

    def reply(self, client: Client, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        if message.get("req") is None:
            return      # a post: its sender reads no reply (see _protocol)
        try:
            _protocol.send(client.sock, message, fds)
        except BlockingIOError:
            # Never block the loop on one worker: one that does not read its replies is cut
            # off, and the hang-up detaches it on the next turn.
            log.warning("worker pid %d does not read its replies: disconnecting it", client.pid)
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass        # the worker is gone; its EOF will detach it

    def detach(self, client: Client) -> None:
        self.detached(client)
        self.epoll.unregister(client.sock.fileno())
        del self.clients[client.sock.fileno()]
        client.sock.close()

    # -- the end ------------------------------------------------------------------------------

    def close(self, remove_directory: bool) -> None:
        """Remove the socket (and its private directory), hang up on every worker: their
        readers see it and raise SupervisorGone."""
        path = self.listen_sock.getsockname()
        for remove in (os.unlink, os.rmdir) if remove_directory else (os.unlink,):
            try:
                remove(path)
            except OSError:
                pass
            path = os.path.dirname(path)
        self.listen_sock.close()
        for client in list(self.clients.values()):
            client.sock.close()
        self.clients.clear()
        if self.reserve_fd is not None:
            os.close(self.reserve_fd)
            self.reserve_fd = None


class OwnerChannel:
    """The socketpair to the process that started the supervisor (the Supervisor object):
    stats and stop. Its hang-up means the owner is gone: the supervisor stops."""

    def __init__(self, sock: socket.socket, epoll: select.epoll,
                 stats: Callable[[], dict[str, Any]], stop: Callable[[str | None], None]) -> None:
        self.sock = sock
        self.stats = stats
        self.stop = stop
        epoll.register(sock.fileno(), select.EPOLLIN)

    def on_ready(self) -> None:
        try:
            got = _protocol.recv(self.sock)
        except (OSError, ValueError):
            got = None
        if got is None:
            self.stop("the owning process is gone: stopping")
            return
        message, _fds = got
        op = message.get("op")
        if op == "stats":
            self._reply(message, self.stats())
        elif op == "stop":
            self.stop(None)
            self._reply(message, {})

    def _reply(self, message: dict[str, Any], body: dict[str, Any]) -> None:
        try:
            _protocol.send(self.sock, {"req": message.get("req"), "ok": True, **body})
        except OSError:
            self.stop(None)
