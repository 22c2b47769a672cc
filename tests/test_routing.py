"""Routing against a model: random subscribe, unsubscribe, notify, kill and reconnect steps
in several worker processes; every stream must be exactly what the model says."""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from typing import Any

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Gap, Supervisor
from workers import agent

CHANNELS = ["c0", "c1", "Mixed Case", "é"]
MAX_AGENTS = 3
_ctx = multiprocessing.get_context("forkserver")


class Agent:
    """A worker process that subscribes and reads on command."""

    def __init__(self, sup: Supervisor) -> None:
        self.conn, theirs = _ctx.Pipe()
        self.process = _ctx.Process(target=agent, args=(sup.worker(), theirs), daemon=True)
        self.process.start()
        theirs.close()

    def ask(self, *command: Any) -> Any:
        self.conn.send(command)
        assert self.conn.poll(60), f"agent did not answer {command}"
        status, value = self.conn.recv()
        assert status == "ok", value
        return value

    def kill(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        self.conn.close()


class Routing(RuleBasedStateMachine):
    dsn: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.sup = Supervisor(self.dsn, backoff_initial=0.05, backoff_max=0.2).start()
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        # The test's own subscription, to know when everything sent before has arrived.
        self.sentinel = self.sup.worker().subscribe("sentinel", timeout=30)
        self.agents: list[Agent] = []
        self.expected: dict[tuple[Agent, int], tuple[str, list[str]]] = {}
        # Streams whose last record is a reconnect gap: a second outage with nothing in
        # between adds no second gap (the first covers it).
        self.gap_last: set[tuple[Agent, int]] = set()
        self.counter = 0

    def teardown(self) -> None:
        for a in self.agents:
            a.kill()
        self.sentinel.unsubscribe()
        self.conn.close()
        self.sup.stop()

    def _payload(self) -> str:
        self.counter += 1
        return f"m{self.counter}"

    @precondition(lambda self: len(self.agents) < MAX_AGENTS)
    @rule()
    def start_agent(self) -> None:
        self.agents.append(Agent(self.sup))

    @precondition(lambda self: self.agents)
    @rule(data=st.data(), channel=st.sampled_from(CHANNELS))
    def subscribe(self, data: st.DataObject, channel: str) -> None:
        a = data.draw(st.sampled_from(self.agents))
        key = a.ask("subscribe", channel)
        self.expected[(a, key)] = (channel, [])
        self.gap_last.discard((a, key))     # keys of closed subscriptions are reused

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        a, key = data.draw(st.sampled_from(sorted(self.expected, key=repr)))
        a.ask("unsubscribe", key)
        del self.expected[(a, key)]

    @rule(channel=st.sampled_from(CHANNELS), n=st.integers(1, 5))
    def notify(self, channel: str, n: int) -> None:
        payloads = [self._payload() for _ in range(n)]
        notify(self.conn, channel, payloads)
        for key, (ch, items) in self.expected.items():
            if ch == channel:
                items.extend(payloads)
                self.gap_last.discard(key)

    @precondition(lambda self: self.agents)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.agents))
        a.kill()
        self.agents.remove(a)
        self.expected = {k: v for k, v in self.expected.items() if k[0] is not a}

    @rule()
    def reconnect(self) -> None:
        self._sync()        # what was sent before the cut has arrived
        old = self.sup.backend_pid
        self.conn.execute("SELECT pg_terminate_backend(%s)", (old,))
        wait_for(lambda: self.sup.stats().connected and
                 self.sup.backend_pid not in (None, old), "the supervisor to reconnect")
        for key, (_ch, items) in self.expected.items():
            if key not in self.gap_last:
                items.append("GAP:reconnect")
                self.gap_last.add(key)

    def _sync(self) -> None:
        """Return once the supervisor has routed everything sent so far."""
        marker = f"sync-{uuid.uuid4()}"
        notify(self.conn, "sentinel", [marker])
        while True:
            item = self.sentinel.get(timeout=30)
            if not isinstance(item, Gap) and item.payload == marker:
                return

    @invariant()
    def streams_match_the_model(self) -> None:
        wait_for(lambda: self.sup.stats().subscriptions == len(self.expected) + 1,
                 "dead workers' subscriptions to be reclaimed")
        wanted = {ch for ch, _ in self.expected.values()} | {"sentinel"}
        assert self.sup.stats().channels == tuple(sorted(wanted))
        self._sync()
        for (a, key), (_ch, items) in self.expected.items():
            assert a.ask("read", key, len(items)) == items
            items.clear()
        # The server no longer sends what nobody wants: UNLISTEN happened.
        before = self.sup.stats().unrouted
        for ch in set(CHANNELS) - wanted:
            notify(self.conn, ch, [self._payload()])
        self._sync()
        assert self.sup.stats().unrouted == before


def test_routing_matches_the_model(dsn: str) -> None:
    Routing.dsn = dsn
    run_state_machine_as_test(Routing, settings=settings(
        max_examples=12, stateful_step_count=15, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
