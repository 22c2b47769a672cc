"""A Prometheus collector for a Supervisor (needs prometheus-client: pglistener[prometheus]).

    from prometheus_client import REGISTRY
    REGISTRY.register(SupervisorCollector(sup))

Every scrape asks the supervisor for stats() once. Every field of Stats and ReaderStats is
exported, as its declaration in stats.py says: counters (`_total`), gauges, strings as a gauge
of 1 labelled with the value (`pglistener_state{state="listening"} 1`), the channel list as its
length; per reader, labelled by subscription, pid, channels, group and overflow policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import SupervisorGone
from .stats import COUNTER, INFO, LABEL, SIZE, ReaderStats, Stats
from .supervisor import Supervisor


def _family(name: str, kind: str, help: str, labels: list[str]
            ) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == COUNTER:
        return CounterMetricFamily(name, help, labels=labels)
    return GaugeMetricFamily(name, help, labels=labels)


def _value(kind: str, value: Any) -> float | None:
    if value is None:
        return None
    if kind == SIZE:
        return float(len(value))
    return float(value)


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
                                value=1 if s.connected else 0)
        for f in dataclasses.fields(Stats):
            kind = f.metadata.get("kind")
            if kind is None:
                continue        # readers: below
            value = getattr(s, f.name)
            name = f"{p}_{f.metadata['name'] or f.name}"
            if kind == INFO:
                info = GaugeMetricFamily(name, f.metadata["help"], labels=[f.name])
                if value is not None:
                    info.add_metric([str(value)], 1)
                yield info
                continue
            family = _family(name, kind, f.metadata["help"], [])
            number = _value(kind, value)
            if number is not None:
                family.add_metric([], number)
                yield family
        yield from self._readers(s.readers)

    def _readers(self, readers: tuple[ReaderStats, ...]) -> Iterator[Metric]:
        p = self.prefix
        fields = dataclasses.fields(ReaderStats)
        labels = [f for f in fields if f.metadata["kind"] == LABEL]
        names = [f.metadata["label"] for f in labels]
        families = {f.name: _family(f"{p}_reader_{f.name}", f.metadata["kind"],
                                    f.metadata["help"], names)
                    for f in fields if f.metadata["kind"] != LABEL}
        fill = GaugeMetricFamily(f"{p}_reader_ring_fill", "How full a reader's ring is, 0 to 1",
                                 labels=names)
        for r in readers:
            values = [_label(getattr(r, f.name)) for f in labels]
            for name, family in families.items():
                family.add_metric(values, float(getattr(r, name)))
            fill.add_metric(values, r.fill)
        yield from families.values()
        yield fill


def _label(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)
