"""The supervisor process: owns the connection, answers workers, runs the dispatch loop.

Everything here is policy; the per-record work happens in the core's run() without the GIL,
each source's in its own objects (notify/source.py, wal/source.py), and each connection's
life in its shell (listen.py, wal/connection.py). What this module holds is what every
source shares: the workers' control connections, the rings and their descriptors, routes,
hand-over and answers.
This module is the target of the spawned process (see supervisor.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import logging.handlers
import math
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from .. import _protocol
from .._checks import check_group, check_overflow
from .._core.dispatch import HEADER_BYTES, Dispatcher, RunStatus, run
from .._sizes import check_ring_bytes
from ..channels import channel_bytes
from ..stats import ReaderStats, Stats
from .control_server import Client, ControlServer, OwnerChannel
from .listen import ListenConnection
from .registry import Actions, Sub
from .source import Source, group_key
from .sources import SOURCES

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
    # The WAL source (Supervisor(slot=...)): off when slot is None.
    slot: str | None = None
    slot_conninfo: str | None = None     # slot_dsn's; None: the conninfo's server
    slot_safe_target: str = ""
    publication: str = "pglistener"
    slot_lag_warning: int = 1 << 30
    group_hold: float = 60.0
    failover: bool | None = None         # a failover slot: None is "where the server can"


class Server:
    """The supervisor's one loop: every source's connections (the sources), the workers'
    control connections and the owner's channel, all waited on together in the core's run().
    Nothing in it blocks: connecting, resolving and every query go on while workers are
    served."""

    def __init__(self, config: Config, listen_sock: socket.socket, owner: socket.socket) -> None:
        self.config = config
        self.orphaned = 0               # left unread by consumer-group members that left
        self.stopping = False
        self.epoll = select.epoll()
        # A subscribe's memfd, eventfd and wake eventfd, until they go with its answer.
        self.ring_fds: dict[int, tuple[int, ...]] = {}
        # The most a worker's message may take: a subscribe of every channel it may hold,
        # each escaped at worst (a 63-byte name of control characters as \u00XX).
        self.control = ControlServer(
            listen_sock, self.epoll, 384 * config.max_channels_per_worker + _protocol.MAX_MESSAGE,
            config.max_channels_per_worker, self._handle, self._detached)
        self.owner = OwnerChannel(owner, self.epoll, self.stats, self._stop)
        self.ids: Iterator[int] = itertools.count(1)   # subscription ids, one for all sources
        # The sources this config enables, by name, in the table's order (sources.py).
        self.sources: dict[str, Source] = {}
        for name, kind in SOURCES.items():
            if kind.enabled(config):
                self.sources[name] = kind(self)
        # A signal writes a byte here (signal.set_wakeup_fd), so that it wakes the loop
        # wherever it waits: in run(), epoll fires through the control fd.
        self.wakeup, self._wakeup_w = socket.socketpair()
        for sock in (self.wakeup, self._wakeup_w):
            sock.setblocking(False)
        self.epoll.register(self.wakeup.fileno(), select.EPOLLIN)

    def reply(self, client: Client, message: dict[str, Any],
              fds: tuple[int, ...] = ()) -> None:
        self.control.reply(client, message, fds)

    def reply_error(self, client: Client, req: Any, exc: Exception) -> None:
        self.control.reply_error(client, req, exc)

    def plain(self) -> ListenConnection:
        """The plain connection a source before the asking one lends (Source.lends)."""
        return next(c for c in (s.lends() for s in self.sources.values()) if c is not None)

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
        sources = list(self.sources.values())       # run() names one by its index
        while not self.stopping:
            now = time.monotonic()
            wait = min(source.step(now) for source in sources)
            watch = [fd for source in sources for shell in source.shells()
                     for fd in shell.fds()]
            wait_ms = max(1, min(TICK_MS, math.ceil(wait * 1000)))
            status, which = run(tuple(source.polled() for source in sources),
                                self.epoll.fileno(), wait_ms, tuple(watch))
            if status == RunStatus.RUN_CONN_BAD and which >= 0:
                sources[which].on_bad()
            elif status == RunStatus.RUN_RESULT:
                sources[which].on_result()
            elif status == RunStatus.RUN_WATCH:
                self._advance_connecting(watch)
            elif status == RunStatus.RUN_CONTROL:
                self._handle_control(timeout=0)
        self._shutdown()

    def _advance_connecting(self, watch: list[tuple[int, bool]]) -> None:
        """A descriptor of a connection being made is ready: each connection whose own is
        takes its next step (one per wait: the descriptor may change with it)."""
        poller = select.poll()
        for fd, writable in watch:
            poller.register(fd, select.POLLOUT if writable else select.POLLIN)
        ready = {fd for fd, _events in poller.poll(0)}
        now = time.monotonic()
        for source in self.sources.values():
            for shell in source.shells():
                if any(fd in ready for fd, _w in shell.fds()):
                    shell.advance(now)

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
            self._subscribe(client, req, message)
        elif op == "unsubscribe":
            sub_id = message.get("sub")
            source = next((s for s in self.sources.values() if sub_id in s.registry.subs),
                          next(iter(self.sources.values())))
            source.apply(source.registry.unsubscribe(client, sub_id))
            self.control.reply(client, {"req": req, "ok": True})
        elif op == "cancel":
            self._cancel(client, message.get("of"))
        elif op == "state":
            state: dict[str, Any] = {"req": req, "ok": True}
            for kind in SOURCES.values():
                state.update(kind.off_state)
            for source in self.sources.values():
                state.update(source.state())
            self.control.reply(client, state)
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _subscribe(self, client: Client, req: Any, message: dict[str, Any]) -> None:
        changes = message.get("changes")
        channels = message.get("channels") if changes is None else []
        name = message.get("source", next(iter(SOURCES)))     # the first is the default
        if not isinstance(channels, list) or (not channels and changes is None):
            raise ValueError("a subscription needs a list of one or more channels")
        if not isinstance(name, str) or name not in SOURCES:
            raise ValueError(f"source is {' or '.join(map(repr, SOURCES))}, not {name!r}")
        source = self.sources.get(name)
        if source is None:
            raise ValueError(SOURCES[name].absent(changes is not None))
        source.check(message)
        position = source.position(message)
        if changes is not None:
            source.subscribe_changes(client, req, message, changes)
            return
        raws = {ch: channel_bytes(ch) for ch in channels}     # in order, without repeats
        self.open_subscription(client, req, message, source, list(raws), position)

    def subscribe_options(self, message: dict[str, Any]) -> tuple[int, str, str | None, bool]:
        """A subscribe's ring size, overflow policy, group and key=, checked."""
        ring_bytes = message.get("ring_bytes")
        capacity = self.config.ring_bytes if ring_bytes is None else check_ring_bytes(
            ring_bytes, self.config.max_ring_bytes, "Supervisor(max_ring_bytes=...)")
        group = check_group(message.get("group"))
        keyed = message.get("key") is True
        if keyed and group is None:
            raise ValueError("key=True orders a consumer group's stream by key: give group= "
                             "too")
        return capacity, check_overflow(message.get("overflow", "gap")), group, keyed

    def open_subscription(self, client: Client, req: Any, message: dict[str, Any],
                          source: Source, channels: list[str],
                          position: tuple[int, int, int] | None) -> None:
        """A subscription of `source` on these routes: its ring made, then placed."""
        capacity, overflow, group, keyed = self.subscribe_options(message)
        peer = next((s for s in source.registry.subs.values()
                     if s.group == group and s.channels == tuple(channels)), None)
        if group is not None and peer is not None and peer.keyed != keyed:
            raise ValueError(f"consumer group {group!r} is {'' if peer.keyed else 'not '}keyed:"
                             f" its members all give key=True, or none does")
        sub = source.registry.new(client, client.pid, req, channels, capacity, overflow, group)
        sub.keyed = keyed
        self.ring_fds[sub.id] = self._make_ring(source.dispatcher, sub.id, capacity,
                                                sub.overflow == "block")
        if keyed:
            source.dispatcher.set_keyed(sub.id, group_key(sub))
            if peer is not None:    # it takes its share of the keys from the others
                source.dispatcher.rebalance(sub.id)
        if message.get("restart") is True:  # a restarted pool worker: its stream says so
            source.dispatcher.mark_gap([sub.id], "restart")
        source.subscribed(sub, position)

    def _make_ring(self, dispatcher: Dispatcher, sub_id: int, capacity: int,
                   block: bool) -> tuple[int, int, int]:
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
            wake = os.dup(dispatcher.wake_fd)
            undo.callback(os.close, wake)
            dispatcher.add_ring(sub_id, memfd, owned, capacity, block)
            undo.pop_all()
        return memfd, efd, wake

    def carry_out(self, source: Source, act: Actions) -> None:
        """Routes, rings to free, refusals, gaps and answers: what every source does
        alike."""
        dispatcher = source.dispatcher
        for channel, ids in act.routes.items():
            source.routed(channel, bool(ids))
            dispatcher.set_route(channel.encode(), ids, keep=source.keeps_routes)
        for sub in act.free:
            for fd in self.ring_fds.pop(sub.id, ()):
                os.close(fd)
            if not sub.died:
                # Closed: what it handed out is consumed (its reader said so at close; a
                # group's mates get the rest), and for any other stream what it took.
                dispatcher.reader_closed(sub.id, sub.group is None)
            if sub.group is not None and self._hand_over(source, sub):
                continue            # its ring waits for the group's next member
            dispatcher.remove_ring(sub.id)
        for sub, exc in act.refuse:
            self.control.reply_error(cast(Client, sub.worker), sub.req, exc)
        if act.gaps:
            dispatcher.mark_gap(act.gaps, "reconnect")
        for sub in act.answer:
            fds = self.ring_fds.pop(sub.id)
            try:
                self.control.reply(cast(Client, sub.worker),
                                   {"req": sub.req, "ok": True, "sub": sub.id}, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def _hand_over(self, source: Source, sub: Sub) -> bool:
        """A consumer group's member left: what it had not consumed goes to the members
        left (one that died: at least once, a batch in its hands counts as not consumed; one
        that unsubscribed consumed what it took). With none left, the source may keep its
        ring for the group's next member (True: a WAL group, for group_hold seconds); else
        what it had not consumed is counted in orphaned."""
        key = group_key(sub)
        mates = [s.id for s in source.registry.subs.values() if group_key(s) == key]
        if mates:
            _moved, missed = source.dispatcher.handover(sub.id, mates)
            self.orphaned += missed
            return False
        if source.orphan(sub):
            return True
        self.orphaned += source.dispatcher.unread(sub.id, unconsumed=True)
        return False

    def _cancel(self, client: Client, req: Any) -> None:
        """The worker gave up waiting for subscribe `req`: drop it, and close the request."""
        for source in self.sources.values():
            if source.cancel(client, req):
                self.control.reply(client, {"req": req, "ok": False, "error": "Cancelled"})
                return

    def _detached(self, client: Client) -> None:
        """A worker's connection went: every subscription of it goes too."""
        for source in self.sources.values():
            source.worker_gone(client)

    def stats(self) -> dict[str, Any]:
        """Stats (the schema, stats.py) as the control reply carries it."""
        readers = []
        for source in self.sources.values():
            for sub in source.registry.subs.values():
                delivered, missed, lag, held = source.dispatcher.ring_stats(sub.id)
                readers.append(ReaderStats(
                    subscription=sub.id, channels=sub.channels, pid=sub.pid,
                    delivered=delivered, missed=missed, ring_bytes=sub.ring_bytes,
                    lag_bytes=lag, overflow=sub.overflow, held_seconds=held, group=sub.group,
                    source=source.name))
        fields: dict[str, Any] = {}
        for kind in SOURCES.values():
            fields.update(kind.off_stats)
        for source in self.sources.values():
            source.stats(fields)
        return Stats(
            workers=self.control.processes(),
            connections=len(self.control.clients),
            subscriptions=sum(len(source.registry.subs) for source in self.sources.values()),
            channels=tuple(sorted({ch for source in self.sources.values()
                                   for ch in source.registry.routes})),
            orphaned=self.orphaned,
            readers=tuple(readers),
            **fields,
        ).to_dict()

    def _shutdown(self) -> None:
        # The control socket and its private directory go here too, so that an owner that
        # died without stop() leaves nothing behind (rmdir only takes an empty one).
        self.control.close(self.config.private_dir)
        for fds in self.ring_fds.values():
            for fd in fds:
                os.close(fd)
        for source in self.sources.values():
            source.close()
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
