"""The WAL source's connection: a replication connection that reads a logical slot.

The same shell as the LISTEN connection (_listen.ListenConnection: a ConnectionMachine,
names resolved in a thread, commands one at a time), with a different setup and a different
heartbeat. Its setup checks the server (wal_level, the slot, the publication), creates what
is missing, and starts streaming the slot with pgoutput and `messages 'true'`; from then on
the compiled dispatcher (Dispatcher(wal=True)) reads the stream in the supervisor's one loop,
and this shell only tells the server how far the slot may be confirmed (feedback) and asks
it for a keepalive as its heartbeat.

What the slot may confirm is decided by the readers: the commit LSN of the oldest
transaction some open subscription is not done with (Dispatcher.confirmable). So a reader
that is slow, a connection that is lost, or the supervisor killed loses nothing: the server
sends again, from the slot, everything after what was confirmed, and the dispatcher skips
for each reader what it had already.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._connection import Phase, Step, Timing
from ._listen import ListenConnection, is_permanent
from ._producer import Dispatcher
from ._reader import format_lsn, parse_lsn

log = logging.getLogger("pglistener.supervisor")

#: Slot and publication names: what PostgreSQL allows for a slot (and so no quoting).
NAME = re.compile(r"[a-z0-9_]{1,63}")

#: At most this often the slot's position is reported while it moves.
FEEDBACK_INTERVAL = 0.1

#: At least this often feedback goes out anyway: while a blocking reader holds the stream,
#: nothing is read (the server's keepalives wait), and a walsender that hears nothing for
#: wal_sender_timeout drops the connection.
FEEDBACK_ANYWAY = 1.0


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
    """A replication connection's failure, with what to do about it when we know."""
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


class WalConnection(ListenConnection):
    """on_connected() is called once the replication connection is made (run setup() on it);
    on_down(cause) when it goes."""

    def __init__(self, conninfo: str, safe_target: str, timing: Timing, dispatcher: Dispatcher,
                 now: float, slot: str, publication: str,
                 on_connected: Callable[[], None], on_down: Callable[[str], None],
                 nudge: Callable[[], None] = lambda: None) -> None:
        params = conninfo_to_dict(conninfo)
        params["replication"] = "database"
        super().__init__(make_conninfo("", **params), safe_target, timing, dispatcher, now,
                         on_connected, on_down)
        self.slot = slot
        self.publication = publication
        self.nudge = nudge          # a standby makes a slot once the primary logs a snapshot
        self._heard_copy = 0
        self._fed_at = 0.0
        self.slot_confirmed = 0     # the slot's confirmed_flush_lsn when the setup read it
        self.recovery = False       # the server is a standby
        self.start_lsn = 0          # the server's WAL position when the setup began
        self.extra_hold = 0         # the slot may not be confirmed past this either (0: none)
        self.setup_permanent = False    # the setup's last failure needs a setting changed
        self._nudged_at: float | None = None    # making a slot on a standby: last nudge

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

    def setup(self, done: Callable[[SetupError | None, bool, int], None]) -> None:
        """Check the server, create the slot and the publication if missing, and start the
        stream: done(None, recreated, start_lsn) once it runs (recreated: the slot had been
        invalidated and was made again; start_lsn: the server's WAL position before it
        started), done(error, False, 0) when it cannot."""
        slot, pub = self.slot, self.publication

        def checked(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return done(SetupError(f"checking the server failed: {error}", False), False, 0)
            level, recovery, version, position = (_text(v) for v in results[0][0])
            self.start_lsn = parse_lsn(position) if position else 0
            self.recovery = recovery == "t"
            if int(version or 0) < 140000:
                return done(SetupError(
                    f"the WAL source needs PostgreSQL 14 or later (messages in pgoutput); the "
                    f"server is {version}", True), False, 0)
            if level != "logical":
                return done(SetupError(
                    f"wal_level is {level!r} on {self.safe_target}: the WAL source needs "
                    f"wal_level = logical (set it in postgresql.conf and restart the server"
                    f"{'; on a standby, on the primary' if self.recovery else ''})", True),
                    False, 0)
            self.query(f"SELECT plugin, active_pid, wal_status, confirmed_flush_lsn, "
                       f"database = current_database() FROM pg_replication_slots "
                       f"WHERE slot_name = '{slot}'".encode(), found)

        def found(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> None:
            if error is not None:
                return done(SetupError(f"looking for slot {slot!r} failed: {error}", False),
                            False, 0)
            rows = results[0] if results else []
            if not rows:
                log.info("creating replication slot %r (pgoutput) on %s", slot,
                         self.safe_target)
                return make(False)
            plugin, active, status, confirmed, same_db = (_text(v) for v in rows[0])
            if plugin != "pgoutput" or same_db != "t":
                return done(SetupError(
                    f"replication slot {slot!r} exists for another use (plugin {plugin!r}"
                    f"{'' if same_db == 't' else ', another database'}): name another slot, "
                    f"or drop it (python -m pglistener slot drop {slot})", True), False, 0)
            if active is not None:
                return done(SetupError(
                    f"replication slot {slot!r} is in use by server process {active} (another "
                    f"supervisor?): a slot is read by one supervisor at a time; retrying",
                    False), False, 0)
            if status == "lost":
                log.error("replication slot %r was invalidated: the server removed WAL it "
                          "still needed (max_slot_wal_keep_size); what it held is lost. "
                          "Making it again; every WAL subscription gets Gap('slot')", slot)
                return self.query(f'DROP_REPLICATION_SLOT "{slot}"'.encode(),
                                  lambda results, error: (
                                      done(SetupError(f"dropping the invalidated slot failed: "
                                                      f"{error}", False), False, 0)
                                      if error is not None else make(True)))
            self.slot_confirmed = parse_lsn(confirmed) if confirmed else 0
            publication(False)

        def make(recreated: bool) -> None:
            self.query(f'CREATE_REPLICATION_SLOT "{slot}" LOGICAL pgoutput '
                       f'NOEXPORT_SNAPSHOT'.encode(),
                       lambda results, error: created(error, recreated))
            if self.recovery:       # a standby's slot waits for the primary's snapshot
                self._nudged_at = time.monotonic()
                self.nudge()

        def created(error: str | None, recreated: bool) -> None:
            self._nudged_at = None
            if error is not None:
                return done(SetupError(explain(f"creating slot {slot!r} failed: {error}"),
                                       "wal_level" in error), False, 0)
            publication(recreated)

        def publication(recreated: bool) -> None:
            if self.recovery:       # a standby has what its primary has
                return start(recreated)
            self.query(f"SELECT 1 FROM pg_publication WHERE pubname = '{pub}'".encode(),
                       lambda results, error: (
                           done(SetupError(f"looking for publication {pub!r} failed: {error}",
                                           False), False, 0) if error is not None else
                           start(recreated) if results and results[0] else
                           self.query(f'CREATE PUBLICATION "{pub}"'.encode(),
                                      lambda _r, error: publication_made(error, recreated))))

        def publication_made(error: str | None, recreated: bool) -> None:
            if error is not None and "already exists" not in error:
                return done(SetupError(f"creating publication {pub!r} failed: {error} "
                                       f"(CREATE PUBLICATION {pub}; as its owner)", False),
                            False, 0)
            start(recreated)

        def start(recreated: bool) -> None:
            self.query(f"START_REPLICATION SLOT \"{slot}\" LOGICAL 0/0 (proto_version '1', "
                       f"publication_names '\"{pub}\"', messages 'true')".encode(),
                       lambda results, error: started(error, recreated))

        def started(error: str | None, recreated: bool) -> None:
            if error is not None:
                return done(SetupError(explain(f"starting to read slot {slot!r} failed: "
                                               f"{error}"), False), False, 0)
            if self.conn is None or not self.conn.copy_both:
                return done(SetupError("START_REPLICATION did not start a stream", False),
                            False, 0)
            done(None, recreated, self.start_lsn)

        self.query(b"SELECT current_setting('wal_level'), pg_is_in_recovery(), "
                   b"current_setting('server_version_num'), CASE WHEN pg_is_in_recovery() "
                   b"THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END", checked)

    def ready(self, now: float) -> None:
        assert self.conn is not None
        was_out = self._outage_logged
        self._outage_logged = False      # the base class logs "listening": we say our own
        self.last_error_permanent = self.setup_permanent = False
        self.machine.ready(now)
        self._heard_copy = self.dispatcher.copy_messages
        (log.warning if was_out else log.info)(
            "reading slot %r on %s (backend pid %d) from %s", self.slot, self.safe_target,
            self.conn.backend_pid, format_lsn(self.slot_confirmed))

    def lose(self, now: float, cause: str) -> None:
        super().lose(now, explain(cause))

    def _failed(self, now: float, cause: str) -> None:
        self._nudged_at = None
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


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


