"""Unload (`ollama stop`) means every backend: a model may be loaded on the GPU and the CPU.

Ollama unloads a model when `/api/generate` has an empty prompt (or `/api/chat` no
messages) and `keep_alive` is zero (`0`, `"0"`, `"0s"`, `"0m"` ...). Routed like a
real request, that would reach one backend and leave the model loaded on the other.
So harbord sends it to every backend that lists the model (every reachable one, when
none does), at once, and answers with Ollama's own `done_reason: "unload"` answer
once all have answered; `X-Harbor-Backend` names those that did ("gpu,cpu"). It is
an error only when every backend failed.

Why every backend that lists the model rather than those whose `/api/ps` shows it
loaded: Ollama expires the model's runner if there is one and never loads it for an
unload, so asking one that has none loaded is harmless; asking `/api/ps` first would
cost a round trip and miss a load still in progress, which `/api/ps` does not show
yet. With X-Harbor-Backend, only that backend is asked (`harborctl unload --backend`).

A preload (empty prompt, keep_alive not zero) is not this: it loads the model where
a real request would run, so it is routed like one.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
from aiohttp import web

from harbord import failures as fail
from harbord.backends import Backend
from harbord.errors import Problem
from harbord.failures import Failure
from harbord.harbor import Harbor
from harbord.learning import Outcome
from harbord.policy import PolicyError
from harbord.relay import upstream_headers
from harbord.schemas import UNDECODABLE, Attempt, Decision
from harbord.upstream import UpstreamError
from harbord.views import normalize_model

UNLOAD_PATHS = frozenset(("/api/generate", "/api/chat"))
# Ollama only marks the runner to expire: its answer is quick even on a busy backend.
UNLOAD_TIMEOUT = 15.0
# A Go duration (time.ParseDuration) that is zero: "0", or zero-valued parts with units.
_ZERO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:0+\.?0*|\.0+)(?:ns|us|µs|μs|ms|s|m|h))+)")


class _UnloadFacts(msgspec.Struct):
    prompt: str | None = None
    messages: list[msgspec.Raw] | None = None
    keep_alive: float | str | None = None


_unload_facts = msgspec.json.Decoder(_UnloadFacts)


def keep_alive_is_zero(value: float | str | None) -> bool:
    """Whether an Ollama `keep_alive` (seconds, or a Go duration string) is zero."""
    if value is None:
        return False
    if isinstance(value, float):
        return value == 0
    text = value.strip()
    try:
        return float(text) == 0
    except ValueError:
        return _ZERO_DURATION.fullmatch(text) is not None


def is_unload(path: str, body: bytes) -> bool:
    """Whether this routed request is Ollama's unload (what `ollama stop` sends)."""
    if path not in UNLOAD_PATHS or b'"keep_alive"' not in body:
        return False
    try:
        facts = _unload_facts.decode(body)
    except UNDECODABLE:
        return False  # the backend's 400 to give
    empty = not facts.prompt if path == "/api/generate" else not facts.messages
    return empty and keep_alive_is_zero(facts.keep_alive)


async def unload_everywhere(
    request: web.Request, harbor: Harbor, decision: Decision, model: str, body: bytes
) -> web.Response:
    """Send the unload to every target at once; Ollama's answer once all have answered."""
    name = normalize_model(model)
    forced = request.headers.get("X-Harbor-Backend")
    try:
        plan = harbor.scheduler.place_unload(name, forced)
    except PolicyError as err:
        raise Problem(400, str(err)) from None
    chosen = [harbor.backends[step] for step in plan.backends]
    decision.plan, decision.model, decision.intent = plan, name, plan.intent
    decision.stream = False
    results = await asyncio.gather(*(_unload_one(harbor, b, request, body) for b in chosen))
    answers: list[tuple[str, str, bytes]] = []
    failed: list[tuple[str, Failure]] = []
    for backend, (outcome, ms) in zip(chosen, results, strict=True):
        if isinstance(outcome, Failure):
            failed.append((backend.name, outcome))
            decision.attempts.append(
                Attempt(
                    backend.name,
                    "failed",
                    outcome.error_class,
                    outcome.text[:300],
                    outcome.status,
                    ms,
                )
            )
        else:
            answers.append((backend.name, *outcome))
            decision.attempts.append(Attempt(backend.name, "served", ms=ms))
        # What is loaded where has changed: let the probers see it now.
        backend.inventory_at = 0.0
        backend.wake.set()
    if not answers:
        tried = [(b.name, b.config.url) for b in chosen]
        return fail.verdict(failed, decision.id, tried)
    first, content_type, answer = answers[0]
    decision.served_by = first
    decision.first_byte_ms = round((time.time() - decision.time) * 1000, 3)
    response_headers = {
        "Content-Type": content_type,
        "X-Harbor-Backend": ",".join(n for n, _, _ in answers),
        "X-Harbor-Request-Id": decision.id,
    }
    if failed:
        response_headers["X-Harbor-Fallbacks"] = fail.fallbacks_header(failed)
    return web.Response(status=200, body=answer, headers=response_headers)


async def _unload_one(
    harbor: Harbor,
    backend: Backend,
    request: web.Request,
    body: bytes,
) -> tuple[tuple[str, bytes] | Failure, float]:
    """(content type, answer) from one backend, or its failure; and how long it took, ms."""
    config = backend.config
    started = time.monotonic()
    outcome: tuple[str, bytes] | Failure
    try:
        async with asyncio.timeout(UNLOAD_TIMEOUT):
            exchange, answer = await harbor.upstreams.answer(
                config.url,
                "POST",
                request.path_qs,
                upstream_headers(request.headers).items(),
                body,
                config.connect_timeout,
                fail.MAX_ERROR_BODY,
            )
        if exchange.status >= 400:
            outcome = fail.from_answer(exchange.status, answer, exchange.content_type)
        else:
            outcome = exchange.headers.get("Content-Type", "application/json"), answer
    except TimeoutError:
        outcome = Failure(
            "network", f"no answer from {backend.name} within {UNLOAD_TIMEOUT:g}s", timeout=True
        )
    except UpstreamError as err:
        outcome = fail.from_error(backend.name, err, config.connect_timeout)
    if isinstance(outcome, Failure) and outcome.status is None:  # no answer: the backend's
        harbor.scheduler.report(
            Outcome(
                backend.name,
                backend.config.kind,
                None,
                request.path,
                served=False,
                error_class=outcome.error_class,
                text=outcome.text,
                refused=outcome.refused,
            )
        )
    return outcome, round((time.monotonic() - started) * 1000, 3)
