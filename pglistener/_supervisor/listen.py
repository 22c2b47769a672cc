"""The LISTEN connection: the I/O shell around one ConnectionMachine.

It owns a dispatch.PGConnection (libpq, ours), connects it without blocking (names resolved
in a thread, PQconnectPoll driven by the supervisor's loop) and runs a queue of commands on it,
one at a time, each answered by a callback. Nothing here waits: the supervisor's one loop asks
step() what is due, waits on fds() while connecting, and hands results over with on_result().
What the commands are (the LISTEN replay, LISTEN, UNLISTEN) is its source's business
(notify/source.py's NotifySource); this module adds only the heartbeat.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg.conninfo import make_conninfo

from .._core.dispatch import ConnectPoll, Dispatcher, PGConnection
from .connection import ConnectionMachine, Phase, Step, Timing
from .resolve import Resolver

log = logging.getLogger("pglistener.supervisor")

#: The heartbeat: cheap, and what stats() reports as the server's queue fill.
HEARTBEAT = b"SELECT pg_notification_queue_usage()"

#: This server's WAL position, a primary's or a standby's (SQL).
WAL_POSITION = ("CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                "ELSE pg_current_wal_lsn() END")

#: The bytes of WAL a row of pg_replication_slots keeps on this server (SQL).
SLOT_LAG = f"({WAL_POSITION} - restart_lsn)::bigint"

#: What libpq says when retrying alone will not mend a connection: the credentials, the role
#: or the database are wrong (libpq gives no SQLSTATE for a refused connection).
_PERMANENT = re.compile(r"authentication failed|no pg_hba\.conf entry|"
                        r"(role|database) \"[^\"]*\" does not exist|password is required")


def is_permanent(cause: str) -> bool:
    """Whether a connection failure is one that retrying alone will not mend."""
    return bool(_PERMANENT.search(cause))


#: A command's answer: the rows of each result that has rows, and the first error's text
#: (None when every statement succeeded; a query string of several statements runs as one
#: transaction, so after an error none of them took effect).
Done = Callable[[list[list[tuple[bytes | None, ...]]], "str | None"], None]


@dataclass
class _Command:
    query: bytes
    done: Done
    results: list[list[tuple[bytes | None, ...]]] = field(default_factory=list)
    error: str | None = None


class ListenConnection:
    """on_connected() is called once a connection is made (send its setup with query(), then
    call ready()); on_down(cause) when it goes, however it goes (an attempt that failed
    included), after what was queued is dropped."""

    def __init__(self, conninfo: str, safe_target: str, timing: Timing, dispatcher: Dispatcher,
                 now: float, on_connected: Callable[[], None],
                 on_down: Callable[[str], None]) -> None:
        # Notifications are decoded as UTF-8 on the readers' side.
        self.conninfo = make_conninfo(conninfo, client_encoding="UTF8")
        self.safe_target = safe_target
        self.machine = ConnectionMachine(timing, now)
        self.dispatcher = dispatcher
        self.on_connected = on_connected
        self.on_down = on_down
        self.conn: PGConnection | None = None     # connected: in SETUP or UP
        self._connecting: PGConnection | None = None
        self._want = 0                            # ConnectPoll of the connection being made
        self.resolver = Resolver()
        self._resolving = False
        self._commands: collections.deque[_Command] = collections.deque()
        self._heard_count = 0
        self._notices_seen = 0                    # of the connection's notice_count
        self.queue_usage: float | None = None     # pg_notification_queue_usage(), last seen
        self.heartbeat = HEARTBEAT
        self.slot_lag: int | None = None          # WAL the watched slot holds, last seen
        self.last_error_permanent = False
        self._outage_logged = False

    # -- what the loop asks -------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A command is in flight: the core's run() is to say when its result is ready."""
        return self.machine.busy

    def step(self, now: float) -> float:
        """Do what is due; the seconds the loop may wait before calling again."""
        held = self.dispatcher.held_seconds
        if self.conn is not None and self.dispatcher.received != self._heard_count:
            self._heard_count = self.dispatcher.received    # notifications count as life
            self.machine.heard(now, held)
        while True:
            step, wait, cause = self.machine.due(now, held)
            if step is Step.CONNECT:
                self._resolving = True      # names first, beside the loop (_resolve)
                self.resolver.start(self.conninfo)
                continue
            if step is Step.HEARTBEAT:
                self._send(_Command(self.heartbeat, lambda results, _error:
                                    self.sample_queue(results)))
                if self.conn is None:       # sending it failed
                    continue
            elif step is Step.TIMEOUT:
                self.lose(now, cause)
                continue
            return wait

    def fds(self) -> list[tuple[int, bool]]:
        """While connecting: the descriptors to wait on, each with True to wait until it is
        writable (else readable); then call advance()."""
        if self._resolving:
            return [(self.resolver.fileno(), False)]
        if self._connecting is not None:
            return [(self._connecting.fileno(), self._want == ConnectPoll.CONNECT_WRITING)]
        return []

    # -- connecting ---------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """A descriptor of fds() is ready: take the next step of connecting."""
        if self._resolving:
            self._resolving = False
            try:
                conninfo = self.resolver.result()
            except Exception as exc:  # noqa: BLE001 - a lookup's every failure is reported
                self._failed(now, f"cannot connect to {self.safe_target}: {exc}")
                return
            try:
                self._connecting = PGConnection.start(conninfo.encode())
            except MemoryError as exc:
                self._failed(now, f"cannot connect to {self.safe_target}: {exc}")
                return
        if self._connecting is None:
            return
        self._want = self._connecting.connect_poll()
        if self._want == ConnectPoll.CONNECT_FAILED:
            self._failed(now, f"cannot connect to {self.safe_target}: "
                              f"{self._connecting.error_message}")
        elif self._want == ConnectPoll.CONNECT_OK:
            self.conn, self._connecting = self._connecting, None
            self._notices_seen = 0
            self._heed_notices()
            self._heard_count = self.dispatcher.received
            self.machine.connected(now, self.dispatcher.held_seconds)
            self.on_connected()

    def ready(self, now: float) -> None:
        """The setup is done: the connection works."""
        assert self.conn is not None
        if self._outage_logged:
            log.warning("reconnected to %s (backend pid %d)", self.safe_target,
                        self.conn.backend_pid)
        else:
            log.info("listening on %s (backend pid %d)", self.safe_target,
                     self.conn.backend_pid)
        self._outage_logged = False
        self.last_error_permanent = False
        self.machine.ready(now)

    # -- commands -----------------------------------------------------------------------------

    def query(self, query: bytes, done: Done) -> None:
        """Run `query` after the commands before it; done(results, error) when it is
        answered. Dropped, never answered, when the connection goes first."""
        self._send(_Command(query, done))

    def _send(self, command: _Command) -> None:
        self._commands.append(command)
        self._send_next()

    def _send_next(self) -> None:
        """Send the first command queued, unless one is in flight: one at a time."""
        if not self._commands or self.conn is None or self.machine.busy:
            return
        query = self._commands[0].query
        if not self.conn.send_query(query):
            self.lose_now(f"sending a query failed: {self.conn.error_message}")
            return
        self.machine.sent(time.monotonic(), heartbeat=query is self.heartbeat)

    def on_result(self, now: float) -> None:
        """the core's run() said RUN_RESULT: take the result (it does not block)."""
        assert self.conn is not None and self._commands
        self.machine.heard(now, self.dispatcher.held_seconds)
        got = self.conn.get_result()
        self._heed_notices()
        command = self._commands[0]
        if got is not None:
            ok, rows, error = got
            if not ok:
                command.error = command.error or error
            elif rows:
                command.results.append(rows)
            return
        self._commands.popleft()
        self.machine.answered(now, self.dispatcher.held_seconds)
        command.done(command.results, command.error)     # may queue more, or lose it all
        self._send_next()

    def _heed_notices(self) -> None:
        """What the server said beside the results, in the log (libpq would print it to
        the supervisor's stderr): a WARNING as a warning, the rest (a NOTICE such as "already
        exists, skipping") at debug level."""
        conn = self.conn
        if conn is None or conn.notice_count == self._notices_seen:
            return
        more = conn.notice_count - self._notices_seen - 1
        self._notices_seen = conn.notice_count
        severity, text = conn.last_notice
        log.log(logging.WARNING if severity == "WARNING" else logging.DEBUG,
                "%s says (%s): %s%s", self.safe_target, severity, text,
                f" (and {more} more before it)" if more else "")

    def watch_slot(self, slot: str) -> None:
        """The heartbeat also samples how much WAL replication slot `slot` holds (on this
        server: the one the WAL source reads from, a primary or a standby)."""
        self.heartbeat = (HEARTBEAT + f", (SELECT {SLOT_LAG} FROM pg_replication_slots "
                          f"WHERE slot_name = '{slot}')".encode())

    def sample_queue(self, results: list[list[tuple[bytes | None, ...]]]) -> None:
        """Keep the queue fill (and a watched slot's WAL) from the results of a query that
        ended with the heartbeat."""
        if results and results[-1]:
            row = results[-1][0]
            self.queue_usage = None if row[0] is None else float(row[0])
            if len(row) > 1:
                self.slot_lag = None if row[1] is None else int(row[1])

    # -- losing it ----------------------------------------------------------------------------

    def lose_now(self, cause: str) -> None:
        self.lose(time.monotonic(), cause)

    def lose(self, now: float, cause: str) -> None:
        """The connection (or the attempt) is gone: close it, drop what was queued, back
        off."""
        if self.machine.phase in (Phase.SETUP, Phase.UP):
            self._failed(now, f"lost the connection to {self.safe_target}: {cause}")
        else:
            self._failed(now, f"cannot connect to {self.safe_target}: {cause}")

    def _failed(self, now: float, cause: str) -> None:
        self._close_connections()
        self._resolving = False
        self._commands.clear()
        self.dispatcher.drop_held()     # taken off the dead connection: the gap covers it
        delay = self.machine.down(now, cause)
        self.last_error_permanent = self.permanent(cause)
        if not self._outage_logged:
            log.error("%s; retrying %s", cause, "now" if delay == 0 else f"in {delay:.1f} s")
            self._outage_logged = True
        else:
            log.info("%s; retrying in %.1f s", cause, delay)
        self.on_down(cause)

    def permanent(self, cause: str) -> bool:
        """Whether retrying alone will not mend this failure."""
        return is_permanent(cause)

    def _close_connections(self) -> None:
        for conn in (self.conn, self._connecting):
            if conn is not None:
                conn.close()
        self.conn = self._connecting = None

    def close(self) -> None:
        self._close_connections()
        self.resolver.close()
