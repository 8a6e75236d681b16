"""The HTTP application on the Unix socket: routes, the routed handler, errors.

Every error of harbord's own is JSON in the shape of the API family the path
belongs to (errors.py), never a traceback; a backend's own answer on a path
harbord does not know comes back as it is (passthrough.py). Bodies are read
with a hard limit, and only the fields routing needs are decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from harbord import errors, harbor_api, ollama_api, passthrough, unload
from harbord.config import MODEL_RE
from harbord.errors import Problem, family_of
from harbord.guard import bearer_middleware
from harbord.harbor import HARBOR, Harbor
from harbord.ledger import Ledger, accounted
from harbord.policy import PolicyError, RouteRequest
from harbord.relay import RELAY, Relay
from harbord.request_body import decode, read_body
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
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
)

# Newer aiohttp refuses a request with very many header fields, 3.11 takes any number:
# harbord's own cap holds the same on both.
MAX_HEADERS = 100
_facts = msgspec.json.Decoder(RequestFacts)
_STREAM_BY_DEFAULT = frozenset(("/api/chat", "/api/generate"))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _strip_intent(body: bytes) -> bytes:
    """The body without its top-level "intent" field (harbord's, not Ollama's)."""
    decoded = decode(msgspec.json.decode, body)
    if isinstance(decoded, dict) and "intent" in decoded:
        del decoded["intent"]
        return msgspec.json.encode(decoded)
    return body


async def routed(request: web.Request, decision: Decision) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    config = harbor.config
    body = await read_body(request, config.max_body_size, config.client_timeout)
    if not body:
        raise Problem(400, "missing request body")
    facts = decode(_facts.decode, body)
    model = facts.model_name
    if not model:
        raise Problem(400, "model is required")
    if not MODEL_RE.fullmatch(model):  # match() would let a trailing newline through ($)
        raise Problem(400, f"invalid model name {model[:80]!r}")
    if b'"intent"' in body:
        body = _strip_intent(body)
    if unload.is_unload(request.path, body):
        return await unload.unload_everywhere(request, harbor, decision, model, body)
    try:
        plan = harbor.plan(
            RouteRequest(
                model=model,
                intent_header=request.headers.get("X-Harbor-Intent"),
                intent_body=facts.intent,
                forced_backend=request.headers.get("X-Harbor-Backend"),
                num_ctx=facts.options.num_ctx if facts.options is not None else None,
            )
        )
    except PolicyError as err:
        raise Problem(400, str(err)) from None
    if plan.refused is not None:
        # It fits no backend's memory: said at once, and nothing is loaded anywhere. A
        # 400, not a 5xx: SDKs (Claude Code too) retry a 5xx, and this never gets better.
        decision.plan, decision.model, decision.intent = plan, plan.model, plan.intent
        raise Problem(400, plan.refused)
    # Ollama's native chat and generate stream unless told not to; the rest (OpenAI's and
    # Anthropic's APIs) only when asked to.
    stream = facts.stream
    decision.stream = stream if stream is not None else request.path in _STREAM_BY_DEFAULT
    if config.log_bodies:
        log.debug("request %s body: %s", decision.id, body[:4096].decode("utf-8", "replace"))
    return await request.app[RELAY].run(request, plan, body, decision)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON in the API family's shape, and no tracebacks to clients."""
    try:
        if len(request.raw_headers) > MAX_HEADERS:
            raise Problem(431, f"more than {MAX_HEADERS} request header fields")
        return await handler(request)
    except Problem as problem:
        return errors.render(problem, family_of(request.path))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return errors.render(Problem(exc.status, message, allow), family_of(request.path))
    except (ConnectionError, TimeoutError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        internal = Problem(500, "internal error in harbord (details in its log)")
        return errors.render(internal, family_of(request.path))


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


def _ledger(request: web.Request) -> Ledger:
    return request.app[HARBOR].ledger


def make_app(harbor: Harbor, token: str | None = None) -> web.Application:
    """The application; with `token`, every request must carry it (the TCP listener)."""
    middlewares = [problems] if token is None else [problems, bearer_middleware(token)]
    app = web.Application(
        middlewares=middlewares,
        client_max_size=harbor.config.max_body_size,
        handler_args={"logger": http_log},
    )
    app[HARBOR] = harbor
    app[RELAY] = Relay(harbor.scheduler, harbor.upstreams)
    router = app.router
    for path in ROUTED_PATHS:
        router.add_post(path, accounted(_ledger, routed))
    ollama_api.add_routes(router)
    harbor_api.add_routes(router)
    passthrough.add_route(router)  # last: it takes every path the others do not
    return app
