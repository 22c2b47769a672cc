"""The supervisor's registry driven in-process against a model of PostgreSQL and the rings:
thousands of steps, no server. The real-fault cases stay in test_routing/test_resilience.

The model: the server delivers a notification to a subscription's ring when the server
LISTENs on its channel (from the moment the LISTEN is sent: it may deliver before its answer
comes) and the registry routes the channel to it. The property: no silent loss. Once a stream
has received anything on a channel, or its subscribe was answered, a notification on that
channel that it did not get must be followed by a gap before its next item (a gap that is
still the last thing in the ring covers it too).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pglistener._supervisor.registry import Actions, Registry, Sub
from pglistener.errors import TooManySubscriptions

CHANNELS = ["a", "b", "c", "d"]
WORKERS = ["w1", "w2", "w3"]
MAX_SUBS = 3
MAX_CHANNELS = 5


class Model(RuleBasedStateMachine):
    subs = Bundle("subs")

    def __init__(self) -> None:
        super().__init__()
        self.reg = Registry(MAX_SUBS, MAX_CHANNELS)
        self.connected = False               # a connection exists (replayed or not)
        self.replaying: tuple[list[str], int] | None = None  # the replay in flight on it
        self.server: set[str] = set()        # what the server LISTENs on
        self.rings: dict[int, list[Any]] = {}   # ring id -> items and "GAP"
        self.begun: dict[int, set[str]] = {}    # channels each stream has begun on
        self.owed: dict[int, set[str]] = {}     # channels with a loss not yet gapped
        self.routes: dict[str, list[int]] = {}  # what the dispatcher was told
        self.answered: set[int] = set()
        self.sent = 0

    # -- carrying out actions, as server.Server does ----------------------------------------

    def apply(self, act: Actions, outcome: st.DataObject | None = None) -> None:
        for channel, ids in act.routes.items():
            assert all(i in self.rings for i in ids), "a route to a ring that does not exist"
            self.routes[channel] = list(ids)
        for sub in act.free:
            assert all(sub.id not in ids for ids in self.routes.values()), "freed while routed"
            del self.rings[sub.id]
        for ring in act.gaps:
            self.rings[ring].append("GAP")
            self.owed[ring].clear()
        for sub in act.answer:
            assert sub.id not in self.answered, "answered twice"
            # Answered once listened on a working connection; or during an outage, when its
            # channels were wanted already, with a gap first.
            assert ((self.reg.up and self.server.issuperset(sub.channels))
                    or (not self.reg.up and self.rings[sub.id] == ["GAP"]))
            self.answered.add(sub.id)
            self.begun[sub.id].update(sub.channels)
        if act.unlisten:
            assert self.connected
            self.server.difference_update(act.unlisten)
            if outcome is not None and outcome.draw(st.booleans(), label="UNLISTEN lost"):
                self.lose()
                return
        if act.listen:
            assert self.connected
            if outcome is not None and outcome.draw(st.booleans(), label="LISTEN refused"):
                self.reg.refused(act.listen, act.listen_token)  # a standby: nothing took effect
                self.lose()
                return
            self.server.update(act.listen)      # the server may deliver from now on
            self.traffic(outcome)
            if outcome is not None and outcome.draw(st.booleans(), label="LISTEN lost"):
                self.lose()
            else:
                self.apply(self.reg.listened(act.listen, act.listen_token), outcome)

    def traffic(self, data: st.DataObject | None) -> None:
        """Notifications while a LISTEN is in flight."""
        if data is None:
            return
        for channel in data.draw(st.lists(st.sampled_from(CHANNELS), max_size=3),
                                 label="in flight"):
            self.publish(channel)

    def lose(self) -> None:
        self.connected = False
        self.replaying = None
        self.server.clear()
        self.apply(self.reg.lost())

    def publish(self, channel: str) -> None:
        self.sent += 1
        delivered = self.routes.get(channel, []) if channel in self.server else []
        for ring, items in self.rings.items():
            if ring in delivered:
                assert not self.owed[ring], (
                    f"ring {ring} receives {channel}#{self.sent} after a silent loss on "
                    f"{sorted(self.owed[ring])}: {items[-5:]}")
                items.append((channel, self.sent))
                self.begun[ring].add(channel)
            elif channel in self.begun[ring] and items[-1:] != ["GAP"]:
                self.owed[ring].add(channel)    # (a gap still last covers this loss too)

    # -- events ------------------------------------------------------------------------------

    @rule(target=subs, worker=st.sampled_from(WORKERS),
          channels=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3, unique=True),
          data=st.data())
    def subscribe(self, worker: str, channels: list[str], data: st.DataObject) -> Any:
        try:
            sub = self.reg.new(worker, 0, object(), channels, 16384)
        except TooManySubscriptions:
            held = self.reg.held_by(worker)
            assert (len(held) >= MAX_SUBS
                    or sum(len(s.channels) for s in held) + len(channels) > MAX_CHANNELS)
            return None
        self.rings[sub.id] = []
        self.begun[sub.id] = set()
        self.owed[sub.id] = set()
        self.apply(self.reg.add(sub), data)
        return sub

    @rule(sub=consumes(subs), data=st.data())
    def unsubscribe(self, sub: Sub | None, data: st.DataObject) -> None:
        if sub is None or sub.id not in self.reg.subs:
            return
        if data.draw(st.booleans(), label="as a cancel"):
            found, act = self.reg.cancel(sub.worker, sub.req)
            assert (found is sub) == (sub.id not in self.answered)
            if found is None:
                act = self.reg.unsubscribe(sub.worker, sub.id)
        else:
            act = self.reg.unsubscribe(sub.worker, sub.id)
        self.apply(act, data)

    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def worker_dies(self, worker: str, data: st.DataObject) -> None:
        self.apply(self.reg.worker_gone(worker), data)

    @rule(channel=st.sampled_from(CHANNELS))
    def notify(self, channel: str) -> None:
        self.publish(channel)

    @precondition(lambda self: self.connected)
    @rule()
    def connection_lost(self) -> None:
        self.lose()

    @precondition(lambda self: not self.connected)
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        self.connected = True
        act = self.reg.connected()
        if act.listen and data.draw(st.booleans(), label="replay refused"):
            self.reg.refused(act.listen, act.listen_token)
            self.lose()
            return
        self.server.update(act.listen)
        self.replaying = (act.listen, act.listen_token)
        self.traffic(data)

    @precondition(lambda self: self.replaying is not None)
    @rule(data=st.data())
    def replay_answered(self, data: st.DataObject) -> None:
        """Subscribes and unsubscribes may come between the replay's LISTEN and its answer
        (the supervisor's loop serves workers meanwhile)."""
        if data.draw(st.booleans(), label="replay lost"):
            self.lose()
            return
        assert self.replaying is not None
        replayed, self.replaying = self.replaying, None
        self.apply(self.reg.replayed(*replayed), data)

    # -- what must always hold ---------------------------------------------------------------

    @invariant()
    def routes_are_the_subscriptions(self) -> None:
        wanted: dict[str, list[int]] = {}
        for sub in sorted(self.reg.subs.values(), key=lambda s: s.id):
            for channel in sub.channels:
                wanted.setdefault(channel, []).append(sub.id)
        assert self.reg.routes == wanted
        assert {ch: ids for ch, ids in self.routes.items() if ids} == wanted
        assert set(self.rings) == set(self.reg.subs)

    @invariant()
    def the_server_listens_on_what_is_wanted(self) -> None:
        if self.reg.up:
            assert self.server == set(self.reg.routes) == self.reg.listening
        assert self.reg.listening <= self.server

    @invariant()
    def answered_exactly_when_listened(self) -> None:
        for sub in self.reg.subs.values():
            assert sub.answered == (sub.id in self.answered)
            if self.reg.up:
                assert sub.answered, "a subscribe left waiting on a working connection"

    @invariant()
    def limits_hold(self) -> None:
        for worker in WORKERS:
            held = self.reg.held_by(worker)
            assert len(held) <= MAX_SUBS
            assert sum(len(s.channels) for s in held) <= MAX_CHANNELS


def test_registry_against_the_model() -> None:
    run_state_machine_as_test(
        Model, settings=settings(max_examples=300, stateful_step_count=60, deadline=None))


def test_a_subscribe_lost_during_its_listen_gets_a_gap() -> None:
    """Item 4 of the issue, spelled out: "b" is LISTENed already for another subscription, so
    the new subscription of ["b", "c"] receives on "b" while its LISTEN of "c" is in flight;
    the connection goes then. Its stream must say so before what comes after the replay."""
    reg = Registry(10, 10)
    reg.replayed([], reg.connected().listen_token)
    first = reg.new("w1", 0, 1, ["b"], 16384)
    act = reg.add(first)
    assert act.listen == ["b"]
    reg.listened(["b"], act.listen_token)
    second = reg.new("w2", 0, 2, ["b", "c"], 16384)
    act = reg.add(second)
    assert (act.listen, act.answer) == (["c"], [])      # waits for "c"; routed on "b" now
    assert act.routes["b"] == [first.id, second.id]
    lost = reg.lost()
    assert lost.lost_stream and sorted(lost.gaps) == [first.id, second.id]
    replay = reg.connected()
    assert replay.listen == ["b", "c"]
    assert reg.replayed(["b", "c"], replay.listen_token).answer == [second]


@pytest.mark.parametrize("refused", [True, False])
def test_a_listen_that_never_reached_the_server_gives_no_gap(refused: bool) -> None:
    """A subscription whose only channel's LISTEN was refused (a standby) has received
    nothing and begins whole; one whose LISTEN was sent when the connection went may have."""
    reg = Registry(10, 10)
    reg.replayed([], reg.connected().listen_token)
    sub = reg.new("w1", 0, 1, ["x"], 16384)
    act = reg.add(sub)
    assert act.listen == ["x"]
    if refused:
        reg.refused(["x"], act.listen_token)
    assert reg.lost().gaps == ([] if refused else [sub.id])


def test_only_the_last_command_of_a_channel_decides_it() -> None:
    """Commands run one after another while the loop serves workers: a LISTEN in flight,
    then its channel dropped (UNLISTEN queued) and subscribed again (a second LISTEN). The
    first LISTEN's answer must not count as the second's: between them the UNLISTEN runs."""
    reg = Registry(10, 10)
    reg.replayed([], reg.connected().listen_token)
    first = reg.new("w1", 0, 1, ["x"], 16384)
    one = reg.add(first)
    assert reg.unsubscribe("w1", first.id).unlisten == ["x"]
    second = reg.new("w1", 0, 2, ["x"], 16384)
    two = reg.add(second)
    assert two.listen == ["x"] and two.listen_token != one.listen_token
    assert reg.listened(["x"], one.listen_token).answer == []       # not yet
    assert reg.listened(["x"], two.listen_token).answer == [second]


def test_a_subscribe_during_an_outage_on_a_listened_channel_is_answered_at_once() -> None:
    reg = Registry(10, 10)
    reg.replayed([], reg.connected().listen_token)
    first = reg.new("w1", 0, 1, ["x"], 16384)
    reg.listened(["x"], reg.add(first).listen_token)
    reg.lost()
    second = reg.new("w2", 0, 2, ["x"], 16384)
    act = reg.add(second)
    assert act.answer == [second] and act.gaps == [second.id] and act.listen == []
    other = reg.new("w2", 0, 3, ["x", "y"], 16384)
    assert reg.add(other).answer == []          # "y" needs the server


def test_a_registry_that_does_not_listen_routes_and_answers_at_once() -> None:
    """The WAL source's registry: no LISTEN to send or wait for, its routes in place as they
    are set; answered once its connection streams (connected() is whole at once), and at
    once from then on; a channel nobody reads any more is dropped, with no UNLISTEN."""
    reg = Registry(MAX_SUBS, MAX_CHANNELS, listens=False)
    first = reg.new("w1", 1, 1, ["a", "b"], 4096)
    act = reg.add(first)
    assert act.routes == {"a": [first.id], "b": [first.id]} and not act.listen
    assert act.answer == []             # not streaming yet: it waits
    act = reg.connected()
    assert reg.up and act.answer == [first] and not act.listen
    second = reg.new("w2", 2, 1, ["b", "c"], 4096)
    act = reg.add(second)
    assert act.answer == [second] and not act.listen
    act = reg.unsubscribe("w1", first.id)
    assert act.routes["a"] == [] and act.unlisten == [] and "a" not in reg.listening
