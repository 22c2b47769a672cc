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
from ._listen import ListenConnection
from ._producer import HEADER_BYTES, Dispatcher, RunStatus
from ._reader import format_lsn, parse_lsn
from ._registry import Actions, Registry, Sub
from ._sizes import check_ring_bytes
from ._stream import check_group, check_overflow
from ._wal import SetupError, SlotProbe, Started, WalConnection
from .channels import channel_bytes
from .stats import ReaderStats, Stats

log = logging.getLogger("pglistener.supervisor")

#: How long run() may keep the GIL-free loop before Python gets a turn when nothing happens.
TICK_MS = 1000

#: How often the WAL source looks again at what a failover needs (Server._check_failover).
FAILOVER_CHECK = 30.0

#: Channels nobody reads any more that the WAL source goes on watching (Server._watch).
MAX_WATCHED = 4096


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
        # The WAL source: its own dispatcher (routes and rings), registry and connection.
        self.wal_dispatcher: Dispatcher | None = None
        self.wal: WalConnection | None = None
        self.wal_registry = Registry(config.max_subscriptions_per_worker,
                                     config.max_channels_per_worker, ids=self.registry.ids)
        self.wal_error: SetupError | None = None
        self.lag_warned = False
        # WAL subscriptions waiting for the server's WAL position to begin at (_placed).
        self.placing: dict[int, Sub] = {}
        # WAL consumer groups whose last member went: (channels, group) -> the ring it left
        # (kept, unrouted: what it had not consumed) and when the group's hold ends.
        self.orphans: dict[tuple[tuple[str, ...], str], tuple[int, float]] = {}
        self.probe: SlotProbe | None = None     # slot_dsn: samples the slot where it lives
        # What the WAL source has read, for as long as this process lives: from where in
        # the slot (None: not yet), each channel watched since when, the watched channels
        # nobody reads (oldest first), the consumer groups served, how often the slot was
        # lost, and the hold at start for the previous supervisor's groups (where, until).
        self.read_from: int | None = None
        self.watched: dict[str, tuple[int, int]] = {}
        self.unread_channels: dict[str, None] = {}
        self.served_groups: set[tuple[tuple[str, ...], str]] = set()
        self.slot_losses = 0
        self.start_hold: tuple[int, float] | None = None
        self.failover_warned: str | None = None
        self.failover_ready: bool | None = None
        self.failover_checked = 0.0
        if config.slot is not None:
            self.wal_dispatcher = Dispatcher(wal=True)
            self.wal = WalConnection(
                config.slot_conninfo or config.conninfo, config.slot_safe_target,
                Timing(config.connect_timeout, config.liveness_timeout, config.backoff_initial,
                       config.backoff_max, config.backoff_reset_after),
                self.wal_dispatcher, time.monotonic(), config.slot, config.publication,
                self._on_wal_connected, self._on_wal_down, self._nudge_standby,
                config.failover)
            if config.slot_conninfo is None:
                self.link.watch_slot(config.slot)
            else:           # the slot lives elsewhere: its lag is sampled there
                self.probe = SlotProbe(
                    config.slot_conninfo, config.slot_safe_target,
                    Timing(config.connect_timeout, config.liveness_timeout,
                           config.backoff_initial, config.backoff_max,
                           config.backoff_reset_after),
                    self.wal_dispatcher, time.monotonic(), config.slot)
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
        link, wal = self.link, self.wal
        while not self.stopping:
            now = time.monotonic()
            wait = link.step(now)
            watch = link.fds()
            if wal is not None:
                if self.orphans:
                    self._expire_orphans(now)
                wal.extra_hold = self._orphan_hold()
                if wal.streaming and now - self.failover_checked >= FAILOVER_CHECK:
                    self.failover_checked = now
                    self._check_failover()
                wait = min(wait, wal.step(now))
                watch += wal.fds()
                if self.probe is not None:
                    wait = min(wait, self.probe.step(now))
                    watch += self.probe.fds()
                self._check_lag()
            wait_ms = max(1, min(TICK_MS, math.ceil(wait * 1000)))
            conn = link.conn
            status = self.dispatcher.run(
                conn, self.epoll.fileno(), wait_ms, want_result=conn is not None and link.busy,
                wal=self.wal_dispatcher, wal_conn=None if wal is None else wal.conn,
                wal_want_result=wal is not None and wal.busy, watch=tuple(watch))
            if self.dispatcher.block_expiries != self.expiries_logged:
                if not self.expiries_logged:
                    log.warning("a subscription with overflow='block' held the connection for "
                                "block_timeout (%g s): it misses what does not fit (an overflow "
                                "Gap counts it) until it makes room; said once",
                                self.config.block_timeout)
                self.expiries_logged = self.dispatcher.block_expiries
            if status == RunStatus.RUN_CONN_BAD and conn is not None:
                link.lose_now(conn.error_message or "the server closed the connection")
            elif status == RunStatus.RUN_RESULT:
                link.on_result(time.monotonic())
            elif status == RunStatus.RUN_WAL_BAD and wal is not None and wal.conn is not None:
                wal.lose_now(wal.conn.error_message or "the server ended the replication stream")
            elif status == RunStatus.RUN_WAL_RESULT and wal is not None:
                wal.on_result(time.monotonic())
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
        for shell in (self.link, self.wal, self.probe):
            if shell is not None and any(fd in ready for fd, _w in shell.fds()):
                shell.advance(now)

    # -- the connection -----------------------------------------------------------------------

    def _on_connected(self) -> None:
        """A new connection: LISTEN every wanted channel and sample the queue, then check
        that the server listens on exactly those (a query of its own: a LISTEN takes effect
        at commit, after the statements of its query string); then streams are whole."""
        act = self.registry.connected()
        wanted, token = act.listen, act.listen_token
        replay = ([_listen_sql("LISTEN", wanted)] if wanted else []) + [self.link.heartbeat]
        self.link.query(b"; ".join(replay), lambda results, error:
                        self._on_replay_listened(wanted, token, results, error))
        self.link.query(b"SELECT pg_listening_channels()", lambda results, error:
                        self._on_replayed(wanted, token, results, error))
        if self.config.slot is not None and self.config.slot_conninfo is not None:
            # The slot is read elsewhere (a standby cannot create one): the publication
            # pgoutput needs is made here, on the primary, and replicated there.
            pub = self.config.publication
            self.link.query(
                f"DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = "
                f"'{pub}') THEN CREATE PUBLICATION \"{pub}\"; END IF; END$$".encode(),
                lambda _results, error: self._on_publication(error))

    def _on_publication(self, error: str | None) -> None:
        if error is not None:
            pub = self.config.publication
            log.warning("could not create publication %r on %s for the WAL source: %s (create "
                        "it there: CREATE PUBLICATION %s;)", pub, self.config.safe_target,
                        error, pub)

    def _nudge_standby(self) -> None:
        """A slot being made on a standby waits for the primary to log its running
        transactions, which an idle primary does not do soon: ask it to (PostgreSQL 16+)."""
        if self.link.conn is not None:
            self.link.query(b"SELECT pg_log_standby_snapshot()", lambda _results, _error: None)

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
        if self.placing:
            self._answer_placing()

    # -- the WAL source -------------------------------------------------------------------------

    def _on_wal_connected(self) -> None:
        assert self.wal is not None
        self.wal.setup_permanent = False
        self.wal.setup(self._on_wal_setup)

    def _on_wal_setup(self, error: SetupError | None, started: Started | None) -> None:
        wal, disp = self.wal, self.wal_dispatcher
        assert wal is not None and disp is not None
        if error is not None or started is None:
            assert error is not None
            first = not self.wal_registry.was_up
            if error.permanent or first:
                # Said to whoever waits for this source, not retried behind their backs.
                self._fail_wal_subscribes(str(error))
            self.wal_error = error
            wal.setup_permanent = error.permanent
            wal.lose_now(str(error))
            return
        self.wal_error = None
        first = self.read_from is None
        if started.loss is not None:
            # Before anything the slot sends from now on: every stream, and every group
            # waiting for a member, says that what came between is not there.
            rings = [sub.id for sub in self.wal_registry.subs.values()]
            disp.mark_gap(rings + [ring for ring, _until in self.orphans.values()], "slot")
            disp.reset_positions()
            self.watched = dict.fromkeys(self.watched, (0, 0))   # from the new slot on
            self.slot_losses += 1
            for sub in self.wal_registry.subs.values():
                sub.after = None    # said already: its stream begins anew, after the Gap
        elif started.rewind_to is not None:
            log.warning("slot %r is read on a new timeline (a standby was promoted): reading "
                        "on from %s, where its history left the one read before", wal.slot,
                        format_lsn(started.rewind_to))
            disp.reset_positions(started.rewind_to)
            back = (started.rewind_to, 0)
            self.watched = {ch: min(since, back) for ch, since in self.watched.items()}
        if first or started.loss is not None:
            self.read_from = wal.slot_confirmed
            # What a subscription without after= gets: what commits from now on. After a
            # loss, the streams there were get all that the slot has, after their Gap.
            position = (started.start_lsn, 0)
            disp.set_stream_position(*position)
            for sub in self.wal_registry.subs.values() if first else ():
                if not sub.resumes and disp.position(sub.id) < position:
                    disp.set_position(sub.id, *position)
        if first and not started.created and self.config.group_hold > 0:
            # Groups of the supervisor before this one come back where the slot stands: it
            # keeps that place for group_hold, as for a group whose last member went.
            self.start_hold = (wal.slot_confirmed, time.monotonic() + self.config.group_hold)
        for sub in [s for s in self.wal_registry.subs.values() if s.after is not None]:
            self._judge_after(sub)
        wal.ready(time.monotonic())
        self.failover_checked = 0.0         # looked at again, now that it streams
        if not self.wal_registry.up:
            act = self.wal_registry.connected()
            self._apply_wal(self.wal_registry.replayed(act.listen, act.listen_token))

    def _on_wal_down(self, cause: str) -> None:
        assert self.wal_dispatcher is not None and self.wal is not None
        self.wal_dispatcher.stream_reset()  # the slot sends again what was not confirmed
        if self.wal.last_error_permanent and not self.wal_registry.was_up:
            # A role without REPLICATION, bad credentials: said to whoever waits.
            self.wal_error = SetupError(self.wal.machine.last_error or cause, True)
            self._fail_wal_subscribes(str(self.wal_error))

    def _orphan_hold(self) -> int:
        """How far the slot may be confirmed for the groups that wait for a member: what
        their last member had not consumed, else where the group stood (0: no hold)."""
        disp = self.wal_dispatcher
        assert disp is not None
        holds = [disp.oldest_pending(ring) or disp.position(ring)[0] or 1
                 for ring, _until in self.orphans.values()]
        if self.start_hold is not None:
            if time.monotonic() < self.start_hold[1]:
                holds.append(self.start_hold[0] or 1)
            else:
                self.start_hold = None
        return min(holds) if holds else 0

    def _expire_orphans(self, now: float) -> None:
        disp = self.wal_dispatcher
        assert disp is not None
        for key, (ring, until) in list(self.orphans.items()):
            if now >= until:
                del self.orphans[key]
                left = disp.unread(ring, unconsumed=True)
                self.orphaned += left
                disp.remove_ring(ring)
                log.info("consumer group %r on %s had no member for group_hold (%g s): the "
                         "slot no longer keeps its place (%d messages it had not consumed "
                         "are counted in orphaned)", key[1], ", ".join(key[0]),
                         self.config.group_hold, left)

    def _adopt(self, sub: Sub) -> bool:
        """A member joins a WAL group that waits for one: it gets what the last member had
        not consumed, and everything after where the group stood (read from the slot again
        when the stream is past it)."""
        disp, wal = self.wal_dispatcher, self.wal
        assert disp is not None and wal is not None and sub.group is not None
        found = self.orphans.pop(_group_key(sub), None)
        if found is None:
            return False
        ring = found[0]
        disp.handover(ring, [sub.id])
        position = disp.position(ring)
        disp.remove_ring(ring)
        disp.set_position(sub.id, *position)
        if position < (disp.at_commit, disp.at_lsn):
            wal.restart(f"consumer group {sub.group!r} has a member again")
        return True

    def _rejoin(self, sub: Sub) -> bool:
        """A WAL group this supervisor has not served yet, joining while the slot keeps the
        place it had at start (start_hold): it begins there, so that what the group had not
        consumed when the supervisor before this one died comes again (at least once). The
        slot not read yet, it begins where the slot is, as every stream then does."""
        disp, wal = self.wal_dispatcher, self.wal
        assert disp is not None and wal is not None
        if _group_key(sub) in self.served_groups:
            return False
        if not wal.has_read:
            return True
        if self.start_hold is None or time.monotonic() >= self.start_hold[1]:
            return False
        disp.set_position(sub.id, self.start_hold[0], 0)
        if (self.start_hold[0], 0) < (disp.at_commit, disp.at_lsn):
            wal.restart(f"consumer group {sub.group!r} joins where the slot stood at start")
        return True

    def _check_failover(self) -> None:
        """What a failover of the primary would do to the slot, said once per process as a
        warning naming what is missing, and in stats() (failover_ready)."""
        wal = self.wal
        assert wal is not None
        if wal.recovery:
            self.failover_ready = None      # a standby's own slot survives its promotion
            return
        if wal.server_version < 170000:
            self._not_ready(
                f"PostgreSQL {wal.server_version // 10000} cannot keep a logical slot across "
                f"a failover: a promoted standby does not have slot {wal.slot!r}. The "
                f"supervisor then makes it again, and every WAL subscription gets "
                f"Gap('slot') (PostgreSQL 17 keeps failover slots; or read the slot on a "
                f"standby with slot_dsn=)")
            return
        if not wal.slot_failover:
            self._not_ready(f"slot {wal.slot!r} is not a failover slot "
                            f"(Supervisor(failover=False)): a failover loses it, and every "
                            f"WAL subscription then gets Gap('slot')")
            return
        names = [n.strip().strip('"') for n in wal.sync_slots.split(",") if n.strip()]
        if not names:
            self._not_ready(self._failover_needs("synchronized_standby_slots is not set on "
                                                 "the primary"))
            return
        if self.config.slot_conninfo is not None:
            self.failover_ready = None      # not seen from here: the primary is elsewhere
            return
        if self.link.conn is None:          # the LISTEN connection asks: again in a second
            self.failover_checked = time.monotonic() - FAILOVER_CHECK + 1.0
            return
        quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in names)
        self.link.query(f"SELECT slot_name, slot_type, active FROM pg_replication_slots "
                        f"WHERE slot_name IN ({quoted})".encode(),
                        lambda results, error: self._standby_slots(names, results, error))

    def _standby_slots(self, names: list[str], results: list[list[tuple[bytes | None, ...]]],
                       error: str | None) -> None:
        if error is not None:
            return
        rows = {(r[0] or b"").decode(): r for r in (results[0] if results else [])}
        missing = [n for n in names if n not in rows or rows[n][1] != b"physical"]
        inactive = [n for n in names if n in rows and rows[n][2] != b"t"]
        if missing:
            self._not_ready(self._failover_needs(
                f"synchronized_standby_slots names {', '.join(missing)}, which is not a "
                f"physical slot on the primary: every logical reader there waits for it (a "
                f"stall); create it, or correct the setting"))
        elif inactive:
            self._not_ready(self._failover_needs(
                f"the standby's slot {', '.join(inactive)} (synchronized_standby_slots) is "
                f"not in use: no standby receives through it, and every logical reader on the "
                f"primary waits for it"))
        else:
            self.failover_ready = True

    def _failover_needs(self, what: str) -> str:
        return (f"slot {self.config.slot!r} is a failover slot, but a failover would not "
                f"keep it: {what}. A failover needs, on the primary, "
                f"synchronized_standby_slots = '<the standby's physical slot>'; on the "
                f"standby, sync_replication_slots = on, hot_standby_feedback = on, "
                f"primary_slot_name, and a dbname in primary_conninfo")

    def _not_ready(self, message: str) -> None:
        """A failover would lose the slot: stats() says so, and a warning names why (once
        for each reason)."""
        self.failover_ready = False
        if message != self.failover_warned:
            log.warning("%s", message)
            self.failover_warned = message

    def _fail_wal_subscribes(self, message: str) -> None:
        for sub in self.wal_registry.unanswered():
            _sub, act = self.wal_registry.cancel(sub.worker, sub.req)
            self._apply_wal(act)
            self.control.reply(cast(Client, sub.worker),
                               {"req": sub.req, "ok": False, "error": "WalSourceError",
                                "message": message})

    @property
    def slot_lag(self) -> int | None:
        """The WAL the slot holds, as last sampled where it lives."""
        return (self.probe or self.link).slot_lag

    def _check_lag(self) -> None:
        lag = self.slot_lag
        if lag is None:
            return
        if lag > self.config.slot_lag_warning and not self.lag_warned:
            log.warning("replication slot %r holds %d bytes of WAL (more than "
                        "slot_lag_warning): a reader does not keep up, or a slot is "
                        "forgotten (python -m pglistener slot list)", self.config.slot, lag)
            self.lag_warned = True
        elif lag <= self.config.slot_lag_warning // 2:
            self.lag_warned = False

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
                            message.get("group"), message.get("source", "notify"),
                            message.get("after"), message.get("after_lsn"))
        elif op == "unsubscribe":
            sub_id = message.get("sub")
            if sub_id in self.wal_registry.subs:
                self._apply_wal(self.wal_registry.unsubscribe(client, sub_id))
            else:
                self._apply(self.registry.unsubscribe(client, sub_id))
            self.control.reply(client, {"req": req, "ok": True})
        elif op == "cancel":
            self._cancel(client, message.get("of"))
        elif op == "state":
            self.control.reply(client, {
                "req": req, "ok": True, "connected": self.registry.up,
                "last_error": self.link.machine.last_error,
                "wal_last_error": None if self.wal is None else self.wal.machine.last_error})
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _subscribe(self, client: Client, req: Any, channels: Any, ring_bytes: Any,
                   restart: bool = False, overflow: Any = "gap", group: Any = None,
                   source: Any = "notify", after: Any = None, after_lsn: Any = None) -> None:
        if not isinstance(channels, list) or not channels:
            raise ValueError("a subscription needs a list of one or more channels")
        if source not in ("notify", "wal"):
            raise ValueError(f"source is 'notify' or 'wal', not {source!r}")
        if source == "wal" and self.wal is None:
            raise ValueError("source='wal' needs a supervisor that reads a slot: "
                             "Supervisor(dsn, slot='name')")
        if source == "wal" and self.wal_error is not None and self.wal_error.permanent:
            self.control.reply(client, {"req": req, "ok": False, "error": "WalSourceError",
                                        "message": str(self.wal_error)})
            return
        position = _position(after, after_lsn) if source == "wal" else None
        raws = {ch: channel_bytes(ch) for ch in channels}     # in order, without repeats
        capacity = self.config.ring_bytes if ring_bytes is None else check_ring_bytes(
            ring_bytes, self.config.max_ring_bytes, "Supervisor(max_ring_bytes=...)")
        registry = self.wal_registry if source == "wal" else self.registry
        sub = registry.new(client, client.pid, req, list(raws), capacity,
                           check_overflow(overflow), check_group(group))
        sub.resumes = position is not None
        dispatcher = self.wal_dispatcher if source == "wal" else self.dispatcher
        assert dispatcher is not None
        self.ring_fds[sub.id] = self._make_ring(dispatcher, sub.id, capacity,
                                                sub.overflow == "block")
        if restart:     # a restarted pool worker: its stream starts by saying so
            dispatcher.mark_gap([sub.id], "restart")
        if source == "notify":
            self._apply(self.registry.add(sub))
            return
        if position is not None:
            self._resume(sub, *position)
        elif sub.group is not None and (self._adopt(sub) or self._rejoin(sub)):
            sub.resumes = True      # where its group stood, not where the stream is
        if sub.group is not None:
            self.served_groups.add(_group_key(sub))
        act = self.wal_registry.add(sub)
        if not sub.resumes and sub in act.answer and self.link.conn is not None:
            act.answer.remove(sub)          # once it is placed (below)
            self.placing[sub.id] = sub
            self.link.query(b"SELECT pg_current_wal_lsn()::text",
                            lambda results, error: self._placed(sub, results, error))
        self._apply_wal(act)

    def _placed(self, sub: Sub, results: list[list[tuple[bytes | None, ...]]],
                error: str | None) -> None:
        """A WAL subscription without after= begins with what commits once it is answered:
        what its ring took meanwhile that committed before the server's WAL position now
        goes, and it is answered."""
        if self.placing.pop(sub.id, None) is None or sub.id not in self.wal_registry.subs:
            return              # answered already, or its worker went meanwhile
        assert self.wal_dispatcher is not None
        if error is None and results and results[0] and results[0][0][0]:
            self.wal_dispatcher.trim_before(sub.id, parse_lsn(results[0][0][0].decode()))
        self._apply_wal(Actions(answer=[sub]))

    def _answer_placing(self) -> None:
        """The LISTEN connection went with the position queries: answer what waited for
        them (those streams begin where the supervisor's stream stood)."""
        waiting, self.placing = list(self.placing.values()), {}
        self._apply_wal(Actions(answer=[s for s in waiting if s.id in self.wal_registry.subs]))

    def _resume(self, sub: Sub, commit: int, lsn: int, seek: int) -> None:
        """A WAL subscription that starts after= a position: if the stream is past it, read
        the slot again from where it is confirmed (the others skip what they had). Whether
        the slot still holds what follows is judged once it has been read (_judge_after)."""
        wal, disp = self.wal, self.wal_dispatcher
        assert wal is not None and disp is not None
        sub.after = (commit, lsn, seek)
        disp.set_position(sub.id, commit, lsn, seek)
        if wal.has_read:
            commit, lsn, seek = self._judge_after(sub)
        if seek or (commit, lsn) < (disp.at_commit, disp.at_lsn):
            wal.restart(f"a subscription resumes after {format_lsn(seek or lsn)}")

    def _judge_after(self, sub: Sub) -> tuple[int, int, int]:
        """Whether the slot still holds everything after where `sub` resumes. A position
        the slot is confirmed past is exact only where this supervisor has watched each of
        the subscription's channels since before it and seen nothing on it after it; else
        what came between may be gone, and the stream begins with Gap("slot"). Where the
        subscription then stands: (commit, lsn, seek lsn)."""
        wal, disp = self.wal, self.wal_dispatcher
        assert wal is not None and disp is not None and sub.after is not None
        commit, lsn, seek = sub.after
        sub.after = None
        confirmed = max(wal.slot_confirmed, disp.confirmed)
        if seek and seek < confirmed:
            # Before the slot: what it sends all comes after, and the seek would never end.
            commit, lsn, seek = seek, seek, 0
            disp.set_position(sub.id, commit, lsn, 0)
        if seek or commit >= confirmed:
            return commit, lsn, seek    # the slot sends the transaction again: exact
        watched = [self._watched_since(ch) for ch in sub.channels]
        last = [disp.route_position(ch.encode()) for ch in sub.channels]
        if all(since is not None and since <= (commit, lsn) and at is not None
               and at <= (commit, lsn) for since, at in zip(watched, last, strict=True)):
            return commit, lsn, seek    # nothing came on its channels after it
        log.warning("a subscription to %s resumes after %s, but slot %r is confirmed past "
                    "it (at %s): what came between may be gone from the slot; its stream "
                    "begins with Gap('slot')", ", ".join(sub.channels), format_lsn(lsn),
                    wal.slot, format_lsn(confirmed))
        disp.mark_gap([sub.id], "slot")
        return commit, lsn, seek

    def _watched_since(self, channel: str) -> tuple[int, int] | None:
        """From where in the stream every WAL message on `channel` has been seen (the route
        made then, or kept since with none), None when it is not watched."""
        since = self.watched.get(channel)
        if since is None or self.read_from is None:
            return None
        return max(since, (self.read_from, 0))

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

    def _apply(self, act: Actions) -> None:
        """Carry out what the registry decided, in its order."""
        self._carry_out(act, self.dispatcher, self.registry)
        if self.link.conn is None:
            return
        if act.unlisten:
            self.link.query(_listen_sql("UNLISTEN", act.unlisten),
                            lambda _results, error: self._on_unlistened(error))
        if act.listen:
            channels, token = act.listen, act.listen_token
            self.link.query(_listen_sql("LISTEN", channels),
                            lambda _results, error: self._on_listened(channels, token, error))

    def _apply_wal(self, act: Actions) -> None:
        """What the WAL source's registry decided: the slot needs no LISTEN, so what it
        would LISTEN is in place at once (streams are whole once the slot is read)."""
        assert self.wal_dispatcher is not None
        self._carry_out(act, self.wal_dispatcher, self.wal_registry)
        if act.listen:
            self._apply_wal(self.wal_registry.listened(act.listen, act.listen_token))

    def _carry_out(self, act: Actions, dispatcher: Dispatcher, registry: Registry) -> None:
        """Routes, rings to free, gaps and answers: what both sources share."""
        wal = dispatcher is self.wal_dispatcher
        for channel, ids in act.routes.items():
            if wal:
                self._watch(channel, bool(ids))
            dispatcher.set_route(channel.encode(), ids, keep=wal)
        for sub in act.free:
            for fd in self.ring_fds.pop(sub.id, ()):
                os.close(fd)
            if not sub.died:
                dispatcher.reader_closed(sub.id)    # closed: what it took is consumed
            if sub.group is not None and self._hand_over(sub, dispatcher, registry):
                continue            # its ring waits for the group's next member
            dispatcher.remove_ring(sub.id)
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

    def _watch(self, channel: str, routed: bool) -> None:
        """The WAL source keeps watching a channel nobody reads any more (its route kept
        with no entries), so that a subscription resuming on it can be told whether it
        missed anything (_judge_after): up to MAX_WATCHED such channels, oldest dropped."""
        disp = self.wal_dispatcher
        assert disp is not None
        if channel not in self.watched:
            self.watched[channel] = (disp.at_commit, disp.at_lsn)
        if routed:
            self.unread_channels.pop(channel, None)
            return
        self.unread_channels[channel] = None
        while len(self.unread_channels) > MAX_WATCHED:
            oldest = next(iter(self.unread_channels))
            del self.unread_channels[oldest]
            del self.watched[oldest]
            disp.set_route(oldest.encode(), [])

    def _hand_over(self, sub: Sub, dispatcher: Dispatcher, registry: Registry) -> bool:
        """A consumer group's member left: what it had not consumed goes to the members
        left (one that died: at least once, a batch in its hands counts as not consumed; one
        that unsubscribed consumed what it took). With none left,
        a WAL group keeps its ring and its place in the slot for group_hold seconds (True);
        a NOTIFY group counts it in orphaned."""
        key = _group_key(sub)
        mates = [s.id for s in registry.subs.values() if _group_key(s) == key]
        if mates:
            _moved, missed = dispatcher.handover(sub.id, mates)
            self.orphaned += missed
            return False
        if dispatcher is self.wal_dispatcher and self.config.group_hold > 0 \
                and not self.stopping:
            self.orphans[key] = (sub.id, time.monotonic() + self.config.group_hold)
            return True
        self.orphaned += dispatcher.unread(sub.id, unconsumed=True)
        return False

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
        else:
            sub, act = self.wal_registry.cancel(client, req)
            if sub is not None:
                self._apply_wal(act)
        if sub is not None:
            self.control.reply(client, {"req": req, "ok": False, "error": "Cancelled"})

    def _detached(self, client: Client) -> None:
        """A worker's connection went: every subscription of it goes too."""
        self._apply(self.registry.worker_gone(client))
        if self.wal is not None:
            self._apply_wal(self.wal_registry.worker_gone(client))

    def stats(self) -> dict[str, Any]:
        """Stats (the schema, stats.py) as the control reply carries it."""
        up = self.registry.up
        machine = self.link.machine
        if up:
            state = "listening"
        else:
            state = "disconnected" if machine.phase is Phase.BACKOFF else "connecting"
        readers = []
        for source, registry, dispatcher in (("notify", self.registry, self.dispatcher),
                                             ("wal", self.wal_registry, self.wal_dispatcher)):
            for sub in registry.subs.values():
                assert dispatcher is not None
                delivered, missed, lag, held = dispatcher.ring_stats(sub.id)
                readers.append(ReaderStats(
                    subscription=sub.id, channels=sub.channels, pid=sub.pid,
                    delivered=delivered, missed=missed, ring_bytes=sub.ring_bytes,
                    lag_bytes=lag, overflow=sub.overflow, held_seconds=held, group=sub.group,
                    source=source))
        wal, disp = self.wal, self.wal_dispatcher
        wal_state = None
        if wal is not None:
            wal_state = ("streaming" if wal.machine.phase is Phase.UP else "disconnected"
                         if wal.machine.phase is Phase.BACKOFF else "connecting")
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
            subscriptions=len(self.registry.subs) + len(self.wal_registry.subs),
            channels=tuple(sorted(set(self.registry.routes) | set(self.wal_registry.routes))),
            outage_seconds=machine.outage_seconds(time.monotonic()),
            queue_usage=self.link.queue_usage,
            held_seconds=self.dispatcher.held_seconds,
            orphaned=self.orphaned,
            readers=tuple(readers),
            slot=self.config.slot,
            wal_state=wal_state,
            wal_backend_pid=(wal.conn.backend_pid if wal is not None and wal.streaming
                             and wal.conn is not None else None),
            wal_reconnects=0 if wal is None else wal.machine.reconnects,
            wal_last_error=None if wal is None else wal.machine.last_error,
            wal_received=0 if disp is None else disp.received,
            wal_unrouted=0 if disp is None else disp.unrouted,
            wal_confirmed_lsn=0 if disp is None else disp.confirmed,
            slot_lag_bytes=self.slot_lag,
            slot_losses=self.slot_losses,
            slot_failover=None if wal is None or not wal.has_read else wal.slot_failover,
            failover_ready=self.failover_ready,
        ).to_dict()

    def _shutdown(self) -> None:
        # The control socket and its private directory go here too, so that an owner that
        # died without stop() leaves nothing behind (rmdir only takes an empty one).
        self.control.close(self.config.private_dir)
        for fds in self.ring_fds.values():
            for fd in fds:
                os.close(fd)
        self.link.close()
        if self.wal is not None:
            self.wal.close()
        if self.probe is not None:
            self.probe.close()
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


def _group_key(sub: Sub) -> tuple[tuple[str, ...], str]:
    """What makes subscriptions members of one consumer group (Registry.entries)."""
    return tuple(sorted(sub.channels)), str(sub.group)


def _position(after: Any, after_lsn: Any) -> tuple[int, int, int] | None:
    """Where a WAL subscription starts, from its request: (commit LSN, LSN, seek LSN), None
    without after=. An exact position is a message's (commit_lsn, lsn); a bare LSN is sought
    in the stream (see Server._resume)."""
    if after is not None:
        if (not isinstance(after, list) or len(after) != 2
                or not all(isinstance(v, int) and 0 < v < 1 << 64 for v in after)):
            raise ValueError("after= is an LSN (int) or a (commit_lsn, lsn) position")
        return after[0], after[1], 0
    if after_lsn is not None:
        if not isinstance(after_lsn, int) or not 0 < after_lsn < 1 << 64:
            raise ValueError("after= is an LSN (int) or a (commit_lsn, lsn) position")
        return 0, 0, after_lsn
    return None


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
