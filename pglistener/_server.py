"""The supervisor process: owns the connection, answers workers, runs the dispatch loop.

Everything here is policy; the per-notification work happens in _dispatch.Dispatcher.run()
without the GIL. This module is the target of the spawned process (see supervisor.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import logging.handlers
import math
import os
import re
import resource
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import pq, sql

from . import _protocol
from ._backoff import Backoff
from ._dispatch import HEADER_BYTES, Dispatcher, RunStatus
from ._libpq_check import check_same_libpq
from ._registry import Actions, Registry
from ._sizes import check_ring_bytes
from ._stream import check_group, check_overflow
from .channels import channel_bytes
from .errors import PGListenerError, TooManySubscriptions

log = logging.getLogger("pglistener.supervisor")

#: How long run() may keep the GIL-free loop before Python gets a turn when nothing happens.
TICK_MS = 1000

#: The heartbeat: cheap, and what stats() reports as the server's queue fill.
_HEARTBEAT = b"SELECT pg_notification_queue_usage()"


#: What libpq says when retrying alone will not mend a connection: the credentials, the role
#: or the database are wrong (libpq gives no SQLSTATE for a refused connection).
_PERMANENT = re.compile(r"authentication failed|no pg_hba\.conf entry|"
                        r"(role|database) \"[^\"]*\" does not exist|password is required")


def is_permanent(cause: str) -> bool:
    """Whether a connection failure is one that retrying alone will not mend."""
    return bool(_PERMANENT.search(cause))


class _QueryFailed(Exception):
    """A query on the listening connection failed or went unanswered; the connection is
    treated as lost (a standby refusing LISTEN is retried like a dead server). `refused`:
    the server answered with an error, so none of its statements took effect (a query
    string of several statements runs as one transaction)."""

    def __init__(self, cause: str, refused: bool = False) -> None:
        super().__init__(cause)
        self.refused = refused


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


@dataclass(eq=False)
class _Client:
    """One worker process's control connection."""

    sock: socket.socket
    pid: int


class Server:
    def __init__(self, config: Config, listen_sock: socket.socket, owner: socket.socket) -> None:
        self.config = config
        self.listen_sock = listen_sock
        self.owner = owner
        self.dispatcher = Dispatcher()
        self.dispatcher.block_timeout = config.block_timeout
        self.expiries_logged = 0
        self.orphaned = 0               # left unread by consumer-group members that left
        self.epoll = select.epoll()
        self.clients: dict[int, _Client] = {}
        self.registry = Registry(config.max_subscriptions_per_worker,
                                 config.max_channels_per_worker)
        # A subscribe's memfd, eventfd and wake eventfd, until they go with its answer.
        self.ring_fds: dict[int, tuple[int, ...]] = {}
        # The most a worker's message may take: a subscribe of every channel it may hold,
        # each escaped at worst (a 63-byte name of control characters as \u00XX).
        self.body_limit = 384 * config.max_channels_per_worker + _protocol.MAX_MESSAGE
        self.conn: psycopg.Connection[Any] | None = None
        self.down_since: float | None = None    # a working connection was lost then
        self.outage_total = 0.0
        self.queue_usage: float | None = None   # pg_notification_queue_usage(), last seen
        self.backoff = Backoff(
            config.backoff_initial, config.backoff_max, config.backoff_reset_after
        )
        self.next_attempt = 0.0
        self.last_error: str | None = None
        self.last_error_permanent = False   # retrying alone will not mend it (credentials)
        self.outage_logged = False
        self.stopping = False
        self.reconnects = 0
        self.last_heard = 0.0           # when the server last sent us anything
        self.heard_held = 0.0           # dispatcher.held_seconds at that time
        self.heard_count = 0            # dispatcher.received at that time
        self.command_done = 0.0         # when the last query or heartbeat was answered
        self.heartbeat_sent: float | None = None
        self.refused = 0                # connections refused for want of descriptors
        self.refused_logged = 0.0
        self.reserve_fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        listen_sock.setblocking(False)
        self.epoll.register(listen_sock.fileno(), select.EPOLLIN)
        self.epoll.register(owner.fileno(), select.EPOLLIN)
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
        if not self.stopping:
            log.info("%s: stopping", signal.Signals(signum).name)
        self.stopping = True

    # -- the main loop ------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            if self.conn is None:
                now = time.monotonic()
                if now >= self.next_attempt:
                    self._connect()
                    continue
                self._handle_control(timeout=self.next_attempt - now)
                continue
            try:
                wait_ms = self._liveness()
            except psycopg.Error as exc:
                self._lost(f"heartbeat failed: {_one_line(exc)}")
                continue
            if wait_ms is None:
                self._lost("the server did not answer within liveness_timeout "
                           f"({self.config.liveness_timeout:g} s)")
                continue
            status = self.dispatcher.run(_pgconn_ptr(self.conn), self.epoll.fileno(), wait_ms,
                                         want_result=self.heartbeat_sent is not None)
            if self.dispatcher.block_expiries != self.expiries_logged:
                if not self.expiries_logged:
                    log.warning("a subscription with overflow='block' held the connection for "
                                "block_timeout (%g s): it misses what does not fit (an overflow "
                                "Gap counts it) until it makes room; said once",
                                self.config.block_timeout)
                self.expiries_logged = self.dispatcher.block_expiries
            if status == RunStatus.RUN_CONN_BAD:
                self._lost(self._conn_error() or "the server closed the connection")
            elif status == RunStatus.RUN_RESULT:
                self._on_heartbeat_result()
            elif status == RunStatus.RUN_CONTROL:
                self._handle_control(timeout=0)
        self._shutdown()

    # -- the connection -----------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            conn = psycopg.connect(
                self.config.conninfo,
                autocommit=True,
                connect_timeout=max(2, round(self.config.connect_timeout)),
                client_encoding="UTF8",
            )
        except psycopg.Error as exc:
            self._failed(f"cannot connect to {self.config.safe_target}: {_one_line(exc)}")
            return
        # From here on psycopg only holds the connection: every query goes through _query(),
        # so that notifications arriving meanwhile take the usual path into the rings.
        conn.pgconn.notify_handler = None
        self.conn = conn
        self._heard()
        self.command_done = self.last_heard
        self.heartbeat_sent = None
        wanted = self.registry.connected().listen
        try:
            self._replay_listens(wanted)
        except _QueryFailed as exc:
            self._lost(f"LISTEN replay failed: {exc}")
            return
        if self.outage_logged:
            log.warning("reconnected to %s (backend pid %d)", self.config.safe_target,
                        conn.info.backend_pid)
        else:
            log.info("listening on %s (backend pid %d)", self.config.safe_target,
                     conn.info.backend_pid)
        self.outage_logged = False
        self.last_error = None
        self.last_error_permanent = False
        if self.down_since is not None:
            self.outage_total += time.monotonic() - self.down_since
            self.down_since = None
        self.backoff.succeeded(time.monotonic())
        self._apply(self.registry.replayed(wanted))

    def _replay_listens(self, channels: list[str]) -> None:
        """LISTEN every wanted channel in one round trip, then check the server agrees."""
        if channels:
            try:
                self._query(_listen_sql("LISTEN", channels))
            except _QueryFailed as exc:
                if exc.refused:
                    self.registry.refused(channels)     # nothing can have come through
                raise
        wanted = set(channels)
        self.queue_usage = _queue_usage(self._query(sql.SQL(_HEARTBEAT.decode()))[0][0])
        rows = self._query(sql.SQL("SELECT pg_listening_channels()"))
        actual = {bytes(row[0] or b"").decode() for row in rows}
        if actual != wanted:
            raise _QueryFailed(
                f"server listens on {len(actual)} channels, expected {len(wanted)}: "
                f"missing {sorted(wanted - actual)[:5]}, unexpected {sorted(actual - wanted)[:5]}")

    # -- queries and liveness -----------------------------------------------------------------
    #
    # A blocked read never notices a peer that vanished without FIN or RST (a frozen NAT, a
    # dead host), and TCP keepalives cannot see a stalled proxy that still ACKs. So nothing
    # waits on the server without a deadline: each query must be answered, and a quiet
    # connection must answer a heartbeat, within liveness_timeout, or it is declared dead.

    def _query(self, query: sql.Composable) -> list[tuple[bytes | None, ...]]:
        """Run query (one or more statements) within liveness_timeout; the rows of every
        result, as text. Notifications that arrive meanwhile go to the rings as usual."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        deadline = time.monotonic() + self.config.liveness_timeout
        if self.heartbeat_sent is not None:      # one command at a time on a connection
            for _ in self._results(deadline):
                pass
            self.heartbeat_sent = None
        try:
            pgconn.send_query(query.as_bytes(self.conn))
        except psycopg.Error as exc:
            raise _QueryFailed(_one_line(exc)) from None
        rows: list[tuple[bytes | None, ...]] = []
        error = None
        for res in self._results(deadline):
            if res.status == pq.ExecStatus.FATAL_ERROR:
                error = error or _one_line(res.error_message.decode("utf-8", "replace"))
            elif res.status == pq.ExecStatus.TUPLES_OK:
                rows.extend(tuple(res.get_value(i, j) for j in range(res.nfields))
                            for i in range(res.ntuples))
        if error is not None:
            raise _QueryFailed(error, refused=True)
        return rows

    def _results(self, deadline: float) -> Iterator[pq.abc.PGresult]:
        """Each result of the command in flight as it becomes ready, until the last."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        held_at_start = self.dispatcher.held_seconds
        while True:
            # Time a blocking reader holds the connection does not count: the answer waits
            # behind the notifications held back.
            remaining = (deadline + self.dispatcher.held_seconds - held_at_start
                         - time.monotonic())
            if remaining <= 0:
                raise _QueryFailed(
                    f"no answer within liveness_timeout ({self.config.liveness_timeout:g} s)")
            status = self.dispatcher.run(_pgconn_ptr(self.conn), -1,
                                         math.ceil(remaining * 1000), want_result=True)
            if status == RunStatus.RUN_CONN_BAD:
                raise _QueryFailed(self._conn_error() or "the server closed the connection")
            if status == RunStatus.RUN_RESULT:
                self._heard()
                res = pgconn.get_result()      # ready: does not block
                if res is None:
                    self.command_done = self.last_heard
                    return
                yield res

    def _heard(self) -> None:
        self.last_heard = time.monotonic()
        self.heard_count = self.dispatcher.received
        self.heard_held = self.dispatcher.held_seconds

    def _silence(self, now: float) -> float:
        """How long the server has said nothing, not counting time a blocking reader held
        the connection (nothing is read then, so nothing can be heard)."""
        return now - self.last_heard - (self.dispatcher.held_seconds - self.heard_held)

    def _liveness(self) -> int | None:
        """Send the heartbeat when it is due; how long run() may wait (ms) before the next
        look, or None when the server has been silent past liveness_timeout."""
        assert self.conn is not None
        now = time.monotonic()
        if self.dispatcher.received != self.heard_count:     # notifications count as life
            self._heard()
        limit = self.config.liveness_timeout
        if self._silence(now) >= limit:
            return None
        # A heartbeat every third of the limit, busy or not: one cheap query that also
        # samples the server's notification queue for stats(), and keeps the session from
        # looking idle to idle_session_timeout or a pooler.
        if self.heartbeat_sent is None and now - self.command_done >= limit / 3:
            self.conn.pgconn.send_query(_HEARTBEAT)
            self.heartbeat_sent = now
        due = now + limit - self._silence(now)
        if self.heartbeat_sent is None:
            due = min(due, self.command_done + limit / 3)
        return max(1, min(TICK_MS, math.ceil((due - now) * 1000)))

    def _on_heartbeat_result(self) -> None:
        assert self.conn is not None
        self._heard()
        res = self.conn.pgconn.get_result()     # ready: does not block
        if res is None:
            self.heartbeat_sent = None
            self.command_done = self.last_heard
        elif res.status == pq.ExecStatus.TUPLES_OK:
            self.queue_usage = _queue_usage(res.get_value(0, 0))

    def _conn_error(self) -> str:
        if self.conn is None:
            return ""
        return _one_line(self.conn.pgconn.error_message.decode("utf-8", "replace"))

    def _failed(self, cause: str) -> None:
        delay = self.backoff.failed(time.monotonic())
        self.next_attempt = time.monotonic() + delay
        self.last_error = cause
        self.last_error_permanent = is_permanent(cause)
        if not self.outage_logged:
            log.error("%s; retrying %s", cause, "now" if delay == 0 else f"in {delay:.1f} s")
            self.outage_logged = True
        else:
            log.info("%s; retrying in %.1f s", cause, delay)

    def _lost(self, cause: str) -> None:
        """The connection is gone: the streams it fed get a Gap, then we reconnect."""
        self.dispatcher.drop_held()     # taken off the dead connection: the gap covers it
        act = self.registry.lost()
        if act.lost_stream:
            self.reconnects += 1
            self.down_since = time.monotonic()
        self._apply(act)
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the socket is already broken
                pass
        self._failed(f"lost the connection to {self.config.safe_target}: {cause}")

    # -- control ------------------------------------------------------------------------------

    def _handle_control(self, timeout: float) -> None:
        for fd, _events in self.epoll.poll(timeout):
            if fd == self.listen_sock.fileno():
                self._accept()
            elif fd == self.owner.fileno():
                self._on_owner()
            elif fd == self.wakeup.fileno():
                try:
                    self.wakeup.recv(4096)      # the signal's handler has run
                except BlockingIOError:
                    pass
            elif fd in self.clients:
                self._on_client(self.clients[fd])

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
        self.clients[sock.fileno()] = _Client(sock, pid)

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

    def _on_client(self, client: _Client) -> None:
        try:
            got = _protocol.recv(client.sock, self.body_limit)
        except BlockingIOError:
            return
        except _protocol.MessageTooLarge as exc:
            # Answered, and the connection kept: nothing about it was wrong but the size.
            head = exc.head
            if head.get("op") == "subscribe":
                self._reply_error(client, head.get("req"), TooManySubscriptions(
                    f"this subscribe names more channels than max_channels_per_worker "
                    f"({self.config.max_channels_per_worker}) allows ({exc})"))
            else:
                self._reply_error(client, head.get("req"), ValueError(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - malformed or hostile: drop that peer only
            log.warning("dropping worker pid %d: %s", client.pid,
                        _one_line(exc)[:200] or type(exc).__name__)
            got = None
        if got is None:
            self._detach(client)
            return
        message, fds = got
        for fd in fds:        # workers never send descriptors
            os.close(fd)
        req = message.get("req")
        try:
            op = message.get("op")
            if op == "subscribe":
                self._subscribe(client, req, message.get("channels"), message.get("ring_bytes"),
                                message.get("restart") is True, message.get("overflow", "gap"),
                                message.get("group"))
            elif op == "unsubscribe":
                self._apply(self.registry.unsubscribe(client, message.get("sub")))
                self._reply(client, {"req": req, "ok": True})
            elif op == "cancel":
                self._cancel(client, message.get("of"))
            elif op == "state":
                self._reply(client, {"req": req, "ok": True, "connected": self.registry.up,
                                     "last_error": self.last_error})
            else:
                raise ValueError(f"unknown operation {op!r}")
        except (PGListenerError, ValueError, KeyError, OSError) as exc:
            # One worker's bad or failed request (a bad name, out of descriptors) fails that
            # request only, never the supervisor.
            self._reply_error(client, req, exc)
        except Exception as exc:  # noqa: BLE001 - nor does a request we did not foresee
            log.exception("a request from worker pid %d failed", client.pid)
            self._reply_error(client, req, PGListenerError(
                f"the supervisor failed this request: {exc!r}"))

    def _reply_error(self, client: _Client, req: Any, exc: Exception) -> None:
        """Fail request `req` with exc, whose class name the worker maps back (_stream)."""
        self._reply(client, {"req": req, "ok": False, "error": type(exc).__name__,
                             # (a KeyError's str() is its repr)
                             "message": str(exc.args[0]) if isinstance(exc, KeyError)
                             and exc.args else str(exc)})

    def _reply(self, client: _Client, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
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

    def _subscribe(self, client: _Client, req: Any, channels: Any, ring_bytes: Any,
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
                self._reply(cast(_Client, sub.worker),
                            {"req": sub.req, "ok": True, "sub": sub.id}, fds)
            finally:
                for fd in fds:
                    os.close(fd)
        if self.conn is None:
            return
        for verb, channels in (("UNLISTEN", act.unlisten), ("LISTEN", act.listen)):
            if not channels:
                continue
            try:
                self._query(_listen_sql(verb, channels))
            except _QueryFailed as exc:
                if exc.refused and verb == "LISTEN":
                    self.registry.refused(channels)     # nothing can have come through
                self._lost(f"{verb} failed: {exc}")
                return
            if verb == "LISTEN":
                self._apply(self.registry.listened(channels))

    def _cancel(self, client: _Client, req: Any) -> None:
        """The worker gave up waiting for subscribe `req`: drop it, and close the request."""
        sub, act = self.registry.cancel(client, req)
        if sub is not None:
            self._apply(act)
            self._reply(client, {"req": req, "ok": False, "error": "Cancelled"})

    def _detach(self, client: _Client) -> None:
        self._apply(self.registry.worker_gone(client))
        self.epoll.unregister(client.sock.fileno())
        del self.clients[client.sock.fileno()]
        client.sock.close()

    def _on_owner(self) -> None:
        try:
            got = _protocol.recv(self.owner)
        except (OSError, ValueError):
            got = None
        if got is None:
            log.info("the owning process is gone: stopping")
            self.stopping = True
            return
        message, _fds = got
        op = message.get("op")
        if op == "stats":
            self._reply_owner(message, self.stats())
        elif op == "stop":
            self.stopping = True
            self._reply_owner(message, {})

    def _reply_owner(self, message: dict[str, Any], body: dict[str, Any]) -> None:
        try:
            _protocol.send(self.owner, {"req": message.get("req"), "ok": True, **body})
        except OSError:
            self.stopping = True

    def stats(self) -> dict[str, Any]:
        up = self.registry.up
        if up:
            state = "listening"
        else:
            state = "connecting" if self.conn is not None else "disconnected"
        outage = self.outage_total
        if self.down_since is not None:
            outage += time.monotonic() - self.down_since
        readers = []
        for sub in self.registry.subs.values():
            delivered, missed, lag, held = self.dispatcher.ring_stats(sub.id)
            readers.append({"subscription": sub.id, "channels": list(sub.channels),
                            "pid": sub.pid, "delivered": delivered, "missed": missed,
                            "ring_bytes": sub.ring_bytes, "lag_bytes": lag,
                            "overflow": sub.overflow, "held_seconds": held,
                            "group": sub.group})
        return {
            "state": state,
            "backend_pid": self.conn.info.backend_pid if up and self.conn else None,
            "last_error": self.last_error,
            "last_error_permanent": self.last_error_permanent,
            "reconnects": self.reconnects,
            "workers": len(self.clients),
            "received": self.dispatcher.received,
            "unrouted": self.dispatcher.unrouted,
            "subscriptions": len(self.registry.subs),
            "channels": sorted(self.registry.routes),
            "outage_seconds": outage,
            "queue_usage": self.queue_usage,
            "held_seconds": self.dispatcher.held_seconds,
            "orphaned": self.orphaned,
            "readers": readers,
        }

    def _shutdown(self) -> None:
        # Remove the control socket and its private directory here too, so that an owner
        # that died without stop() leaves nothing behind (rmdir only takes an empty one).
        path = self.listen_sock.getsockname()
        for remove in (os.unlink, os.rmdir) if self.config.private_dir else (os.unlink,):
            try:
                remove(path)
            except OSError:
                pass
            path = os.path.dirname(path)
        self.listen_sock.close()
        for client in list(self.clients.values()):
            client.sock.close()    # readers see the hang-up and raise SupervisorGone
        self.clients.clear()
        for fds in self.ring_fds.values():
            for fd in fds:
                os.close(fd)
        if self.conn is not None:
            self.conn.close()
        signal.set_wakeup_fd(-1)
        self.wakeup.close()
        self._wakeup_w.close()
        if self.reserve_fd is not None:
            os.close(self.reserve_fd)
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


def _pgconn_ptr(conn: psycopg.Connection[Any]) -> int:
    """The PGconn* of psycopg's C implementation (checked at start), for our libpq calls."""
    return int(conn.pgconn.pgconn_ptr)  # type: ignore[attr-defined]  # C implementation only


def _queue_usage(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _listen_sql(verb: str, channels: list[str]) -> sql.Composable:
    """LISTEN or UNLISTEN of every channel, in one round trip."""
    return sql.SQL("; ").join(
        sql.SQL(verb + " {}").format(sql.Identifier(ch)) for ch in channels)


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


def main(config: Config, listen_sock: socket.socket, owner: socket.socket, log_queue: Any) -> None:
    """Entry point of the spawned supervisor process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the owner's to handle
    root = logging.getLogger("pglistener")
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(config.log_level)
    root.propagate = False
    try:
        try:
            check_same_libpq()
        except PGListenerError as exc:
            _protocol.send(owner, {"ready": False, "error": type(exc).__name__,
                                   "message": str(exc)})
            return
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
