"""A connection's life, without I/O: when to connect, when it has taken too long, when to send
a heartbeat, when the server has been silent too long, and how long to back off.

`ConnectionMachine` takes events with the time passed in (`connected`, `ready`, `heard`,
`sent`, `answered`, `down`) and answers `due(now)` with what the shell must do now and how
long it may wait before asking again. It never touches a socket, so its whole life runs
in-process in the tests (tests/test_connection.py). The LISTEN connection (listen.py) is one
instance; a connection of another kind (a replication stream) is another, with its own shell.

    BACKOFF --due: CONNECT--> CONNECTING --connected()--> SETUP --ready()--> UP
       ^                          |                         |                 |
       +---- down(): a failed attempt, a timeout, a lost connection ---------+

Liveness: a blocked read never notices a peer that vanished without FIN or RST (a frozen NAT,
a dead host), and TCP keepalives cannot see a stalled proxy that still ACKs. So nothing waits
on the server without a deadline: a connect must finish within connect_timeout, and once
connected the server must say something (a result, a notification) within liveness_timeout.
A quiet connection is asked a heartbeat every third of that. Time during which a blocking
reader holds the connection (`held`: nothing is read then, so nothing can be heard) does not
count as silence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .._backoff import Backoff


class Phase(enum.Enum):
    BACKOFF = "backing off"     # no connection: the next attempt is at `next_attempt`
    CONNECTING = "connecting"   # resolving, connecting, authenticating
    SETUP = "setting up"        # connected; its setup (the LISTEN replay) is in flight
    UP = "up"                   # set up: streams are whole


class Step(enum.Enum):
    WAIT = "wait"               # nothing to do before `wait` seconds have passed
    CONNECT = "connect"         # start an attempt (the phase is CONNECTING now)
    HEARTBEAT = "heartbeat"     # send the heartbeat query, then call sent(heartbeat=True)
    TIMEOUT = "timeout"         # give up on this connection: call down(cause)


@dataclass
class Timing:
    connect_timeout: float
    liveness_timeout: float
    backoff_initial: float
    backoff_max: float
    backoff_reset_after: float


class ConnectionMachine:
    """One connection's life. `held` in every call that takes it is the total time blocking
    readers have held the connection so far (it only grows)."""

    def __init__(self, timing: Timing, now: float, backoff: Backoff | None = None) -> None:
        self.timing = timing
        self.backoff = backoff or Backoff(timing.backoff_initial, timing.backoff_max,
                                          timing.backoff_reset_after)
        self.phase = Phase.BACKOFF
        self.next_attempt = now                 # the first attempt at once
        self.attempt_started = now
        self.last_heard = now
        self.heard_held = 0.0
        self.command_done = now                 # when the last command was answered
        self.busy = False                       # a command is in flight
        self.heartbeat_out = False              # ... and it is the heartbeat
        self.last_error: str | None = None
        self.down_since: float | None = None    # a working (UP) connection was lost then
        self.outage_total = 0.0
        self.reconnects = 0                     # working connections lost

    # -- what to do ---------------------------------------------------------------------------

    def due(self, now: float, held: float = 0.0) -> tuple[Step, float, str]:
        """What the shell must do now, how long it may wait (seconds) before asking again,
        and for TIMEOUT the cause to pass to down()."""
        if self.phase is Phase.BACKOFF:
            if now >= self.next_attempt:
                self.phase = Phase.CONNECTING
                self.attempt_started = now
                return Step.CONNECT, 0.0, ""
            return Step.WAIT, self.next_attempt - now, ""
        if self.phase is Phase.CONNECTING:
            left = self.attempt_started + self.timing.connect_timeout - now
            if left <= 0:
                return Step.TIMEOUT, 0.0, (f"no connection within connect_timeout "
                                           f"({self.timing.connect_timeout:g} s)")
            return Step.WAIT, left, ""
        limit = self.timing.liveness_timeout
        silence = self.silence(now, held)
        if silence >= limit:
            return Step.TIMEOUT, 0.0, (f"the server did not answer within liveness_timeout "
                                       f"({limit:g} s)")
        wait = limit - silence
        if self.phase is Phase.UP and not self.busy:
            heartbeat_at = self.command_done + limit / 3
            if now >= heartbeat_at:
                return Step.HEARTBEAT, wait, ""
            wait = min(wait, heartbeat_at - now)
        return Step.WAIT, wait, ""

    def silence(self, now: float, held: float = 0.0) -> float:
        """How long the server has said nothing, held time not counted."""
        return now - self.last_heard - (held - self.heard_held)

    # -- events -------------------------------------------------------------------------------

    def connected(self, now: float, held: float = 0.0) -> None:
        """The transport is up and authenticated; the shell sends the setup now."""
        assert self.phase is Phase.CONNECTING, self.phase
        self.phase = Phase.SETUP
        self.busy = False
        self.heartbeat_out = False
        self.heard(now, held)
        self.command_done = now

    def ready(self, now: float) -> None:
        """The setup is done: the connection works. Ends an outage."""
        assert self.phase is Phase.SETUP, self.phase
        self.phase = Phase.UP
        self.last_error = None
        self.backoff.succeeded(now)
        if self.down_since is not None:
            self.outage_total += now - self.down_since
            self.down_since = None

    def heard(self, now: float, held: float = 0.0) -> None:
        """The server said something (a result, a notification)."""
        self.last_heard = now
        self.heard_held = held

    def sent(self, now: float, heartbeat: bool = False) -> None:
        """A command (the heartbeat, when `heartbeat`) went out; the shell sends one at a
        time, and answers a HEARTBEAT step with sent(now, heartbeat=True)."""
        self.busy = True
        self.heartbeat_out = heartbeat

    def answered(self, now: float, held: float = 0.0) -> None:
        """The command in flight is answered in full (its last result came)."""
        self.busy = False
        self.heartbeat_out = False
        self.command_done = now
        self.heard(now, held)

    def down(self, now: float, cause: str) -> float:
        """The attempt failed, timed out, or the connection was lost (the shell has closed
        it): back off. Returns the delay before the next attempt."""
        was_up = self.phase is Phase.UP
        if was_up:
            self.reconnects += 1
            self.down_since = now
        self.phase = Phase.BACKOFF
        self.busy = False
        self.heartbeat_out = False
        self.last_error = cause
        delay = self.backoff.failed(now)
        self.next_attempt = now + delay
        return delay

    def restart(self, now: float) -> None:
        """The shell closed a working connection on purpose (to read again from an earlier
        place): connect again at once; not an outage, not a failure."""
        self.phase = Phase.BACKOFF
        self.busy = False
        self.heartbeat_out = False
        self.next_attempt = now

    # -- what stats() shows -------------------------------------------------------------------

    def outage_seconds(self, now: float) -> float:
        """Time without a working connection since one was first up, in all: from the loss
        of a working connection until the next is set up (connecting at start is not an
        outage)."""
        if self.down_since is None:
            return self.outage_total
        return self.outage_total + now - self.down_since
