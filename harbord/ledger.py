"""The request ledger: one Decision per request, and everything derived from it.

A routed or model-management request opens its Decision when it arrives
(`accounted` does it for a handler) and closes it when its answer is done, or
refused, or the client left. Closing is the one place where the counters, the
Prometheus metrics, the recent decisions (`harborctl explain`) and the log line
are updated; the rest of the request path only fills the Decision in.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from harbord.errors import Problem
from harbord.metrics import Metrics
from harbord.schemas import Counters, Decision

log = logging.getLogger("harbord.relay")  # the one line per request, where it always was

DECISIONS_KEPT = 500
_request_ids = itertools.count(1)
_request_id_prefix = f"{os.getpid():x}"


def new_request_id() -> str:
    """Short, unique within this daemon's life, and cheap."""
    return f"{_request_id_prefix}-{next(_request_ids):x}"


class Ledger:
    def __init__(self) -> None:
        self.counters = Counters()
        self.metrics = Metrics()
        self.decisions: collections.OrderedDict[str, Decision] = collections.OrderedDict()
        self.in_flight = 0
        self._started: dict[str, float] = {}  # request id -> monotonic start

    def open(self, request: web.Request) -> Decision:
        decision = Decision(
            id=new_request_id(), time=time.time(), method=request.method, path=request.path
        )
        self._started[decision.id] = time.monotonic()
        self.in_flight += 1
        return decision

    def close(self, decision: Decision) -> None:
        self.in_flight -= 1
        started = self._started.pop(decision.id, None)
        if started is not None:
            decision.duration_ms = round((time.monotonic() - started) * 1000, 3)
        counters = self.counters
        counters.requests += 1
        attempts = decision.attempts
        counters.fallbacks += sum(
            1 for a in attempts[:-1] if a.outcome == "failed" and not a.after_first_byte
        )
        served_by = decision.served_by
        if served_by is not None:
            counters.served += 1
            counters.by_backend[served_by] = counters.by_backend.get(served_by, 0) + 1
        status = decision.status
        if status >= 500 or any(a.after_first_byte for a in attempts):
            counters.failed += 1
        elif status >= 400:
            counters.client_errors += 1
        self.metrics.observe(decision)
        self.decisions[decision.id] = decision
        if len(self.decisions) > DECISIONS_KEPT:
            self.decisions.popitem(last=False)
        _log(decision)


AccountedHandler = Callable[[web.Request, Decision], Awaitable[web.StreamResponse]]


def accounted(
    ledger_of: Callable[[web.Request], Ledger], handler: AccountedHandler
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler, with its request's Decision opened before and closed after."""

    async def serve(request: web.Request) -> web.StreamResponse:
        ledger = ledger_of(request)
        decision = ledger.open(request)
        try:
            response = await handler(request, decision)
        except Problem as problem:
            decision.status, decision.error = problem.status, problem.message
            problem.headers.setdefault("X-Harbor-Request-Id", decision.id)
            raise
        else:
            decision.status = decision.status or response.status
            return response
        finally:
            ledger.close(decision)

    return serve


def _log(d: Decision) -> None:
    """The one line per request: who asked for what, the plan, who served, what failed."""
    if not log.isEnabledFor(logging.INFO):
        return
    failed = [f"{a.backend}={a.error_class}" for a in d.attempts if a.outcome == "failed"]
    log.info(
        "%s %s %s model=%s intent=%s plan=%s served=%s%s status=%s %.1fms%s",
        d.id,
        d.method,
        d.path,
        d.model,
        d.intent,
        ">".join(d.plan.backends) if d.plan is not None else "-",
        d.served_by or "-",
        f" fallbacks={','.join(failed)}" if failed else "",
        d.status or "client-gone",
        d.duration_ms,
        f" error={d.error!r}" if d.error else "",
    )
