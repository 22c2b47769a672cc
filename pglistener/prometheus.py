"""A Prometheus collector for a Supervisor (needs prometheus-client: pglistener[prometheus]).

    from prometheus_client import REGISTRY
    REGISTRY.register(SupervisorCollector(sup))

Every scrape asks the supervisor for stats() once; the figures are those of stats().
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import SupervisorGone
from .supervisor import Supervisor


class SupervisorCollector(Collector):
    def __init__(self, supervisor: Supervisor, prefix: str = "pglistener") -> None:
        self.supervisor = supervisor
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        try:
            s = self.supervisor.stats()
        except (SupervisorGone, TimeoutError):
            yield GaugeMetricFamily(f"{p}_up", "1 while the supervisor listens", value=0)
            return
        yield GaugeMetricFamily(f"{p}_up", "1 while the supervisor listens",
                                value=1 if s.state == "listening" else 0)
        yield CounterMetricFamily(f"{p}_reconnects", "Outages of a working connection",
                                  value=s.reconnects)
        yield CounterMetricFamily(f"{p}_outage_seconds", "Time spent not listening",
                                  value=s.outage_seconds)
        yield CounterMetricFamily(f"{p}_received", "Notifications taken off the connection",
                                  value=s.received)
        yield CounterMetricFamily(f"{p}_unrouted",
                                  "Notifications on channels nobody subscribes to",
                                  value=s.unrouted)
        yield GaugeMetricFamily(f"{p}_workers", "Connected worker processes", value=s.workers)
        if s.queue_usage is not None:
            yield GaugeMetricFamily(f"{p}_server_queue_usage",
                                    "pg_notification_queue_usage() of the server, 0 to 1",
                                    value=s.queue_usage)
        labels = ["channels", "pid", "subscription"]
        delivered = CounterMetricFamily(f"{p}_reader_delivered",
                                        "Notifications written into a reader's ring",
                                        labels=labels)
        missed = CounterMetricFamily(f"{p}_reader_missed",
                                     "Notifications a reader missed (overflow gaps)",
                                     labels=labels)
        lag = GaugeMetricFamily(f"{p}_reader_lag_bytes", "Bytes written and not read yet",
                                labels=labels)
        fill = GaugeMetricFamily(f"{p}_reader_ring_fill", "How full a reader's ring is, 0 to 1",
                                 labels=labels)
        for r in s.readers:
            values = [",".join(r.channels), str(r.pid), str(r.subscription)]
            delivered.add_metric(values, r.delivered)
            missed.add_metric(values, r.missed)
            lag.add_metric(values, r.lag_bytes)
            fill.add_metric(values, r.fill)
        yield from (delivered, missed, lag, fill)
