"""The WAL source's connection: a replication connection that reads a logical slot.

The same shell as the LISTEN connection (listen.ListenConnection: a ConnectionMachine,
names resolved in a thread, commands one at a time), with a different setup and a different
heartbeat. Its setup checks the server (wal_level, the slot, the publication), creates what
is missing, and starts streaming the slot with pgoutput and `messages 'true'`; from then on
the compiled decoder (decoder.pyx's WalDispatcher) reads the stream in the supervisor's one
loop, and this shell only tells the server how far the slot may be confirmed (feedback) and asks
it for a keepalive as its heartbeat.

What the slot may confirm is decided by the readers: the commit LSN of the oldest
transaction some open subscription is not done with (WalDispatcher.confirmable). So a reader
that is slow, a connection that is lost, or the supervisor killed loses nothing: the server
sends again, from the slot, everything after what was confirmed, and the dispatcher skips
for each reader what it had already.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..._core.dispatch import Dispatcher
from ..._core.reader import format_lsn, parse_lsn
from ..connection import Phase, Step, Timing
from ..listen import WAL_POSITION, ListenConnection, is_permanent
from . import tables as _tables
from .decoder import WalDispatcher

log = logging.getLogger("pglistener.supervisor")

#: Slot and publication names: what PostgreSQL allows for a slot (and so no quoting).
NAME = re.compile(r"[a-z0-9_]{1,63}")

#: At most this often the slot's position is reported while it moves.
FEEDBACK_INTERVAL = 0.1

#: At least this often feedback goes out anyway: while a blocking reader holds the stream,
#: nothing is read (the server's keepalives wait), and a walsender that hears nothing for
#: wal_sender_timeout drops the connection.
FEEDBACK_ANYWAY = 1.0

#: pgoutput writes each value as its type's text output under the walsender's settings,
#: which it takes from the database and the role (ALTER DATABASE ... SET DateStyle): these
#: four change that text (a date in 'SQL, DMY', an interval in 'sql_standard', a float8 cut to
#: 15 digits at extra_float_digits 0, a bytea in 'escape'), and TimeZone the offset a
#: timestamptz is written in. A client's startup options outrank the database's and the
#: role's settings, so the replication connection asks for the forms readers load exactly
#: (psycopg's loaders read these; extra_float_digits above 0 writes the shortest text that
#: reads back to the same bits). lc_monetary is left alone: money's text is the database's,
#: as a SELECT there gives it.
#: Where a supervisor keeps, for the next one, what it has seen on each channel of its slot
#: (in the DSN's database, its search_path's first schema): so that a reader resuming with
#: after= across a supervisor restart gets a Gap only where its channels had something.
KEEP_TABLE = "pglistener_positions"

#: A publication found gone (dropped) is made again only after this long (seconds): a
#: migration that drops it and makes it again would fail if the supervisor made it between.
PUBLICATION_GRACE = 5.0

#: How often (seconds) a standby is asked whether the publication has reached it, and for
#: how long before the setup fails (and is tried again).
PUBLICATION_POLL = 0.1
PUBLICATION_REPLAY = 60.0

#: A replication stream that has run this long (seconds) is no longer failing.
STEADY = 1.0

#: Under load (records again within 4 lingers), the supervisor lets the stream gather this
#: long (ns) before reading it again: the walsender sends each transaction alone, and a
#: wake-up per transaction costs the supervisor and each reader more than the transaction.
#: A lone transaction is read at once; one in a stream under load waits at most this.
LINGER_NS = 50_000

#: What PostgreSQL 15-17 say when pgoutput cannot decode a change because the publication
#: did not exist as of it (dropped, then made again): the stream fails there for good.
#: (The server's message, in English: a translated one is not recognised.)
PUBLICATION_GONE = re.compile(r'publication "(?P<pub>[^"]+)" does not exist.*?associated LSN '
                              r'(?P<lsn>[0-9A-Fa-f]+/[0-9A-Fa-f]+)')

OUTPUT_SETTINGS = ("-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
                   "-c bytea_output=hex -c TimeZone=UTC")


def check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{what} is 1 to 63 lower-case letters, digits and underscores, "
                         f"not {name!r}")
    return name


class SetupError(Exception):
    """The server cannot serve the slot as it is; `permanent` when retrying alone will not
    mend it (a setting to change), else it is retried (the slot in use elsewhere)."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def explain(cause: str) -> str:
    """A replication connection's failure, with what to do about it when we know (said
    once, however many times a failure passes through here)."""
    if "(the role needs the REPLICATION" in cause or "(set wal_level = logical" in cause:
        return cause
    if "must be superuser or replication role" in cause or \
            "permission denied to start WAL sender" in cause:
        return (f"{cause} (the role needs the REPLICATION attribute for the WAL source: "
                f"ALTER ROLE <role> REPLICATION; on managed services a role such as "
                f"rds_replication)")
    if "logical decoding requires" in cause and "wal_level" in cause:
        return f"{cause} (set wal_level = logical in postgresql.conf and restart the server)"
    return cause


def is_permanent_failure(cause: str) -> bool:
    """A replication connection's failure that retrying alone will not mend."""
    return is_permanent(cause) or "REPLICATION attribute" in cause or "wal_level" in cause


#: What the server's invalidation_reason (pg_replication_slots, PostgreSQL 17+) means.
INVALIDATIONS = {
    "wal_removed": "it removed WAL the slot still needed (max_slot_wal_keep_size)",
    "idle_timeout": "the slot was unread for longer than idle_replication_slot_timeout",
    "rows_removed": "rows the slot still needed were removed (on a standby: "
                    "hot_standby_feedback off, or no physical slot on the primary)",
    "wal_level_insufficient": "wal_level fell below logical on the primary",
    "conflicting": "it conflicted with recovery on this standby (rows it needed were "
                   "removed, or wal_level fell below logical on the primary)",
}


def invalidation(reason: str | None) -> str:
    """Why the server invalidated a slot, naming its own reason where it gives one (none
    before PostgreSQL 16, where only max_slot_wal_keep_size invalidates a slot)."""
    if reason is None:
        return f"the server invalidated it: {INVALIDATIONS['wal_removed']}"
    meaning = INVALIDATIONS.get(reason)
    return (f"the server invalidated it ({reason})" +
            (f": {meaning}" if meaning is not None else ""))


@dataclass
class Started:
    """How a setup that started the stream found the slot."""

    start_lsn: int                  # the server's WAL position when the setup began
    loss: str | None = None         # why the stream cannot go on from where it stood
    rewind_to: int | None = None    # a new timeline: where its history left the one read
    created: bool = False           # the slot was made by this setup
    # What the supervisor before this one kept (KEEP_TABLE): per channel, since when it
    # watched it and its last message then ((commit, lsn) each; None: none).
    kept: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] | None = None


def switch_point(history: str, timeline: int) -> int | None:
    """Where the timeline history file `history` says `timeline` ended (the first switch
    at or after it), None when it does not name it (lines: parent TLI, switch LSN, why)."""
    points = []
    for line in history.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) >= timeline:
            try:
                points.append(parse_lsn(fields[1]))
            except ValueError:
                continue
    return min(points) if points else None


class WalConnection(ListenConnection):
    """on_connected() is called once the replication connection is made (run setup() on it);
    on_down(cause) when it goes."""

    dispatcher: WalDispatcher

    def __init__(self, conninfo: str, safe_target: str, timing: Timing,
                 dispatcher: WalDispatcher, now: float, slot: str, publication: str,
                 on_connected: Callable[[], None], on_down: Callable[[str], None],
                 nudge: Callable[[], None] = lambda: None,
                 failover: bool | None = None,
                 tables: Callable[[], list[int]] = list) -> None:
        params = conninfo_to_dict(conninfo)
        params["replication"] = "database"
        params["options"] = f"{params.get('options') or ''} {OUTPUT_SETTINGS}".strip()
        super().__init__(make_conninfo("", **params), safe_target, timing, dispatcher, now,
                         on_connected, on_down)
        self.slot = slot
        self.publication = publication
        self.nudge = nudge          # a standby makes a slot once the primary logs a snapshot
        self.tables = tables        # the oids of the tables whose changes are subscribed to
        self.publication_gone: float | None = None    # found missing since (monotonic)
        self._heard_copy = 0
        self._fed_at = 0.0
        self.slot_confirmed = 0     # the slot's confirmed_flush_lsn when the setup read it
        self.recovery = False       # the server is a standby
        self.extra_hold = 0         # the slot may not be confirmed past this either (0: none)
        self.setup_permanent = False    # the setup's last failure needs a setting changed
        self._nudged_at: float | None = None    # making a slot on a standby: last nudge
        self.failover = failover    # Supervisor(failover=): None is "where the server can"
        self.server_version = 0
        self.sync_slots = ""        # the primary's synchronized_standby_slots
        self.slot_failover = False  # the slot is a failover slot
        # What was read before, remembered for as long as this process lives: the slot
        # (a missing one is then a loss, not a first start) and the cluster and timeline.
        self.has_read = False
        self.system: tuple[str, int] | None = None
        # A change pgoutput could not decode, as the stream's last failure said: (the
        # publication, the change's LSN); the next setup moves the slot past its transaction.
        self.undecodable: tuple[str, int] | None = None
        # The last failure, until the stream has run for STEADY seconds: a stream that
        # starts and fails over and over (machine.last_error is None while it runs) says why
        # in stats().last_error all the while.
        self.failing: str | None = None
        self._up_since = 0.0

    @property
    def streaming(self) -> bool:
        return self.conn is not None and self.conn.copy_both

    @property
    def busy(self) -> bool:
        """A setup command waits for its result (once streaming, run() reads the stream)."""
        return self.machine.busy and not self.streaming

    def step(self, now: float) -> float:
        """As ListenConnection.step(), with feedback for its heartbeat: the answer is the
        server's keepalive, and anything on the stream counts as life."""
        held = self.dispatcher.held_seconds
        copied = self.dispatcher.copy_messages
        if self.conn is not None and copied != self._heard_copy:
            self._heard_copy = copied
            if self.machine.heartbeat_out:
                self.machine.answered(now, held)
            else:
                self.machine.heard(now, held)
        if self.streaming:
            self.feedback(now)
            if self.failing is not None and now - self._up_since >= STEADY:
                self.failing = None
        elif self._nudged_at is not None and now - self._nudged_at >= 1.0:
            # The primary's snapshot must come after the standby began to wait for one.
            self._nudged_at = now
            self.nudge()
        while True:
            step, wait, cause = self.machine.due(now, held)
            if step is Step.CONNECT:
                self._resolving = True
                self.resolver.start(self.conninfo)
                continue
            if step is Step.HEARTBEAT:
                assert self.conn is not None
                if not self.dispatcher.send_feedback(self.conn, True):
                    self.lose(now, f"sending feedback failed: {self.conn.error_message}")
                    continue
                self.machine.sent(now, heartbeat=True)
            elif step is Step.TIMEOUT:
                self.lose(now, cause)
                continue
            if self.streaming:
                wait = min(wait, FEEDBACK_INTERVAL)
            return wait

    def feedback(self, now: float) -> None:
        """Report how far the slot may be confirmed, when that moved (at most every
        FEEDBACK_INTERVAL), and every FEEDBACK_ANYWAY regardless; the server confirms
        nothing past what it was told."""
        if now - self._fed_at < FEEDBACK_INTERVAL:
            return
        confirm = self.dispatcher.confirmable()
        if self.extra_hold:
            confirm = min(confirm, self.extra_hold)
        if confirm <= self.dispatcher.confirmed and now - self._fed_at < FEEDBACK_ANYWAY:
            return
        self._fed_at = now
        self.dispatcher.confirmed = max(confirm, self.dispatcher.confirmed)
        assert self.conn is not None
        if not self.dispatcher.send_feedback(self.conn, False):
            self.lose(now, f"sending feedback failed: {self.conn.error_message}")

    def on_result(self, now: float) -> None:
        """As ListenConnection.on_result(); START_REPLICATION's answer is COPY BOTH, after
        which no result comes: the command is answered with it."""
        assert self.conn is not None and self._commands
        super().on_result(now)
        if self.conn is not None and self.conn.copy_both and self._commands:
            command = self._commands.popleft()
            self.machine.answered(now, self.dispatcher.held_seconds)
            command.done(command.results, command.error)

    # -- the setup ----------------------------------------------------------------------------

    def setup(self, done: Callable[[SetupError | None, Started | None], None]) -> None:
        """Check the server, create the slot and the publication if missing, and start the
        stream: done(None, started) once it runs, done(error, None) when it cannot.

        What was read before decides what a slot found now means. This supervisor has read
        the slot (has_read) and finds it missing, invalidated, confirmed past what it was
        told, or on another cluster: the stream cannot go on from where it stood, and
        started.loss says why (every WAL subscription gets Gap("slot")). A new timeline on
        the same cluster (a standby promoted, its slot synced or made there) goes on, from
        the point where the histories part (started.rewind_to)."""
        slot, pub = self.slot, self.publication
        temporary = f"pglistener_skip_{os.getpid()}"
        outcome = Started(start_lsn=0)

        def fail(message: str, permanent: bool = False) -> None:
            done(SetupError(message, permanent), None)

        def checked(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return fail(f"checking the server failed: {error}")
            level, recovery, version, position, sync_slots, effective = (
                _text(v) for v in results[0][0])
            outcome.start_lsn = parse_lsn(position) if position else 0
            self.recovery = recovery == "t"
            self.server_version = int(version or 0)
            version = f"{self.server_version // 10000}.{self.server_version % 10000}"
            if self.server_version < 140000:
                return fail(f"the WAL source needs PostgreSQL 14 or later (messages in "
                            f"pgoutput); the server is {version}", True)
            # PostgreSQL 19 decodes with wal_level = replica: making the first logical slot
            # turns logical decoding on (effective_wal_level becomes logical).
            if (effective or level) != "logical" and \
                    not (self.server_version >= 190000 and level == "replica"):
                where = "; on a standby, on the primary" if self.recovery else ""
                need = ("wal_level = replica or logical" if self.server_version >= 190000
                        else "wal_level = logical")
                return fail(f"wal_level is {level!r} on {self.safe_target}: the WAL source "
                            f"needs {need} (set it in postgresql.conf and restart the "
                            f"server{where})", True)
            if self.recovery and self.server_version < 160000:
                return fail(f"{self.safe_target} is a standby running PostgreSQL {version}: "
                            f"a slot can be read on a standby from PostgreSQL 16 on; read it "
                            f"on the primary (leave out slot_dsn=)", True)
            if self.failover is True and self.server_version < 170000:
                return fail(f"Supervisor(failover=True) needs PostgreSQL 17 or later, whose "
                            f"slots can be synchronised to a standby; the server is "
                            f"{version}: pass failover=False, or leave it unset", True)
            if self.failover is True and self.recovery:
                return fail(f"Supervisor(failover=True): a slot read on a standby "
                            f"({self.safe_target}) cannot be a failover slot; read it on the "
                            f"primary, or pass failover=False (a standby's own slot survives "
                            f"its promotion)", True)
            self.sync_slots = sync_slots or ""
            self.query(b"IDENTIFY_SYSTEM", identified)

        def identified(results: list[list[tuple[bytes | None, ...]]],
                       error: str | None) -> None:
            if error is not None:
                return fail(f"IDENTIFY_SYSTEM failed: {error}")
            system, timeline = str(_text(results[0][0][0])), int(_text(results[0][0][1]) or 0)
            before, self.system = self.system, (system, timeline)
            if before is None or not self.has_read or before == self.system:
                return look()
            if before[0] != system:
                outcome.loss = (f"the server is another cluster (system identifier {system}, "
                                f"was {before[0]})")
            elif before[1] > timeline:
                outcome.loss = (f"the server is on timeline {timeline}, older than the "
                                f"{before[1]} read before (another server of the cluster)")
            else:
                # A standby was promoted: where its history left the one we read, from
                # TIMELINE_HISTORY of the timeline we are on now.
                return self.query(f"TIMELINE_HISTORY {timeline}".encode(),
                                  lambda results, error: history(before[1], timeline, results,
                                                                 error))
            look()

        def history(old: int, now: int, results: list[list[tuple[bytes | None, ...]]],
                    error: str | None) -> None:
            if error is not None:
                return fail(f"TIMELINE_HISTORY failed: {error}")
            raw = (results[0][0][1] or b"").decode()
            content = bytes.fromhex(raw[2:]).decode() if raw.startswith("\\x") else raw
            outcome.rewind_to = switch_point(content, old)
            if outcome.rewind_to is None:
                outcome.loss = (f"the server is on timeline {now}, whose history does not "
                                f"hold timeline {old}, the one read before")
            look()

        def look() -> None:
            extra = (", failover, synced, invalidation_reason" if self.server_version >= 170000
                     else ", NULL, NULL, CASE WHEN conflicting THEN 'conflicting' END"
                     if self.server_version >= 160000 else ", NULL, NULL, NULL")
            self.query(f"SELECT plugin, active_pid, wal_status, confirmed_flush_lsn, "
                       f"database = current_database(){extra} FROM pg_replication_slots "
                       f"WHERE slot_name = '{slot}'".encode(), found)

        def found(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return fail(f"looking for slot {slot!r} failed: {error}")
            rows = results[0] if results else []
            if not rows:
                if self.has_read and outcome.loss is None:
                    outcome.loss = ("it is gone (dropped, or this server is a new primary "
                                    "that did not have it)")
                if outcome.loss is None:
                    log.info("creating replication slot %r (pgoutput) on %s", slot,
                             self.safe_target)
                return make()
            plugin, active, status, confirmed, same_db, failover, synced, invalidated = (
                _text(v) for v in rows[0])
            if plugin != "pgoutput" or same_db != "t":
                return fail(f"replication slot {slot!r} exists for another use (plugin "
                            f"{plugin!r}{'' if same_db == 't' else ', another database'}): "
                            f"name another slot, or drop it (python -m pglistener slot drop "
                            f"{slot})", True)
            if synced == "t" and self.recovery:
                return fail(f"replication slot {slot!r} on {self.safe_target} is synchronised "
                            f"from the primary (a failover slot): it can be read only once "
                            f"this standby is promoted; read it on the primary", False)
            if active is not None:
                return fail(f"replication slot {slot!r} is in use by server process {active} "
                            f"(another supervisor?): a slot is read by one supervisor at a "
                            f"time; retrying")
            if status == "lost" or invalidated is not None:
                outcome.loss = invalidation(invalidated)
                return self.query(f'DROP_REPLICATION_SLOT "{slot}"'.encode(),
                                  lambda results, error: (
                                      fail(f"dropping the invalidated slot failed: {error}")
                                      if error is not None else make()))
            at = parse_lsn(confirmed) if confirmed else 0
            told = max(self.dispatcher.confirmed, self.slot_confirmed)
            if self.has_read and outcome.loss is None and outcome.rewind_to is None \
                    and at > told:
                outcome.loss = (f"it is confirmed at {format_lsn(at)}, past the "
                                f"{format_lsn(told)} this supervisor reported (made again, or "
                                f"advanced, by someone else)")
            self.slot_confirmed = at
            self.slot_failover = failover == "t"
            if not self.has_read:
                # First read by this process: what the one before kept, if it did.
                return self.query(f"SELECT to_regclass('{KEEP_TABLE}') IS NOT NULL".encode(),
                                  lambda results, error: keeping(results, error))
            failed_over()

        def keeping(results: list[list[tuple[bytes | None, ...]]],
                    error: str | None) -> None:
            if error is not None or not results or results[0][0][0] != b"t":
                return failed_over()
            self.query(f"SELECT encode(channel, 'hex'), since_commit, since_lsn, last_commit, "
                       f"last_lsn FROM {KEEP_TABLE} WHERE slot = '{slot}'".encode(),
                       lambda results, error: kept(results, error))

        def kept(results: list[list[tuple[bytes | None, ...]]],
                 error: str | None) -> None:
            if error is None and results:
                outcome.kept = {}
                for channel, s_commit, s_lsn, l_commit, l_lsn in results[0]:
                    name = bytes.fromhex((channel or b"").decode()).decode("utf-8", "replace")
                    last = None if l_commit is None else (int(l_commit), int(l_lsn or 0))
                    outcome.kept[name] = ((int(s_commit or 0), int(s_lsn or 0)), last)
            failed_over()

        def failed_over() -> None:
            if self.failover is not None and self.server_version >= 170000 \
                    and not self.recovery and self.slot_failover != self.failover:
                want = "true" if self.failover else "false"
                return self.query(f'ALTER_REPLICATION_SLOT "{slot}" (FAILOVER {want})'.encode(),
                                  lambda _results, error: altered(error))
            publication()

        def altered(error: str | None) -> None:
            if error is not None:
                return fail(f"making slot {slot!r} a failover slot failed: {error}")
            self.slot_failover = bool(self.failover)
            publication()

        def make() -> None:
            # The publication first: pgoutput reads it as of each change it decodes, and a
            # change from before the publication existed fails the stream for good
            # ("publication ... does not exist"), whatever table it is on.
            publication(make_slot)

        def make_slot() -> None:
            self.slot_failover = self.wants_failover
            options = "(SNAPSHOT 'nothing', FAILOVER)" if self.slot_failover else \
                "NOEXPORT_SNAPSHOT"
            self.query(f'CREATE_REPLICATION_SLOT "{slot}" LOGICAL pgoutput {options}'.encode(),
                       created)
            if self.recovery:       # a standby's slot waits for the primary's snapshot
                self._nudged_at = time.monotonic()
                self.nudge()

        def created(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            self._nudged_at = None
            if error is not None:
                return done(SetupError(explain(f"creating slot {slot!r} failed: {error}"),
                                       "wal_level" in error), None)
            point = _text(results[0][0][1]) if results and results[0] else None
            self.slot_confirmed = parse_lsn(point) if point else outcome.start_lsn
            outcome.created = True
            start()

        def publication(then: Callable[[], None] | None = None) -> None:
            after = skip if then is None else then
            if self.recovery:
                # A standby has what its primary has, once it has replayed it: a slot made
                # before the publication arrives would fail at the changes between.
                return self.query(f"SELECT EXISTS (SELECT 1 FROM pg_publication WHERE "
                                  f"pubname = '{pub}')".encode(),
                                  lambda results, error: replayed(after, 0, results, error))
            self.query(f"SELECT 1 FROM pg_publication WHERE pubname = '{pub}'".encode(),
                       lambda results, error: (
                           fail(f"looking for publication {pub!r} failed: {error}")
                           if error is not None else found_publication(after)
                           if results and results[0] else remake(after)))

        def replayed(after: Callable[[], None], waited: int,
                     results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return fail(f"looking for publication {pub!r} failed: {error}")
            if results and results[-1] and results[-1][0][-1] == b"t":
                return after()
            if waited == 0:
                log.info("waiting for publication %r to reach the standby %s", pub,
                         self.safe_target)
            if waited * PUBLICATION_POLL >= PUBLICATION_REPLAY:
                return fail(f"publication {pub!r} is not on the standby {self.safe_target} "
                            f"(it is made on the primary, and replicates: is the standby "
                            f"replaying?)")
            self.query(f"SELECT pg_sleep({PUBLICATION_POLL}), EXISTS (SELECT 1 FROM "
                       f"pg_publication WHERE pubname = '{pub}')".encode(),
                       lambda results, error: replayed(after, waited + 1, results, error))

        def found_publication(after: Callable[[], None]) -> None:
            self.publication_gone = None
            after()

        def remake(after: Callable[[], None]) -> None:
            # Missing: made, or made again (dropped under this supervisor) with the tables
            # whose changes are subscribed to; not at once, as a migration that drops it and
            # makes it again would then fail to.
            tables = self.tables()
            if self.has_read:
                now = time.monotonic()
                if self.publication_gone is None:
                    self.publication_gone = now
                if now - self.publication_gone < PUBLICATION_GRACE:
                    return fail(f"publication {pub!r} is gone from {self.safe_target} (dropped?):"
                                f" it is made again after {PUBLICATION_GRACE:g} s unless it "
                                f"comes back")
                self.publication_gone = None
                log.warning("publication %r is gone from %s (dropped?): making it again%s",
                            pub, self.safe_target,
                            f" with the {len(tables)} tables subscribed to" if tables else "")
            self.query(_tables.remake_query(pub, tables),
                       lambda _r, error: publication_made(error, after))

        def publication_made(error: str | None, after: Callable[[], None]) -> None:
            if error is not None and "already exists" not in error:
                return fail(f"creating publication {pub!r} failed: {error} (CREATE "
                            f"PUBLICATION {pub}; as its owner)")
            after()

        def skip() -> None:
            # The stream failed at a change pgoutput could not decode: the publication did
            # not exist as of it (PostgreSQL 15-17; 18 on skips such a change itself, and
            # says so in a WARNING, which the decoder turns into a Gap). Read every time from
            # before it, it fails every time: the slot must pass its transaction. Where it
            # ends is found on a temporary copy of the slot decoded by test_decoding (which
            # reads no publication), from that change on: the commit of the change's
            # transaction, and of the one that made the publication again when that came
            # later (what committed between could not be decoded either). Without
            # test_decoding on the server, the slot passes everything up to now.
            if self.undecodable is None:
                return start()
            gone, at = self.undecodable
            self.undecodable = None
            self.query(f"SELECT {WAL_POSITION}, (SELECT xmin::text FROM pg_publication WHERE "
                       f"pubname = '{pub}')".encode(),
                       lambda results, error: copy(gone, at, results, error))

        def copy(gone: str, at: int, results: list[list[tuple[bytes | None, ...]]],
                 error: str | None) -> None:
            if error is not None:
                return fail(f"reading the WAL position failed: {error}")
            now, made = (_text(v) for v in results[0][0])
            target = parse_lsn(now) if now else 0
            why = (f"a change at {format_lsn(at)} could not be decoded: publication {gone!r} "
                   f"did not exist as of it (dropped, and made again later?)")
            self.query(f"SELECT pg_copy_logical_replication_slot('{slot}', '{temporary}', true, "
                       f"'test_decoding')".encode(),
                       lambda _results, error: (
                           passed(target, f"{why}; everything up to {format_lsn(target)} is "
                                  f"passed (the copy of the slot decoded by test_decoding, "
                                  f"which finds where its transaction ends, could not be "
                                  f"made: {error})")
                           if error is not None else
                           find(at, made, why, target, None, None)))

        def find(at: int, made: str | None, why: str, now: int, xid: str | None,
                 end: int | None, made_end: int | None = None) -> None:
            if xid is not None and end is not None and (made is None or made_end is not None):
                return dropped(max(end, made_end or 0), why)
            self.query(f"SELECT lsn::text, xid::text, data FROM pg_logical_slot_get_changes("
                       f"'{temporary}', '{format_lsn(now)}', 10000, 'include-xids', '1', "
                       f"'skip-empty-xacts', '0')".encode(),
                       lambda results, error: found_rows(at, made, why, now, xid, end,
                                                         made_end, results, error))

        def found_rows(at: int, made: str | None, why: str, now: int, xid: str | None,
                       end: int | None, made_end: int | None,
                       results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return fail(f"decoding a copy of slot {slot!r} failed: {error}")
            rows = results[0] if results else []
            for lsn, row_xid, data in ((_text(a), _text(b), _text(c)) for a, b, c in rows):
                if xid is None and lsn and parse_lsn(lsn) == at:
                    xid = row_xid
                if data is not None and lsn and data.startswith("COMMIT "):
                    if row_xid == xid and end is None:
                        end = parse_lsn(lsn)
                    if row_xid == made and made_end is None:
                        made_end = parse_lsn(lsn)
            if not rows:        # decoded up to `now`: what was not found is not there
                if xid is None:
                    return dropped(now, f"{why}; its transaction was not found, so everything "
                                        f"up to {format_lsn(now)} is passed")
                return dropped(max(end or now, made_end or 0), why)
            find(at, made, why, now, xid, end, made_end)

        def dropped(target: int, why: str) -> None:
            self.query(f"SELECT pg_drop_replication_slot('{temporary}')".encode(),
                       lambda _results, error: (
                           fail(f"dropping the temporary slot {temporary!r} failed: {error}")
                           if error is not None else passed(target, why)))

        def passed(target: int, why: str) -> None:
            self.query(f"SELECT pg_replication_slot_advance('{slot}', '{format_lsn(target)}')"
                       .encode(),
                       lambda _results, error: advanced(target, why, error))

        def advanced(target: int, why: str, error: str | None) -> None:
            if error is not None:
                return fail(f"moving slot {slot!r} past what could not be decoded failed: "
                            f"{error}")
            if outcome.loss is None:
                outcome.loss = f"{why}; the slot goes on from {format_lsn(target)}"
            self.slot_confirmed = max(self.slot_confirmed, target)
            start()

        def start() -> None:
            self.query(_tables.DOMAINS_QUERY, domains)

        def domains(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return fail(f"reading the domains' base types failed: {error}")
            self.dispatcher.set_base_types(_tables.base_types(results[-1] if results else []))
            self.query(f"START_REPLICATION SLOT \"{slot}\" LOGICAL 0/0 (proto_version '1', "
                       f"publication_names '\"{pub}\"', messages 'true')".encode(), started)

        def started(_results: object, error: str | None) -> None:
            if error is not None:
                return fail(explain(f"starting to read slot {slot!r} failed: {error}"))
            if self.conn is None or not self.conn.copy_both:
                return fail("START_REPLICATION did not start a stream")
            self.has_read = True
            if outcome.loss is not None:
                log.error("replication slot %r on %s: %s. What it held, and what was written "
                          "meanwhile, cannot be read from it: %severy WAL subscription gets "
                          "Gap('slot')", slot, self.safe_target, outcome.loss,
                          "made again; " if outcome.created else "")
            done(None, outcome)

        self.query(f"SELECT current_setting('wal_level'), pg_is_in_recovery(), "
                   f"current_setting('server_version_num'), {WAL_POSITION}, "
                   f"current_setting('synchronized_standby_slots', true), "
                   f"current_setting('effective_wal_level', true)".encode(), checked)

    @property
    def wants_failover(self) -> bool:
        """Whether a slot made now is a failover slot: asked for, or by default where the
        server can (PostgreSQL 17+, on a primary)."""
        if self.failover is not None:
            return self.failover
        return self.server_version >= 170000 and not self.recovery

    def ready(self, now: float) -> None:
        assert self.conn is not None
        was_out = self._outage_logged
        self._outage_logged = False      # the base class logs "listening": we say our own
        self.last_error_permanent = self.setup_permanent = False
        self.machine.ready(now)
        self._up_since = now
        self._heard_copy = self.dispatcher.copy_messages
        (log.warning if was_out else log.info)(
            "reading slot %r on %s (backend pid %d) from %s", self.slot, self.safe_target,
            self.conn.backend_pid, format_lsn(self.slot_confirmed))

    def lose(self, now: float, cause: str) -> None:
        super().lose(now, explain(cause))

    def _failed(self, now: float, cause: str) -> None:
        self._nudged_at = None
        self.failing = explain(cause)
        gone = PUBLICATION_GONE.search(cause)
        if gone is not None and self.has_read:
            self.undecodable = (gone["pub"], parse_lsn(gone["lsn"]))
        super()._failed(now, explain(cause))

    def permanent(self, cause: str) -> bool:
        return self.setup_permanent or is_permanent_failure(cause)

    def restart(self, why: str) -> None:
        """Read the slot again from where it is confirmed (a subscription resumes from an
        earlier position): close the stream and connect again at once."""
        if self.machine.phase not in (Phase.SETUP, Phase.UP):
            return
        now = time.monotonic()
        self._close_connections()
        self._commands.clear()
        self.dispatcher.stream_reset()
        self.machine.restart(now)
        log.info("reading slot %r again from its confirmed position: %s", self.slot, why)


class SlotProbe(ListenConnection):
    """A plain connection to the server the slot lives on when that is not the LISTEN
    connection's (slot_dsn: a standby): its heartbeat samples the WAL the slot holds, so
    that stats().slot_lag_bytes is read where the slot is. the core's run() does not read
    it: the loop waits on its socket while a query is in flight, and advance() takes it."""

    def __init__(self, conninfo: str, safe_target: str, timing: Timing, dispatcher: Dispatcher,
                 now: float, slot: str) -> None:
        super().__init__(conninfo, safe_target, timing, dispatcher, now,
                         lambda: self.ready(time.monotonic()), lambda _cause: None)
        self.watch_slot(slot)

    def fds(self) -> list[tuple[int, bool]]:
        if self.conn is not None and self.machine.busy:
            return [(self.conn.fileno(), False)]
        return super().fds()

    def advance(self, now: float) -> None:
        if self.conn is None:
            return super().advance(now)
        while self.conn is not None and self.machine.busy:
            ready = self.conn.consume()
            if ready is None:
                return self.lose(now, self.conn.error_message or "the server closed the "
                                 "connection")
            if not ready:
                return
            self.on_result(now)

    def ready(self, now: float) -> None:
        assert self.conn is not None
        self._outage_logged = False     # no "listening on" or "reconnected" line: it is a probe
        self.last_error_permanent = False
        self.machine.ready(now)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


