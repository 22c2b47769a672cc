"""Supervisor.stats() and its Prometheus collector, on a real server."""

from __future__ import annotations

import os

import psycopg
from fix_cluster import Cluster
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fix_pg import notify
from fix_supervisor import wait_for
from pglistener import Supervisor
from pglistener.prometheus import SupervisorCollector


def test_stats_follow_delivery_lag_overflow_and_outages(dsn: str,
                                                         conn: psycopg.Connection) -> None:
    with Supervisor(dsn, ring_bytes=16 * 1024).start() as sup:
        s = sup.wait_connected()
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


def test_every_figure_reaches_stats_and_prometheus(logical_cluster: Cluster) -> None:
    """The schema is the dataclasses: the supervisor's reply has every field, and the
    collector exports every one (per reader, labelled by channels, group, policy and
    source). With both sources, so that none is left unknown."""
    import dataclasses

    from pglistener.stats import COUNTER, INFO, LABEL, ReaderStats, Stats

    dsn = logical_cluster.dsn
    with Supervisor(dsn, slot="stats_schema", liveness_timeout=1.5).start() as sup, \
            psycopg.connect(dsn, autocommit=True) as conn:
        sup.wait_connected()
        worker = sup.worker()
        plain = worker.subscribe("schema", timeout=30)
        member = worker.subscribe("schema", group="g", overflow="block", timeout=30)
        wal = worker.subscribe("schema", source="wal", timeout=30)
        notify(conn, "schema", ["a", "b"])
        conn.execute("SELECT pg_logical_emit_message(true, 'schema', 'w')")
        wal.get(timeout=30)
        wait_for(lambda: sup.stats().received == 2, "delivery")
        wait_for(lambda: sup.stats().slot_lag_bytes is not None, "the slot's WAL sampled")
        wait_for(lambda: sup.stats().wal_confirmed_lsn > 0, "the slot confirmed")
        s = sup.stats()
        assert (s.workers, s.connections, s.subscriptions) == (1, 1, 3)
        assert (s.slot, s.wal_state, s.wal_received) == ("stats_schema", "streaming", 1)
        registry = CollectorRegistry()
        registry.register(SupervisorCollector(sup))
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest(registry).decode())}
        for f in dataclasses.fields(Stats):
            if f.name == "readers":
                continue
            name = f"pglistener_{f.metadata['name'] or f.name}"
            assert name in families, f"Stats.{f.name} is not exported"
            family = families[name]
            assert family.type == ("counter" if f.metadata["kind"] == COUNTER else "gauge")
            if f.metadata["kind"] == INFO and getattr(s, f.name) is not None:
                assert family.samples[0].labels == {f.name: getattr(s, f.name)}
        assert families["pglistener_state"].samples[0].labels == {"state": "listening"}
        assert families["pglistener_channels"].samples[0].value == 1
        assert families["pglistener_connections"].samples[0].value == 1
        labels = {f.metadata["label"] for f in dataclasses.fields(ReaderStats)
                  if f.metadata["kind"] == LABEL}
        assert labels == {"subscription", "channels", "pid", "policy", "group", "source"}
        for f in dataclasses.fields(ReaderStats):
            if f.metadata["kind"] == LABEL:
                continue
            family = families[f"pglistener_reader_{f.name}"]
            by_kind = {(sample.labels["policy"], sample.labels["source"]): sample
                       for sample in family.samples}
            assert set(by_kind) == {("gap", "notify"), ("block", "notify"), ("gap", "wal")}, \
                f"ReaderStats.{f.name} is not exported"
            assert by_kind["block", "notify"].labels["group"] == "g"
            assert by_kind["gap", "notify"].labels["group"] == ""
            assert by_kind["gap", "notify"].labels["channels"] == "schema"
        delivered = {(x.labels["policy"], x.labels["source"]): x.value
                     for x in families["pglistener_reader_delivered"].samples}
        assert delivered == {("gap", "notify"): 2, ("block", "notify"): 2, ("gap", "wal"): 1}
        plain.unsubscribe()
        member.unsubscribe()
        wal.unsubscribe()
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_replication_slots WHERE "
                                      "slot_name = 'stats_schema' AND active").fetchone() == (0,),
                 "the slot released")
        conn.execute("SELECT pg_drop_replication_slot('stats_schema')")
