"""Pass-through: any path harbord does not know goes to a backend, and its answer comes back.

Ollama keeps adding endpoints (`/v1/images/generations`, `/api/status`, experimental
ones); a router that answered 404 for them would break the next client. So a request
no other route takes is sent on: by its `model` when the body names one (a JSON field,
or a multipart form field as in `/v1/audio/transcriptions`), with the same plan as the
routed paths (X-Harbor-Intent and X-Harbor-Backend honoured); otherwise to the first
healthy backend in configuration order. A backend that cannot answer (refused, busy,
hung, a 5xx) is followed by the next before the first byte; a backend's own 4xx (its
404 for a path it does not serve, too) is the answer, as it is. `/harbor/*` and
`/metrics` are harbord's own: there an unknown path stays harbord's 404 (405 for a
known path with another method).

The body is read whole, under the same `max_body_size` limit as a routed request (an
upload over it is refused with 413, as on the routed paths); only then is its model
looked for, so nothing beyond the limit is ever held.
"""

from __future__ import annotations

import email.message
import re
from email.utils import collapse_rfc2231_value

import msgspec
from aiohttp import web

from harbord.config import MODEL_RE
from harbord.errors import Problem
from harbord.harbor import HARBOR
from harbord.ledger import accounted
from harbord.policy import PolicyError, RouteRequest
from harbord.relay import RELAY
from harbord.request_body import read_body
from harbord.schemas import UNDECODABLE, Decision

OWN_PREFIXES = ("/harbor/",)
OWN_PATHS = frozenset(("/harbor", "/metrics"))


class _BodyFacts(msgspec.Struct):
    """What pass-through reads of a JSON body: a model to route by, whether it streams."""

    model: object = None
    stream: object = None


_facts = msgspec.json.Decoder(_BodyFacts)
_JSON_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")  # without copying a large body to strip it


def is_own_path(path: str) -> bool:
    return path in OWN_PATHS or path.startswith(OWN_PREFIXES)


def json_model(body: bytes) -> tuple[str | None, bool | None]:
    """The `model` and `stream` of a JSON object body; (None, None) for anything else."""
    if _JSON_OBJECT_START.match(body) is None:
        return None, None
    try:
        facts = _facts.decode(body)
    except UNDECODABLE:
        return None, None  # not ours to judge: the backend answers it
    model = facts.model if isinstance(facts.model, str) and facts.model else None
    stream = facts.stream if isinstance(facts.stream, bool) else None
    return model, stream


def _header_param(header: str, value: str, name: str) -> str | None:
    message = email.message.Message()
    message[header] = value
    found = message.get_param(name, header=header)
    if found is None or isinstance(found, str):
        return found
    return collapse_rfc2231_value(found)


def multipart_model(body: bytes, content_type: str) -> str | None:
    """The value of the form field `model` in a multipart/form-data body, if it has one.

    Parts are read in order and only until that field: a file part before it is skipped
    over, not copied."""
    boundary = _header_param("Content-Type", content_type, "boundary")
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    at = body.find(delimiter)
    while at >= 0:
        start = at + len(delimiter)
        if body[start : start + 2] == b"--":
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            return None
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            return None
        if _part_name(body[start:head_end]) == "model":
            try:
                return body[head_end + 4 : end].decode("utf-8").strip() or None
            except UnicodeDecodeError:
                return None
        at = end + 2
    return None


def _part_name(head: bytes) -> str | None:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            return _header_param("Content-Disposition", value.strip(), "name")
    return None


async def pass_through(request: web.Request, decision: Decision) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    config = harbor.config
    body = await read_body(request, config.max_body_size, config.client_timeout)
    if request.content_type == "multipart/form-data":
        model, stream = multipart_model(body, request.headers.get("Content-Type", "")), None
    else:
        model, stream = json_model(body)
    forced = request.headers.get("X-Harbor-Backend")
    if model is not None and not MODEL_RE.fullmatch(model):
        raise Problem(400, f"invalid model name {model[:80]!r}")
    scheduler = harbor.scheduler
    try:
        if model is None:
            plan = scheduler.place_without_model(forced)
        else:
            plan = scheduler.place(
                RouteRequest(
                    model=model,
                    intent_header=request.headers.get("X-Harbor-Intent"),
                    forced_backend=forced,
                )
            )
    except PolicyError as err:
        raise Problem(400, str(err)) from None
    if plan.refused is not None:
        decision.plan, decision.model, decision.intent = plan, plan.model, plan.intent
        raise Problem(400, plan.refused)
    # An unknown endpoint's answer may take long (an image): wait for it whole unless
    # the body asks for a stream.
    decision.stream = bool(stream)
    relay = request.app[RELAY]
    return await relay.run(request, plan, body, decision, answer_as_is=True)


_accounted_pass_through = accounted(lambda request: request.app[HARBOR].ledger, pass_through)


async def catch_all(request: web.Request) -> web.StreamResponse:
    """The last route: harbord's own paths get its 404 (or 405), the rest pass through."""
    if is_own_path(request.path):
        raise await _own_refusal(request)
    return await _accounted_pass_through(request)


async def _own_refusal(request: web.Request) -> web.HTTPException:
    """405 with Allow when another route serves this path with other methods, else 404."""
    this = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not this:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        return web.HTTPMethodNotAllowed(request.method, allowed)
    return web.HTTPNotFound()


def add_route(router: web.UrlDispatcher) -> None:
    """Add the catch-all; it must come after every other route."""
    router.add_route("*", "/{tail:.*}", catch_all)
