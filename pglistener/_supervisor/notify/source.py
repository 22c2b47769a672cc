"""The NOTIFY source: LISTEN/NOTIFY on the LISTEN connection (a plain one, listen.py's
shell), its notifications decoded by decoder.pyx on the dispatch core."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..._core.dispatch import Dispatcher, PGConnection
from ..connection import Phase
from ..listen import ListenConnection
from ..registry import Actions, Registry
from ..source import Host, Rows, Source, timing
from .decoder import NotifyDispatcher

log = logging.getLogger("pglistener.supervisor")


class NotifySource(Source):
    """LISTEN/NOTIFY: its routes take effect once the server LISTENs (at commit)."""

    name = "notify"

    def __init__(self, server: Host) -> None:
        super().__init__(server)
        config = self.config
        self.dispatcher = NotifyDispatcher()
        self.dispatcher.block_timeout = config.block_timeout
        self.expiries_logged = 0
        self.registry = Registry(config.max_subscriptions_per_worker,
                                 config.max_channels_per_worker, ids=server.ids)
        self.shell = ListenConnection(config.conninfo, config.safe_target, timing(config),
                                      self.dispatcher, time.monotonic(), self._on_connected,
                                      self._on_down)

    def lends(self) -> ListenConnection:
        return self.shell           # the LISTEN connection: plain, on the DSN's server

    def polled(self) -> tuple[Dispatcher, PGConnection | None, bool]:
        disp = self.dispatcher
        if disp.block_expiries != self.expiries_logged:
            if not self.expiries_logged:
                log.warning("a subscription with overflow='block' held the connection for "
                            "block_timeout (%g s): it misses what does not fit (an overflow "
                            "Gap counts it) until it makes room; said once",
                            self.config.block_timeout)
            self.expiries_logged = disp.block_expiries
        return super().polled()

    def _on_connected(self) -> None:
        """A new connection: LISTEN every wanted channel and sample the queue, then check
        that the server listens on exactly those (a query of its own: a LISTEN takes effect
        at commit, after the statements of its query string); then streams are whole."""
        act = self.registry.connected()
        wanted, token = act.listen, act.listen_token
        replay = ([listen_sql("LISTEN", wanted)] if wanted else []) + [self.shell.heartbeat]
        self.shell.query(b"; ".join(replay), lambda results, error:
                         self._on_replay_listened(wanted, token, results, error))
        self.shell.query(b"SELECT pg_listening_channels()", lambda results, error:
                         self._on_replayed(wanted, token, results, error))
        for source in self.server.sources.values():
            if source is not self:
                source.query_connected()

    def _on_replay_listened(self, wanted: list[str], token: int, results: Rows,
                            error: str | None) -> None:
        if error is not None:
            self.registry.refused(wanted, token)    # nothing took effect (one transaction)
            self.shell.lose_now(f"LISTEN replay failed: {error}")
            return
        self.shell.sample_queue(results)    # the replay ends with the heartbeat's query

    def _on_replayed(self, wanted: list[str], token: int, results: Rows,
                     error: str | None) -> None:
        if error is not None:
            self.shell.lose_now(f"LISTEN replay failed: {error}")
            return
        actual = {bytes(row[0] or b"").decode() for rows in results for row in rows}
        if actual != set(wanted):
            self.shell.lose_now(
                f"LISTEN replay failed: server listens on {len(actual)} channels, expected "
                f"{len(wanted)}: missing {sorted(set(wanted) - actual)[:5]}, unexpected "
                f"{sorted(actual - set(wanted))[:5]}")
            return
        self.shell.ready(time.monotonic())
        self.apply(self.registry.replayed(wanted, token))

    def _on_down(self, cause: str) -> None:
        """The connection is gone: the streams it fed get a Gap, then we reconnect."""
        self.apply(self.registry.lost())
        for source in self.server.sources.values():
            if source is not self:
                source.query_lost()

    def apply(self, act: Actions) -> None:
        super().apply(act)
        if self.shell.conn is None:
            return
        if act.unlisten:
            self.shell.query(listen_sql("UNLISTEN", act.unlisten),
                             lambda _results, error: self._on_unlistened(error))
        if act.listen:
            channels, token = act.listen, act.listen_token
            self.shell.query(listen_sql("LISTEN", channels),
                             lambda _results, error: self._on_listened(channels, token, error))

    def _on_listened(self, channels: list[str], token: int, error: str | None) -> None:
        if error is not None:
            self.registry.refused(channels, token)  # nothing can have come through
            self.shell.lose_now(f"LISTEN failed: {error}")
            return
        self.apply(self.registry.listened(channels, token))

    def _on_unlistened(self, error: str | None) -> None:
        if error is not None:
            self.shell.lose_now(f"UNLISTEN failed: {error}")

    def state(self) -> dict[str, Any]:
        return {"connected": self.registry.up, "last_error": self.shell.machine.last_error}

    def stats(self, fields: dict[str, Any]) -> None:
        machine = self.shell.machine
        up = self.registry.up
        if up:
            state = "listening"
        else:
            state = "disconnected" if machine.phase is Phase.BACKOFF else "connecting"
        fields.update(
            state=state,
            backend_pid=self.shell.conn.backend_pid if up and self.shell.conn else None,
            last_error=machine.last_error,
            last_error_permanent=self.shell.last_error_permanent,
            reconnects=machine.reconnects,
            received=self.dispatcher.received,
            unrouted=self.dispatcher.unrouted,
            outage_seconds=machine.outage_seconds(time.monotonic()),
            queue_usage=self.shell.queue_usage,
            held_seconds=self.dispatcher.held_seconds)


def listen_sql(verb: str, channels: list[str]) -> bytes:
    """LISTEN or UNLISTEN of every channel, in one round trip. Names are quoted as
    identifiers, as PQescapeIdentifier does for UTF-8 (the connection's encoding): between
    double quotes, a double quote doubled. channel_bytes() has refused NUL and bad UTF-8."""
    return "; ".join(f'{verb} "{ch.replace(chr(34), chr(34) * 2)}"' for ch in channels).encode()
