"""Affinity: which backend a model last ran on, when to learn it and when to forget it.

Pure functions over the facts the daemon keeps (`StateFile.affinity`); the policy
uses affinity only to break ties between backends equal on everything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from harbord.schemas import Affinity, Plan
from harbord.views import BackendView


def affinity_expired(entry: Affinity, now: float, ttl: float) -> bool:
    """Past `ttl` after the last answer served there (keep-alive has unloaded it)."""
    last = entry.last_served if entry.last_served is not None else entry.since
    return now >= last + ttl


def expired_affinities(affinity: Mapping[str, Affinity], now: float, ttl: float) -> list[str]:
    """Models whose affinity the daemon can forget (the policy ignores them already)."""
    return [model for model, entry in affinity.items() if affinity_expired(entry, now, ttl)]


def affinities_to_drop(
    affinity: Mapping[str, Affinity], views: Sequence[BackendView], came_up: str
) -> list[str]:
    """Models whose affinity to forget when backend `came_up` is healthy again.

    Affinity only breaks ties between backends of one kind, so the ones it kept away
    from `came_up` point at another backend of `came_up`'s kind. Affinities to a
    backend that is no longer configured go too.
    """
    kinds = {view.name: view.kind for view in views}
    kind = kinds.get(came_up)
    return [
        model
        for model, entry in affinity.items()
        if entry.backend not in kinds or (entry.backend != came_up and kinds[entry.backend] == kind)
    ]


def should_learn_affinity(plan: Plan, served_backend: str, forced: bool = False) -> bool:
    """Learn affinity from an answer only where the plan chose to go on its own.

    Not from a fallback (not the first step), a forced backend, a pinned model (the
    operator's or an OOM pin's choice, not a fact about where the model lives), nor a
    busy spill (a moment's load, not where the model stays loaded).
    """
    return (
        not forced
        and not plan.forced
        and plan.pinned is None
        and plan.rule != "busy-spill"
        and bool(plan.steps)
        and plan.steps[0].backend == served_backend
    )


def affinity_after_serve(current: Affinity | None, backend: str, now: float) -> Affinity:
    """The affinity to keep after `backend` served the model at `now`."""
    if current is not None and current.backend == backend:
        return Affinity(backend=backend, since=current.since, last_served=now)
    return Affinity(backend=backend, since=now, last_served=now)
