"""The routing policy: a pure function from facts to an ordered plan with reasons.

No I/O here. Everything the decision needs is passed in: the request's model
and intent, a snapshot of each backend (health, inventory, memory), pins,
affinity, the per-model rules and the clock. The result is data (`Plan`), so
`harborctl route` shows exactly what a real request would do.

Order of precedence, strongest first:
  1. cooling down (a refused connection): out of the plan until the prober
     sees the backend again;
  2. health: a backend that is down goes to the end, a degraded one after the
     healthy ones;
  3. inventory: a backend whose model list lacks the model goes to the end;
  4. pin (state, else the model's configured pin);
  5. memory: a GPU backend too small for the model, or one where Ollama spilled
     the model to system RAM, goes after the CPU backends (`fast` included);
  6. affinity (`fast` only): the backend that served the model last;
  7. intent: `fast` prefers GPU backends, `heavy` CPU backends;
  8. the order of the backends in the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from harbord.config import ModelRule
from harbord.schemas import INTENTS, Affinity, BackendKind, Health, Intent, Pin, Plan, PlanStep


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


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str | None
    intent_header: str | None = None
    intent_body: str | None = None
    forced_backend: str | None = None


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


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def plan(
    request: RouteRequest,
    backends: Sequence[BackendView],
    pins: Mapping[str, Pin],
    affinity: Mapping[str, Affinity],
    rules: Mapping[str, ModelRule],
    default_intent: Intent,
    now: float,
) -> Plan:
    model = normalize_model(request.model) if request.model else None
    rule = (rules.get(request.model) or rules.get(model)) if request.model and model else None
    intent, intent_source = resolve_intent(request, rule, default_intent)

    if request.forced_backend is not None:
        for view in backends:
            if view.name == request.forced_backend:
                return Plan(
                    model=model,
                    intent=intent,
                    intent_source=intent_source,
                    steps=[PlanStep(view.name, ["forced by X-Harbor-Backend; no fallback"])],
                    forced=True,
                )
        names = ", ".join(v.name for v in backends)
        raise PolicyError(f"unknown backend {request.forced_backend!r}; expected one of: {names}")

    pin_backend: str | None = None
    pin_reason = ""
    if model is not None:
        pin = pins.get(model)
        if pin is not None and pin.active(now):
            pin_backend, pin_reason = pin.backend, f"pinned here: {pin.reason}"
        elif rule is not None and rule.pin is not None:
            pin_backend, pin_reason = rule.pin, "pinned here by the model's configuration"
    affine = affinity.get(model) if model is not None and intent == "fast" else None

    size = 0
    if model is not None:
        for view in backends:
            if view.models is not None:
                size = max(size, view.models.get(model, 0))

    preferred_kind: BackendKind = "gpu" if intent == "fast" else "cpu"
    notes: list[str] = []
    ranked: list[tuple[tuple[int, ...], PlanStep]] = []
    excluded: list[PlanStep] = []
    for index, view in enumerate(backends):
        reasons: list[str] = []
        if view.cooldown:
            excluded.append(PlanStep(view.name, ["cooling down after a refused connection"]))
            continue
        health_rank = {"down": 2, "degraded": 1}.get(view.health, 0)
        if health_rank:
            reasons.append(f"backend is {view.health}: moved back")
        missing = 0
        if model is not None and view.models is not None and model not in view.models:
            missing = 1
            reasons.append("model not in this backend's list: moved back")
        pinned = 0 if view.name == pin_backend else 1
        if not pinned:
            reasons.append(pin_reason)
        memory = 0
        if model is not None and view.kind == "gpu" and pinned:
            spill = view.spilled.get(model)
            if size and view.memory_limit and size > view.memory_limit:
                memory = 1
                reasons.append(
                    f"model size {_gb(size)} exceeds the {_gb(view.memory_limit)} limit: "
                    "after CPU backends"
                )
                notes.append(f"{model} is too large for {view.name}")
            elif spill is not None:
                memory = 1
                reasons.append(
                    f"memory pressure: only {_gb(spill[1])} of {_gb(spill[0])} in VRAM: "
                    "after CPU backends"
                )
                notes.append(f"memory pressure on {view.name} for {model}")
        affine_rank = 1
        if affine is not None and affine.backend == view.name:
            affine_rank = 0
            reasons.append("affinity: served this model last")
        kind_rank = 0 if view.kind == preferred_kind else 1
        reasons.append(
            f"{intent} intent prefers {preferred_kind}"
            if kind_rank == 0
            else f"{view.kind} fallback"
        )
        key = (health_rank, missing, pinned, memory, affine_rank, kind_rank, index)
        ranked.append((key, PlanStep(view.name, reasons)))

    ranked.sort(key=lambda item: item[0])
    return Plan(
        model=model,
        intent=intent,
        intent_source=intent_source,
        steps=[step for _, step in ranked],
        excluded=excluded,
        notes=notes,
    )
