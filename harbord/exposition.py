"""Prometheus exposition: the metrics and the live backend state as metric families.

Imported when `/metrics` is first read (harbor_api), so prometheus_client costs
nothing at start-up. The request path only bumps plain integers (metrics.py);
a custom collector turns them into the library's families at scrape time.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from harbord.harbor import Harbor


class HarborCollector(Collector):
    def __init__(self, harbor: Harbor) -> None:
        self.harbor = harbor

    def collect(self) -> Iterator[Metric]:
        harbor, metrics = self.harbor, self.harbor.ledger.metrics
        requests = CounterMetricFamily(
            "harbor_requests",
            "Routed requests by serving backend, intent and outcome",
            labels=["backend", "intent", "outcome"],
        )
        for request_labels, count in sorted(metrics.requests.items()):
            requests.add_metric(list(request_labels), count)
        yield requests

        fallbacks = CounterMetricFamily(
            "harbor_fallbacks",
            "Failed attempts after which another backend was tried",
            labels=["backend", "error_class"],
        )
        errors = CounterMetricFamily(
            "harbor_backend_errors",
            "Failed attempts by backend and error class",
            labels=["backend", "error_class"],
        )
        for family, counter in ((fallbacks, metrics.fallbacks), (errors, metrics.errors)):
            for pair, count in sorted(counter.items()):
                family.add_metric(list(pair), count)
            yield family

        rules = CounterMetricFamily(
            "harbor_decisions",
            "Routing decisions by the placement rule that decided them",
            labels=["rule"],
        )
        for rule, count in sorted(metrics.rules.items()):
            rules.add_metric([rule], count)
        yield rules

        pins_set = CounterMetricFamily("harbor_pins_set", "Pins set, by source", labels=["source"])
        for pin_source, count in sorted(harbor.state.pins_set.items()):
            pins_set.add_metric([pin_source], count)
        yield pins_set

        now = time.time()
        pins = GaugeMetricFamily("harbor_pins", "Active pins by backend", labels=["backend"])
        per_backend = collections.Counter(
            p.backend for p in harbor.state.pins.values() if p.active(now)
        )
        for name in harbor.backends:
            pins.add_metric([name], per_backend.get(name, 0))
        yield pins

        gauges: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "in_flight": GaugeMetricFamily(
                "harbor_in_flight", "Requests in flight to a backend", labels=["backend"]
            ),
            "queued": GaugeMetricFamily(
                "harbor_queued", "Requests waiting for a backend slot", labels=["backend"]
            ),
            "up": GaugeMetricFamily(
                "harbor_backend_up",
                "1 when the backend answers its probe and is not cooling down",
                labels=["backend"],
            ),
            "restarts": CounterMetricFamily(
                "harbor_unit_restarts",
                "Restarts of the backend's unit done by harbord",
                labels=["backend"],
            ),
            "systemd_restarts": GaugeMetricFamily(
                "harbor_unit_nrestarts",
                "systemd's NRestarts of the backend's unit",
                labels=["backend"],
            ),
        }
        health = GaugeMetricFamily(
            "harbor_backend_health", "Backend health, one-hot", labels=["backend", "state"]
        )
        for backend in harbor.backends.values():
            label = [backend.name]
            gauges["in_flight"].add_metric(label, backend.in_flight)
            gauges["queued"].add_metric(label, backend.limiter.queued)
            up = backend.health in ("up", "degraded") and not backend.cooldown
            gauges["up"].add_metric(label, 1 if up else 0)
            for state in ("unknown", "up", "degraded", "down"):
                health.add_metric([backend.name, state], 1 if backend.health == state else 0)
            unit = backend.unit_status
            gauges["restarts"].add_metric(label, unit.harbor_restarts if unit else 0)
            gauges["systemd_restarts"].add_metric(label, unit.n_restarts if unit else 0)
        yield from gauges.values()
        yield health

        # Residency (issue 16): model loads and evictions seen per backend and model.
        loads = CounterMetricFamily(
            "harbor_model_loads",
            "Model loads seen on a backend (answers that loaded the model)",
            labels=["backend", "model"],
        )
        evictions = CounterMetricFamily(
            "harbor_model_evictions",
            "Models a backend unloaded before their keep_alive ran out (evicted)",
            labels=["backend", "model"],
        )
        for backend in harbor.backends.values():
            for model, count in sorted(backend.residency.loads.items()):
                loads.add_metric([backend.name, model], count)
            for model, count in sorted(backend.residency.evictions.items()):
                evictions.add_metric([backend.name, model], count)
        yield loads
        yield evictions

        histograms = (
            (
                "harbor_time_to_first_byte_seconds",
                metrics.ttfb,
                "Time from request to the first byte relayed to the client",
            ),
            ("harbor_request_duration_seconds", metrics.duration, "Whole request duration"),
        )
        for metric_name, source, help_text in histograms:
            histogram_family = HistogramMetricFamily(metric_name, help_text, labels=["backend"])
            for backend_name, histogram in sorted(source.items()):
                histogram_family.add_metric([backend_name], histogram.buckets(), histogram.total)
            yield histogram_family

        yield GaugeMetricFamily(
            "harbor_uptime_seconds", "Seconds since harbord started", value=now - harbor.started_at
        )


def registry_for(harbor: Harbor) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HarborCollector(harbor))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
