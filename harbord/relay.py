"""Carry one request through its plan: try backends in order, relay the answer.

Rules this module keeps:
- A backend is retried only while nothing has reached the client. The first
  line (or the whole body of a non-streaming answer) is read before the
  client's response starts, so an error the backend writes as its first line,
  or a stream that ends inside it, can still move the request on. A streamed
  request body (a blob upload) is never sent twice.
- There is no overall deadline: only connect, first-byte and idle-between-
  chunks timeouts, because a heavy answer on the CPU may take many minutes.
- When the client goes away, the upstream connection is closed at once, so
  Ollama stops generating.
- What a request did is written into its Decision (attempts, who served); the
  ledger derives counters and metrics from it when the request is done.
- The relay decides nothing: it executes the plan, takes its slots from the
  scheduler, and reports each attempt's outcome there (learning.py says what it
  teaches: pins, health, service and load times, residency).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Mapping

from aiohttp import web
from multidict import CIMultiDict

from harbord import failures as fail
from harbord.backends import Backend
from harbord.classify import classify, error_text, is_retryable
from harbord.failures import Failure
from harbord.learning import NOT_A_LOAD, Outcome, load_duration_ms
from harbord.scheduler import Scheduler
from harbord.schemas import Attempt, Decision, Plan
from harbord.stream import (
    MAX_LINE,
    STREAM_TYPES,
    first_line,
    is_json,
    looks_like_error,
    relay_stream,
)
from harbord.upstream import Exchange, Pools, UpstreamError

log = logging.getLogger(__name__)

# Request headers that describe this hop or are ours, not the backend's.
_DROP_REQUEST = frozenset(
    h.lower()
    for h in (
        "Host",
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Transfer-Encoding",
        "TE",
        "Upgrade",
        "Content-Length",
        "Accept-Encoding",
        "X-Harbor-Intent",
        "X-Harbor-Backend",
        "Authorization",
    )
)
_DROP_RESPONSE = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Date", "Server")
)

Body = bytes | AsyncIterable[bytes]


def upstream_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _DROP_REQUEST)


class Relay:
    def __init__(self, scheduler: Scheduler, upstreams: Pools) -> None:
        self.scheduler = scheduler  # slots, and where outcomes are reported
        self.upstreams = upstreams  # the request path's connections

    async def run(
        self,
        request: web.Request,
        plan: Plan,
        body: Body,
        decision: Decision,
        content_length: int | None = None,
        answer_as_is: bool = False,
    ) -> web.StreamResponse:
        """The first answer a backend of the plan gives; raises a Problem when none does.

        With `answer_as_is` (pass-through), a backend's own 4xx answer, a 404 included,
        is the client's answer: no other backend is tried after it."""
        decision.plan, decision.model, decision.intent = plan, plan.model, plan.intent
        backends = self.scheduler.backends
        headers = upstream_headers(request.headers)
        failures: list[tuple[str, Failure]] = []
        for step in plan.steps:
            backend = backends.get(step.backend)
            if backend is None:
                continue
            started = time.monotonic()
            outcome = await self._attempt(
                request, backend, headers, body, content_length, failures, decision, started
            )
            if isinstance(outcome, web.StreamResponse):
                decision.status = outcome.status
                return outcome
            failure = outcome
            decision.attempts.append(
                Attempt(
                    backend.name,
                    "failed",
                    failure.error_class,
                    failure.text[:300],
                    failure.status,
                    round((time.monotonic() - started) * 1000, 3),
                )
            )
            failures.append((backend.name, failure))
            self._report_failure(backend, failure, decision)
            if not is_retryable(failure.error_class) or not isinstance(body, bytes):
                break
            if answer_as_is and failure.status is not None and failure.status < 500:
                break  # the backend's own 4xx is the answer
            if not self.scheduler.may_move_on(plan, backend, failure.error_class):
                break
        tried = [
            (step.backend, backends[step.backend].config.url)
            for step in (*plan.steps, *plan.excluded)
            if step.backend in backends
        ]
        return fail.verdict(failures, decision.id, tried, answer_as_is)

    async def _attempt(
        self,
        request: web.Request,
        backend: Backend,
        headers: CIMultiDict[str],
        body: Body,
        content_length: int | None,
        failures: list[tuple[str, Failure]],
        decision: Decision,
        started: float,
    ) -> web.StreamResponse | Failure:
        config = backend.config
        if backend.hung:  # the prober already knows: don't wait for it to say so again
            return fail.hung(backend.name)
        plan = decision.plan
        model = plan.model if plan is not None else None
        async with self.scheduler.admit(backend, decision.intent or "fast", model) as admitted:
            if not admitted:
                return Failure(
                    "busy",
                    f"{backend.name}: queue full or queue wait over {config.queue_timeout:g}s",
                )
            return await self._exchange(
                request, backend, headers, body, content_length, failures, decision, started
            )

    async def _exchange(
        self,
        request: web.Request,
        backend: Backend,
        headers: CIMultiDict[str],
        body: Body,
        content_length: int | None,
        failures: list[tuple[str, Failure]],
        decision: Decision,
        started: float,
    ) -> web.StreamResponse | Failure:
        config = backend.config
        sent_at = time.monotonic()  # service time starts here, after harbord's own queue
        upstream: Exchange | None = None
        # The prober fires this deadline early when the backend hangs (Backend.mark_hung).
        wait = config.first_byte_timeout if decision.stream else config.answer_timeout
        deadline = asyncio.timeout(wait)
        backend.waiting.add(deadline)
        send = self.upstreams.request
        args = (request.method, request.path_qs, headers.items(), body, config.connect_timeout)
        try:
            try:
                if not isinstance(body, bytes):
                    # An upload takes as long as the client takes to send it: the wait for
                    # the answer starts once it is all sent.
                    upstream = await send(config.url, *args, content_length)
                    await upstream.body_sent()
                async with deadline:
                    if upstream is None:
                        upstream = await send(config.url, *args, content_length)
                    await upstream.response_head()
                    if upstream.status >= 400:
                        error_body = await upstream.read_body(fail.MAX_ERROR_BODY)
                        return fail.from_answer(upstream.status, error_body, upstream.content_type)
                    streaming = upstream.content_type in STREAM_TYPES
                    first = await (first_line(upstream) if streaming else upstream.read_body())
            except TimeoutError:
                if backend.hung:
                    return fail.hung(backend.name)
                return Failure(
                    "network", f"no answer from {backend.name} within {wait:g}s", timeout=True
                )
            except UpstreamError as err:
                return fail.from_error(backend.name, err, config.connect_timeout)
            finally:
                backend.waiting.discard(deadline)

            broken = _broken_start(backend.name, upstream, first, streaming)
            if broken is not None:
                return broken
            response_headers = self._response_headers(upstream, backend, failures, decision)
            served = self._served(backend, decision)
            if not streaming:
                served.ms = round((time.monotonic() - started) * 1000, 3)
                self._report_served(backend, decision, sent_at, first)
                return web.Response(status=upstream.status, body=first, headers=response_headers)
            response, broke, tail = await relay_stream(
                request, upstream, first, response_headers, backend.name, config.idle_timeout
            )
            served.ms = round((time.monotonic() - started) * 1000, 3)
            if broke is None:
                self._report_served(backend, decision, sent_at, tail)
            else:
                error_class, text = broke
                decision.attempts.append(
                    Attempt(backend.name, "failed", error_class, text, after_first_byte=True)
                )
                log.warning("request %s: %s after the first byte", decision.id, text)
                # Too late to try elsewhere, not too late to learn (an OOM pins the model).
                self._report_failure(backend, Failure(error_class, text), decision, True)
            return response
        finally:
            if upstream is not None:
                upstream.close()  # a no-op after a full read; cuts the backend off otherwise

    def _response_headers(
        self,
        upstream: Exchange,
        backend: Backend,
        failures: list[tuple[str, Failure]],
        decision: Decision,
    ) -> CIMultiDict[str]:
        headers = CIMultiDict(
            (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
        )
        headers["X-Harbor-Backend"] = backend.name
        headers["X-Harbor-Request-Id"] = decision.id
        if failures:
            headers["X-Harbor-Fallbacks"] = fail.fallbacks_header(failures)
        return headers

    def _served(self, backend: Backend, decision: Decision) -> Attempt:
        attempt = Attempt(backend.name, "served")
        decision.attempts.append(attempt)
        decision.served_by = backend.name
        decision.first_byte_ms = round((time.time() - decision.time) * 1000, 3)
        self.scheduler.served(backend, decision.plan)
        return attempt

    def _report_served(
        self, backend: Backend, decision: Decision, sent_at: float, tail: bytes
    ) -> None:
        """A whole answer: how long it took, and whether (and how long) it loaded the
        model, from Ollama's `load_duration` in its last bytes."""
        plan = decision.plan
        model = plan.model if plan is not None else None
        load = load_duration_ms(tail[-512:]) if model and decision.path not in NOT_A_LOAD else None
        self.scheduler.report(
            Outcome(
                backend.name,
                backend.config.kind,
                model,
                decision.path,
                served=True,
                service_ms=(time.monotonic() - sent_at) * 1000,
                load_ms=load,
            ),
            plan,
        )

    def _report_failure(
        self, backend: Backend, failure: Failure, decision: Decision, after_first_byte: bool = False
    ) -> None:
        plan = decision.plan
        self.scheduler.report(
            Outcome(
                backend.name,
                backend.config.kind,
                plan.model if plan is not None else None,
                decision.path,
                served=after_first_byte,
                error_class=failure.error_class,
                text=failure.text,
                refused=failure.refused,
                after_first_byte=after_first_byte,
            ),
            plan,
        )
        log.info(
            "request %s: %s failed (%s): %s",
            decision.id,
            backend.name,
            failure.error_class,
            failure.text[:200],
        )


def _broken_start(name: str, upstream: Exchange, first: bytes, streaming: bool) -> Failure | None:
    """A 2xx whose start shows it failed, while nothing has reached the client yet."""
    status, content_type = upstream.status, upstream.content_type
    if not streaming and content_type == "application/json" and not is_json(first):
        # Ollama's answers are JSON: this one is broken.
        return Failure(
            "other",
            f"{name} answered {status} with a body that is not JSON",
            status,
            first,
            content_type,
        )
    if streaming and b"\n" not in first and len(first) < MAX_LINE:
        what = "an empty stream" if not first else "a stream that ends inside its first line"
        return Failure("other", f"{name} answered {what}", status, first, content_type)
    if looks_like_error(first):
        # A 200 whose first line is an error: move on.
        text = error_text(first.split(b"\n", 1)[0].removeprefix(b"data:").strip())
        return Failure(classify(500, text), text, 200, first, content_type)
    return None


RELAY: web.AppKey[Relay] = web.AppKey("relay", Relay)
