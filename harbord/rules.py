"""The placement rules, strongest first: each a small pure function over one candidate.

`policy.plan` builds one `Candidate` per backend and runs `RULES` in order; each
rule writes its rank (0 is better) into the candidate's key at its own position and
may say why. Candidates sort by that key, and the first rule on which the first two
differ is the plan's `rule`. Adding a rule means adding one function and one line
in `RULES`.

Most rules look at one candidate alone. Two compare a candidate with the others
that are equal on every stronger rule (its *group*): `residency` (the expected
time, loads and evictions included) and `busy-spill` (a saturated first choice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from harbord import residency
from harbord.memory import format_context, format_gb, format_gib
from harbord.model_size import MeasureSource
from harbord.queueing import expected_finish_ms
from harbord.schemas import (
    Affinity,
    BackendKind,
    Intent,
    MemoryEstimate,
    PlacementRule,
    PlanStep,
)
from harbord.views import BackendView


@dataclass(slots=True, eq=False)
class Request:
    """What every rule may read about the request being placed."""

    model: str | None
    intent: Intent
    preferred: BackendKind
    pin_backend: str | None
    pin_reason: str
    affine: Affinity | None
    size: int  # the model's weights, bytes (0: not known)
    now: float
    cpu_slowdown: float
    usage: Mapping[str, residency.Usage]
    notes: list[str]
    # A request with no intent of its own at a context beyond the GPUs' default (a
    # coding agent, a long document): background work, never evicting interactive work.
    background: bool = False


@dataclass(slots=True, eq=False)
class Candidate:
    """One backend on its way into the plan."""

    view: BackendView
    index: int
    step: PlanStep
    ctx: int  # the context the request runs at here
    needs: int | None  # bytes at that context (None: size not known)
    key: list[int]
    # Filled by the group rules, shown by `route`.
    service_ms: float | None = None
    finish_ms: float | None = None
    resident: bool | None = None
    load_ms: float | None = None
    load_learned: bool = False
    evicts: Sequence[str] = ()
    eviction_ms: float = 0.0
    expected_ms: float | None = None
    # The memory figure's parts and whether /api/ps measured it (model_size).
    needs_source: MeasureSource | None = None
    estimate: MemoryEstimate | None = None
    fits: bool | None = None  # against the backend's budget; None: not known
    measured_at: int | None = None  # the context /api/ps measured the model at

    @property
    def reasons(self) -> list[str]:
        return self.step.reasons


# A rule ranks one candidate (0 is better); a group rule ranks every candidate at once,
# in the candidates' order, comparing each with the others equal on every stronger rule.
OneRule = Callable[[Request, Candidate], int]
GroupRule = Callable[[Request, Sequence[Candidate]], list[int]]

_HEALTH_RANK: Mapping[str, int] = {"down": 2, "degraded": 1}


def health(req: Request, cand: Candidate) -> int:
    rank = _HEALTH_RANK.get(cand.view.health, 0)
    if rank:
        cand.reasons.append(f"backend is {cand.view.health}: moved back")
    return rank


def inventory(req: Request, cand: Candidate) -> int:
    models = cand.view.models
    if req.model is not None and models is not None and req.model not in models:
        cand.reasons.append("model not in this backend's list: moved back")
        return 1
    return 0


def pin(req: Request, cand: Candidate) -> int:
    if cand.view.name == req.pin_backend:
        cand.reasons.append(req.pin_reason)
        return 0
    return 1


def _pinned_here(req: Request, cand: Candidate) -> bool:
    return cand.view.name == req.pin_backend


def memory(req: Request, cand: Candidate) -> int:
    """A backend the model would not fit goes after the ones it fits: a GPU after the
    CPU backends (`fast` included), a CPU whose RAM is too small after the rest."""
    view, model = cand.view, req.model
    if model is None or _pinned_here(req, cand):
        return 0
    limit, budget = view.memory_limit, view.budget
    if view.kind == "gpu" and req.size and limit and req.size > limit:
        cand.fits = False
        cand.reasons.append(
            f"model size {format_gb(req.size)} exceeds the {format_gb(limit)} limit: "
            "after CPU backends"
        )
        req.notes.append(f"{model} is too large for {view.name}")
        return 1
    if cand.needs is None or budget is None:
        return 0
    if cand.needs <= budget.bytes:
        cand.fits = True
        return 0
    cand.fits = False
    context = format_context(cand.ctx)
    what = "" if view.kind == "gpu" else " of RAM"
    after = "after CPU backends" if view.kind == "gpu" else "moved back"
    cand.reasons.append(
        f"needs {format_gb(cand.needs)} at {context} context, {view.name} has "
        f"{format_gib(budget.bytes)}{what} ({budget.source}): {after}"
    )
    req.notes.append(f"{model} at {context} context does not fit {view.name}")
    return 1


def spill(req: Request, cand: Candidate) -> int:
    """A GPU where Ollama put the model partly in system RAM (now, or before at this
    context or a smaller one) goes after the CPU backends."""
    view, model = cand.view, req.model
    if model is None or view.kind != "gpu" or _pinned_here(req, cand):
        return 0
    spilled = view.spilled.get(model) if view.spilled else None
    if spilled is not None:
        cand.reasons.append(
            f"memory pressure: only {format_gb(spilled[1])} of {format_gb(spilled[0])} "
            "in VRAM: after CPU backends"
        )
        req.notes.append(f"memory pressure on {view.name} for {model}")
        return 1
    spilled_at = view.spilled_contexts.get(model) if view.spilled_contexts else None
    if spilled_at is not None and cand.ctx >= spilled_at:
        cand.reasons.append(
            f"spilled to system RAM here at {format_context(spilled_at)} context, this "
            f"request needs {format_context(cand.ctx)}: after CPU backends"
        )
        req.notes.append(f"{model} spilled on {view.name} at {format_context(spilled_at)}")
        return 1
    return 0


def intent_rank(req: Request, cand: Candidate) -> int:
    return 0 if cand.view.kind == req.preferred else 1


# Written out once, not formatted per candidate per plan.
_PREFERS: Mapping[str, str] = {
    "fast": "fast intent prefers gpu",
    "heavy": "heavy intent prefers cpu",
}
_FALLBACK: Mapping[str, str] = {"gpu": "gpu fallback", "cpu": "cpu fallback"}


def intent(req: Request, cand: Candidate) -> int:
    rank = intent_rank(req, cand)
    cand.reasons.append(_PREFERS[req.intent] if rank == 0 else _FALLBACK[cand.view.kind])
    return rank


def affinity_rank(req: Request, cand: Candidate) -> int:
    return 0 if req.affine is not None and req.affine.backend == cand.view.name else 1


def affinity(req: Request, cand: Candidate) -> int:
    rank = affinity_rank(req, cand)
    if rank == 0:
        cand.reasons.append("affinity: served this model last")
    return rank


def order(req: Request, cand: Candidate) -> int:
    return cand.index


# -- the group rules -------------------------------------------------------------


def _top_group(every: Sequence[Candidate]) -> list[Candidate]:
    """The candidates tied for first on every stronger rule: the ones a group rule
    reorders (the rest stay behind them whatever it says)."""
    best = min(c.key for c in every)
    return [c for c in every if c.key == best]


def _first_choice(req: Request, group: Sequence[Candidate]) -> Candidate:
    """Who goes first in `group` when only intent, affinity and order decide."""
    return min(group, key=lambda c: (intent_rank(req, c), affinity_rank(req, c), c.index))


def _first_overall(req: Request, every: Sequence[Candidate]) -> Candidate:
    """Who goes first when only the rules so far, intent, affinity and order decide."""
    best = every[0]
    best_key = (best.key, intent_rank(req, best), affinity_rank(req, best), best.index)
    for cand in every[1:]:
        key = (cand.key, intent_rank(req, cand), affinity_rank(req, cand), cand.index)
        if key < best_key:
            best, best_key = cand, key
    return best


def _service_estimate(req: Request, cand: Candidate, every: Sequence[Candidate]) -> float | None:
    """This model's recent duration here, else another backend's, scaled by kind."""
    model = req.model
    assert model is not None
    own = cand.view.service_ms.get(model)
    if own is not None:
        return own
    for other in every:
        seen = other.view.service_ms.get(model)
        if seen is None:
            continue
        if other.view.kind == cand.view.kind:
            return seen
        return seen * req.cpu_slowdown if cand.view.kind == "cpu" else seen / req.cpu_slowdown
    return None


def _residency_figures(req: Request, cand: Candidate, every: Sequence[Candidate]) -> None:
    view, model = cand.view, req.model
    assert model is not None
    now = req.now
    # Residency not read yet here (a backend that has served nothing): nothing known to
    # be loaded, so a load and no eviction, shown as not known.
    entry = view.resident.get(model) if view.resident is not None else None
    # A request at another context reloads the model (Ollama compares num_ctx).
    here = entry is not None and (
        (entry.expires is None or entry.expires > now)
        and (not entry.context or entry.context == cand.ctx)
    )
    cand.resident = here if view.resident is not None else None
    service = _service_estimate(req, cand, every)
    cand.service_ms = service
    if service is None:
        # Never served anywhere: a nominal answer, slower on a CPU, so a CPU's quicker
        # load alone never outweighs generating there.
        service = residency.NOMINAL_SERVICE_MS * (req.cpu_slowdown if view.kind == "cpu" else 1)
    if here:
        cand.load_ms, cand.expected_ms = 0.0, service
        return
    load, learned = residency.load_ms(view.load_ms, model, req.size, view.kind)
    cand.load_ms, cand.load_learned = load, learned
    cand.expected_ms = residency.amortized_load_ms(load, req.usage.get(model), now) + service
    if not view.resident:
        return  # nothing loaded there: nothing to evict
    budget = view.budget.bytes if view.budget is not None else None
    evicts = residency.predicted_evictions(
        view.resident, model, cand.needs, view.capacity, budget, now, view.running
    )
    if not evicts:
        return
    reload = {
        name: residency.load_ms(view.load_ms, name, view.resident[name].size, view.kind)[0]
        for name in evicts
    }
    # Background work never takes a slot from interactive work, however it compares.
    mine = None if req.background else residency.demand_ms(req.usage.get(model), service, now, 1)
    cost, _ = residency.eviction_cost_ms(evicts, req.usage, reload, now, mine, view.service_ms)
    cand.evicts, cand.eviction_ms = evicts, cost
    if cost:
        cand.expected_ms = load + service + cost  # evicted again when they come back


def residency_rule(req: Request, every: Sequence[Candidate]) -> list[int]:
    """Expected time with loads and the reloads a load imposes on interactive work.

    When the intent's first choice would have to evict a model `fast` requests are
    using, a backend the intent puts later goes first if it is clearly sooner with
    that reload counted (an embedding model beside the chat model on a one-model GPU
    goes to the CPU). A load that evicts nothing interactive is paid once and keeps
    the model where the intent wants it, so it moves nothing. `heavy` only weighs
    backends of its own kind: it never takes the GPU from interactive work."""
    ranks = [0] * len(every)
    if req.model is None:
        return ranks
    for cand in every:
        if cand.view.resident is not None:
            break
    else:
        return ranks  # residency not known anywhere yet
    first = _first_overall(req, every)
    if first.view.resident is None:
        return ranks
    _residency_figures(req, first, every)
    if req.background and first.resident:
        _crowded(req, first)
    if not first.eviction_ms:
        # The common cases, and cheap: the model is where it should run, or its load
        # there evicts nothing interactive (paid once, it moves nothing).
        _say_residency(req, (first,))
        return ranks
    for cand in every:
        if cand is not first:
            _residency_figures(req, cand, every)
    _say_residency(req, every)
    group = _top_group(every)
    contenders = [
        c
        for c in group
        if c.expected_ms is not None and (req.intent == "fast" or c.view.kind == req.preferred)
    ]
    if first.expected_ms is None or not first.eviction_ms or not contenders:
        return ranks
    if req.background:
        # Background work never takes a slot from interactive work: the soonest backend
        # that evicts nothing interactive, however much slower it is.
        polite = [c for c in contenders if not c.eviction_ms and c is not first]
        if not polite:
            return ranks
        best = min(polite, key=lambda c: (c.expected_ms or 0.0, c.index))
        best.reasons.insert(
            0,
            f"background work (context over the default): does not evict "
            f"{', '.join(first.evicts)} from {first.view.name}: first",
        )
        req.notes.append(f"{req.model} goes to {best.view.name}: interactive work keeps the GPU")
        return [1 if c in group and c is not best else 0 for c in every]
    best = min(contenders, key=lambda c: (c.expected_ms or 0.0, c.index))
    best_ms = best.expected_ms or 0.0
    if best is first or first.expected_ms - best_ms < residency.RESIDENCY_MIN_GAIN_MS:
        return ranks
    best.reasons.insert(
        0,
        f"~{best_ms:.0f} ms here with loads counted, ~{first.expected_ms:.0f} ms on "
        f"{first.view.name}: first",
    )
    req.notes.append(f"{req.model} goes to {best.view.name}: sooner with loads counted")
    return [1 if c in group and c is not best else 0 for c in every]


def _crowded(req: Request, cand: Candidate) -> None:
    """Background work on a backend that holds more models than it has slots (one is
    loading for another request): staying there keeps swapping them, so it counts as
    evicting the interactive ones among them."""
    view, model = cand.view, req.model
    resident = view.resident
    if resident is None or len(resident) <= view.capacity:
        return
    hot = [
        name
        for name in resident
        if name != model and residency.is_hot(req.usage.get(name), req.now)
    ]
    if hot:
        reload = {
            name: residency.load_ms(view.load_ms, name, resident[name].size, view.kind)[0]
            for name in hot
        }
        cand.evicts = hot
        cand.eviction_ms, _ = residency.eviction_cost_ms(hot, req.usage, reload, req.now)


def _say_residency(req: Request, every: Sequence[Candidate]) -> None:
    """One reason per backend: loaded here, or the load and whom it evicts."""
    for cand in every:
        if cand.resident is None:
            continue
        if cand.resident:
            cand.reasons.append("loaded here")
            continue
        how = "learned" if cand.load_learned else "estimated"
        text = f"load {(cand.load_ms or 0.0) / 1000:.1f} s ({how})"
        if cand.evicts:
            text += ", evicts " + ", ".join(
                _evictee(name, req.usage.get(name), req.now) for name in cand.evicts
            )
        cand.reasons.append(text)


def _evictee(name: str, usage: residency.Usage | None, now: float) -> str:
    if usage is None or not residency.is_hot(usage, now):
        return name
    minutes = residency.USAGE_WINDOW / 60
    return f"{name} (fast, {usage.recent} requests in {minutes:.0f} min)"


def busy_spill(req: Request, every: Sequence[Candidate]) -> list[int]:
    """`fast` only: when the first choice is saturated (every `parallel` slot taken),
    another backend that has the model goes first if it is expected to finish sooner."""
    ranks = [0] * len(every)
    model = req.model
    if model is None or req.intent != "fast" or len(every) < 2:
        return ranks
    for cand in every:
        if cand.view.in_flight >= cand.view.parallel:
            break
    else:
        return ranks  # nobody saturated: the common case
    top = _first_overall(req, every)
    view = top.view
    if view.in_flight < view.parallel:
        return ranks  # the first choice has a free slot
    top_ms = view.service_ms.get(model)
    group = _top_group(every)
    if len(group) < 2 or not top_ms:
        return ranks
    top_finish = expected_finish_ms(top_ms, view.in_flight, view.queued, view.parallel)
    top.service_ms, top.finish_ms = top_ms, top_finish
    best, best_finish = None, top_finish
    for other in group:
        o = other.view
        if other is top or o.models is None or model not in o.models:
            continue
        service = o.service_ms.get(model)
        if service is None:
            if o.kind == view.kind:
                service = top_ms
            else:
                scale = req.cpu_slowdown
                service = top_ms * scale if o.kind == "cpu" else top_ms / scale
        finish = expected_finish_ms(service, o.in_flight, o.queued, o.parallel)
        if other.resident is False and other.load_ms:
            finish += other.load_ms
        other.service_ms, other.finish_ms = service, finish
        if finish < best_finish:
            best, best_finish = other, finish
    if best is None:
        return ranks
    busy = (
        f"{view.name} is busy ({view.in_flight} running, {view.queued} queued, "
        f"{view.parallel} at once): done in ~{top_finish:.0f} ms there"
    )
    best.reasons.insert(0, f"{busy}, ~{best_finish:.0f} ms here: first")
    top.reasons.insert(0, f"{busy}: after {best.view.name}")
    req.notes.append(f"{view.name} is busy: {model} goes to {best.view.name}")
    return [1 if c in group and c is not best else 0 for c in every]


# The rules, strongest first: (name, rule of one candidate, group rule); one of the
# two is None. The plan's `rule` is the first name on which its first two steps differ.
RULES: tuple[tuple[PlacementRule, OneRule | None, GroupRule | None], ...] = (
    ("health", health, None),
    ("inventory", inventory, None),
    ("pin", pin, None),
    ("memory", memory, None),
    ("spill", spill, None),
    ("residency", None, residency_rule),
    ("busy-spill", None, busy_spill),
    ("intent", intent, None),
    ("affinity", affinity, None),
    ("order", order, None),
)
