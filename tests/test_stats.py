"""Supervisor.stats() and its Prometheus collector, on a real server."""

from __future__ import annotations

import os

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Supervisor
from pglistener.prometheus import SupervisorCollector


def test_stats_follow_delivery_lag_overflow_and_outages(dsn: str,
                                                         conn: psycopg.Connection) -> None:
    with Supervisor(dsn, ring_bytes=16 * 1024).start() as sup:
        s = sup.stats()
        assert s.state == "listening"
        assert s.backend_pid == sup.backend_pid
        assert (s.reconnects, s.readers) == (0, ())
        assert s.queue_usage is not None and 0.0 <= s.queue_usage < 0.01
        assert s.outage_seconds == 0.0      # connecting at start is not an outage
        assert (s.connected, s.subscriptions, s.channels) == (True, 0, ())

        sub = sup.worker().subscribe("st", timeout=30)
        s = sup.stats()
        assert (s.subscriptions, s.channels, s.workers) == (1, ("st",), 1)
        notify(conn, "st", [f"{i:04d}" for i in range(100)])
        wait_for(lambda: sup.stats().readers[0].delivered == 100, "delivery")
        (r,) = sup.stats().readers
        assert (r.channels, r.pid, r.ring_bytes, r.missed) == (("st",), os.getpid(), 16384, 0)
        assert r.lag_bytes == 100 * 24 and r.fill == r.lag_bytes / 16384   # 16 + 2 + 4, to 8
        sub.get_many(100, timeout=30)
        assert sup.stats().readers[0].lag_bytes == 0

        notify(conn, "st", [f"{i:04d}" for i in range(1000)])       # 24 KB into 16 KiB
        wait_for(lambda: sup.stats().received == 1100, "the flood")
        (r,) = sup.stats().readers
        assert r.missed > 0 and r.delivered + r.missed == 1100
        assert r.fill > 0.9

        old = sup.backend_pid
        before = sup.stats().outage_seconds
        conn.execute("SELECT pg_terminate_backend(%s)", (old,))
        wait_for(lambda: sup.stats().backend_pid not in (None, old), "the reconnect")
        s = sup.stats()
        assert (s.state, s.reconnects, s.last_error) == ("listening", 1, None)
        assert 0.0 < s.outage_seconds - before < 30
        sub.unsubscribe()
        assert sup.stats().readers == ()


def test_prometheus_collector_exposes_the_same_figures(dsn: str,
                                                       conn: psycopg.Connection) -> None:
    with Supervisor(dsn).start() as sup:
        sub = sup.worker().subscribe("prom", timeout=30)
        notify(conn, "prom", ["a", "b", "c"])
        wait_for(lambda: sup.stats().received == 3, "delivery")
        registry = CollectorRegistry()
        registry.register(SupervisorCollector(sup))
        samples = {(s.name, s.labels.get("channels")): s.value
                   for family in text_string_to_metric_families(generate_latest(registry)
                                                                .decode())
                   for s in family.samples}
        assert samples[("pglistener_up", None)] == 1
        assert samples[("pglistener_received_total", None)] == 3
        assert samples[("pglistener_reconnects_total", None)] == 0
        assert samples[("pglistener_reader_delivered_total", "prom")] == 3
        assert samples[("pglistener_reader_missed_total", "prom")] == 0
        assert samples[("pglistener_reader_lag_bytes", "prom")] > 0
        assert 0 <= samples[("pglistener_server_queue_usage", None)] < 0.01
        sub.unsubscribe()
    # A stopped supervisor scrapes as down, not as an error.
    assert b"pglistener_up 0.0" in generate_latest(registry)
