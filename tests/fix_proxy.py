"""A loopback TCP proxy in front of the test server, to break the stream on purpose.

freeze() stops forwarding on every open connection and sends nothing, no FIN and no RST: to
the client the server looks alive and silent, as behind a dead NAT or a stalled host.
reset() aborts every open connection with an RST. New connections are forwarded normally,
unless mute(): from then on a new connection is accepted and never answered (a server that
takes TCP and says nothing, as a hung postmaster or a black-holed address behind a proxy).
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo


class Proxy:
    def __init__(self, upstream_family: int, upstream_address: str | tuple[str, int]) -> None:
        self.upstream_family = upstream_family
        self.upstream_address = upstream_address
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.peer: dict[socket.socket, socket.socket] = {}
        self.frozen: set[socket.socket] = set()
        self.accepted = 0
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.pending: list[str] = []
        self.closed = False
        self.muted = False
        self.silent: list[socket.socket] = []   # accepted while muted: held, never read
        self.thread = threading.Thread(target=self._loop, name="test-proxy", daemon=True)
        self.thread.start()

    def freeze(self) -> None:
        """Stop moving bytes on every open connection, and keep them open."""
        self._ask("freeze")

    def reset(self) -> None:
        """Abort every open connection with an RST."""
        self._ask("reset")

    def mute(self) -> None:
        """Accept new connections and never answer them."""
        self._ask("mute")

    def close(self) -> None:
        self._ask("close")
        self.thread.join(5)

    def _ask(self, what: str) -> None:
        done = threading.Event()
        with self.lock:
            self.pending.append(what)
            self._done = done
        self.wake_w.send(b"x")
        assert done.wait(5), f"the proxy did not {what}"

    def _loop(self) -> None:
        while not self.closed:
            for key, _ in self.selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                elif sock is self.wake_r:
                    self._commands()
                elif sock in self.peer:
                    self._pump(sock)

    def _commands(self) -> None:
        self.wake_r.recv(64)
        with self.lock:
            pending, self.pending = self.pending, []
            done = self._done
        for what in pending:
            if what == "freeze":
                for sock in self.peer:
                    if sock not in self.frozen:
                        self.selector.unregister(sock)
                        self.frozen.add(sock)
            elif what == "mute":
                self.muted = True
            elif what in ("reset", "close"):
                for sock in list(self.peer):
                    if sock in self.peer:       # its other end may have gone with a pair
                        self._drop(sock, rst=True)
                if what == "close":
                    self.closed = True
                    self.listener.close()
                    for silent in self.silent:
                        silent.close()
        done.set()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        if self.muted:
            self.accepted += 1
            self.silent.append(client)
            return
        upstream = socket.socket(self.upstream_family, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream_address)
        except OSError:
            client.close()
            upstream.close()
            return
        self.accepted += 1
        self.peer[client] = upstream
        self.peer[upstream] = client
        self.selector.register(client, selectors.EVENT_READ)
        self.selector.register(upstream, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                self.peer[sock].sendall(data)
                return
        except OSError:
            pass
        self._drop(sock, rst=False)

    def _drop(self, sock: socket.socket, rst: bool) -> None:
        other = self.peer.pop(sock)
        del self.peer[other]
        for s in (sock, other):
            if s in self.frozen:
                self.frozen.discard(s)
            else:
                self.selector.unregister(s)
            if rst:
                # Linger 0: close() sends an RST instead of a FIN.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def proxied(dsn: str, proxy: Proxy) -> str:
    """dsn, connecting through the proxy instead."""
    return make_conninfo(dsn, host="127.0.0.1", hostaddr="127.0.0.1", port=str(proxy.port))


def upstream_of(dsn: str) -> tuple[int, str | tuple[str, int]]:
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql")
    port = int(params.get("port") or os.environ.get("PGPORT") or 5432)
    host = host.split(",")[0]
    if host.startswith("/"):
        return socket.AF_UNIX, os.path.join(host, f".s.PGSQL.{port}")
    return socket.AF_INET, (str(params.get("hostaddr") or host), port)


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    p = Proxy(*upstream_of(dsn))
    try:
        yield p
    finally:
        p.close()
