"""Ollama endpoints that are not routed per model.

Aggregated over the healthy backends: `/api/tags` (each model once),
`/api/ps`, `/v1/models` and `/v1/models/{model}`, `/api/version`, and `/` for
liveness checks.
Model management (pull, delete, copy, create, push, blobs) goes to one
backend, the first GPU backend unless `X-Harbor-Backend` names another, with
its progress streamed through; the model store is shared, so every backend's
inventory is refreshed afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from harbord.backends import Backend
from harbord.config import MODEL_RE
from harbord.errors import Problem
from harbord.failures import none_reachable
from harbord.harbor import HARBOR, Harbor
from harbord.ledger import Ledger, accounted
from harbord.relay import RELAY
from harbord.schemas import UNDECODABLE, Decision, Plan, PlanStep
from harbord.upstream import UpstreamError
from harbord.views import normalize_model

FETCH_TIMEOUT = 5.0
MAX_ANSWER = 16 * 1024 * 1024  # an /api/tags of a large model store is still far below
BLOB_CHUNK = 256 * 1024


def _reachable(harbor: Harbor) -> list[Backend]:
    return harbor.scheduler.reachable()


async def _fetch(harbor: Harbor, backend: Backend, path: str) -> Any:
    config = backend.config
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            exchange, body = await harbor.upstreams.answer(
                config.url, "GET", path, (), b"", config.connect_timeout, MAX_ANSWER
            )
        return msgspec.json.decode(body) if exchange.status == 200 else None
    except (UpstreamError, TimeoutError, *UNDECODABLE):
        return None


async def _gather(harbor: Harbor, path: str) -> list[tuple[Backend, Any]]:
    backends = _reachable(harbor)
    answers = await asyncio.gather(*(_fetch(harbor, b, path) for b in backends))
    return [(b, a) for b, a in zip(backends, answers, strict=True) if isinstance(a, dict)]


def _no_backend(harbor: Harbor) -> Problem:
    tried = [(b.name, b.config.url) for b in harbor.backends.values()]
    return Problem(503, none_reachable(tried), {"Retry-After": "5"})


async def root(request: web.Request) -> web.StreamResponse:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    for backend in _reachable(harbor):
        if backend.version:
            return web.json_response({"version": backend.version})
    answers = await _gather(harbor, "/api/version")
    if not answers:
        raise _no_backend(harbor)
    return web.json_response({"version": answers[0][1].get("version", "")})


def _merge(answers: list[tuple[Backend, Any]], key: str, ident: str) -> list[dict[str, Any]] | None:
    merged: dict[str, dict[str, Any]] = {}
    seen_any = False
    for _, answer in answers:
        items = answer.get(key)
        seen_any = seen_any or key in answer
        for item in items or ():
            if isinstance(item, dict) and isinstance(item.get(ident), str):
                merged.setdefault(item[ident], item)
    return list(merged.values()) if merged or seen_any else None


async def tags(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    answers = await _gather(harbor, "/api/tags")
    if not answers:
        raise _no_backend(harbor)
    return web.json_response({"models": _merge(answers, "models", "name") or []})


async def ps(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    answers = await _gather(harbor, "/api/ps")
    if not answers:
        raise _no_backend(harbor)
    models = [m for _, answer in answers for m in answer.get("models") or () if isinstance(m, dict)]
    return web.json_response({"models": models})


async def v1_models(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    answers = await _gather(harbor, "/v1/models")
    if not answers:
        raise _no_backend(harbor)
    return web.json_response({"object": "list", "data": _merge(answers, "data", "id") or None})


async def v1_model(request: web.Request) -> web.StreamResponse:
    """One model object (`client.models.retrieve`), from the backends' `/v1/models`."""
    harbor = request.app[HARBOR]
    model = request.match_info["model"]
    if not MODEL_RE.fullmatch(model):
        raise Problem(400, f"invalid model name {model[:80]!r}")
    answers = await _gather(harbor, "/v1/models")
    if not answers:
        raise _no_backend(harbor)
    wanted = normalize_model(model)
    for item in _merge(answers, "data", "id") or ():
        if normalize_model(item["id"]) == wanted:
            return web.json_response({**item, "id": model})  # Ollama names it as asked
    raise Problem(404, f"model '{model}' not found")


async def manage(request: web.Request, decision: Decision) -> web.StreamResponse:
    """Model management: one backend, no fallback, progress streamed through."""
    harbor = request.app[HARBOR]
    named = request.headers.get("X-Harbor-Backend")
    if named is not None and named not in harbor.backends:
        raise Problem(
            400, f"unknown backend {named!r}; expected one of: {', '.join(harbor.backends)}"
        )
    target = named or next(
        (n for n, b in harbor.backends.items() if b.config.kind == "gpu"),
        next(iter(harbor.backends)),
    )
    body: bytes | AsyncIterator[bytes]
    if request.method == "POST" and request.path.startswith("/api/blobs/"):
        body = request.content.iter_chunked(BLOB_CHUNK)  # large: stream it, never hold it
    else:
        body = await request.read()
    plan = Plan(
        model=None,
        intent="fast",
        intent_source="default",
        steps=[PlanStep(target, ["model management goes to one backend"])],
        forced=True,
        rule="forced",
    )
    try:
        return await request.app[RELAY].run(request, plan, body, decision, request.content_length)
    finally:
        # The model store is shared: every backend's list may have changed.
        for backend in harbor.backends.values():
            backend.inventory_at = 0.0
            backend.wake.set()


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", root)  # GET also answers HEAD
    router.add_get("/api/version", version)
    router.add_get("/api/tags", tags)
    router.add_get("/api/ps", ps)
    router.add_get("/v1/models", v1_models)
    router.add_get("/v1/models/{model:.+}", v1_model)
    managed = accounted(_ledger, manage)
    for path in ("/api/pull", "/api/copy", "/api/create", "/api/push"):
        router.add_post(path, managed)
    router.add_delete("/api/delete", managed)
    router.add_route("HEAD", "/api/blobs/{digest}", managed)
    router.add_post("/api/blobs/{digest}", managed)


def _ledger(request: web.Request) -> Ledger:
    return request.app[HARBOR].ledger
