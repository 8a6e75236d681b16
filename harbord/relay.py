"""Carry one request through its plan: try backends in order, relay the answer.

Rules this module keeps:
- Bytes are relayed as they arrive; no chunk is decoded or re-encoded. A
  stream is relayed in whole lines: the tail of a line is held back until its
  newline arrives, so a stream cut short never leaves half a line behind.
- A backend is retried only while nothing has reached the client. The first
  line (or the whole body of a non-streaming answer) is read before the
  client's response starts, so an error the backend writes as its first line,
  or a stream that ends inside it, can still move the request on.
- After the first byte, a backend failure ends the stream with an
  Ollama-style `{"error": ...}` line (an SSE error event on /v1).
- There is no overall deadline: only connect, first-byte and idle-between-
  chunks timeouts, because a heavy answer on the CPU may take many minutes.
- When the client goes away, the upstream connection is closed at once, so
  Ollama stops generating.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from harbord.backends import Backend
from harbord.classify import classify, error_text, is_retryable
from harbord.harbor import Harbor
from harbord.schemas import Attempt, Decision, ErrorClass, Plan
from harbord.upstream import ConnectError, ConnectTimeout, Exchange, UpstreamError

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
_STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
MAX_ERROR_BODY = 64 * 1024
# A streamed line longer than this is relayed without waiting for its end.
MAX_LINE = 1024 * 1024
_error_json = msgspec.json.Encoder()


@dataclass(slots=True)
class Failure:
    error_class: ErrorClass
    text: str
    status: int | None = None  # the backend's status, when it answered
    body: bytes | None = None
    content_type: str | None = None
    timeout: bool = False
    refused: bool = False  # the connection was refused: cool the backend down


def _hung(backend: Backend) -> Failure:
    return Failure("network", f"{backend.name} is hung (probes time out)", timeout=True)


def _fallbacks_header(failures: list[tuple[str, Failure]]) -> str:
    """X-Harbor-Fallbacks: the backends that failed before, with their error classes."""
    return ", ".join(f"{name}={failure.error_class}" for name, failure in failures)


def upstream_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _DROP_REQUEST)


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(message: str, openai: bool, error_type: str = "api_error") -> bytes:
    """harbord's own error: Ollama's shape, or OpenAI's on the /v1 API as Ollama does."""
    if openai:
        return _error_json.encode(
            {"error": {"message": message, "type": error_type, "param": None, "code": None}}
        )
    return _error_json.encode({"error": message})


def error_response(
    status: int, message: str, openai: bool = False, headers: Mapping[str, str] | None = None
) -> web.Response:
    error_type = "invalid_request_error" if 400 <= status < 500 else "api_error"
    return web.Response(
        status=status,
        body=error_body(message, openai, error_type),
        content_type="application/json",
        headers=headers,
    )


def _stream_error(message: str, sse: bool) -> bytes:
    if sse:
        payload = _error_json.encode({"error": {"message": message, "type": "api_error"}})
        return b"event: error\ndata: " + payload + b"\n\n"
    return _error_json.encode({"error": message}) + b"\n"


class _SessionAnswer:
    """An aiohttp answer read like an Exchange: for uploads streamed from the client (blobs)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.content_type = response.content_type
        self.headers: Mapping[str, str] = response.headers

    async def read_chunk(self) -> bytes:
        return await self.response.content.readany()

    async def read_body(self, limit: int | None = None) -> bytes:
        if limit is None:
            return await self.response.read()
        # read(n) returns what has arrived so far: loop to the end (or the cap).
        parts: list[bytes] = []
        size = 0
        while size < limit:
            part = await self.response.content.read(limit - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def close(self) -> None:
        self.response.close()


Answer = Exchange | _SessionAnswer


async def _first_line(upstream: Answer) -> bytes:
    """What the backend sent up to the end of its first line (or EOF, or MAX_LINE)."""
    data = await upstream.read_chunk()
    while data and b"\n" not in data and len(data) < MAX_LINE:
        more = await upstream.read_chunk()
        if not more:
            break
        data += more
    return data


def _split_line(data: bytes) -> bytes:
    """The unfinished last line of `data` (b"" when it ends in a newline)."""
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) >= MAX_LINE:
        return b""  # no newline in sight: relay it anyway
    return data[cut:]


def _looks_like_error(chunk: bytes) -> bool:
    """A first line or body that is an error object: `{"error": ...}` (or SSE `data: {"error"`)."""
    head = chunk[:64].lstrip()
    if head.startswith(b"data:"):
        head = head[5:].lstrip()
    return head.startswith(b'{"error"') or head.startswith(b'{ "error"')


def _is_json(body: bytes) -> bool:
    """Whether a non-empty body is one whole JSON value (checked, not built)."""
    if not body:
        return True  # a 200 with no body (copy, delete, HEAD) is not a broken JSON answer
    try:
        msgspec.json.decode(body, type=msgspec.Raw)
    except msgspec.DecodeError:
        return False
    except RecursionError:
        return True  # too deeply nested to check here; the client will judge
    return True


class Relay:
    def __init__(self, harbor: Harbor) -> None:
        self.harbor = harbor

    async def serve(
        self,
        request: web.Request,
        plan: Plan,
        body: bytes | aiohttp.StreamReader,
        decision: Decision,
        started: float,
    ) -> web.StreamResponse:
        """`run`, with the bookkeeping every relayed request gets: counters, record, log line."""
        harbor = self.harbor
        harbor.in_flight += 1
        try:
            return await self.run(request, plan, body, decision)
        finally:
            harbor.in_flight -= 1
            decision.duration_ms = round((time.monotonic() - started) * 1000, 3)
            harbor.record(decision)
            if decision.status >= 500 or any(a.after_first_byte for a in decision.attempts):
                harbor.counters.failed += 1
            elif decision.status >= 400:
                harbor.counters.client_errors += 1
            _log_decision(decision)

    async def run(
        self,
        request: web.Request,
        plan: Plan,
        body: bytes | aiohttp.StreamReader,
        decision: Decision,
    ) -> web.StreamResponse:
        harbor = self.harbor
        openai = is_openai(request.path)
        headers = upstream_headers(request.headers)
        failures: list[tuple[str, Failure]] = []
        for index, step in enumerate(plan.steps):
            backend = harbor.backends.get(step.backend)
            if backend is None:
                continue
            started = time.monotonic()
            outcome = await self._attempt(request, backend, headers, body, failures, decision)
            elapsed = (time.monotonic() - started) * 1000
            if isinstance(outcome, web.StreamResponse):  # _served() recorded who
                decision.status = outcome.status
                served = next(
                    (a for a in reversed(decision.attempts) if a.outcome == "served"), None
                )
                if served is not None:
                    served.ms = round(elapsed, 3)
                return outcome
            failure = outcome
            decision.attempts.append(
                Attempt(
                    backend.name,
                    "failed",
                    failure.error_class,
                    failure.text[:300],
                    failure.status,
                    round(elapsed, 3),
                )
            )
            failures.append((backend.name, failure))
            self._react(backend, failure, plan, decision)
            if not is_retryable(failure.error_class) or not isinstance(body, bytes):
                break
            if index + 1 < len(plan.steps):
                harbor.counters.fallbacks += 1
        return self._give_up(failures, openai, decision)

    async def _attempt(
        self,
        request: web.Request,
        backend: Backend,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader,
        failures: list[tuple[str, Failure]],
        decision: Decision,
    ) -> web.StreamResponse | Failure:
        config = backend.config
        if backend.hung:  # the prober already knows: don't wait for it to say so again
            return _hung(backend)
        if not await backend.limiter.acquire():
            return Failure(
                "busy", f"{backend.name}: queue full or queue wait over {config.queue_timeout:g}s"
            )
        backend.in_flight += 1
        upstream: Answer | None = None
        # The prober fires this deadline early when the backend hangs (Backend.mark_hung).
        wait = config.first_byte_timeout if decision.stream else config.answer_timeout
        deadline = asyncio.timeout(wait)
        backend.waiting.add(deadline)
        try:
            try:
                async with deadline:
                    if isinstance(body, bytes):
                        upstream = await self.harbor.upstreams.request(
                            config.url,
                            request.method,
                            request.path_qs,
                            headers.items(),
                            body,
                            config.connect_timeout,
                        )
                        await upstream.response_head()
                    else:
                        upstream = _SessionAnswer(
                            await self.harbor.session.request(
                                request.method,
                                config.url + request.path_qs,
                                data=body,
                                headers=headers,
                                timeout=backend.client_timeout,
                            )
                        )
                    if upstream.status >= 400:
                        return await _failure_from_answer(upstream)
                    streaming = upstream.content_type in _STREAM_TYPES
                    first = await (_first_line(upstream) if streaming else upstream.read_body())
            except (ConnectTimeout, aiohttp.ConnectionTimeoutError):  # before TimeoutError
                return Failure(
                    "network",
                    f"connecting to {backend.name} timed out after {config.connect_timeout:g}s",
                    timeout=True,
                )
            except TimeoutError:
                if backend.hung:
                    return _hung(backend)
                return Failure(
                    "network",
                    f"no answer from {backend.name} within {wait:g}s",
                    timeout=True,
                )
            except ConnectError as err:
                return Failure(
                    "network", f"cannot connect to {backend.name}: {err.reason}", refused=True
                )
            except aiohttp.ClientConnectorError as err:
                return Failure(
                    "network",
                    f"cannot connect to {backend.name}: "
                    f"{err.os_error.strerror or type(err.os_error).__name__}",
                    refused=True,
                )
            except (UpstreamError, aiohttp.ClientError, OSError) as err:
                return Failure(
                    "network", f"{backend.name} broke the connection ({type(err).__name__})"
                )
            finally:
                backend.waiting.discard(deadline)

            if (
                not streaming
                and upstream.content_type == "application/json"
                and not _is_json(first)
            ):
                # Ollama's answers are JSON: this one is broken, and nothing is sent yet.
                return Failure(
                    "other",
                    f"{backend.name} answered {upstream.status} with a body that is not JSON",
                    upstream.status,
                    first,
                    upstream.content_type,
                )
            if streaming and b"\n" not in first and len(first) < MAX_LINE:
                what = (
                    "an empty stream" if not first else "a stream that ends inside its first line"
                )
                return Failure(
                    "other",
                    f"{backend.name} answered {what}",
                    upstream.status,
                    first,
                    upstream.content_type,
                )
            if _looks_like_error(first):
                # A 200 whose first line is an error: still nothing sent, so move on.
                text = error_text(first.split(b"\n", 1)[0].removeprefix(b"data:").strip())
                return Failure(classify(500, text), text, 200, first, upstream.content_type)

            response_headers = self._response_headers(upstream, backend, failures, decision)
            if not streaming:
                self._served(backend, decision)
                return web.Response(status=upstream.status, body=first, headers=response_headers)
            return await self._stream(request, upstream, backend, first, response_headers, decision)
        finally:
            if upstream is not None:
                upstream.close()  # a no-op after a full read; cuts the backend off otherwise
            backend.in_flight -= 1
            backend.limiter.release()

    async def _stream(
        self,
        request: web.Request,
        upstream: Answer,
        backend: Backend,
        first: bytes,
        headers: CIMultiDict[str],
        decision: Decision,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        pending = _split_line(first)
        sent = first[: len(first) - len(pending)]
        await response.write(sent)
        tail = sent[-2:]  # the end of what the client has, to start an error on a fresh line
        self._served(backend, decision)
        idle = backend.config.idle_timeout
        loop = asyncio.get_running_loop()
        read_chunk = upstream.read_chunk
        failure: tuple[ErrorClass, str] | None = None
        # Moving the deadline on every chunk costs a timer per token; moving it by 1.5 idle
        # periods at most every half period keeps it between idle and 1.5 idle after the
        # last chunk, for one timer per half period.
        rearm_at = loop.time() + idle / 2
        try:
            async with asyncio.timeout(idle * 1.5) as idle_deadline:
                while True:
                    chunk = await read_chunk()
                    if not chunk:
                        break
                    now = loop.time()
                    if now > rearm_at:
                        idle_deadline.reschedule(now + idle * 1.5)
                        rearm_at = now + idle / 2
                    if pending:
                        chunk = pending + chunk
                    pending = _split_line(chunk)
                    if len(pending) < len(chunk):
                        whole = chunk[: len(chunk) - len(pending)]
                        await response.write(whole)  # a client that left raises here
                        tail = (tail + whole)[-2:]
            if pending:
                failure = "other", f"{backend.name} ended its stream inside a line"
        except TimeoutError:
            failure = "network", f"{backend.name} sent nothing for {idle:g}s"
        except (
            UpstreamError,
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
        ) as err:
            if request.transport is None or request.transport.is_closing():
                raise  # the client left, not the backend
            failure = "network", f"{backend.name} broke off the stream ({type(err).__name__})"
        if failure is not None:
            error_class, text = failure
            decision.attempts.append(
                Attempt(backend.name, "failed", error_class, text, after_first_byte=True)
            )
            backend.record_failure(error_class, text)
            log.warning("request %s: %s after the first byte; ending the stream", decision.id, text)
            sse = upstream.content_type == "text/event-stream"
            fresh = b"" if tail.endswith(b"\n\n" if sse else b"\n") or not tail else b"\n"
            await response.write(fresh + _stream_error(text, sse))
        await response.write_eof()
        return response

    def _response_headers(
        self,
        upstream: Answer,
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
            headers["X-Harbor-Fallbacks"] = _fallbacks_header(failures)
        return headers

    def _served(self, backend: Backend, decision: Decision) -> None:
        decision.attempts.append(Attempt(backend.name, "served"))
        decision.served_by = backend.name
        decision.first_byte_ms = round((time.time() - decision.time) * 1000, 3)
        backend.record_success()
        harbor = self.harbor
        harbor.counters.served += 1
        by_backend = harbor.counters.by_backend
        by_backend[backend.name] = by_backend.get(backend.name, 0) + 1
        harbor.learn_affinity(decision.plan, backend.name)

    def _react(self, backend: Backend, failure: Failure, plan: Plan, decision: Decision) -> None:
        """What a failure teaches us: pins, health."""
        backend.record_failure(
            failure.error_class,
            failure.text,
            refused=failure.refused,
        )
        if failure.error_class == "oom" and backend.config.kind == "gpu" and plan.model:
            target = self._cpu_for(plan)
            if target is not None:
                self.harbor.pin(
                    plan.model,
                    target,
                    f"out of memory on {backend.name}: {failure.text[:160]}",
                    self.harbor.config.routing.oom_pin_for,
                    "oom",
                )
        log.info(
            "request %s: %s failed (%s): %s",
            decision.id,
            backend.name,
            failure.error_class,
            failure.text[:200],
        )

    def _cpu_for(self, plan: Plan) -> str | None:
        backends = self.harbor.backends
        for name in [*plan.backends, *backends]:
            backend = backends.get(name)
            if backend is not None and backend.config.kind == "cpu":
                return name
        return None

    def _give_up(
        self, failures: list[tuple[str, Failure]], openai: bool, decision: Decision
    ) -> web.Response:
        headers = {}
        if failures:
            headers["X-Harbor-Fallbacks"] = _fallbacks_header(failures)
        headers["X-Harbor-Request-Id"] = decision.id
        if not failures:
            headers["Retry-After"] = "5"
            decision.status = 503
            return error_response(503, "no backend available", openai, headers)
        name, last = failures[-1]
        classes = {f.error_class for _, f in failures}
        if last.error_class == "client" and last.status is not None and last.body is not None:
            # The backend's own 4xx answer goes back as it is.
            headers["X-Harbor-Backend"] = name
            decision.status = last.status
            return web.Response(
                status=last.status,
                body=last.body,
                content_type=last.content_type or "application/json",
                headers=headers,
            )
        summary = "; ".join(f"{n}: {f.text}" for n, f in failures)
        if classes == {"model"}:
            status, message = 404, failures[0][1].text
        elif any(f.timeout for _, f in failures) and classes <= {"network", "busy"}:
            status, message = 504, f"backend timeout: {summary}"
        elif classes <= {"network", "busy"}:
            status, message = 503, f"no backend available: {summary}"
            headers["Retry-After"] = "5"
        else:
            status = last.status if last.status and last.status >= 500 else 502
            message = summary
        decision.status = status
        return error_response(status, message, openai, headers)


def _log_decision(d: Decision) -> None:
    """The one line per request: who asked for what, the plan, who served, what failed."""
    if not log.isEnabledFor(logging.INFO):
        return
    failed = [f"{a.backend}={a.error_class}" for a in d.attempts if a.outcome == "failed"]
    log.info(
        "%s %s %s model=%s intent=%s plan=%s served=%s%s status=%s %.1fms",
        d.id,
        d.method,
        d.path,
        d.model,
        d.intent,
        ">".join(d.plan.backends) or "-",
        d.served_by or "-",
        f" fallbacks={','.join(failed)}" if failed else "",
        d.status or "client-gone",
        d.duration_ms,
    )


async def _failure_from_answer(upstream: Answer) -> Failure:
    body = await upstream.read_body(MAX_ERROR_BODY)
    text = error_text(body) or f"HTTP {upstream.status}"
    return Failure(
        classify(upstream.status, text), text, upstream.status, body, upstream.content_type
    )


RELAY: web.AppKey[Relay] = web.AppKey("relay", Relay)
