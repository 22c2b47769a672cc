"""The supervisor's bookkeeping, without I/O: subscriptions, routes, pending subscribes, the
channels LISTENed on the connection, and the per-worker limits.

It takes events (a subscribe, a LISTEN committed, an unsubscribe, a worker gone, the
connection lost or replayed) and returns `Actions`: what the server must do to the dispatcher,
the connection and the workers. It never touches a socket, a ring or PostgreSQL, so the whole
routing state machine runs in-process in the tests (tests/test_registry.py); each source
(source.py) with server.Server is the thin shell that carries the actions out.

When a worker's stream begins: a subscription is answered once every one of its channels is
LISTENed on a working connection. Its ring is routed before that, so that a channel already
LISTENed for somebody else delivers into it from the subscribe on; such a stream has begun on
that channel, and a connection lost before the answer must leave it a gap too.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TooManySubscriptions


@dataclass(eq=False)
class Sub:
    """One subscription: its ring's id, its channels in order, and who asked for it."""

    id: int
    channels: tuple[str, ...]
    worker: Hashable
    pid: int
    ring_bytes: int
    req: Any                    # the subscribe request, answered once LISTEN is committed
    overflow: str = "gap"       # "gap" or "block"
    group: str | None = None    # a consumer group: shares the stream with its members
    answered: bool = False
    resumes: bool = False       # WAL source: it said where to start (after=)
    # WAL source: where after= said, (commit, lsn, seek lsn), until the slot's position has
    # been compared with it
    after: tuple[int, int, int] | None = None
    died: bool = False          # dropped because its worker went, not unsubscribed
    keyed: bool = False         # its group sends each key to one member (key=True)


@dataclass
class Actions:
    """What to do, in this order: routes, rings to free, refusals, gaps, answers, UNLISTEN,
    LISTEN."""

    # channel -> what it goes to: ring ids, and lists of ring ids for consumer groups
    routes: dict[str, list[int | list[int]]] = field(default_factory=dict)
    free: list[Sub] = field(default_factory=list)     # rings to free, after the routes
    # subscribes refused (dropped, among `free`): each answered with its error
    refuse: list[tuple[Sub, Exception]] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)     # rings that get Gap("reconnect")
    unlisten: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)   # then call listened(), or lost()
    listen_token: int = 0       # what to give listened() (or replayed()) for that LISTEN
    answer: list[Sub] = field(default_factory=list)   # subscribes to answer with their ring
    lost_stream: bool = False   # lost(): a working connection went (an outage begins)

    def __iadd__(self, other: Actions) -> Actions:
        self.routes.update(other.routes)
        self.free += other.free
        self.refuse += other.refuse
        self.gaps += other.gaps
        self.unlisten += [ch for ch in other.unlisten if ch not in self.unlisten]
        assert not (self.listen and other.listen), "one LISTEN per Actions"
        if other.listen:
            self.listen, self.listen_token = list(other.listen), other.listen_token
        self.answer += other.answer
        self.lost_stream = self.lost_stream or other.lost_stream
        return self


class Registry:
    def __init__(self, max_subscriptions_per_worker: int, max_channels_per_worker: int,
                 ids: Iterator[int] | None = None, listens: bool = True) -> None:
        self.max_subscriptions = max_subscriptions_per_worker
        # False: a source with no LISTEN (the WAL source), whose routes take effect as they
        # are set: what would be LISTENed is in place at once, and connected() is whole.
        self.listens = listens
        self.max_channels = max_channels_per_worker
        self.subs: dict[int, Sub] = {}
        self.routes: dict[str, list[int]] = {}      # channel -> subscription ids, in order
        self.listening: set[str] = set()            # LISTENs committed on the connection
        # LISTENs sent, not known committed yet: channel -> the token of the LISTEN that
        # counts (commands run in order, and an UNLISTEN or a later LISTEN of the channel
        # may follow one in flight: only the last one's answer says where it stands).
        self.requested: dict[str, int] = {}
        self._tokens = itertools.count(1)
        self.up = False          # connected and every LISTEN replayed: streams are whole
        self.was_up = False      # ... at least once: while not up now, this is an outage
        self._by_worker: dict[Hashable, dict[int, Sub]] = {}
        # Subscription ids (ring ids): a second registry (the WAL source's) shares them.
        self.ids = ids if ids is not None else itertools.count(1)

    # -- subscribing --------------------------------------------------------------------------

    def new(self, worker: Hashable, pid: int, req: Any, channels: Sequence[str],
            ring_bytes: int, overflow: str = "gap", group: str | None = None) -> Sub:
        """A subscription within the worker's limits, not recorded yet: make its ring, then
        add() it. Raises TooManySubscriptions past a limit, and changes nothing then."""
        held = self._by_worker.get(worker, {})
        if len(held) >= self.max_subscriptions:
            raise TooManySubscriptions(
                f"a worker process may hold at most {self.max_subscriptions} subscriptions "
                f"(Supervisor(max_subscriptions_per_worker=...)); unsubscribe some first")
        in_use = sum(len(sub.channels) for sub in held.values())
        if in_use + len(channels) > self.max_channels:
            raise TooManySubscriptions(
                f"a worker process may subscribe to at most {self.max_channels} channels in "
                f"all (Supervisor(max_channels_per_worker=...)); it holds {in_use} and asked "
                f"for {len(channels)} more")
        return Sub(next(self.ids), tuple(channels), worker, pid, ring_bytes, req, overflow,
                   group)

    def add(self, sub: Sub) -> Actions:
        """Record a subscription whose ring exists: route it, LISTEN what is new.

        During an outage, a subscription whose channels are all wanted already (they will be
        replayed) is answered at once, so that a worker does not wait on an unreachable
        server: its stream begins with the reconnect gap that its neighbours on those channels
        got when the connection went. Any other waits for its LISTEN, as always."""
        act = Actions()
        if self.was_up and not self.up and all(ch in self.routes for ch in sub.channels):
            sub.answered = True
            act.gaps = [sub.id]
            act.answer = [sub]
        self.subs[sub.id] = sub
        self._by_worker.setdefault(sub.worker, {})[sub.id] = sub
        for channel in sub.channels:
            self.routes.setdefault(channel, []).append(sub.id)
            act.routes[channel] = self.entries(channel)
        if self.up:
            self._request(act, [ch for ch in sub.channels
                                if ch not in self.listening and ch not in self.requested])
            act.answer = self._answerable()
        return act

    def _request(self, act: Actions, channels: list[str]) -> None:
        """LISTEN `channels` (if any), under a new token."""
        if not self.listens:
            self.listening.update(channels)
            return
        if channels:
            act.listen = channels
            act.listen_token = next(self._tokens)
            for ch in channels:
                self.requested[ch] = act.listen_token

    def _answered(self, channels: Sequence[str], token: int) -> list[str]:
        """The channels whose standing the LISTEN `token` decides: its last command."""
        mine = [ch for ch in channels if self.requested.get(ch) == token]
        for ch in mine:
            del self.requested[ch]
        return mine

    def listened(self, channels: Sequence[str], token: int) -> Actions:
        """The LISTENs of `channels` (Actions.listen_token `token`) are committed: answer
        what waited for them."""
        self.listening.update(ch for ch in self._answered(channels, token)
                              if ch in self.routes)
        return Actions(answer=self._answerable())

    def refused(self, channels: Sequence[str], token: int) -> None:
        """The server refused the LISTENs of `channels` (none took effect)."""
        self._answered(channels, token)

    def _answerable(self) -> list[Sub]:
        if not self.up:
            return []
        ready = [sub for sub in self.subs.values()
                 if not sub.answered and self.listening.issuperset(sub.channels)]
        for sub in ready:
            sub.answered = True
        return ready

    def entries(self, channel: str) -> list[int | list[int]]:
        """What the dispatcher routes `channel` to, in subscription order: each ring id, and
        for a consumer group (the same group name on the same channels) the list of its
        members' ring ids, at the place of its first member."""
        out: list[int | list[int]] = []
        groups: dict[tuple[tuple[str, ...], str], list[int]] = {}
        for sub_id in self.routes.get(channel, []):
            sub = self.subs[sub_id]
            if sub.group is None:
                out.append(sub_id)
                continue
            key = (tuple(sorted(sub.channels)), sub.group)
            if key in groups:
                groups[key].append(sub_id)
            else:
                groups[key] = [sub_id]
                out.append(groups[key])
        return out

    # -- unsubscribing ------------------------------------------------------------------------

    def unsubscribe(self, worker: Hashable, sub_id: Any) -> Actions:
        sub = self._by_worker.get(worker, {}).get(sub_id) if isinstance(sub_id, int) else None
        if sub is None:
            raise KeyError(f"no subscription {sub_id!r} for this worker")
        return self._drop(sub)

    def cancel(self, worker: Hashable, req: Any) -> tuple[Sub | None, Actions]:
        """The worker gave up waiting for subscribe `req`: the subscription, if still
        unanswered, and what dropping it takes."""
        for sub in self._by_worker.get(worker, {}).values():
            if not sub.answered and sub.req == req:
                return sub, self._drop(sub)
        return None, Actions()

    def worker_gone(self, worker: Hashable) -> Actions:
        act = Actions()
        for sub in sorted(self._by_worker.get(worker, {}).values(), key=lambda s: s.id):
            sub.died = True
            act += self._drop(sub)
        self._by_worker.pop(worker, None)
        return act

    def _drop(self, sub: Sub) -> Actions:
        del self.subs[sub.id]
        del self._by_worker[sub.worker][sub.id]
        act = Actions(free=[sub])
        for channel in sub.channels:
            ids = self.routes[channel]
            ids.remove(sub.id)
            act.routes[channel] = self.entries(channel)
            if not ids:
                del self.routes[channel]
                if channel in self.listening or channel in self.requested:
                    self.listening.discard(channel)
                    self.requested.pop(channel, None)
                    if self.listens:
                        act.unlisten.append(channel)
        return act

    # -- the connection -----------------------------------------------------------------------

    def lost(self) -> Actions:
        """The connection is gone. Every stream that may have received something on it gets a
        gap at the place it was lost: each one with a channel LISTENed, or whose LISTEN was
        sent (the server may deliver before its answer arrives). That is every stream when a
        working connection goes, and during a replay that fails, those it reached (the
        dispatcher writes no second gap where nothing came after the first)."""
        act = Actions(lost_stream=self.up)
        began = self.listening | set(self.requested)
        act.gaps = [sub.id for sub in self.subs.values() if not began.isdisjoint(sub.channels)]
        self.up = False
        self.listening.clear()
        self.requested.clear()
        return act

    def connected(self) -> Actions:
        """A new connection: LISTEN every routed channel, then call replayed(). A registry
        that does not listen is whole at once: what replayed() does is done here."""
        act = Actions()
        self._request(act, sorted(self.routes))
        if not self.listens:
            return self.replayed([], 0)
        return act

    def replayed(self, channels: Sequence[str], token: int) -> Actions:
        """Every LISTEN of connected() is committed: streams are whole again. Channels that
        subscriptions made during the replay want are LISTENed now."""
        self.up = self.was_up = True
        act = self.listened(channels, token)
        self._request(act, [ch for ch in self.routes
                            if ch not in self.listening and ch not in self.requested])
        return act

    # -- what stats() shows -------------------------------------------------------------------

    def unanswered(self) -> list[Sub]:
        """Subscriptions still waiting for their answer."""
        return [sub for sub in self.subs.values() if not sub.answered]

    def workers(self) -> int:
        return len(self._by_worker)

    def held_by(self, worker: Hashable) -> list[Sub]:
        return list(self._by_worker.get(worker, {}).values())
