"""What is loaded on one backend, as harbord saw it: the door residency facts change by.

Kept per backend (`Backend.residency`): the resident models (from /api/ps, and
from the answers harbord relays, so a load is known before the next read), the
generations running per model, learned load times, how many models the backend
holds at once (residency.choose_capacity) and what a load showed about it, and
the loads and evictions seen. The policy reads the live mappings through the
backend's view; only the scheduler and the prober's reads change them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from types import MappingProxyType

from harbord.queueing import ewma
from harbord.residency import (
    Capacity,
    Resident,
    choose_capacity,
    learn_capacity,
    predicted_evictions,
)
from harbord.schemas import MemoryBudget, PsModel
from harbord.views import normalize_model

log = logging.getLogger(__name__)

# How long Ollama keeps a model loaded when neither the request nor the unit says
# (OLLAMA_KEEP_ALIVE's default): what an answer's model is taken to expire after
# until /api/ps says when.
DEFAULT_KEEP_ALIVE = 300.0


class ResidencyFacts:
    def __init__(self, name: str, configured: int | None, changed: Callable[[], None]) -> None:
        self.name = name
        self.configured = configured  # max_loaded in the configuration
        self.changed = changed  # the view shows capacity and whether residency is known
        self.resident: dict[str, Resident] | None = None  # None until /api/ps was read
        self.view: MappingProxyType[str, Resident] | None = None
        self.running: dict[str, int] = {}  # model -> generations running here now
        self.running_view = MappingProxyType(self.running)
        self.load_ms: dict[str, float] = {}  # model -> moving average of its loads, ms
        self.load_view = MappingProxyType(self.load_ms)
        self.unit_max_loaded: int | None = None  # OLLAMA_MAX_LOADED_MODELS of its unit
        self.learned_max_loaded: int | None = None
        self.capacity = choose_capacity(configured, None, None)
        self.loads: dict[str, int] = {}  # model -> loads seen here (metrics)
        self.evictions: dict[str, int] = {}  # model -> evictions seen here (metrics)
        self.kept_hot: set[str] = set()  # models harbord loaded again to keep them hot
        self.evicted_at: dict[str, float] = {}  # model -> when it left before its time
        self.unloaded_by_user: set[str] = set()  # not to be kept hot until asked for
        self._load_begun: str | None = None  # the model whose load began last, until a read
        # What the last /api/ps read listed; and, once models left before their time,
        # what it listed before they left and who left, until a read shows what came
        # in their place (the slots are learned then: residency.learn_capacity).
        self._listed: dict[str, Resident] = {}
        self._reference: dict[str, Resident] | None = None
        self._left: set[str] = set()
        # Taken as loading when their request got a slot; not yet seen answering or in /api/ps.
        self._loading: set[str] = set()
        # Model -> requests that took a slot while its load was under way: their answers
        # show the rest of that load, not a load of their own.
        self._joined: dict[str, int] = {}
        # Model -> when it last answered here, and the other models loaded since.
        self._last_answer: dict[str, float] = {}
        self._since: dict[str, set[str]] = {}
        # Bumped when what the policy reads here changes (resident models, load times),
        # but not by the last use of a resident model, nor by which models run (the
        # scheduler reads `running` itself): it reuses a plan only while this stays
        # the same (Scheduler.place).
        self.generation = 0

    def started(self, model: str | None) -> None:
        """A generation for `model` took a slot here: if the model is not loaded, it is
        being loaded now, and the next plan must see it (and what it evicts) so."""
        if model is None:
            return
        self.running[model] = self.running.get(model, 0) + 1
        resident, now = self.resident, time.time()
        if resident is not None:
            entry = resident.get(model)
            if entry is None or (entry.expires is not None and entry.expires <= now):
                self._begin_load(model, now)
                self._loading.add(model)
                self._joined[model] = 0
            elif model in self._loading:
                self._joined[model] = self._joined.get(model, 0) + 1

    def finished(self, model: str | None) -> None:
        if model is not None:
            left = self.running.get(model, 0) - 1
            if left > 0:
                self.running[model] = left
            else:
                self.running.pop(model, None)
                self._make_room_for_waiting()

    def requested(self, model: str) -> None:
        """A request asked for `model`: the user's earlier unload no longer holds."""
        self.unloaded_by_user.discard(model)

    def user_unloaded(self, model: str) -> None:
        self.unloaded_by_user.add(model)
        self.kept_hot.discard(model)

    def _record_load(self, model: str, load_ms: float | None) -> None:
        if load_ms is not None:
            self.load_ms[model] = ewma(self.load_ms.get(model), load_ms)
            self.generation += 1

    def answered(self, model: str, now: float, load_ms: float | None) -> bool:
        """`model` answered just now: it is loaded. True when that is news (it loaded
        the model, per Ollama's load_duration or because it was not resident here, or
        residency is not known yet), and /api/ps is worth reading.

        `load_ms` (Ollama's load_duration) is learned as the model's load time only from
        the answer of the request that began the load, or of a load harbord did not see
        begin: a request that joined a load under way (keep-hot's, another request's)
        reports only the rest of it."""
        resident = self.resident
        if resident is None:
            self._record_load(model, load_ms)
            return True
        if load_ms is None and model in self._loading and model in self._listed:
            # /api/ps listed it first (Ollama lists a model from the moment its load
            # begins): an answer that says no load is no news.
            self._loading.discard(model)
        entry = resident.get(model)
        here = entry is not None and (entry.expires is None or entry.expires > now)
        if model in self._loading or not here:
            self._record_load(model, load_ms)
        joined = self._joined.get(model, 0)
        if here and model not in self._loading and (load_ms is None or joined):
            assert entry is not None
            if load_ms is not None:
                self._joined[model] = joined - 1  # joined the load answered before
            resident[model] = Resident(entry.size, entry.context, entry.expires, now)
            self._answered_now(model, now)
            return False
        if not here and self.evicted_at.get(model, -1.0) > self._last_answer.get(model, 0.0):
            # It was loaded for this answer, and a load that began meanwhile (another
            # request's, waiting for this one) evicts it: not loaded again by answering.
            # (Asked for again after that, it would be resident again: `started`.)
            self._loading.discard(model)
            self._answered_now(model, now)
            if load_ms is None:
                return False
            self.loads[model] = self.loads.get(model, 0) + 1
            return True
        self._loading.discard(model)
        self.loads[model] = self.loads.get(model, 0) + 1
        last = self._last_answer.get(model)
        if (
            load_ms is not None
            and last is not None
            and now - last < DEFAULT_KEEP_ALIVE
            and model not in self.unloaded_by_user
        ):
            # Answered here within its keep-alive, and loaded again: something evicted it
            # since, maybe between two reads of /api/ps (loads that follow each other
            # fast). With least-recently-used eviction, the models loaded here since its
            # last answer are at least as many as the slots.
            if self.evicted_at.get(model, 0.0) < last:
                self._evicted(model, now)
            others = self._since.get(model, set())
            if others:  # an upper bound: keep the smallest seen
                current = self.learned_max_loaded
                self._learn(min(len(others), current) if current else len(others))
        self._loaded_now(model)
        self._answered_now(model, now)
        if self._load_begun == model and entry is not None:
            # Begun when the request took its slot (started): the model is there now.
            resident[model] = Resident(entry.size, entry.context, now + DEFAULT_KEEP_ALIVE, now)
            self.generation += 1
        else:
            self._begin_load(model, now)
        return True

    def _answered_now(self, model: str, now: float) -> None:
        """Its last use: what loads here after it counts anew (a load adds itself to
        every other model's list)."""
        self._last_answer[model] = now
        self._since[model] = set()

    def _loaded_now(self, model: str) -> None:
        for name, since in self._since.items():
            if name != model:
                since.add(model)

    def _begin_load(self, model: str, now: float) -> None:
        """`model` is being loaded: what it evicts by the slots, as Ollama picks (least
        recently used, idle), is taken as gone now, before /api/ps says so."""
        resident = self.resident
        assert resident is not None
        self.generation += 1
        self._load_begun = model
        entry = resident.get(model)
        waiting = self._waiting(model)
        candidates = (
            {n: r for n, r in resident.items() if n not in waiting} if waiting else resident
        )
        for name in predicted_evictions(
            candidates, model, None, self.capacity.models, None, now, self.running
        ):
            del resident[name]
            self._evicted(name, now)
        size, context = (entry.size, entry.context) if entry is not None else (0, 0)
        resident[model] = Resident(size, context, now + DEFAULT_KEEP_ALIVE, now)

    def _waiting(self, but: str | None = None) -> set[str]:
        """Models whose requests hold a slot here but that are not loaded yet: they
        wait in Ollama's queue for room, and take the next slot that frees."""
        return {
            name
            for name in self._loading
            if name != but and self.running.get(name) and name not in self._listed
        }

    def _make_room_for_waiting(self) -> None:
        """A model went idle here: if loads wait for room and more models are taken as
        resident than the backend holds, Ollama evicts idle ones, least recently used
        first, for them (the model that just finished, on a one-model GPU)."""
        resident = self.resident
        if resident is None or not self._waiting():
            return
        excess = len(resident) - self.capacity.models
        if excess <= 0:
            return
        idle = sorted(
            (n for n in resident if not self.running.get(n)), key=lambda n: resident[n].last_used
        )
        now = time.time()
        for name in idle[:excess]:
            del resident[name]
            self._evicted(name, now)

    def _evicted(self, name: str, now: float) -> None:
        self.evictions[name] = self.evictions.get(name, 0) + 1
        self.generation += 1
        self.evicted_at[name] = now
        log.info("%s left %s before its time (evicted)", name, self.name)

    def set_capacity_sources(self, unit_max_loaded: int | None) -> None:
        """The unit's OLLAMA_MAX_LOADED_MODELS, as the supervisor read it."""
        if unit_max_loaded != self.unit_max_loaded:
            self.unit_max_loaded = unit_max_loaded
            self._choose_capacity()

    def reconfigure(self, configured: int | None) -> None:
        self.configured = configured
        self._choose_capacity()

    def _choose_capacity(self) -> None:
        capacity: Capacity = choose_capacity(
            self.configured, self.unit_max_loaded, self.learned_max_loaded
        )
        if capacity != self.capacity:
            self.capacity = capacity
            self.changed()

    def _learn_slots(self, listed: dict[str, Resident], budget: MemoryBudget | None) -> None:
        """How many models the backend holds, from what /api/ps listed alone (a model
        harbord takes as loading may still wait for a slot): when models left before
        their time (not by the user's own unload) and a read shows what came in their
        place, unless memory pushed them out."""
        now = time.time()
        left = [
            name
            for name, old in self._listed.items()
            if name not in listed and self._left_early(name, old, now)
        ]
        if left:
            if self._reference is None:
                self._reference = self._listed
            self._left.update(left)
        reference = self._reference
        self._listed = listed
        if reference is None or not set(listed) - set(reference):
            return
        limit = budget.bytes if budget is not None else None
        forced = _memory_forced(reference, self._left, listed, limit)
        learned = learn_capacity(reference, self._left, listed, forced)
        self._reference, self._left = None, set()
        if learned is not None:
            self._learn(learned)

    def _left_early(self, name: str, last_seen: Resident, now: float) -> bool:
        """Whether a model no longer there left before its time, and not by the user's
        own unload: an eviction."""
        expires = last_seen.expires
        return expires is not None and expires > now + 1 and name not in self.unloaded_by_user

    def _learn(self, learned: int) -> None:
        if learned != self.learned_max_loaded:
            log.info("%s holds %d model(s) at once (learned from an eviction)", self.name, learned)
            self.learned_max_loaded = learned
            self._choose_capacity()

    def hot_now(self) -> list[str]:
        """The models kept hot that are still loaded."""
        return sorted(m for m in self.kept_hot if self.resident and m in self.resident)

    def sync(self, loaded: list[PsModel], budget: MemoryBudget | None) -> None:
        """What /api/ps showed: the resident models, what left before its time (an
        eviction), and after a load, how many models the backend holds at once."""
        now = time.time()
        self.generation += 1
        before = dict(self.resident) if self.resident is not None else {}
        fresh: dict[str, Resident] = {}
        for entry in loaded:
            name = normalize_model(entry.name)
            old = before.get(name)
            fresh[name] = Resident(
                entry.size,
                entry.context_length,
                parse_expiry(entry.expires_at),
                old.last_used if old is not None else now,
            )
        listed = dict(fresh)
        for name, kept in before.items():
            if name not in fresh and self.running.get(name):
                # Generating, or loading for a request that holds a slot: a read that
                # falls inside the load does not show it yet, and it is there.
                fresh[name] = kept
        evicted = [
            name
            for name, old in before.items()
            # Having been seen in /api/ps (an answer alone, as with keep_alive 0, never
            # counts: it may have been unloaded on purpose).
            if name not in fresh and old.size and self._left_early(name, old, now)
        ]
        for name in evicted:
            self._evicted(name, now)
        self._load_begun = None
        self._learn_slots(listed, budget)
        if self.resident is None:
            self.resident = fresh
            self.view = MappingProxyType(fresh)
            self.changed()
        else:
            # In place: the backend's view reads this mapping, and is rebuilt only when
            # a fact it copies changes.
            self.resident.clear()
            self.resident.update(fresh)


def _memory_forced(
    before: dict[str, Resident], gone: set[str], fresh: dict[str, Resident], limit: int | None
) -> bool:
    """Whether memory, not a slot, pushed models out: everything would not have fit."""
    if limit is None:
        return False
    kept = sum(e.size for e in fresh.values())
    return kept + sum(before[n].size for n in gone if n in before) > limit


def parse_expiry(expires_at: str | None) -> float | None:
    """/api/ps's `expires_at` (RFC 3339 with nanoseconds and an offset) as epoch seconds."""
    if not expires_at:
        return None
    text = expires_at.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:  # Go writes nanoseconds; Python takes at most microseconds
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
