"""The HTTP application on the Unix socket: routes, the routed handler, errors.

Every answer is JSON (`{"error": ...}` for errors; OpenAI's error object on
/v1, as Ollama does), never a traceback. Bodies are read with a hard limit,
and only the fields routing needs are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from harbord import harbor_api, ollama_api
from harbord.config import MODEL_RE
from harbord.guard import bearer_middleware
from harbord.harbor import HARBOR, Harbor, new_request_id
from harbord.policy import PolicyError, RouteRequest
from harbord.relay import RELAY, Relay, error_response, is_openai
from harbord.schemas import Decision, RequestFacts

log = logging.getLogger(__name__)

ROUTED_PATHS = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)

_facts = msgspec.json.Decoder(RequestFacts)
_STREAM_BY_DEFAULT = frozenset(("/api/chat", "/api/generate"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")


class BodyTooLarge(Exception):
    pass


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing (before reading it) anything over `limit` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class BadBody(Exception):
    """A body that is not JSON we can take, with the message the client gets."""


def _decode(decode: Callable[[bytes], _T], body: bytes) -> _T:
    """msgspec's decode, with every way it refuses untrusted bytes turned into BadBody.

    Invalid UTF-8 in a decoded string is a UnicodeDecodeError up to msgspec 0.19
    and a DecodeError ("Invalid UTF-8 encoded string") from 0.20 on; arrays or
    objects nested deeper than the recursion limit raise RecursionError. A
    ValidationError (the JSON is fine, a field's type is not) is left to the caller.
    """
    try:
        return decode(body)
    except UnicodeDecodeError:
        raise BadBody("invalid JSON: a string is not valid UTF-8") from None
    except RecursionError:
        raise BadBody("invalid JSON: nested too deeply") from None
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as err:
        if "utf-8" in str(err).lower():
            raise BadBody("invalid JSON: a string is not valid UTF-8") from None
        raise BadBody(f"invalid JSON: {err}") from None


def _strip_intent(body: bytes) -> bytes:
    """The body without its top-level "intent" field (harbord's, not Ollama's)."""
    decoded = _decode(msgspec.json.decode, body)
    if isinstance(decoded, dict) and "intent" in decoded:
        del decoded["intent"]
        return msgspec.json.encode(decoded)
    return body


async def routed(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    openai = is_openai(request.path)
    started = time.monotonic()
    harbor.counters.requests += 1
    request_id = new_request_id()
    try:
        if request.content.is_eof():  # a small body arrives with the head: no timer needed
            body = await read_body(request, harbor.config.max_body_size)
        else:
            async with asyncio.timeout(harbor.config.client_timeout):
                body = await read_body(request, harbor.config.max_body_size)
    except BodyTooLarge:
        return _client_error(
            harbor, 413, f"request body over the {harbor.config.max_body_size} byte limit", openai
        )
    except TimeoutError:
        return _client_error(
            harbor,
            408,
            f"request body not received within {harbor.config.client_timeout:g}s",
            openai,
        )
    if not body:
        return _client_error(harbor, 400, "missing request body", openai)
    try:
        facts = _decode(_facts.decode, body)
    except BadBody as err:
        return _client_error(harbor, 400, str(err), openai)
    except msgspec.ValidationError as err:
        return _client_error(harbor, 400, f"invalid request: {err}", openai)
    model = facts.model_name
    if not model:
        return _client_error(harbor, 400, "model is required", openai)
    if not MODEL_RE.fullmatch(model):  # match() would let a trailing newline through ($)
        return _client_error(harbor, 400, f"invalid model name {model[:80]!r}", openai)
    if b'"intent"' in body:
        try:
            body = _strip_intent(body)
        except BadBody as err:
            return _client_error(harbor, 400, str(err), openai)
    try:
        plan = harbor.plan(
            RouteRequest(
                model=model,
                intent_header=request.headers.get("X-Harbor-Intent"),
                intent_body=facts.intent,
                forced_backend=request.headers.get("X-Harbor-Backend"),
            )
        )
    except PolicyError as err:
        return _client_error(harbor, 400, str(err), openai)

    decision = Decision(
        id=request_id,
        time=time.time(),
        method=request.method,
        path=request.path,
        model=plan.model,
        intent=plan.intent,
        plan=plan,
        # Ollama's native chat and generate stream unless told not to; the rest do not.
        stream=facts.stream if facts.stream is not None else request.path in _STREAM_BY_DEFAULT,
    )
    if harbor.config.log_bodies:
        log.debug("request %s body: %s", request_id, body[:4096].decode("utf-8", "replace"))
    return await request.app[RELAY].serve(request, plan, body, decision, started)


def _client_error(harbor: Harbor, status: int, message: str, openai: bool) -> web.Response:
    harbor.counters.client_errors += 1
    return error_response(status, message, openai)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413 ...) as JSON, and no tracebacks to clients."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        response = error_response(exc.status, message, is_openai(request.path))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (ConnectionError, TimeoutError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(
            500, "internal error in harbord (details in its log)", is_openai(request.path)
        )


class _MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a header over 8 KiB, a bad request
    line, a broken chunk) at ERROR with a traceback. That is the client's mistake, not
    harbord's: one INFO line naming the kind of error, without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= exc.code < 500:
            return True
        kind = (exc.message or "").strip().split(":", 1)[0][:120]
        record.msg, record.args = "refused a malformed request (%d): %s", (exc.code, kind)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return http_log.isEnabledFor(logging.INFO)


# The logger aiohttp's protocol handler reports through (instead of aiohttp.server).
http_log = logging.getLogger("harbord.http")
http_log.addFilter(_MalformedRequests())


def make_app(harbor: Harbor, token: str | None = None) -> web.Application:
    """The application; with `token`, every request must carry it (the TCP listener)."""
    middlewares = [json_errors] if token is None else [json_errors, bearer_middleware(token)]
    app = web.Application(
        middlewares=middlewares,
        client_max_size=harbor.config.max_body_size,
        handler_args={"logger": http_log},
    )
    app[HARBOR] = harbor
    app[RELAY] = Relay(harbor)
    router = app.router
    for path in ROUTED_PATHS:
        router.add_post(path, routed)
    ollama_api.add_routes(router)
    harbor_api.add_routes(router)
    return app
