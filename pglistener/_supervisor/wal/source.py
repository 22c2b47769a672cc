"""The WAL source: messages and row changes from a logical slot, on a replication
connection (connection.py's shell), decoded from pgoutput by decoder.pyx on the dispatch
core. It asks the LISTEN connection for what only a plain connection can answer (the
server's WAL position, the standby slots, the publication on a primary).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..._checks import op_list, qualified
from ..._core.reader import format_lsn, parse_lsn
from ..._dsn import safe_target
from ...errors import PGListenerError, WalSourceError
from ..connection import Phase
from ..control_server import Client
from ..conversation import drive
from ..listen import Done, ListenConnection
from ..registry import Actions, Registry, Sub
from ..source import Host, Rows, Source, group_key, timing
from . import failover as _failover
from . import tables as _tables
from .connection import LINGER_NS, SlotProbe, WalConnection
from .decoder import WalDispatcher
from .failover import Verdict
from .setup import KEEP_TABLE, PUBLICATION_GRACE, SetupError, Started

if TYPE_CHECKING:
    from ..server import Config

log = logging.getLogger("pglistener.supervisor")

#: How often the WAL source looks again at what a failover needs (WalSource.check_failover).
FAILOVER_CHECK = 30.0

#: At most this often (seconds) what the supervisor saw on each channel is written to
#: KEEP_TABLE (only when it moved): the slot waits for it that long at most.
KEEP_INTERVAL = 0.5

#: Channels nobody reads any more that the WAL source goes on watching (WalSource.watch).
MAX_WATCHED = 4096

#: The WAL source's fields of Stats, for a supervisor without one.
NO_SLOT: dict[str, Any] = dict(
    slot=None, wal_state=None, wal_backend_pid=None, wal_reconnects=0, wal_last_error=None,
    wal_received=0, wal_unrouted=0, wal_confirmed_lsn=0, slot_lag_bytes=None, slot_losses=0,
    slot_failover=None, failover_ready=None, failover_reason=None)


class WalSource(Source):
    """Messages from a logical slot (Supervisor(slot=...)): no LISTEN, so what a registry
    would LISTEN is in place at once (streams are whole once the slot is read). Every
    position and promise the slot makes is kept here: where each subscription begins
    (after=, or what commits once it is answered), the groups that wait for a member, what
    a loss of the slot or a new timeline does, and what a failover would need."""

    name = "wal"
    keeps_routes = True
    off_stats = NO_SLOT
    off_state: dict[str, Any] = {"wal_last_error": None}
    shell: WalConnection
    dispatcher: WalDispatcher
    ended = "the server ended the replication stream"

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.slot is not None

    @classmethod
    def absent(cls, changes: bool) -> str:
        what = "table changes need" if changes else "source='wal' needs"
        return f"{what} a supervisor that reads a slot: Supervisor(dsn, slot='name')"

    def __init__(self, server: Host) -> None:
        super().__init__(server)
        config = self.config
        assert config.slot is not None
        self.plain = server.plain()     # the LISTEN connection, for what replication cannot ask
        self.dispatcher = WalDispatcher()
        self.dispatcher.linger_ns = LINGER_NS
        self.registry = Registry(config.max_subscriptions_per_worker,
                                 config.max_channels_per_worker, ids=server.ids, listens=False)
        self.shell = WalConnection(
            config.slot_conninfo or config.conninfo, config.slot_safe_target, timing(config),
            self.dispatcher, time.monotonic(), config.slot, config.publication,
            self._on_connected, self._on_down, self._nudge_standby, config.failover,
            lambda: _tables.table_oids(list(self.registry.routes)))
        self.probe: SlotProbe | None = None     # slot_dsn: samples the slot where it lives
        if config.slot_conninfo is None:
            self.plain.watch_slot(config.slot)
        else:           # the slot lives elsewhere: its lag is sampled there
            self.probe = SlotProbe(config.slot_conninfo, config.slot_safe_target,
                                   timing(config), self.dispatcher, time.monotonic(),
                                   config.slot)
        self.error: SetupError | None = None
        self.lag_warned = False
        # Subscriptions waiting for the server's WAL position to begin at (_placed).
        self.placing: dict[int, Sub] = {}
        # Consumer groups whose last member went: (channels, group) -> the ring it left
        # (kept, unrouted: what it had not consumed) and when the group's hold ends.
        self.orphans: dict[tuple[tuple[str, ...], str], tuple[int, float]] = {}
        # What this source has read, for as long as this process lives: from where in
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
        self.failover_reason: str | None = None
        # The standbys the DSN names besides the primary ((conninfo, where) of each host),
        # asked whether their copy of the slot is one a promotion keeps.
        self.standbys = standby_conninfos(config.conninfo) if config.slot_conninfo is None \
            else []
        self.asking = False
        self.standby_answer: list[tuple[str, str | None]] | None = None
        self.nudge_refused = False
        # What this supervisor keeps on the server for the next one (KEEP_TABLE), and what
        # the one before kept: see _keep().
        self.kept: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {}
        self.keeping = True             # False once writing the table failed
        self.kept_written: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {}
        self.kept_once = False          # the table was written by this process
        self.keep_upto = 0              # what the slot may be confirmed to, as last written
        self.keep_cap = 0               # ... held there while something is unwritten
        self.keep_busy = False
        self.kept_at = 0.0
        self.keep_stamp: tuple[int, int, int] | None = None   # what the stream had, last look
        self.notices_seen = 0       # the decoder's notice counts, as logged
        self.skips_seen = 0
        self.remake_at: float | None = None     # the publication made again then, if gone
        # subscribe_changes() requests whose tables are being found, by (id(client), req):
        # the worker, and what asks again on a new LISTEN connection.
        self.finding: dict[tuple[int, Any], tuple[Client, Callable[[], None]]] = {}

    # -- what the loop asks -------------------------------------------------------------------

    def step(self, now: float) -> float:
        wal = self.shell
        if self.orphans:
            self._expire_orphans(now)
        if self.standby_answer is not None:
            self._heed_standbys(now)
        self._keep(now)
        holds = [h for h in (self._orphan_hold(), self.keep_cap) if h]
        wal.extra_hold = min(holds) if holds else 0
        if wal.streaming and now - self.failover_checked >= FAILOVER_CHECK:
            self.failover_checked = now
            self._check_failover()
        self._heed_notices()
        if self.remake_at is not None and now >= self.remake_at \
                and self.plain.conn is not None:
            self.remake_at = None
            self.plain.query(
                f"SELECT 1 FROM pg_publication WHERE pubname = "
                f"{_tables.literal(self.config.publication)}".encode(), self._remake)
        wait = wal.step(now)
        if self.remake_at is not None:
            wait = min(wait, max(0.0, self.remake_at - now))
        if self.probe is not None:
            wait = min(wait, self.probe.step(now))
        self._check_lag()
        return wait

    def shells(self) -> list[ListenConnection]:
        return [self.shell] if self.probe is None else [self.shell, self.probe]

    def close(self) -> None:
        self.shell.close()
        if self.probe is not None:
            self.probe.close()

    # -- the LISTEN connection, asked for what a replication connection cannot answer -------

    def query_connected(self) -> None:
        for _client, start in list(self.finding.values()):
            start()         # what was asked for tables went with the old connection
        if self.config.slot_conninfo is not None:
            # The slot is read elsewhere (a standby cannot create one): the publication
            # pgoutput needs is made here, on the primary, and replicated there.
            self.plain.query(_tables.remake_query(self.config.publication, []),
                             lambda _results, error: self._on_publication(error))

    def query_lost(self) -> None:
        if self.placing:
            self._answer_placing()

    def _on_publication(self, error: str | None) -> None:
        if error is not None:
            pub = self.config.publication
            log.warning("could not create publication %r on %s for the WAL source: %s (create "
                        "it there: CREATE PUBLICATION %s;)", pub, self.config.safe_target,
                        error, pub)

    def _remake(self, results: Rows, error: str | None) -> None:
        """The publication, looked for after the server skipped changes for want of it: made
        again with the tables subscribed to if it is still gone."""
        if error is not None or (results and results[-1]):
            return
        tables = _tables.table_oids(list(self.registry.routes))
        log.warning("publication %r is gone from %s (dropped?): making it again with the %d "
                    "tables subscribed to", self.config.publication, self.config.safe_target,
                    len(tables))
        self.plain.query(_tables.remake_query(self.config.publication, tables),
                         lambda _results, error: self._on_publication(error))

    def _nudge_standby(self) -> None:
        """A slot being made on a standby waits for the primary to log its running
        transactions, which an idle primary does not do soon: ask it to (PostgreSQL 16+)."""
        if self.plain.conn is not None:
            self.plain.query(b"SELECT pg_log_standby_snapshot()", lambda _results, _error: None)

    # -- the replication connection -----------------------------------------------------------

    def _on_connected(self) -> None:
        self.shell.setup_permanent = False
        assert self.shell.conn is not None
        self.dispatcher.watch_notices(self.shell.conn)
        self.shell.setup(self._on_setup)

    def _heed_notices(self) -> None:
        """What the walsender said beside the stream, in the log: a skipped publication
        (PostgreSQL 18+) is a loss, already a Gap in every stream where it stood."""
        disp = self.dispatcher
        if disp.notice_count == self.notices_seen:
            return
        skips = disp.publication_skips - self.skips_seen
        self.notices_seen, self.skips_seen = disp.notice_count, disp.publication_skips
        if skips:
            self.slot_losses += 1
            # Dropped and not made again, it would skip every change from here on: made
            # again if it is still gone after PUBLICATION_GRACE (a migration making it again
            # itself would fail if we made it first).
            self.remake_at = time.monotonic() + PUBLICATION_GRACE
            log.error("slot %r on %s: the server skipped changes it could not decode (%s: "
                      "publication %r did not exist as of them, dropped and made again?); "
                      "every WAL subscription gets Gap('slot') where they stood",
                      self.shell.slot, self.shell.safe_target, disp.last_notice,
                      self.config.publication)
        else:
            log.warning("slot %r on %s: the server says: %s", self.shell.slot,
                        self.shell.safe_target, disp.last_notice)

    def _on_setup(self, error: SetupError | None, started: Started | None) -> None:
        wal, disp = self.shell, self.dispatcher
        if error is not None or started is None:
            assert error is not None
            first = not self.registry.was_up
            if error.permanent or first:
                # Said to whoever waits for this source, not retried behind their backs.
                self._fail_subscribes(str(error))
            self.error = error
            wal.setup_permanent = error.permanent
            wal.lose_now(str(error))
            return
        self.error = None
        first = self.read_from is None
        if started.loss is not None:
            # Before anything the slot sends from now on: every stream, and every group
            # waiting for a member, says that what came between is not there.
            rings = [sub.id for sub in self.registry.subs.values()]
            disp.mark_gap(rings + [ring for ring, _until in self.orphans.values()], "slot")
            disp.reset_positions()
            self.watched = dict.fromkeys(self.watched, (0, 0))   # from the new slot on
            self.slot_losses += 1
            for sub in self.registry.subs.values():
                sub.after = None    # said already: its stream begins anew, after the Gap
        elif started.rewind_to is not None:
            log.warning("slot %r is read on a new timeline (a standby was promoted): reading "
                        "on from %s, where its history left the one read before", wal.slot,
                        format_lsn(started.rewind_to))
            disp.reset_positions(started.rewind_to)
            back = (started.rewind_to, 0)
            self.watched = {ch: min(since, back) for ch, since in self.watched.items()}
        if first and started.loss is None and not started.created and started.kept:
            self.kept = started.kept
        elif started.loss is not None or started.rewind_to is not None:
            self.kept = {}          # what it says is of a stream that did not go on
        if first or started.loss is not None:
            self.read_from = wal.slot_confirmed
            # What a subscription without after= gets: what commits from now on. After a
            # loss, the streams there were get all that the slot has, after their Gap.
            position = (started.start_lsn, 0)
            disp.set_stream_position(*position)
            for sub in self.registry.subs.values() if first else ():
                if not sub.resumes and disp.position(sub.id) < position:
                    disp.set_position(sub.id, *position)
        if first and not started.created and self.config.group_hold > 0:
            # Groups of the supervisor before this one come back where the slot stands: it
            # keeps that place for group_hold, as for a group whose last member went.
            self.start_hold = (wal.slot_confirmed, time.monotonic() + self.config.group_hold)
        for sub in [s for s in self.registry.subs.values() if s.after is not None]:
            self._judge_after(sub)
        wal.ready(time.monotonic())
        self.failover_checked = 0.0         # looked at again, now that it streams
        if not self.registry.up:
            self.apply(self.registry.connected())

    def _on_down(self, cause: str) -> None:
        self.dispatcher.stream_reset()  # the slot sends again what was not confirmed
        if self.shell.last_error_permanent and not self.registry.was_up:
            # A role without REPLICATION, bad credentials: said to whoever waits.
            self.error = SetupError(self.shell.machine.last_error or cause, True)
            self._fail_subscribes(str(self.error))

    def _fail_subscribes(self, message: str) -> None:
        """Every subscribe waiting for this source is refused with `message`."""
        act = Actions()
        for sub in self.registry.unanswered():
            _sub, dropped = self.registry.cancel(sub.worker, sub.req)
            act += dropped
            act.refuse.append((sub, WalSourceError(message)))
        self.apply(act)

    # -- consumer groups ----------------------------------------------------------------------

    def _orphan_hold(self) -> int:
        """How far the slot may be confirmed for the groups that wait for a member: what
        their last member had not consumed, else where the group stood (0: no hold)."""
        disp = self.dispatcher
        holds = [disp.oldest_pending(ring) or disp.position(ring)[0] or 1
                 for ring, _until in self.orphans.values()]
        if self.start_hold is not None:
            if time.monotonic() < self.start_hold[1]:
                holds.append(self.start_hold[0] or 1)
            else:
                self.start_hold = None
        return min(holds) if holds else 0

    def _expire_orphans(self, now: float) -> None:
        disp = self.dispatcher
        for key, (ring, until) in list(self.orphans.items()):
            if now >= until:
                del self.orphans[key]
                left = disp.unread(ring, unconsumed=True)
                self.server.orphaned += left
                disp.remove_ring(ring)
                log.info("consumer group %r on %s had no member for group_hold (%g s): the "
                         "slot no longer keeps its place (%d messages it had not consumed "
                         "are counted in orphaned)", key[1], ", ".join(key[0]),
                         self.config.group_hold, left)

    def orphan(self, sub: Sub) -> bool:
        """With no member left, a group keeps its ring and its place in the slot for
        group_hold seconds."""
        if self.config.group_hold > 0 and not self.server.stopping:
            self.orphans[group_key(sub)] = (sub.id, time.monotonic() + self.config.group_hold)
            return True
        return False

    def _adopt(self, sub: Sub) -> bool:
        """A member joins a group that waits for one: it gets what the last member had not
        consumed, and everything after where the group stood (read from the slot again
        when the stream is past it)."""
        disp, wal = self.dispatcher, self.shell
        assert sub.group is not None
        found = self.orphans.pop(group_key(sub), None)
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
        """A group this supervisor has not served yet, joining while the slot keeps the
        place it had at start (start_hold): it begins there, so that what the group had not
        consumed when the supervisor before this one died comes again (at least once). The
        slot not read yet, it begins where the slot is, as every stream then does."""
        disp, wal = self.dispatcher, self.shell
        if group_key(sub) in self.served_groups:
            return False
        if not wal.has_read:
            return True
        if self.start_hold is None or time.monotonic() >= self.start_hold[1]:
            return False
        disp.set_position(sub.id, self.start_hold[0], 0)
        if (self.start_hold[0], 0) < (disp.at_commit, disp.at_lsn):
            wal.restart(f"consumer group {sub.group!r} joins where the slot stood at start")
        return True

    # -- failover -----------------------------------------------------------------------------

    def _check_failover(self) -> None:
        """What a failover of the primary would do to the slot (failover.judge()), said once
        per process as a warning naming what is missing, and in stats() (failover_ready)."""
        wal, link = self.shell, self.plain

        def ask(sql: bytes, answered: Done) -> None:
            if link.conn is None:   # the LISTEN connection asks: again in a second
                self.failover_checked = time.monotonic() - FAILOVER_CHECK + 1.0
                return
            link.query(sql, answered)

        def heed(verdict: Verdict | None, _error: BaseException | None) -> None:
            if verdict is None:
                return
            if verdict.ask_standbys:
                self._ask_standbys()
            elif verdict.ready is False:
                assert verdict.reason is not None
                self._not_ready(verdict.reason)
            else:
                self.failover_ready = verdict.ready

        drive(_failover.judge(wal.slot, wal.recovery, wal.server_version, wal.slot_failover,
                              wal.sync_slots, self.config.slot_conninfo is None,
                              len(self.standbys)), ask, heed)

    def _ask_standbys(self) -> None:
        """Whether each standby the DSN names holds a synchronised copy of the slot that a
        promotion keeps (synced, not temporary): asked in a thread (a connection to each
        may take its connect_timeout), answered to step() in standby_answer."""
        if self.asking:
            return
        self.asking = True
        slot, standbys = self.config.slot, list(self.standbys)

        def ask() -> None:
            answers: list[tuple[str, str | None]] = []
            for conninfo, target in standbys:
                try:
                    with psycopg.connect(conninfo, autocommit=True) as conn:
                        row = conn.execute(
                            "SELECT pg_is_in_recovery(), (SELECT synced AND NOT temporary FROM "
                            "pg_replication_slots WHERE slot_name = %s)", (slot,)).fetchone()
                except psycopg.Error as exc:
                    answers.append((target, f"did not answer ({str(exc).strip()})"))
                    continue
                if row is None or not row[0]:
                    continue            # the primary (or not a standby): nothing to ask
                answers.append((target, None if row[1] else
                                "holds no synchronised copy of the slot that a promotion "
                                "keeps yet" if row[1] is None else
                                "holds a synchronised copy of the slot that is still "
                                "temporary (a promotion drops it)"))
            self.standby_answer = answers
            self.asking = False

        threading.Thread(target=ask, name="pglistener-standbys", daemon=True).start()

    def _heed_standbys(self, now: float) -> None:
        """The standbys' answer: ready only when every one holds a copy a promotion keeps.
        While one does not, the primary is nudged to log its running transactions (a copy
        stays temporary until the slot passes such a record, which a quiet primary writes
        only every 15 s or at a checkpoint), and asked again in a second."""
        answers, self.standby_answer = self.standby_answer, None
        if answers is None:
            return
        lacking = [f"{target} {why}" for target, why in answers if why is not None]
        if not answers:
            lacking = ["no server the DSN names is a standby now"]
        if not lacking:
            self.failover_ready = True
            self.failover_reason = None
            return
        self.failover_ready = False
        self.failover_reason = "; ".join(lacking)
        if self.failover_reason != self.failover_warned:
            log.info("slot %r is not ready for a failover yet: %s", self.config.slot,
                     self.failover_reason)
            self.failover_warned = self.failover_reason
        self.failover_checked = now - FAILOVER_CHECK + 1.0
        if self.plain.conn is not None:
            self.plain.query(b"SELECT pg_log_standby_snapshot()", self._nudged)

    def _nudged(self, _results: Rows, error: str | None) -> None:
        if error is not None and not self.nudge_refused:
            self.nudge_refused = True
            log.warning("cannot ask the primary to log its running transactions (%s): a "
                        "standby's copy of slot %r becomes one a promotion keeps only once "
                        "the primary does so itself (every 15 s while it writes, or at a "
                        "checkpoint); GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() "
                        "to the supervisor's role to have it sooner", error.strip(),
                        self.config.slot)

    def _not_ready(self, message: str) -> None:
        """A failover would lose the slot: stats() says so, and a warning names why (once
        for each reason)."""
        self.failover_ready = False
        self.failover_reason = message
        if message != self.failover_warned:
            log.warning("%s", message)
            self.failover_warned = message

    # -- the slot's lag -----------------------------------------------------------------------

    @property
    def slot_lag(self) -> int | None:
        """The WAL the slot holds, as last sampled where it lives."""
        return (self.probe or self.plain).slot_lag

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

    # -- subscriptions ------------------------------------------------------------------------

    def check(self, message: dict[str, Any]) -> None:
        if self.error is not None and self.error.permanent:
            raise WalSourceError(str(self.error))

    def position(self, message: dict[str, Any]) -> tuple[int, int, int] | None:
        """An exact position is a message's (commit_lsn, lsn); a bare LSN is sought in the
        stream (see _resume)."""
        after, after_lsn = message.get("after"), message.get("after_lsn")
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

    def subscribe_changes(self, client: Client, req: Any, message: dict[str, Any],
                          changes: Any) -> None:
        """Each table found (and added to the publication when it lacks it) on the LISTEN
        connection (tables.find_tables()), then subscribed by its changes' routes."""
        if (not isinstance(changes, dict) or not isinstance(changes.get("tables"), list)
                or not changes["tables"]):
            raise ValueError("subscribe_changes needs one or more tables")
        names = [qualified(t) for t in changes["tables"]]
        ops = op_list(changes.get("ops"))
        server = self.server
        server.subscribe_options(message)      # bad options cost no query
        most = self.config.max_channels_per_worker
        if len(names) * len(ops) > most:
            raise ValueError(f"{len(names)} tables x {len(ops)} kinds of change is more routes "
                             f"than max_channels_per_worker ({most})")
        link = self.plain
        key = (id(client), req)

        def ask(sql: bytes, answered: Done) -> None:
            # A subscribe cancelled (or its worker gone) meanwhile: its answer is dropped,
            # and the conversation with it.
            link.query(sql, lambda results, error: (answered(results, error)
                                                     if key in self.finding else None))

        def learned(found: _tables.Found) -> None:
            # Domains made since the slot's stream began: their columns load by base type.
            self.dispatcher.set_base_types(found.base_types)
            # REPLICA IDENTITY FULL: a keyed group keeps a row's order by its primary key.
            for oid, columns in found.key_columns.items():
                self.dispatcher.set_key_columns(oid, columns)

        def done(found: _tables.Found | None, error: BaseException | None) -> None:
            if self.finding.pop(key, None) is None:
                return
            if error is not None:
                server.reply_error(client, req, WalSourceError(str(error)))
                return
            assert found is not None
            if found.added:
                log.info("added %s to publication %r for a subscription to their changes",
                         ", ".join(found.added), self.config.publication)
            routes = [_tables.route_key(op, oid) for oid in found.oids for op in ops]
            try:
                server.open_subscription(client, req, message, self, routes,
                                         self.position(message))
            except (PGListenerError, ValueError, KeyError, OSError) as exc:
                # Answered here, not by the control loop: this runs in a query's callback.
                server.reply_error(client, req, exc)

        def start() -> None:
            drive(_tables.find_tables(self.config.publication, names, learned), ask, done,
                  errors=(_tables.TableError,))

        # Asked on the LISTEN connection; again on the next one if it goes meanwhile.
        self.finding[key] = (client, start)
        if link.conn is not None:
            start()

    def cancel(self, client: Client, req: Any) -> bool:
        if self.finding.pop((id(client), req), None) is not None:
            return True
        return super().cancel(client, req)

    def worker_gone(self, client: Client) -> None:
        for key in [k for k, (c, _start) in self.finding.items() if c is client]:
            del self.finding[key]
        super().worker_gone(client)

    def subscribed(self, sub: Sub, position: tuple[int, int, int] | None) -> None:
        sub.resumes = position is not None
        if sub.group is not None and (self._adopt(sub) or self._rejoin(sub) or any(
                group_key(s) == group_key(sub) for s in self.registry.subs.values())):
            # Where its group stood, not where the stream is: what the group was given while
            # this member was away (an app restarted) is not lost, and what a group with
            # members routes to a new one is its own (not trimmed at its answer). The
            # member's after= (an exact position) composes with it: what stands at or before
            # it, the member had, and it goes to another member of the group, or to none;
            # what other members left is handed over as ever.
            sub.resumes = True
            if position is not None and not position[2]:
                self.dispatcher.set_handled(sub.id, position[0], position[1])
        elif position is not None:
            self._resume(sub, *position)
        if sub.group is not None:
            self.served_groups.add(group_key(sub))
        act = self.registry.add(sub)
        link = self.plain
        if not sub.resumes and sub in act.answer and link.conn is not None:
            act.answer.remove(sub)          # once it is placed (below)
            self.placing[sub.id] = sub
            link.query(b"SELECT pg_current_wal_lsn()::text",
                       lambda results, error: self._placed(sub, results, error))
        self.apply(act)

    def _placed(self, sub: Sub, results: Rows, error: str | None) -> None:
        """A subscription without after= begins with what commits once it is answered:
        what its ring took meanwhile that committed before the server's WAL position now
        goes, and it is answered."""
        if self.placing.pop(sub.id, None) is None or sub.id not in self.registry.subs:
            return              # answered already, or its worker went meanwhile
        if error is None and results and results[0] and results[0][0][0]:
            self.dispatcher.trim_before(sub.id, parse_lsn(results[0][0][0].decode()))
        self.apply(Actions(answer=[sub]))

    def _answer_placing(self) -> None:
        """The LISTEN connection went with the position queries: answer what waited for
        them (those streams begin where the supervisor's stream stood)."""
        waiting, self.placing = list(self.placing.values()), {}
        self.apply(Actions(answer=[s for s in waiting if s.id in self.registry.subs]))

    def _resume(self, sub: Sub, commit: int, lsn: int, seek: int) -> None:
        """A subscription that starts after= a position: if the stream is past it, read the
        slot again from where it is confirmed (the others skip what they had). Whether the
        slot still holds what follows is judged once it has been read (_judge_after)."""
        wal, disp = self.shell, self.dispatcher
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
        wal, disp = self.shell, self.dispatcher
        assert sub.after is not None
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
        if all(self._kept_quiet(ch, (commit, lsn)) for ch in sub.channels):
            return commit, lsn, seek    # nor, the supervisor before this one kept, before
        log.warning("a subscription to %s resumes after %s, but slot %r is confirmed past "
                    "it (at %s): what came between may be gone from the slot; its stream "
                    "begins with Gap('slot')", ", ".join(sub.channels), format_lsn(lsn),
                    wal.slot, format_lsn(confirmed))
        disp.mark_gap([sub.id], "slot")
        return commit, lsn, seek

    def _kept_quiet(self, channel: str, after: tuple[int, int]) -> bool:
        """Whether the supervisor before this one watched `channel` from before `after` and
        saw nothing on it after, up to where it confirmed the slot (this one reads on from
        there): what it kept says so."""
        kept = self.kept.get(channel)
        if kept is None or not (kept[0] <= after and (kept[1] is None or kept[1] <= after)):
            return False
        if self.read_from is None or max(self.shell.slot_confirmed,
                                         self.dispatcher.confirmed) <= self.read_from:
            return True     # and this one has confirmed nothing further: the slot has the rest
        # This one confirmed further: it must have watched the channel since it began, and
        # seen nothing on it since.
        since = self.watched.get(channel)
        at = self.dispatcher.route_position(channel.encode())
        return since is not None and since <= (self.read_from, 0) and at is not None and (
            at == (0, 0) or at <= after)

    def _positions(self) -> dict[str, tuple[tuple[int, int], tuple[int, int] | None]]:
        """Per watched channel: since when every message on it has been seen (carried on
        from what the supervisor before kept), and the last one (None: none since)."""
        disp = self.dispatcher
        out: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {}
        for channel in self.watched:
            since = self._watched_since(channel)
            if since is None:
                continue
            at = disp.route_position(channel.encode())
            last = None if at is None or at == (0, 0) else at
            kept = self.kept.get(channel)
            if kept is not None and self.read_from is not None and since <= (self.read_from, 0):
                since = min(since, kept[0])     # watched before, by the supervisor before
                last = last or kept[1]
            out[channel] = (since, last)
        return out

    def _keep(self, now: float) -> None:
        """Keep on the server (KEEP_TABLE, on the LISTEN connection: the primary) what this
        supervisor has seen on each watched channel, so that the next one can tell a reader
        resuming after= a position the slot is confirmed past whether its channels had
        anything since. While something is not written yet the slot is not confirmed past
        what was (keep_cap); so what the table says holds up to where the slot stands. At
        most every KEEP_INTERVAL, and only when a channel's last message moved: an idle
        slot writes nothing."""
        if not self.keeping or self.read_from is None or not self.shell.streaming:
            return
        disp = self.dispatcher
        stamp = (disp.received, disp.changes, len(self.watched))
        if stamp != self.keep_stamp or not self.kept_once:
            self.keep_cap = self.keep_upto or self.shell.slot_confirmed or 1   # until looked
        if self.keep_cap == 0:
            return
        link = self.plain
        if self.keep_busy or link.conn is None or now - self.kept_at < KEEP_INTERVAL:
            return
        self.keep_stamp = stamp
        positions = self._positions()
        changed = {ch: v for ch, v in positions.items() if self.kept_written.get(ch) != v}
        gone = [ch for ch in self.kept_written if ch not in positions]
        if self.kept_once and not changed and not gone:
            self.keep_cap = 0
            return
        self.keep_busy, self.kept_at = True, now
        upto = disp.confirmable()
        slot = _tables.literal(self.config.slot or "")
        rows = ", ".join(
            f"({slot}, {_tables.bytea(ch)}, {since[0]}, {since[1]}, "
            f"{'NULL' if last is None else last[0]}, {'NULL' if last is None else last[1]})"
            for ch, (since, last) in changed.items())
        statements = [] if self.kept_once else [
            f"CREATE TABLE IF NOT EXISTS {KEEP_TABLE} (slot text, channel bytea, since_commit "
            f"bigint, since_lsn bigint, last_commit bigint, last_lsn bigint, PRIMARY KEY "
            f"(slot, channel))",
            f"DELETE FROM {KEEP_TABLE} WHERE slot = {slot}"]
        if gone and self.kept_once:
            statements.append(f"DELETE FROM {KEEP_TABLE} WHERE slot = {slot} AND channel IN ("
                              + ", ".join(_tables.bytea(ch) for ch in gone) + ")")
        if rows:
            statements.append(
                f"INSERT INTO {KEEP_TABLE} VALUES {rows} ON CONFLICT (slot, channel) DO UPDATE "
                f"SET since_commit = EXCLUDED.since_commit, since_lsn = EXCLUDED.since_lsn, "
                f"last_commit = EXCLUDED.last_commit, last_lsn = EXCLUDED.last_lsn")
        link.query("; ".join(statements).encode(),
                   lambda _results, error: self._kept(changed, gone, upto, error))

    def _kept(self, changed: dict[str, tuple[tuple[int, int], tuple[int, int] | None]],
              gone: list[str], upto: int, error: str | None) -> None:
        self.keep_busy = False
        if error is not None:
            self.keeping = False
            self.keep_cap = 0
            log.warning("cannot keep what the supervisor saw on each channel in table %s "
                        "(%s): a reader that resumes with after= across a supervisor restart "
                        "will get Gap('slot') wherever the slot was confirmed past its "
                        "position (grant the supervisor's role CREATE on the schema, or create "
                        "the table for it)", KEEP_TABLE, error.strip())
            return
        self.kept_once = True
        for channel in gone:
            self.kept_written.pop(channel, None)
        self.kept_written.update(changed)
        self.keep_upto = max(self.keep_upto, upto)
        self.keep_cap = self.keep_upto      # lifted by the next look, if nothing moved since

    def _watched_since(self, channel: str) -> tuple[int, int] | None:
        """From where in the stream every message on `channel` has been seen (the route
        made then, or kept since with none), None when it is not watched."""
        since = self.watched.get(channel)
        if since is None or self.read_from is None:
            return None
        return max(since, (self.read_from, 0))

    def routed(self, channel: str, routed: bool) -> None:
        """The source keeps watching a channel nobody reads any more (its route kept with
        no entries), so that a subscription resuming on it can be told whether it missed
        anything (_judge_after): up to MAX_WATCHED such channels, oldest dropped."""
        disp = self.dispatcher
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

    def state(self) -> dict[str, Any]:
        return {"wal_last_error": self.shell.machine.last_error}

    def stats(self, fields: dict[str, Any]) -> None:
        wal, disp = self.shell, self.dispatcher
        phase = wal.machine.phase
        if wal.failing is not None:
            # last_error says why any source fails, the WAL source's too.
            fields["last_error"] = "; ".join(
                e for e in (fields.get("last_error"), f"WAL source: {wal.failing}") if e)
        fields.update(
            slot=self.config.slot,
            wal_state=("streaming" if phase is Phase.UP else "disconnected"
                       if phase is Phase.BACKOFF else "connecting"),
            wal_backend_pid=(wal.conn.backend_pid if wal.streaming and wal.conn is not None
                             else None),
            wal_reconnects=wal.machine.reconnects,
            wal_last_error=wal.machine.last_error,
            wal_received=disp.received,
            wal_unrouted=disp.unrouted,
            wal_confirmed_lsn=disp.confirmed,
            slot_lag_bytes=self.slot_lag,
            slot_losses=self.slot_losses,
            slot_failover=wal.slot_failover if wal.has_read else None,
            failover_ready=self.failover_ready,
            failover_reason=None if self.failover_ready is not False else self.failover_reason)


def standby_conninfos(conninfo: str) -> list[tuple[str, str]]:
    """Each server a DSN with several hosts names, as a conninfo of its own that takes any
    (read-only too), with where it is for the log; none for a DSN of one host."""
    params = conninfo_to_dict(conninfo)
    hosts = str(params.get("host") or "").split(",")
    addrs = str(params.get("hostaddr") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    count = max(len(hosts), len(addrs))
    if count < 2:
        return []
    out = []
    for i in range(count):
        one = dict(params)
        for key, values in (("host", hosts), ("hostaddr", addrs), ("port", ports)):
            if key in params:
                one[key] = values[i] if len(values) > 1 else values[0]
        one.pop("target_session_attrs", None)
        one.pop("load_balance_hosts", None)
        one.setdefault("connect_timeout", "5")
        out.append((make_conninfo("", **one), safe_target(one)))
    return out
