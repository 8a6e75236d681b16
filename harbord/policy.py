"""The routing policy: a pure function from facts to an ordered plan with reasons.

No I/O here. Everything the decision needs is passed in: the request's model,
intent and context, a snapshot of each backend (health, inventory, memory, load),
pins, affinity, the per-model rules, the models' shapes and the clock. The result
is data (`Plan`), so `harborctl route` shows exactly what a real request would do.

Order of precedence, strongest first (each is one element of the sort key; the
first element on which the first step beats the second is `Plan.rule`):
  1. cooling down (a refused connection): out of the plan until the prober
     sees the backend again;
  2. health: a backend that is down goes to the end, a degraded one after the
     healthy ones;
  3. inventory: a backend whose model list lacks the model goes to the end;
  4. pin (state, else the model's configured pin);
  5. memory: a GPU backend where the model would not fit goes after the CPU
     backends (`fast` included): its size over `max_model_size`/`vram`, or
     weights + KV cache at the request's context over the GPU's memory budget;
  6. spill: a GPU backend where Ollama spilled the model to system RAM (now, or
     before at this context or a smaller one) goes after the CPU backends;
  7. busy spill (`fast` only): when the first GPU backend is saturated, a CPU
     backend that has the model goes first if it is expected to finish sooner;
  8. intent: `fast` prefers GPU backends, `heavy` CPU backends;
  9. affinity: among backends equal on all of the above, the one that served the
     model last, until `affinity_ttl` after that answer;
 10. the order of the backends in the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from harbord.affinity import affinity_expired
from harbord.config import ModelRule
from harbord.memory import (
    ALLOWANCE,
    KV_BYTES_PER_ELEMENT,
    OLLAMA_DEFAULT_CONTEXT,
    format_context,
    format_gb,
    format_gib,
    kv_elements_per_token,
)
from harbord.queueing import expected_finish_ms
from harbord.schemas import (
    INTENTS,
    Affinity,
    BackendEstimate,
    BackendKind,
    Health,
    Intent,
    KvCacheType,
    MemoryBudget,
    ModelFacts,
    Pin,
    PlacementRule,
    Plan,
    PlanStep,
)


class PolicyError(ValueError):
    """The request asks for something that cannot be routed (a 400)."""


@dataclass(frozen=True, slots=True)
class BackendView:
    """What the policy knows about one backend at decision time."""

    name: str
    kind: BackendKind
    health: Health = "unknown"
    cooldown: bool = False
    # Model name -> size in bytes from the backend's /api/tags; None = not known yet.
    models: Mapping[str, int] | None = None
    # Model name -> (size, size_vram) for models /api/ps shows partly off the GPU.
    spilled: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    memory_limit: int | None = None  # bytes; GPU backends only
    # What the GPU can give one model, with the figure's source (memory.choose_budget).
    budget: MemoryBudget | None = None
    default_context: int = OLLAMA_DEFAULT_CONTEXT  # memory.default_context
    kv_cache_type: KvCacheType = "f16"
    parallel: int = 1  # requests one model serves at once (OLLAMA_NUM_PARALLEL)
    in_flight: int = 0
    queued: int = 0
    # Model name -> moving average of a request's duration here, ms (queueing.ewma).
    service_ms: Mapping[str, float] = field(default_factory=dict)
    # Model name -> the smallest context it spilled at here (memory.update_spills).
    spilled_contexts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str | None
    intent_header: str | None = None
    intent_body: str | None = None
    forced_backend: str | None = None
    num_ctx: int | None = None  # options.num_ctx


def normalize_model(name: str) -> str:
    """Ollama's canonical form: a name without a tag means `:latest`."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def resolve_intent(
    request: RouteRequest, rule: ModelRule | None, default: Intent
) -> tuple[Intent, str]:
    for value, source in ((request.intent_header, "header"), (request.intent_body, "body")):
        if value is None:
            continue
        for intent in INTENTS:
            if value == intent:
                return intent, source
        raise PolicyError(
            f"unknown intent {value!r} (from the {source}); expected one of: fast, heavy"
        )
    if rule is not None and rule.intent is not None:
        return rule.intent, "model rule"
    return default, "default"


# The sort key's elements, in order, named by the rule each one is.
_RULES: tuple[PlacementRule, ...] = (
    "health",
    "inventory",
    "pin",
    "memory",
    "spill",
    "busy-spill",
    "intent",
    "affinity",
    "order",
)
_BUSY = 5  # the key's busy-spill element
_NO_FACTS: Mapping[str, ModelFacts] = MappingProxyType({})
_NO_LOAD: tuple[None, None] = (None, None)


_HEALTH_RANK: Mapping[str, int] = MappingProxyType({"down": 2, "degraded": 1})
# One backend on its way into the plan: (sort key, step, view, context, bytes needed).
# The key ends with the backend's index, so no two keys are equal and the sort
# never compares the rest.
_Ranked = tuple[tuple[int, ...], PlanStep, BackendView, int, int | None]


def plan(
    request: RouteRequest,
    backends: Sequence[BackendView],
    pins: Mapping[str, Pin],
    affinity: Mapping[str, Affinity],
    rules: Mapping[str, ModelRule],
    default_intent: Intent,
    now: float,
    *,
    model_facts: Mapping[str, ModelFacts] = _NO_FACTS,
    affinity_ttl: float = 300.0,
    cpu_slowdown: float = 6.0,
) -> Plan:
    model = normalize_model(request.model) if request.model else None
    rule = (rules.get(request.model) or rules.get(model)) if request.model and model else None
    intent, intent_source = resolve_intent(request, rule, default_intent)

    pin_backend: str | None = None
    pin_reason = ""
    if model is not None:
        pin = pins.get(model)
        if pin is not None and pin.active(now):
            pin_backend, pin_reason = pin.backend, f"pinned here: {pin.reason}"
        elif rule is not None and rule.pin is not None:
            pin_backend, pin_reason = rule.pin, "pinned here by the model's configuration"

    if request.forced_backend is not None:
        for view in backends:
            if view.name == request.forced_backend:
                return Plan(
                    model=model,
                    intent=intent,
                    intent_source=intent_source,
                    steps=[PlanStep(view.name, ["forced by X-Harbor-Backend; no fallback"])],
                    forced=True,
                    rule="forced",
                    pinned=pin_backend,
                    num_ctx=request.num_ctx,
                )
        names = ", ".join(v.name for v in backends)
        raise PolicyError(f"unknown backend {request.forced_backend!r}; expected one of: {names}")

    affine = affinity.get(model) if model is not None else None
    if affine is not None and affinity_expired(affine, now, affinity_ttl):
        affine = None
    size = 0
    if model is not None:
        for view in backends:
            if view.models is not None:
                size = max(size, view.models.get(model, 0))
    facts = model_facts.get(model) if model is not None and size else None
    kv_per_token = kv_elements_per_token(facts) if facts is not None else 0
    max_ctx = facts.context_length if facts is not None else 0

    preferred_kind: BackendKind = "gpu" if intent == "fast" else "cpu"
    notes: list[str] = []
    ranked: list[_Ranked] = []
    excluded: list[PlanStep] = []
    for index, view in enumerate(backends):
        if view.cooldown:
            excluded.append(PlanStep(view.name, ["cooling down after a refused connection"]))
            continue
        reasons: list[str] = []
        health_rank = _HEALTH_RANK.get(view.health, 0)
        if health_rank:
            reasons.append(f"backend is {view.health}: moved back")
        missing = 0
        if model is not None and view.models is not None and model not in view.models:
            missing = 1
            reasons.append("model not in this backend's list: moved back")
        pinned = 0 if view.name == pin_backend else 1
        if not pinned:
            reasons.append(pin_reason)
        # Ollama caps the context at the model's trained length (memory.effective_context).
        ctx = request.num_ctx or view.default_context
        if 0 < max_ctx < ctx:
            ctx = max_ctx
        needs: int | None = None
        if size:  # memory.estimate, inlined: this loop is on every request's path
            kv_bytes = KV_BYTES_PER_ELEMENT[view.kv_cache_type]
            needs = size + int(kv_per_token * ctx * view.parallel * kv_bytes) + ALLOWANCE
        memory = spill = 0
        if model is not None and view.kind == "gpu" and pinned:
            budget = view.budget
            if size and view.memory_limit and size > view.memory_limit:
                memory = 1
                reasons.append(
                    f"model size {format_gb(size)} exceeds the {format_gb(view.memory_limit)} "
                    "limit: after CPU backends"
                )
                notes.append(f"{model} is too large for {view.name}")
            elif needs is not None and budget is not None and needs > budget.bytes:
                memory = 1
                context = format_context(ctx)
                reasons.append(
                    f"needs {format_gb(needs)} at {context} context, {view.name} has "
                    f"{format_gib(budget.bytes)} ({budget.source}): after CPU backends"
                )
                notes.append(f"{model} at {context} context does not fit {view.name}")
            spilled = view.spilled.get(model) if view.spilled else None
            spilled_at = view.spilled_contexts.get(model) if view.spilled_contexts else None
            if spilled is not None:
                spill = 1
                reasons.append(
                    f"memory pressure: only {format_gb(spilled[1])} of {format_gb(spilled[0])} "
                    "in VRAM: after CPU backends"
                )
                notes.append(f"memory pressure on {view.name} for {model}")
            elif spilled_at is not None and ctx >= spilled_at:
                spill = 1
                reasons.append(
                    f"spilled to system RAM here at {format_context(spilled_at)} context, this "
                    f"request needs {format_context(ctx)}: after CPU backends"
                )
                notes.append(f"{model} spilled on {view.name} at {format_context(spilled_at)}")
        kind_rank = 0 if view.kind == preferred_kind else 1
        reasons.append(
            f"{intent} intent prefers {preferred_kind}"
            if kind_rank == 0
            else f"{view.kind} fallback"
        )
        affine_rank = 1
        if affine is not None and affine.backend == view.name:
            affine_rank = 0
            reasons.append("affinity: served this model last")
        key = (health_rank, missing, pinned, memory, spill, 0, kind_rank, affine_rank, index)
        ranked.append((key, PlanStep(view.name, reasons), view, ctx, needs))

    ranked.sort()
    load: dict[str, tuple[float, float]] = {}
    top = ranked[0][2] if ranked else None
    if top is not None and top.in_flight >= top.parallel and intent == "fast" and model:
        _busy_spill(ranked, model, cpu_slowdown, notes, load)

    return Plan(
        model=model,
        intent=intent,
        intent_source=intent_source,
        steps=[item[1] for item in ranked],
        excluded=excluded,
        notes=notes,
        rule=_deciding_rule(ranked, excluded),
        pinned=pin_backend,
        num_ctx=request.num_ctx,
        estimates=[_estimate_of(item, load) for item in ranked],
    )


def _busy_spill(
    ranked: list[_Ranked],
    model: str,
    cpu_slowdown: float,
    notes: list[str],
    load: dict[str, tuple[float, float]],
) -> None:
    """A saturated first GPU: a CPU backend equal on everything stronger goes first
    when it is expected to finish this request sooner. Fills `load` with each
    backend's (service time, expected finish) it looked at."""
    top_key, top_step, gpu = ranked[0][:3]
    gpu_ms = gpu.service_ms.get(model)
    if gpu.kind != "gpu" or gpu.in_flight < gpu.parallel or not gpu_ms or len(ranked) < 2:
        return
    gpu_finish = expected_finish_ms(gpu_ms, gpu.in_flight, gpu.queued, gpu.parallel)
    load[gpu.name] = (gpu_ms, gpu_finish)
    stronger = top_key[:_BUSY]
    best: _Ranked | None = None
    best_finish = gpu_finish
    for item in ranked[1:]:
        cpu = item[2]
        if cpu.kind != "cpu" or item[0][:_BUSY] != stronger:
            continue
        if cpu.models is None or model not in cpu.models:
            continue
        service = cpu.service_ms.get(model) or gpu_ms * cpu_slowdown
        finish = expected_finish_ms(service, cpu.in_flight, cpu.queued, cpu.parallel)
        load[cpu.name] = (service, finish)
        if finish < best_finish:
            best, best_finish = item, finish
    if best is None:
        return
    busy = (
        f"{gpu.name} is busy ({gpu.in_flight} running, {gpu.queued} queued, "
        f"{gpu.parallel} at once): done in ~{gpu_finish:.0f} ms there"
    )
    best[1].reasons.insert(0, f"{busy}, ~{best_finish:.0f} ms here: first")
    top_step.reasons.insert(0, f"{busy}: after {best[2].name}")
    notes.append(f"{gpu.name} is busy: {model} goes to {best[2].name}")
    for i, item in enumerate(ranked):
        if item is not best:
            key = item[0]
            ranked[i] = ((*key[:_BUSY], 1, *key[_BUSY + 1 :]), *item[1:])
    ranked.sort()


def _deciding_rule(ranked: Sequence[_Ranked], excluded: Sequence[PlanStep]) -> PlacementRule:
    if len(ranked) < 2:
        return "health" if excluded else "order"
    first, second = ranked[0][0], ranked[1][0]
    for rule, a, b in zip(_RULES, first, second, strict=True):
        if a != b:
            return rule
    return "order"


def _estimate_of(item: _Ranked, load: Mapping[str, tuple[float, float]]) -> BackendEstimate:
    _, _, view, ctx, needs = item
    budget = view.budget if view.kind == "gpu" else None
    service, finish = load.get(view.name) or _NO_LOAD
    return BackendEstimate(
        view.name,
        ctx,
        needs,
        budget.bytes if budget is not None else None,
        budget.source if budget is not None else None,
        view.parallel,
        view.in_flight,
        view.queued,
        service,
        finish,
    )
