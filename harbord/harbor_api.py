"""The handlers of harbord's own endpoints: the table in harbor_endpoints, served.

A handler takes a `Call` (the harbor, the path parameters, the query parameters the
table names, the body decoded with the entry's type) and returns the entry's answer
type, which `add_routes` encodes; it refuses with `Problem(status, message)`, which
becomes harbord's JSON error. An undecodable body is a 400 before the handler runs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiohttp import web

from harbord import harbor_endpoints as api
from harbord.config import MODEL_RE
from harbord.errors import Problem
from harbord.harbor import HARBOR, Harbor
from harbord.policy import PolicyError, RouteRequest
from harbord.schemas import (
    UNDECODABLE,
    Affinity,
    CheckEntry,
    Decision,
    Inventory,
    Pin,
    PinRequest,
    Plan,
    Status,
)
from harbord.views import normalize_model

# The largest num_ctx `route` takes: well past any model's trained context.
MAX_CONTEXT = 1 << 24
B = TypeVar("B")
A = TypeVar("A")


@dataclass(frozen=True)
class Call(Generic[B]):
    harbor: Harbor
    path: Mapping[str, str]  # the path parameters, decoded
    query: Mapping[str, str]  # only those the endpoint's entry names
    body: B


Handler = Callable[[Call[B]], Awaitable[A]]
HANDLERS: dict[api.Endpoint[Any, Any], Handler[Any, Any]] = {}


def handles(endpoint: api.Endpoint[B, A]) -> Callable[[Handler[B, A]], Handler[B, A]]:
    """Makes the function the handler of `endpoint`; the types must match the entry's."""

    def register(handler: Handler[B, A]) -> Handler[B, A]:
        HANDLERS[endpoint] = handler
        return handler

    return register


def add_routes(router: web.UrlDispatcher) -> None:
    for endpoint in api.ENDPOINTS:
        serve = _serving(endpoint, HANDLERS[endpoint])
        if endpoint.method == "GET":
            router.add_get(endpoint.path, serve)  # HEAD too, as aiohttp does for GET
        else:
            router.add_route(endpoint.method, endpoint.path, serve)


def _serving(
    endpoint: api.Endpoint[B, A], handler: Handler[B, A]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        query = {name: request.query[name] for name in endpoint.query if name in request.query}
        try:
            raw = b"" if endpoint.body is None else await request.read()
            body = endpoint.decode_body(raw)
        except UNDECODABLE as err:
            raise Problem(400, f"invalid {endpoint.name} request: {err}") from None
        call = Call(request.app[HARBOR], dict(request.match_info), query, body)
        answer = await handler(call)
        return web.Response(
            body=endpoint.encode_answer(answer), headers={"Content-Type": endpoint.content_type}
        )

    return serve


def _model(call: Call[Any]) -> str:
    model = call.path["model"]
    if not MODEL_RE.match(model):
        raise Problem(400, f"invalid model name {model[:80]!r}")
    return model


@handles(api.STATUS)
async def status(call: Call[None]) -> Status:
    return call.harbor.status()


@handles(api.CHECK)
async def check(call: Call[None]) -> dict[str, CheckEntry]:
    return call.harbor.check()


@handles(api.MODELS)
async def models(call: Call[None]) -> Inventory:
    per_backend = {name: sorted(b.models or ()) for name, b in call.harbor.backends.items()}
    per_model: dict[str, list[str]] = {}
    for name, names in per_backend.items():
        for model in names:
            per_model.setdefault(model, []).append(name)
    return Inventory(backends=per_backend, models=dict(sorted(per_model.items())))


@handles(api.PINS)
async def pins(call: Call[None]) -> dict[str, Pin]:
    now = time.time()
    return {m: p for m, p in call.harbor.state.pins.items() if p.active(now)}


@handles(api.PIN)
async def set_pin(call: Call[PinRequest]) -> dict[str, Pin]:
    harbor, model, wanted = call.harbor, _model(call), call.body
    if wanted.backend not in harbor.backends:
        raise Problem(
            400,
            f"unknown backend {wanted.backend!r}; expected one of: {', '.join(harbor.backends)}",
        )
    if wanted.for_seconds is not None and wanted.for_seconds <= 0:
        raise Problem(400, "for_seconds must be > 0")
    pin = harbor.state.pin(model, wanted.backend, wanted.reason, wanted.for_seconds, "operator")
    return {normalize_model(model): pin}


@handles(api.UNPIN)
async def clear_pin(call: Call[None]) -> api.Unpinned:
    model = _model(call)
    if not call.harbor.state.unpin(model):
        raise Problem(404, f"{model} is not pinned")
    return api.Unpinned(normalize_model(model))


@handles(api.ROUTE)
async def route(call: Call[None]) -> Plan:
    model = call.query.get("model")
    if not model or not MODEL_RE.match(model):
        raise Problem(400, "query parameter 'model' is required (a model name)")
    num_ctx: int | None = None
    if "num_ctx" in call.query:
        text = call.query["num_ctx"]
        if not text.isdigit() or not 0 < int(text) <= MAX_CONTEXT:
            raise Problem(400, f"num_ctx must be a number of tokens, 1 to {MAX_CONTEXT}")
        num_ctx = int(text)
    request = RouteRequest(model=model, intent_header=call.query.get("intent"), num_ctx=num_ctx)
    try:
        return call.harbor.scheduler.preview(request)  # a question, not a request
    except PolicyError as err:
        raise Problem(400, str(err)) from None


@handles(api.AFFINITY)
async def affinity(call: Call[None]) -> dict[str, Affinity]:
    return call.harbor.state.active_affinity()


@handles(api.RESET_AFFINITY)
async def reset_affinity(call: Call[None]) -> api.AffinityReset:
    return api.AffinityReset(call.harbor.state.reset_affinity())


@handles(api.RESET_MODEL_AFFINITY)
async def reset_model_affinity(call: Call[None]) -> api.AffinityReset:
    model = _model(call)
    reset = call.harbor.state.reset_affinity(model)
    if not reset:
        raise Problem(404, f"{model} has no affinity")
    return api.AffinityReset(reset)


@handles(api.DECISIONS)
async def decisions(call: Call[None]) -> list[Decision]:
    try:
        limit = int(call.query.get("limit", "20"))
    except ValueError:
        raise Problem(400, "limit must be an integer") from None
    recent = list(call.harbor.ledger.decisions.values())[-max(limit, 0) :] if limit else []
    return list(reversed(recent))


@handles(api.DECISION)
async def decision(call: Call[None]) -> Decision:
    found = call.harbor.ledger.decisions.get(call.path["id"])
    if found is None:
        raise Problem(404, f"no recent request with id {call.path['id']!r}")
    return found


@handles(api.RESTART)
async def restart_backend(call: Call[None]) -> api.Restarted:
    harbor, name = call.harbor, call.path["name"]
    if name not in harbor.backends:
        raise Problem(404, f"no backend named {name!r}")
    restart = harbor.restart_backend
    if restart is None:
        raise Problem(501, "backend restarts need systemd supervision, which is off")
    ok, message = await restart(name)
    if not ok:
        raise Problem(409, message)
    return api.Restarted(name, True, message)


@handles(api.METRICS)
async def metrics(call: Call[None]) -> str:
    from harbord import exposition  # prometheus_client, from the first scrape on only

    harbor = call.harbor
    if harbor.registry is None:
        harbor.registry = exposition.registry_for(harbor)
    return exposition.render(harbor.registry).decode()
