"""A connection's life (the supervisor's ConnectionMachine) driven in-process with time
passed in: connect timeout, liveness, the heartbeat, backoff and its reset, a loss in every
phase. The same machine against real faults is in test_resilience and test_stall."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pglistener._backoff import Backoff
from pglistener._supervisor.connection import ConnectionMachine, Phase, Step, Timing

TIMING = Timing(connect_timeout=10.0, liveness_timeout=15.0, backoff_initial=0.5,
                backoff_max=60.0, backoff_reset_after=30.0)


def machine(now: float = 0.0) -> ConnectionMachine:
    # No jitter: rand() == 0 gives the full delay.
    return ConnectionMachine(TIMING, now, Backoff(0.5, 60.0, 30.0, rand=lambda: 0.0))


def up(m: ConnectionMachine, now: float) -> None:
    assert m.due(now)[0] is Step.CONNECT
    m.connected(now)
    m.ready(now)


def test_the_first_attempt_is_at_once_and_the_phases_follow() -> None:
    m = machine(100.0)
    assert m.phase is Phase.BACKOFF
    step, wait, _ = m.due(100.0)
    assert (step, wait, m.phase) == (Step.CONNECT, 0.0, Phase.CONNECTING)
    m.connected(101.0)
    assert m.phase is Phase.SETUP
    m.ready(101.5)
    assert m.phase is Phase.UP and m.last_error is None


def test_connect_timeout() -> None:
    m = machine()
    m.due(0.0)
    step, wait, _ = m.due(4.0)
    assert (step, wait) == (Step.WAIT, 6.0)
    step, _, cause = m.due(10.0)
    assert step is Step.TIMEOUT and "connect_timeout (10 s)" in cause
    assert m.down(10.0, cause) == 0.0            # the first retry at once
    assert m.phase is Phase.BACKOFF and m.last_error == cause
    assert m.reconnects == 0 and m.outage_seconds(11.0) == 0.0   # never up: no outage


def test_backoff_doubles_to_its_cap() -> None:
    m = machine()
    delays = []
    now = 0.0
    for _ in range(12):
        step, wait, _ = m.due(now)
        if step is Step.WAIT:
            now += wait
            assert m.due(now)[0] is Step.CONNECT
        delays.append(m.down(now, "refused"))
    assert delays[:6] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == 60.0 and max(delays) == 60.0


def test_backoff_starts_over_after_a_stable_period_but_not_after_a_flap() -> None:
    m = machine()
    now = 0.0
    for _ in range(4):          # 0, 0.5, 1, 2
        step, wait, _ = m.due(now)
        now += wait
        m.due(now)
        m.down(now, "refused")
    now += 10
    up(m, now)
    assert m.down(now + 5, "flap") == 4.0           # up 5 s: the long delays stay
    now += 5 + 4
    up(m, now)
    assert m.down(now + 31, "lost") == 0.0          # up 31 s: starts over


def test_heartbeat_every_third_of_liveness_when_quiet() -> None:
    m = machine()
    up(m, 0.0)
    step, wait, _ = m.due(1.0)
    assert step is Step.WAIT and wait == pytest.approx(4.0)
    assert m.due(5.0)[0] is Step.HEARTBEAT
    m.sent(5.0, heartbeat=True)
    assert m.heartbeat_out and m.due(6.0)[0] is Step.WAIT     # one at a time
    m.answered(5.2)
    assert not m.heartbeat_out
    step, wait, _ = m.due(5.2)
    assert step is Step.WAIT and wait == pytest.approx(5.0)


def test_a_busy_connection_sends_no_heartbeat() -> None:
    m = machine()
    up(m, 0.0)
    m.sent(1.0)                  # a LISTEN in flight
    for t in (5.0, 9.0, 14.0):
        m.heard(t)               # notifications keep coming
        assert m.due(t)[0] is Step.WAIT


def test_silence_past_liveness_is_a_loss_and_an_outage() -> None:
    m = machine()
    up(m, 0.0)
    m.due(5.0)
    m.sent(5.0, heartbeat=True)  # never answered
    assert m.due(14.9)[0] is Step.WAIT
    step, _, cause = m.due(15.0)
    assert step is Step.TIMEOUT and "liveness_timeout (15 s)" in cause
    m.down(15.0, cause)
    assert m.reconnects == 1 and m.outage_seconds(17.0) == pytest.approx(2.0)
    m.due(15.0)
    m.connected(18.0)
    m.ready(19.0)
    assert m.outage_seconds(100.0) == pytest.approx(4.0)      # ended by ready()


def test_time_held_by_a_blocking_reader_is_not_silence() -> None:
    m = machine()
    up(m, 0.0)
    m.sent(1.0)
    # Held for 20 s from t=1: nothing could be read, so nothing could be heard.
    assert m.due(21.0, held=20.0)[0] is Step.WAIT
    assert m.silence(21.0, held=20.0) == pytest.approx(1.0)
    assert m.due(35.0, held=20.0)[0] is Step.TIMEOUT


@pytest.mark.parametrize("phase", ["connecting", "setup", "up", "heartbeat out", "held"])
def test_a_loss_in_every_phase(phase: str) -> None:
    m = machine()
    m.due(0.0)
    if phase != "connecting":
        m.connected(1.0)
    if phase in ("up", "heartbeat out", "held"):
        m.ready(2.0)
    if phase == "heartbeat out":
        assert m.due(7.0)[0] is Step.HEARTBEAT
        m.sent(7.0, heartbeat=True)
    was_up = m.phase is Phase.UP
    delay = m.down(8.0, "the server closed the connection")
    assert m.phase is Phase.BACKOFF and not m.busy and not m.heartbeat_out
    assert delay == 0.0 and m.next_attempt == 8.0
    assert m.reconnects == (1 if was_up else 0)
    assert (m.down_since == 8.0) == was_up
    assert m.due(8.0)[0] is Step.CONNECT


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["tick", "connected", "ready", "heard", "sent",
                                           "answered", "down"]),
                          st.floats(0, 20)), max_size=60))
def test_every_wait_is_bounded_and_time_never_runs_backwards(
        events: list[tuple[str, float]]) -> None:
    """Whatever happens, due() never asks to wait past the next deadline (connect_timeout,
    liveness, a heartbeat, the next attempt), so a loop that waits as told never misses one."""
    m = machine()
    now = 0.0
    for event, dt in events:
        now += dt
        step, wait, _ = m.due(now)
        # (with a float's rounding: a wait of (t + 60) - t can be 60.00000000000003)
        assert 0.0 <= wait <= max(TIMING.connect_timeout, TIMING.liveness_timeout,
                                  TIMING.backoff_max) + 1e-9
        if step is Step.TIMEOUT:
            m.down(now, "timeout")
        elif step is Step.HEARTBEAT:
            m.sent(now, heartbeat=True)
        elif event == "connected" and m.phase is Phase.CONNECTING:
            m.connected(now)
        elif event == "ready" and m.phase is Phase.SETUP:
            m.ready(now)
        elif event == "heard" and m.phase in (Phase.SETUP, Phase.UP):
            m.heard(now)
        elif event == "sent" and m.phase in (Phase.SETUP, Phase.UP) and not m.busy:
            m.sent(now)
        elif event == "answered" and m.busy:
            m.answered(now)
        elif event == "down" and m.phase is not Phase.BACKOFF:
            m.down(now, "lost")
        if m.phase in (Phase.SETUP, Phase.UP):
            assert m.silence(now) < TIMING.liveness_timeout or m.due(now)[0] is Step.TIMEOUT
