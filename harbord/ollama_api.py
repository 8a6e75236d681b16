"""Ollama endpoints that are not routed per model.

Aggregated over the healthy backends: `/api/tags` (each model once),
`/api/ps`, `/v1/models`, `/api/version`, and `/` for liveness checks.
Model management (pull, delete, copy, create, push, blobs) goes to one
backend, the first GPU backend unless `X-Harbor-Backend` names another, with
its progress streamed through; the model store is shared, so every backend's
inventory is refreshed afterwards.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from harbord.backends import Backend
from harbord.harbor import HARBOR, Harbor, new_request_id
from harbord.relay import RELAY, error_response, is_openai
from harbord.schemas import UNDECODABLE, Decision, Plan, PlanStep

FETCH_TIMEOUT = 5.0


def _reachable(harbor: Harbor) -> list[Backend]:
    return [b for b in harbor.backends.values() if b.health != "down" and not b.cooldown]


async def _fetch(harbor: Harbor, backend: Backend, path: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with harbor.session.get(backend.config.url + path, timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return msgspec.json.decode(await resp.read())
    except (aiohttp.ClientError, OSError, TimeoutError, *UNDECODABLE):
        return None


async def _gather(harbor: Harbor, path: str) -> list[tuple[Backend, Any]]:
    backends = _reachable(harbor)
    answers = await asyncio.gather(*(_fetch(harbor, b, path) for b in backends))
    return [(b, a) for b, a in zip(backends, answers, strict=True) if isinstance(a, dict)]


def _no_backend(openai: bool = False) -> web.Response:
    return error_response(503, "no backend available", openai, {"Retry-After": "5"})


async def root(request: web.Request) -> web.StreamResponse:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.StreamResponse:
    harbor = request.app[HARBOR]
    for backend in _reachable(harbor):
        if backend.version:
            return web.json_response({"version": backend.version})
    answers = await _gather(harbor, "/api/version")
    if not answers:
        return _no_backend()
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
    answers = await _gather(request.app[HARBOR], "/api/tags")
    if not answers:
        return _no_backend()
    return web.json_response({"models": _merge(answers, "models", "name") or []})


async def ps(request: web.Request) -> web.StreamResponse:
    answers = await _gather(request.app[HARBOR], "/api/ps")
    if not answers:
        return _no_backend()
    models = [m for _, answer in answers for m in answer.get("models") or () if isinstance(m, dict)]
    return web.json_response({"models": models})


async def v1_models(request: web.Request) -> web.StreamResponse:
    answers = await _gather(request.app[HARBOR], "/v1/models")
    if not answers:
        return _no_backend(openai=True)
    return web.json_response({"object": "list", "data": _merge(answers, "data", "id") or None})


async def manage(request: web.Request) -> web.StreamResponse:
    """Model management: one backend, no fallback, progress streamed through."""
    started = time.monotonic()
    harbor = request.app[HARBOR]
    harbor.counters.requests += 1
    openai = is_openai(request.path)
    named = request.headers.get("X-Harbor-Backend")
    if named is not None and named not in harbor.backends:
        return error_response(
            400, f"unknown backend {named!r}; expected one of: {', '.join(harbor.backends)}", openai
        )
    target = named or next(
        (n for n, b in harbor.backends.items() if b.config.kind == "gpu"),
        next(iter(harbor.backends)),
    )
    body: bytes | aiohttp.StreamReader
    if request.path.startswith("/api/blobs/"):
        body = request.content  # blobs are large: stream them through, never hold them
    else:
        body = await request.read()
    plan = Plan(
        model=None,
        intent="fast",
        intent_source="default",
        steps=[PlanStep(target, ["model management goes to one backend"])],
        forced=True,
    )
    decision = Decision(
        id=new_request_id(),
        time=time.time(),
        method=request.method,
        path=request.path,
        model=None,
        intent="fast",
        plan=plan,
    )
    try:
        return await request.app[RELAY].serve(request, plan, body, decision, started)
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
    for path in ("/api/pull", "/api/copy", "/api/create", "/api/push"):
        router.add_post(path, manage)
    router.add_delete("/api/delete", manage)
    router.add_route("HEAD", "/api/blobs/{digest}", manage)
    router.add_post("/api/blobs/{digest}", manage)
