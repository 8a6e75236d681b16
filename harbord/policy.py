"""The routing policy: a pure function from facts to an ordered plan with reasons.

No I/O here. Everything the decision needs is passed in: the request's model,
intent and context, a snapshot of each backend (health, inventory, memory, load),
pins, affinity, the per-model rules, the models' shapes and the clock. The result
is data (`Plan`), so `harborctl route` shows exactly what a real request would do.

The rules, strongest first, are named functions in `rules.RULES` (health,
inventory, pin, memory, spill, residency, busy-spill, intent, affinity, order);
each writes one element of a backend's sort key, and the first element on which
the first step beats the second is `Plan.rule`. A backend cooling down after a
refused connection is left out of the plan until the prober sees it again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from harbord.affinity import affinity_expired
from harbord.config import ModelRule
from harbord.memory import format_context, format_gb, format_gib
from harbord.model_size import MeasureSource, size_from_measurement
from harbord.residency import Usage
from harbord.rules import RULES, Candidate, GroupRule, OneRule, Request
from harbord.schemas import (
    INTENTS,
    Affinity,
    BackendEstimate,
    BackendKind,
    Intent,
    MeasuredSize,
    MemoryEstimate,
    ModelFacts,
    Pin,
    PlacementRule,
    Plan,
    PlanStep,
)
from harbord.views import BackendView as BackendView  # re-exported: the policy's input
from harbord.views import normalize_model as normalize_model


class PolicyError(ValueError):
    """The request asks for something that cannot be routed (a 400)."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str | None
    intent_header: str | None = None
    intent_body: str | None = None
    forced_backend: str | None = None
    num_ctx: int | None = None  # options.num_ctx


def resolve_intent(
    request: RouteRequest, rule: ModelRule | None, default: Intent
) -> tuple[Intent, str]:
    if request.intent_header is not None:
        return _known_intent(request.intent_header, "header")
    if request.intent_body is not None:
        return _known_intent(request.intent_body, "body")
    if rule is not None and rule.intent is not None:
        return rule.intent, "model rule"
    return default, "default"


def _known_intent(value: str, source: str) -> tuple[Intent, str]:
    for intent in INTENTS:
        if value == intent:
            return intent, source
    raise PolicyError(f"unknown intent {value!r} (from the {source}); expected one of: fast, heavy")


_NO_FACTS: Mapping[str, ModelFacts] = MappingProxyType({})

# Estimates by their inputs: a model's estimate is the same for every request at the
# same context on the same backend, and costs a few microseconds to make.
_Needs = tuple[int, MeasureSource, MemoryEstimate]
_NEEDS: dict[tuple[object, ...], tuple[ModelFacts | None, _Needs]] = {}
_NEEDS_KEPT = 4096


def memory_needs(
    facts: ModelFacts | None,
    size: int,
    ctx: int,
    view: BackendView,
    measured: MeasuredSize | None,
) -> _Needs:
    """What the model takes at `ctx` on this backend (model_size.size_from_measurement):
    bytes, whether measured or estimated, and the estimate's parts. Memoized."""
    key = (
        id(facts),
        size,
        ctx,
        view.kind,
        view.parallel,
        view.kv_cache_type,
        view.flash_attention,
        measured,
    )
    hit = _NEEDS.get(key)
    if hit is not None and hit[0] is facts:
        return hit[1]
    needs = size_from_measurement(
        measured,
        facts,
        size,
        ctx,
        view.kind,
        view.parallel,
        view.kv_cache_type,
        view.flash_attention,
    )
    if len(_NEEDS) >= _NEEDS_KEPT:
        _NEEDS.clear()
    _NEEDS[key] = (facts, needs)
    return needs


_NO_USAGE: Mapping[str, Usage] = MappingProxyType({})


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
    usage: Mapping[str, Usage] = _NO_USAGE,
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
        return _forced(request, backends, model, intent, intent_source, pin_backend)

    affine = affinity.get(model) if model is not None else None
    if affine is not None and affinity_expired(affine, now, affinity_ttl):
        affine = None
    size = 0
    if model is not None:
        for view in backends:
            if view.models is not None:
                size = max(size, view.models.get(model, 0))
    facts = model_facts.get(model) if model is not None and size else None
    max_ctx = facts.context_length if facts is not None else 0

    req = Request(
        model=model,
        intent=intent,
        preferred="gpu" if intent == "fast" else "cpu",
        pin_backend=pin_backend,
        pin_reason=pin_reason,
        affine=affine,
        size=size,
        now=now,
        cpu_slowdown=cpu_slowdown,
        usage=usage,
        notes=[],
        background=_background(request, intent_source, backends),
    )
    candidates: list[Candidate] = []
    excluded: list[PlanStep] = []
    for index, view in enumerate(backends):
        if view.cooldown:
            excluded.append(PlanStep(view.name, ["cooling down after a refused connection"]))
            continue
        # Ollama caps the context at the model's trained length (memory.effective_context).
        ctx = request.num_ctx or view.default_context
        if 0 < max_ctx < ctx:
            ctx = max_ctx
        cand = Candidate(view, index, PlanStep(view.name, []), ctx, None, [])
        if size:
            assert model is not None
            measured = view.measured.get(model)
            cand.needs, cand.needs_source, cand.estimate = memory_needs(
                facts, size, ctx, view, measured
            )
            if measured is not None and cand.needs_source == "measured":
                cand.measured_at = measured.num_ctx
        candidates.append(cand)

    if candidates:
        for ones, group in _RULE_RUNS:
            for cand in candidates:
                key = cand.key
                for one in ones:
                    key.append(one(req, cand))
            if group is not None:
                for cand, value in zip(candidates, group(req, candidates), strict=True):
                    cand.key.append(value)
    candidates.sort(key=_key)
    refused = _fits_nowhere(req, candidates)

    return Plan(
        model=model,
        intent=intent,
        intent_source=intent_source,
        steps=[c.step for c in candidates],
        excluded=excluded,
        notes=req.notes,
        rule=_deciding_rule(candidates, excluded),
        pinned=pin_backend,
        num_ctx=request.num_ctx,
        estimates=[_estimate_of(c) for c in candidates],
        refused=refused,
        background=req.background,
    )


def _background(request: RouteRequest, intent_source: str, backends: Sequence[BackendView]) -> bool:
    """Whether a request is background work: no intent said (neither the client nor
    the model's rule), at a context beyond a GPU backend's default, as coding agents
    and long-document tools run. It never evicts a model interactive work is using."""
    num_ctx = request.num_ctx
    if num_ctx is None or intent_source != "default":
        return False
    return any(v.kind == "gpu" and num_ctx > v.default_context for v in backends)


def _fits_nowhere(req: Request, candidates: Sequence[Candidate]) -> str | None:
    """When the model fits no backend's memory: why, with the numbers, so the request
    is answered at once and nothing is loaded (`llama3.1:70b at 8k needs 45.1 GB; gpu
    has 12 GiB, cpu has 28.8 GiB of RAM`). None when it fits one, or one's budget is not
    known."""
    if req.model is None or not candidates:
        return None
    for cand in candidates:  # a loop, not any(): this runs for every plan
        if cand.fits is not False:
            return None
    first = candidates[0]
    needs = max(c.needs or 0 for c in candidates)
    has = ", ".join(
        f"{c.view.name} has "
        + (
            f"{format_gib(c.view.budget.bytes)}{' of RAM' if c.view.kind == 'cpu' else ''}"
            if c.view.budget is not None
            else f"a {format_gb(c.view.memory_limit or 0)} limit"
        )
        for c in candidates
    )
    return f"{req.model} at {format_context(first.ctx)} needs {format_gb(needs)}; {has}"


def _rule_runs() -> tuple[tuple[tuple[OneRule, ...], GroupRule | None], ...]:
    """RULES as runs of one-candidate rules, each run ended by a group rule (or the
    end): a candidate goes through a run in one pass, in RULES order all the same."""
    runs: list[tuple[tuple[OneRule, ...], GroupRule | None]] = []
    ones: list[OneRule] = []
    for _, one, group in RULES:
        if one is not None:
            ones.append(one)
        else:
            runs.append((tuple(ones), group))
            ones = []
    if ones:
        runs.append((tuple(ones), None))
    return tuple(runs)


_RULE_RUNS = _rule_runs()


def _key(cand: Candidate) -> list[int]:
    return cand.key


def _forced(
    request: RouteRequest,
    backends: Sequence[BackendView],
    model: str | None,
    intent: Intent,
    intent_source: str,
    pin_backend: str | None,
) -> Plan:
    forced = request.forced_backend
    assert forced is not None
    _check_known(backends, forced)
    return Plan(
        model=model,
        intent=intent,
        intent_source=intent_source,
        steps=[PlanStep(forced, [_FORCED])],
        forced=True,
        rule="forced",
        pinned=pin_backend,
        num_ctx=request.num_ctx,
    )


_FORCED = "forced by X-Harbor-Backend; no fallback"


def _check_known(backends: Sequence[BackendView], name: str) -> None:
    """X-Harbor-Backend must name a configured backend."""
    if all(v.name != name for v in backends):
        names = ", ".join(v.name for v in backends)
        raise PolicyError(f"unknown backend {name!r}; expected one of: {names}")


_RULE_NAMES: tuple[PlacementRule, ...] = tuple(name for name, _, _ in RULES)


def _deciding_rule(ranked: Sequence[Candidate], excluded: Sequence[PlanStep]) -> PlacementRule:
    if len(ranked) < 2:
        return "health" if excluded else "order"
    second = ranked[1].key
    for i, rank in enumerate(ranked[0].key):
        if rank != second[i]:
            return _RULE_NAMES[i]
    return "order"


def _estimate_of(cand: Candidate) -> BackendEstimate:
    """The numbers behind one backend's place (`route`, `explain`): made for every plan,
    so written out flat (a call per part and a star-unpack cost a tenth of a plan)."""
    view, est = cand.view, cand.estimate
    budget = view.budget
    known = view.resident is not None
    return BackendEstimate(
        view.name,
        cand.ctx,
        cand.needs,
        budget.bytes if budget is not None else None,
        budget.source if budget is not None else None,
        view.parallel,
        view.in_flight,
        view.queued,
        cand.service_ms,
        cand.finish_ms,
        cand.resident,
        cand.load_ms,
        cand.load_learned,
        list(cand.evicts) if cand.evicts else [],
        round(cand.eviction_ms, 1) if cand.eviction_ms else 0.0,
        cand.expected_ms,
        view.capacity if known else None,
        view.capacity_source if known else None,
        est.weights if est is not None else None,
        est.kv if est is not None else None,
        est.graph if est is not None else None,
        est.projector if est is not None else None,
        est.reserve if est is not None else None,
        cand.needs_source if est is not None else None,
        cand.measured_at if est is not None else None,
    )


# -- plans without a model ---------------------------------------------------------


_HEALTH_ORDER: Mapping[str, int] = MappingProxyType({"down": 2, "degraded": 1})


def reachable(backends: Sequence[BackendView]) -> list[str]:
    """Backends worth asking now (aggregated reads): not down, not cooling down."""
    return [v.name for v in backends if v.health != "down" and not v.cooldown]


def plan_without_model(backends: Sequence[BackendView], forced: str | None) -> Plan:
    """A request with no model to route by (pass-through): healthy backends first,
    each group in configuration order."""
    if forced is not None:
        _check_known(backends, forced)
        return Plan(
            model=None,
            intent="fast",
            intent_source="default",
            steps=[PlanStep(forced, [_FORCED])],
            forced=True,
            rule="forced",
        )
    usable = sorted(
        (v for v in backends if not v.cooldown), key=lambda v: _HEALTH_ORDER.get(v.health, 0)
    )
    return Plan(
        model=None,
        intent="fast",
        intent_source="default",
        steps=[PlanStep(v.name, [f"no model to route by; backend is {v.health}"]) for v in usable],
        excluded=[
            PlanStep(v.name, ["cooling down after a refused connection"])
            for v in backends
            if v.cooldown
        ],
        rule="order",
    )


def plan_unload(backends: Sequence[BackendView], model: str, forced: str | None) -> Plan:
    """An unload goes to every reachable backend that lists the model (every reachable
    one when none does), or to the one X-Harbor-Backend names."""
    reason = "unload goes to every backend that may have the model loaded"
    if forced is not None:
        _check_known(backends, forced)
        chosen = [forced]
    else:
        usable = reachable(backends)
        listing = [
            v.name for v in backends if v.name in usable and (v.models is None or model in v.models)
        ]
        chosen = listing or usable
    return Plan(
        model=model,
        intent="fast",
        intent_source="default",
        steps=[PlanStep(name, [reason]) for name in chosen],
        forced=forced is not None,
        rule="forced" if forced is not None else "order",
    )


def may_move_on(plan: Plan, kind: BackendKind, error_class: str) -> bool:
    """After a retryable failure on a backend of `kind`: may the request try its next
    step? A heavy request whose CPU backend is only busy waits for the CPU (a 503 with
    Retry-After), rather than loading its large model onto a GPU and evicting what the
    fast requests run there; a CPU backend that is down does let it move on."""
    return not (plan.intent == "heavy" and error_class == "busy" and kind == "cpu")
