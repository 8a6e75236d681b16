"""Residency: what is loaded where, what a load costs and whom it evicts. Pure.

Ollama keeps at most `OLLAMA_MAX_LOADED_MODELS` models loaded per server (the
shipped GPU unit: 1) and, when a new one needs room (a slot, or memory), evicts
idle models, least recently used first. A load takes seconds; evicting the model
interactive requests use costs their next request the same again. These
functions turn what the daemon saw (`/api/ps`, the answers it relayed, the
requests it placed) into the numbers the policy compares. No I/O, no clock:
the time is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from harbord.schemas import BackendKind, CapacitySource

# Ollama's default OLLAMA_MAX_LOADED_MODELS: three per GPU, three on a CPU-only server.
OLLAMA_DEFAULT_MAX_LOADED = 3

# A load before any was seen here: the runner's start plus reading the weights from a
# warm page cache (Ollama loads 1-8B models in 0.5-3 s on a desktop; a CPU server maps
# the file and starts faster, the GPU copies it over the bus).
LOAD_FIXED_MS = {"gpu": 400.0, "cpu": 250.0}
LOAD_BYTES_PER_MS = {"gpu": 3_000_000.0, "cpu": 4_000_000.0}  # 3 and 4 GB/s

# A model's answer on a GPU before any was timed (a short chat); a CPU's is
# routing.cpu_slowdown times longer.
NOMINAL_SERVICE_MS = 1000.0

# How far ahead a `fast` model's next request counts: the window usage is counted
# over, and the horizon within which its next request makes an eviction cost a reload.
USAGE_WINDOW = 300.0
NEXT_REQUEST_HORIZON = 60.0

# A backend that is not the intent's first choice goes first on expected time only when
# the first choice would evict interactive work, and only when it is at least this much
# sooner (no flapping over a few milliseconds). Then the two are compared in full: the
# reloads imposed on others are as real as the request's own time.
RESIDENCY_MIN_GAIN_MS = 100.0


# Resident and Usage are made on every request: frozen msgspec structs cost a tenth of
# a frozen dataclass to make.
class Resident(msgspec.Struct, frozen=True):
    """One model loaded on a backend, as /api/ps (or a relayed answer) showed it."""

    size: int = 0  # bytes, as loaded (weights + KV + graph)
    context: int = 0  # the context it was loaded with; 0: not said
    expires: float | None = None  # epoch seconds; None: not said
    last_used: float = 0.0  # epoch seconds of the last answer harbord saw from it


@dataclass(frozen=True, slots=True)
class Capacity:
    """How many models a backend holds at once, and how that is known."""

    models: int
    source: CapacitySource


class Usage(msgspec.Struct, frozen=True):
    """How `fast` requests used one model recently (the scheduler counts them)."""

    recent: int  # fast requests in the last USAGE_WINDOW seconds
    last: float  # epoch seconds of the latest
    first: float | None = None  # epoch seconds of the earliest in the window; None: not said


def choose_capacity(configured: int | None, unit_env: int | None, learned: int | None) -> Capacity:
    """The strongest source wins: config `max_loaded`, the unit's
    OLLAMA_MAX_LOADED_MODELS, what an eviction showed, Ollama's default."""
    if configured:
        return Capacity(configured, "config")
    if unit_env:
        return Capacity(unit_env, "unit")
    if learned:
        return Capacity(learned, "learned")
    return Capacity(OLLAMA_DEFAULT_MAX_LOADED, "default")


def learn_capacity(
    reference: Iterable[str],
    left: Iterable[str],
    listed: Iterable[str],
    memory_forced: bool,
) -> int | None:
    """What /api/ps teaches about the slots: `reference` is what it listed before models
    `left` before their time, `listed` what it lists now. Once a model that was not
    there has come in their place, and memory did not force them out, the server holds
    len(listed) models: Ollama evicts only to make room, and never holds more. Until
    then (a read inside the load shows the room, not what took it) nothing is learned."""
    listed_set = set(listed)
    came = listed_set - set(reference)
    if not came or memory_forced or not set(left) - listed_set:
        return None
    return len(listed_set)


def estimate_load_ms(size: int, kind: BackendKind) -> float:
    """A load's time before one was measured here, from the model's size."""
    return LOAD_FIXED_MS[kind] + size / LOAD_BYTES_PER_MS[kind]


def load_ms(
    learned: Mapping[str, float], model: str, size: int, kind: BackendKind
) -> tuple[float, bool]:
    """(expected load time, whether it was learned here) for `model` on a backend."""
    seen = learned.get(model)
    if seen is not None:
        return seen, True
    return estimate_load_ms(size, kind), False


def predicted_evictions(
    resident: Mapping[str, Resident],
    model: str,
    needs: int | None,
    capacity: int,
    budget: int | None,
    now: float,
    busy: Mapping[str, int] | None = None,
) -> list[str]:
    """The models a load of `model` would unload, as Ollama's scheduler picks them:
    least recently used first, idle ones before busy ones (for a busy one Ollama waits
    until it is done, then unloads it), until a slot is free and (when the budget is
    known) the new model fits beside the rest. Expired ones are already gone."""
    live = {
        name: entry
        for name, entry in resident.items()
        if name != model and (entry.expires is None or entry.expires > now)
    }
    running = busy or {}
    order = sorted(live, key=lambda n: (bool(running.get(n)), live[n].last_used))
    evicted: list[str] = []
    used = sum(entry.size for entry in live.values())
    while order and (
        len(live) - len(evicted) >= capacity
        or (budget is not None and needs is not None and used + needs > budget)
    ):
        name = order.pop(0)
        evicted.append(name)
        used -= live[name].size
    return evicted


def recent_requests(usage: Usage | None, now: float) -> int:
    """A model's `fast` requests in the window; 0 when its last one is older."""
    return usage.recent if usage is not None and now - usage.last <= USAGE_WINDOW else 0


def next_request_chance(usage: Usage | None, now: float) -> float:
    """How likely a model's next `fast` request comes within NEXT_REQUEST_HORIZON:
    requests as a Poisson process at the rate seen since the earliest of them in the
    window (a chat begun a minute ago is not spread over five), over at least the
    horizon (one request is no rate)."""
    recent = recent_requests(usage, now)
    if usage is None or recent <= 0:
        return 0.0
    span = USAGE_WINDOW if usage.first is None else now - usage.first
    rate = recent / min(max(span, NEXT_REQUEST_HORIZON), USAGE_WINDOW)
    return 1.0 - math.exp(-rate * NEXT_REQUEST_HORIZON)


def amortized_load_ms(load: float, usage: Usage | None, now: float) -> float:
    """A load that evicts nothing interactive stays: its time is paid once, shared by
    the requests the model gets while loaded, counted as many as it had lately (this
    one too). A load that evicts interactive work is paid again each time: not this."""
    return load / (1 + recent_requests(usage, now))


def demand_ms(usage: Usage | None, service_ms: float, now: float, counting: int = 0) -> float:
    """How much of a backend's time a model's `fast` requests took lately: their number
    in the window (plus `counting` not yet recorded) times the time each takes there."""
    return (recent_requests(usage, now) + counting) * service_ms


def eviction_cost_ms(
    evicted: Sequence[str],
    usage: Mapping[str, Usage],
    reload_ms: Mapping[str, float],
    now: float,
    newcomer_demand: float | None = None,
    service_ms: Mapping[str, float] | None = None,
) -> tuple[float, str | None]:
    """The reloads a load imposes on interactive work: for each evicted model, its
    reload time times the chance its next fast request comes soon. With the
    newcomer's demand (demand_ms, this request counted), a model that kept the backend
    less busy (its `service_ms` here, else nominal) costs nothing: the slot goes to the
    model that gains most from it, and the evicted one's next request is placed knowing
    it would evict the newcomer. Also the model that costs most (for `route`), or None
    when nothing interactive is evicted."""
    total, worst, worst_cost = 0.0, None, 0.0
    served = service_ms or {}
    for name in evicted:
        theirs = usage.get(name)
        if newcomer_demand is not None and (
            demand_ms(theirs, served.get(name, NOMINAL_SERVICE_MS), now) < newcomer_demand
        ):
            continue
        chance = next_request_chance(theirs, now)
        if chance <= 0.0:
            continue
        cost = reload_ms.get(name, 0.0) * chance
        total += cost
        if worst is None or cost > worst_cost:
            worst, worst_cost = name, cost
    return total, worst


def is_hot(usage: Usage | None, now: float) -> bool:
    """A model interactive work is using now: a fast request within the window."""
    return next_request_chance(usage, now) > 0.0


def most_used(usage: Mapping[str, Usage], now: float) -> str | None:
    """The model `fast` requests use most now (the one to keep hot)."""
    best: str | None = None
    best_key = (0, 0.0)
    for name, entry in usage.items():
        recent = recent_requests(entry, now)
        if recent <= 0:
            continue
        key = (recent, entry.last)
        if key > best_key:
            best, best_key = name, key
    return best


def model_to_keep_hot(
    usage: Mapping[str, Usage],
    now: float,
    resident: Mapping[str, Resident],
    evicted_at: Mapping[str, float],
    unloaded_by_user: Iterable[str],
) -> str | None:
    """The model to load again on an idle backend: the one `fast` requests use most
    now, if a load evicted it from this backend (not if its keep_alive ran out, and
    not after the user's own unload)."""
    model = most_used(usage, now)
    if model is None or model in resident or model in set(unloaded_by_user):
        return None
    evicted = evicted_at.get(model)
    if evicted is None or now - evicted > USAGE_WINDOW:
        return None
    return model
