"""Prometheus metrics, rendered by prometheus_client at scrape time.

The request path only bumps plain integers (`Metrics.observe`, called once
per finished request from `Ledger.close`); a custom collector turns them,
and the live backend state, into metric families when `/metrics` is read.
So the exposition format is the library's, and the hot path pays nothing
for it.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from harbord.schemas import Decision

if TYPE_CHECKING:
    from harbord.harbor import Harbor

# Seconds: a warm token arrives in milliseconds, a cold CPU load takes minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Metrics:
    def __init__(self) -> None:
        # (backend or "none", intent, outcome) -> count
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # (backend that failed, error class) -> count, for failures another backend followed
        self.fallbacks: collections.Counter[tuple[str, str]] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()
        # The placement rule that decided each plan (Plan.rule) -> count.
        self.rules: collections.Counter[str] = collections.Counter()
        self.ttfb: collections.defaultdict[str, Histogram] = collections.defaultdict(Histogram)
        self.duration: collections.defaultdict[str, Histogram] = collections.defaultdict(Histogram)

    def observe(self, decision: Decision) -> None:
        status = decision.status
        outcome = (
            "served"
            if decision.served_by and status < 400
            else ("client_error" if 400 <= status < 500 else "failed")
        )
        self.requests[(decision.served_by or "none", decision.intent or "none", outcome)] += 1
        plan = decision.plan
        if plan is not None:  # None: refused before a plan was made
            self.rules[plan.rule] += 1
        attempts = decision.attempts
        for index, attempt in enumerate(attempts):
            if attempt.outcome == "failed":
                key = (attempt.backend, attempt.error_class or "other")
                self.errors[key] += 1
                if index + 1 < len(attempts):
                    self.fallbacks[key] += 1
        if decision.served_by:
            if decision.first_byte_ms is not None:
                self.ttfb[decision.served_by].observe(decision.first_byte_ms / 1000)
            self.duration[decision.served_by].observe(decision.duration_ms / 1000)


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
