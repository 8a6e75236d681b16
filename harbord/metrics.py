"""The request path's metrics: plain integers and histograms, bumped once per request.

`Metrics.observe` is called once per finished request from `Ledger.close`;
`exposition.py` turns these, and the live backend state, into Prometheus metric
families when `/metrics` is read. So the hot path pays nothing for the format,
and the daemon does not import prometheus_client until the first scrape.
"""

from __future__ import annotations

import bisect
import collections

from harbord.schemas import Decision

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
