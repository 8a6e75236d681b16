"""harbord's own endpoints: /harbor/* and /metrics.

GET    /metrics                       Prometheus metrics (metrics.py)
GET    /harbor/status                 full status (schemas.Status)
GET    /harbor/check                  per-backend health in the seed's shape
GET    /harbor/models                 which backend has which model
GET    /harbor/pins                   active pins
PUT    /harbor/pins/{model}           pin (schemas.PinRequest)
DELETE /harbor/pins/{model}           unpin
GET    /harbor/route?model=&intent=   dry-run routing decision (schemas.Plan)
GET    /harbor/decisions[?limit=N]    recent routing decisions, newest first
GET    /harbor/decisions/{id}         one decision with its attempts
POST   /harbor/backends/{name}/restart  restart a backend's unit
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from harbord import metrics as metrics_module
from harbord.config import MODEL_RE
from harbord.harbor import HARBOR
from harbord.policy import PolicyError, RouteRequest, normalize_model
from harbord.relay import error_response
from harbord.schemas import UNDECODABLE, Inventory, PinRequest

_encoder = msgspec.json.Encoder()
_pin_request = msgspec.json.Decoder(PinRequest)


def typed_json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status, content_type="application/json")


async def status(request: web.Request) -> web.StreamResponse:
    return typed_json(request.app[HARBOR].status())


async def check(request: web.Request) -> web.StreamResponse:
    return typed_json(request.app[HARBOR].check())


async def models(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    per_backend = {name: sorted(b.models or ()) for name, b in harbor.backends.items()}
    per_model: dict[str, list[str]] = {}
    for name, names in per_backend.items():
        for model in names:
            per_model.setdefault(model, []).append(name)
    return typed_json(Inventory(backends=per_backend, models=dict(sorted(per_model.items()))))


async def pins(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    now = time.time()
    return typed_json({m: p for m, p in harbor.state.pins.items() if p.active(now)})


def _model_param(request: web.Request) -> str:
    model = request.match_info["model"]
    if not MODEL_RE.match(model):
        raise web.HTTPBadRequest(reason=f"invalid model name {model[:80]!r}")
    return model


async def set_pin(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    model = _model_param(request)
    try:
        pin_request = _pin_request.decode(await request.read())
    except UNDECODABLE as err:
        return error_response(400, f"invalid pin request: {err}")
    if pin_request.backend not in harbor.backends:
        return error_response(
            400,
            f"unknown backend {pin_request.backend!r}; "
            f"expected one of: {', '.join(harbor.backends)}",
        )
    if pin_request.for_seconds is not None and pin_request.for_seconds <= 0:
        return error_response(400, "for_seconds must be > 0")
    pin = harbor.pin(
        model, pin_request.backend, pin_request.reason, pin_request.for_seconds, "operator"
    )
    return typed_json({normalize_model(model): pin})


async def clear_pin(request: web.Request) -> web.StreamResponse:
    model = _model_param(request)
    if not request.app[HARBOR].unpin(model):
        return error_response(404, f"{model} is not pinned")
    return typed_json({"unpinned": normalize_model(model)})


async def route(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    model = request.query.get("model")
    if not model or not MODEL_RE.match(model):
        return error_response(400, "query parameter 'model' is required (a model name)")
    try:
        plan = harbor.plan(RouteRequest(model=model, intent_header=request.query.get("intent")))
    except PolicyError as err:
        return error_response(400, str(err))
    return typed_json(plan)


async def decisions(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        return error_response(400, "limit must be an integer")
    recent = list(harbor.decisions.values())[-max(limit, 0) :] if limit else []
    return typed_json(list(reversed(recent)))


async def decision(request: web.Request) -> web.StreamResponse:
    found = request.app[HARBOR].decisions.get(request.match_info["id"])
    if found is None:
        return error_response(404, f"no recent request with id {request.match_info['id']!r}")
    return typed_json(found)


async def restart_backend(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    name = request.match_info["name"]
    if name not in harbor.backends:
        return error_response(404, f"no backend named {name!r}")
    restart = harbor.restart_backend
    if restart is None:
        return error_response(501, "backend restarts need systemd supervision, which is off")
    ok, message = await restart(name)
    if not ok:
        return error_response(409, message)
    return typed_json({"backend": name, "restarted": True, "message": message})


async def metrics(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    if harbor.registry is None:
        harbor.registry = metrics_module.registry_for(harbor)
    body = metrics_module.render(harbor.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/metrics", metrics)
    router.add_get("/harbor/status", status)
    router.add_get("/harbor/check", check)
    router.add_get("/harbor/models", models)
    router.add_get("/harbor/pins", pins)
    router.add_put("/harbor/pins/{model:.+}", set_pin)
    router.add_delete("/harbor/pins/{model:.+}", clear_pin)
    router.add_get("/harbor/route", route)
    router.add_get("/harbor/decisions", decisions)
    router.add_get("/harbor/decisions/{id}", decision)
    router.add_post("/harbor/backends/{name}/restart", restart_backend)
