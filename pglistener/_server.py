"""The supervisor process: owns the connection, answers workers, runs the dispatch loop.

Everything here is policy; the per-notification work happens in _producer.Dispatcher.run()
without the GIL, and the connection's life is _listen.ListenConnection's. This module is the
target of the spawned process (see supervisor.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import logging.handlers
import math
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from . import _protocol
from ._connection import Phase, Timing
from ._control_server import Client, ControlServer, OwnerChannel
from ._listen import HEARTBEAT, ListenConnection
from ._producer import HEADER_BYTES, Dispatcher, RunStatus
from ._registry import Actions, Registry
from ._sizes import check_ring_bytes
from ._stream import check_group, check_overflow
from .channels import channel_bytes
from .stats import ReaderStats, Stats

log = logging.getLogger("pglistener.supervisor")

#: How long run() may keep the GIL-free loop before Python gets a turn when nothing happens.
TICK_MS = 1000


@dataclass
class Config:
    """What the supervisor process needs; built and validated by Supervisor."""

    conninfo: str
    safe_target: str            # host/port/dbname for log lines, never the password
    ring_bytes: int
    max_ring_bytes: int
    backoff_initial: float
    backoff_max: float
    backoff_reset_after: float
    connect_timeout: float
    liveness_timeout: float
    max_subscriptions_per_worker: int
    max_channels_per_worker: int
    log_level: int
    block_timeout: float = 60.0
    private_dir: bool = True    # the control socket's directory is ours to remove


class Server:
    """The supervisor's one loop: the LISTEN connection (_listen.ListenConnection), the
    workers' control connections, the owner's channel and the dispatcher, all waited on
    together. Nothing in it blocks: connecting, resolving and every query go on while
    workers are served."""

    def __init__(self, config: Config, listen_sock: socket.socket, owner: socket.socket) -> None:
        self.config = config
        self.dispatcher = Dispatcher()
        self.dispatcher.block_timeout = config.block_timeout
        self.expiries_logged = 0
        self.orphaned = 0               # left unread by consumer-group members that left
        self.epoll = select.epoll()
        self.registry = Registry(config.max_subscriptions_per_worker,
                                 config.max_channels_per_worker)
        # A subscribe's memfd, eventfd and wake eventfd, until they go with its answer.
        self.ring_fds: dict[int, tuple[int, ...]] = {}
        # The most a worker's message may take: a subscribe of every channel it may hold,
        # each escaped at worst (a 63-byte name of control characters as \u00XX).
        self.control = ControlServer(
            listen_sock, self.epoll, 384 * config.max_channels_per_worker + _protocol.MAX_MESSAGE,
            config.max_channels_per_worker, self._handle, self._detached)
        self.owner = OwnerChannel(owner, self.epoll, self.stats, self._stop)
        self.link = ListenConnection(
            config.conninfo, config.safe_target,
            Timing(config.connect_timeout, config.liveness_timeout, config.backoff_initial,
                   config.backoff_max, config.backoff_reset_after),
            self.dispatcher, time.monotonic(), self._on_connected, self._on_down)
        self.stopping = False
        # A signal writes a byte here (signal.set_wakeup_fd), so that it wakes the loop
        # wherever it waits: in run(), epoll fires through the control fd.
        self.wakeup, self._wakeup_w = socket.socketpair()
        for sock in (self.wakeup, self._wakeup_w):
            sock.setblocking(False)
        self.epoll.register(self.wakeup.fileno(), select.EPOLLIN)

    def stop_on_signals(self) -> None:
        """SIGTERM (systemd, `docker stop`, `timeout`, a whole process group) stops the
        supervisor the way stop() does: the socket and its directory go with it."""
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop(f"{signal.Signals(signum).name}: stopping")

    def _stop(self, why: str | None) -> None:
        if why and not self.stopping:
            log.info("%s", why)
        self.stopping = True

    # -- the main loop ------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            wait = self.link.step(time.monotonic())
            conn = self.link.conn
            if conn is None:
                self._wait_connecting(wait)
                continue
            wait_ms = max(1, min(TICK_MS, math.ceil(wait * 1000)))
            status = self.dispatcher.run(conn, self.epoll.fileno(), wait_ms,
                                         want_result=self.link.busy)
            if self.dispatcher.block_expiries != self.expiries_logged:
                if not self.expiries_logged:
                    log.warning("a subscription with overflow='block' held the connection for "
                                "block_timeout (%g s): it misses what does not fit (an overflow "
                                "Gap counts it) until it makes room; said once",
                                self.config.block_timeout)
                self.expiries_logged = self.dispatcher.block_expiries
            if status == RunStatus.RUN_CONN_BAD:
                self.link.lose_now(conn.error_message or "the server closed the connection")
            elif status == RunStatus.RUN_RESULT:
                self.link.on_result(time.monotonic())
            elif status == RunStatus.RUN_CONTROL:
                self._handle_control(timeout=0)
        self._shutdown()

    def _wait_connecting(self, wait: float) -> None:
        """No connection to drain: wait on the control fds and whatever connecting waits
        for (the resolver, the socket being connected), up to `wait` seconds."""
        poller = select.poll()
        poller.register(self.epoll.fileno(), select.POLLIN)
        mine = dict(self.link.fds())
        for fd, writable in mine.items():
            if fd >= 0:
                poller.register(fd, select.POLLOUT if writable else select.POLLIN)
        timeout_ms = max(0, min(TICK_MS, math.ceil(wait * 1000)))
        advanced = False
        for fd, _events in poller.poll(timeout_ms):
            if fd == self.epoll.fileno():
                self._handle_control(timeout=0)
            elif fd in mine and not advanced:
                advanced = True     # one step per wait: the descriptor may change with it
                self.link.advance(time.monotonic())

    # -- the connection -----------------------------------------------------------------------

    def _on_connected(self) -> None:
        """A new connection: LISTEN every wanted channel and sample the queue, then check
        that the server listens on exactly those (a query of its own: a LISTEN takes effect
        at commit, after the statements of its query string); then streams are whole."""
        act = self.registry.connected()
        wanted, token = act.listen, act.listen_token
        replay = ([_listen_sql("LISTEN", wanted)] if wanted else []) + [HEARTBEAT]
        self.link.query(b"; ".join(replay), lambda results, error:
                        self._on_replay_listened(wanted, token, results, error))
        self.link.query(b"SELECT pg_listening_channels()", lambda results, error:
                        self._on_replayed(wanted, token, results, error))

    def _on_replay_listened(self, wanted: list[str], token: int,
                            results: list[list[tuple[bytes | None, ...]]],
                            error: str | None) -> None:
        if error is not None:
            self.registry.refused(wanted, token)    # nothing took effect (one transaction)
            self.link.lose_now(f"LISTEN replay failed: {error}")
            return
        self.link.sample_queue(results)     # the replay ends with the heartbeat's query

    def _on_replayed(self, wanted: list[str], token: int,
                     results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
        if error is not None:
            self.link.lose_now(f"LISTEN replay failed: {error}")
            return
        actual = {bytes(row[0] or b"").decode() for rows in results for row in rows}
        if actual != set(wanted):
            self.link.lose_now(
                f"LISTEN replay failed: server listens on {len(actual)} channels, expected "
                f"{len(wanted)}: missing {sorted(set(wanted) - actual)[:5]}, unexpected "
                f"{sorted(actual - set(wanted))[:5]}")
            return
        self.link.ready(time.monotonic())
        self._apply(self.registry.replayed(wanted, token))

    def _on_down(self, cause: str) -> None:
        """The connection is gone: the streams it fed get a Gap, then we reconnect."""
        self._apply(self.registry.lost())

    # -- control ------------------------------------------------------------------------------

    def _handle_control(self, timeout: float) -> None:
        for fd, _events in self.epoll.poll(timeout):
            if fd == self.owner.sock.fileno():
                self.owner.on_ready()
            elif fd == self.wakeup.fileno():
                try:
                    self.wakeup.recv(4096)      # the signal's handler has run
                except BlockingIOError:
                    pass
            else:
                self.control.on_ready(fd)

    def _handle(self, client: Client, message: dict[str, Any]) -> None:
        """One worker's request (past its hello)."""
        req = message.get("req")
        op = message.get("op")
        if op == "subscribe":
            self._subscribe(client, req, message.get("channels"), message.get("ring_bytes"),
                            message.get("restart") is True, message.get("overflow", "gap"),
                            message.get("group"))
        elif op == "unsubscribe":
            self._apply(self.registry.unsubscribe(client, message.get("sub")))
            self.control.reply(client, {"req": req, "ok": True})
        elif op == "cancel":
            self._cancel(client, message.get("of"))
        elif op == "state":
            self.control.reply(client, {"req": req, "ok": True, "connected": self.registry.up,
                                        "last_error": self.link.machine.last_error})
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _subscribe(self, client: Client, req: Any, channels: Any, ring_bytes: Any,
                   restart: bool = False, overflow: Any = "gap", group: Any = None) -> None:
        if not isinstance(channels, list) or not channels:
            raise ValueError("a subscription needs a list of one or more channels")
        raws = {ch: channel_bytes(ch) for ch in channels}     # in order, without repeats
        capacity = self.config.ring_bytes if ring_bytes is None else check_ring_bytes(
            ring_bytes, self.config.max_ring_bytes, "Supervisor(max_ring_bytes=...)")
        sub = self.registry.new(client, client.pid, req, list(raws), capacity,
                                check_overflow(overflow), check_group(group))
        self.ring_fds[sub.id] = self._make_ring(sub.id, capacity, sub.overflow == "block")
        if restart:     # a restarted pool worker: its stream starts by saying so
            self.dispatcher.mark_gap([sub.id], "restart")
        self._apply(self.registry.add(sub))

    def _make_ring(self, sub_id: int, capacity: int, block: bool) -> tuple[int, int, int]:
        """An unnamed, sealed memfd and an eventfd for one subscription, and a duplicate of
        the dispatcher's wake eventfd for its reader."""
        with contextlib.ExitStack() as undo:
            memfd = os.memfd_create(f"pglistener-ring-{sub_id}",
                                    os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            undo.callback(os.close, memfd)
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)    # goes to the worker
            undo.callback(os.close, efd)
            owned = os.dup(efd)     # the dispatcher's copy
            undo.callback(os.close, owned)
            os.ftruncate(memfd, HEADER_BYTES + capacity)
            # The worker cannot shrink the ring under us (a write would then be a SIGBUS).
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            wake = os.dup(self.dispatcher.wake_fd)
            undo.callback(os.close, wake)
            self.dispatcher.add_ring(sub_id, memfd, owned, capacity, block)
            undo.pop_all()
        return memfd, efd, wake

    def _apply(self, act: Actions) -> None:
        """Carry out what the registry decided, in its order."""
        for channel, ids in act.routes.items():
            self.dispatcher.set_route(channel.encode(), ids)
        for sub in act.free:
            if sub.group is not None:
                # What a member that left had not read: its group could have handled it.
                self.orphaned += self.dispatcher.unread(sub.id)
            self.dispatcher.remove_ring(sub.id)
            for fd in self.ring_fds.pop(sub.id, ()):
                os.close(fd)
        if act.gaps:
            self.dispatcher.mark_gap(act.gaps, "reconnect")
        for sub in act.answer:
            fds = self.ring_fds.pop(sub.id)
            try:
                self.control.reply(cast(Client, sub.worker),
                                   {"req": sub.req, "ok": True, "sub": sub.id}, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if self.link.conn is None:
            return
        if act.unlisten:
            self.link.query(_listen_sql("UNLISTEN", act.unlisten),
                            lambda _results, error: self._on_unlistened(error))
        if act.listen:
            channels, token = act.listen, act.listen_token
            self.link.query(_listen_sql("LISTEN", channels),
                            lambda _results, error: self._on_listened(channels, token, error))

    def _on_listened(self, channels: list[str], token: int, error: str | None) -> None:
        if error is not None:
            self.registry.refused(channels, token)  # nothing can have come through
            self.link.lose_now(f"LISTEN failed: {error}")
            return
        self._apply(self.registry.listened(channels, token))

    def _on_unlistened(self, error: str | None) -> None:
        if error is not None:
            self.link.lose_now(f"UNLISTEN failed: {error}")

    def _cancel(self, client: Client, req: Any) -> None:
        """The worker gave up waiting for subscribe `req`: drop it, and close the request."""
        sub, act = self.registry.cancel(client, req)
        if sub is not None:
            self._apply(act)
            self.control.reply(client, {"req": req, "ok": False, "error": "Cancelled"})

    def _detached(self, client: Client) -> None:
        """A worker's connection went: every subscription of it goes too."""
        self._apply(self.registry.worker_gone(client))

    def stats(self) -> dict[str, Any]:
        """Stats (the schema, stats.py) as the control reply carries it."""
        up = self.registry.up
        machine = self.link.machine
        if up:
            state = "listening"
        else:
            state = "disconnected" if machine.phase is Phase.BACKOFF else "connecting"
        readers = []
        for sub in self.registry.subs.values():
            delivered, missed, lag, held = self.dispatcher.ring_stats(sub.id)
            readers.append(ReaderStats(
                subscription=sub.id, channels=sub.channels, pid=sub.pid, delivered=delivered,
                missed=missed, ring_bytes=sub.ring_bytes, lag_bytes=lag,
                overflow=sub.overflow, held_seconds=held, group=sub.group))
        return Stats(
            state=state,
            backend_pid=self.link.conn.backend_pid if up and self.link.conn else None,
            last_error=machine.last_error,
            last_error_permanent=self.link.last_error_permanent,
            reconnects=machine.reconnects,
            workers=self.control.processes(),
            connections=len(self.control.clients),
            received=self.dispatcher.received,
            unrouted=self.dispatcher.unrouted,
            subscriptions=len(self.registry.subs),
            channels=tuple(sorted(self.registry.routes)),
            outage_seconds=machine.outage_seconds(time.monotonic()),
            queue_usage=self.link.queue_usage,
            held_seconds=self.dispatcher.held_seconds,
            orphaned=self.orphaned,
            readers=tuple(readers),
        ).to_dict()

    def _shutdown(self) -> None:
        # The control socket and its private directory go here too, so that an owner that
        # died without stop() leaves nothing behind (rmdir only takes an empty one).
        self.control.close(self.config.private_dir)
        for fds in self.ring_fds.values():
            for fd in fds:
                os.close(fd)
        self.link.close()
        signal.set_wakeup_fd(-1)
        self.wakeup.close()
        self._wakeup_w.close()
        log.info("stopped")


def _raise_open_files_limit() -> None:
    """The supervisor holds a descriptor per subscription (its eventfd) and per worker
    connection: a soft limit of 1024, common under systemd and shells, would cap every
    worker together below one worker's max_subscriptions_per_worker. Raise it to the hard
    limit, as Go's runtime does for its processes; nothing here uses select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            log.debug("could not raise the open-files limit from %d", soft)


def _listen_sql(verb: str, channels: list[str]) -> bytes:
    """LISTEN or UNLISTEN of every channel, in one round trip. Names are quoted as
    identifiers, as PQescapeIdentifier does for UTF-8 (the connection's encoding): between
    double quotes, a double quote doubled. channel_bytes() has refused NUL and bad UTF-8."""
    return "; ".join(f'{verb} "{ch.replace(chr(34), chr(34) * 2)}"' for ch in channels).encode()


def main(config: Config, listen_sock: socket.socket, owner: socket.socket, log_queue: Any) -> None:
    """Entry point of the spawned supervisor process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the owner's to handle
    root = logging.getLogger("pglistener")
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(config.log_level)
    root.propagate = False
    try:
        _raise_open_files_limit()
        server = Server(config, listen_sock, owner)
        server.stop_on_signals()
        _protocol.send(owner, {"ready": True, "pid": os.getpid()})
        server.serve()
    except Exception:
        log.exception("the supervisor failed")
        raise
    finally:
        for h in root.handlers:
            h.close()
        log_queue.close()
        log_queue.join_thread()
