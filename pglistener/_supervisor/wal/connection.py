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
import re
import time
from collections.abc import Callable

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..._core.dispatch import Dispatcher
from ..._core.reader import format_lsn, parse_lsn
from ..connection import Phase, Step, Timing
from ..conversation import Answer, Command, drive
from ..listen import ListenConnection, is_permanent
from . import setup as _setup
from .decoder import WalDispatcher
from .setup import SetupError, Started, explain

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


def is_permanent_failure(cause: str) -> bool:
    """A replication connection's failure that retrying alone will not mend."""
    return is_permanent(cause) or "REPLICATION attribute" in cause or "wal_level" in cause


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
        """Run the setup (wal/setup.py) on this connection: done(None, started) once the
        stream runs, done(error, None) when it cannot."""

        def answer(results: list[list[tuple[bytes | None, ...]]], error: str | None) -> Answer:
            self._nudged_at = None
            return Answer(results, error, self.conn is not None and self.conn.copy_both)

        def sent(command: Command) -> None:
            if command.nudge:
                self._nudged_at = time.monotonic()
                self.nudge()

        def finished(started: Started | None, error: BaseException | None) -> None:
            assert error is None or isinstance(error, SetupError)
            done(error, started)

        drive(_setup.setup(self), self.query, finished, errors=(SetupError,), answer=answer,
              sent=sent)

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
