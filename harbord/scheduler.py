"""The scheduler: every request that reaches a backend is admitted, placed and accounted here.

- **Placement**: the pure policy is asked for a plan over a snapshot of the
  backends' facts (`BackendView`s), the pins and affinity, and how `fast` requests
  used each model lately. Pass-through without a model, unload fan-out and the
  aggregated reads get their plans here too.
- **Admission**: a generation takes one of its backend's slots (`Limiter`: the
  limit and the fast-before-heavy queue); a control call (an unload, an aggregated
  read, a preload's answer) is counted but never waits behind a generation.
- **Accounting**: the relay reports each attempt's `Outcome`; `learning.learn`
  turns it into lessons, applied here, and only here, to the backends' facts and
  the pins.

The backends' facts change only through this object and the prober's inventory
reads; the policy sees immutable views.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

import msgspec

from harbord import learning, policy, residency
from harbord.backends import Backend
from harbord.config import Config
from harbord.learning import Outcome
from harbord.policy import RouteRequest
from harbord.residency import Usage
from harbord.schemas import Intent, ModelFacts, Plan
from harbord.state import StateStore
from harbord.upstream import Pools, StatusError, UpstreamError
from harbord.views import BackendView

log = logging.getLogger(__name__)

MEMINFO = "/proc/meminfo"
_LOCAL_HOSTS = frozenset(("localhost", "::1", "[::1]"))


def on_this_host(url: str) -> bool:
    """Whether a backend's URL is on this machine (loopback), so its RAM is this host's."""
    host = urlsplit(url).hostname or ""
    return host in _LOCAL_HOSTS or host.startswith("127.")


_NO_FACTS: Mapping[str, ModelFacts] = {}

# How long a request's plan is reused for the same request while nothing it reads has
# changed (Scheduler.place): what moves with every answer (service times, usage, the
# last use of a resident model) and the clock (expiries) are then this much old at
# most. A plan costs more than the rest of harbord's own work per request on a
# saturated backend (bench/issue15-after.md), and is the same plan.
PLAN_REUSE_S = 0.1
_PLANS_KEPT = 256


class UsageBook(Mapping[str, Usage]):
    """When `fast` requests asked for each model lately (residency.USAGE_WINDOW):
    the policy weighs an eviction by how soon the evicted model is wanted again."""

    def __init__(self) -> None:
        self._times: dict[str, collections.deque[float]] = {}

    def record(self, model: str, now: float) -> None:
        times = self._times.get(model)
        if times is None:
            times = self._times[model] = collections.deque(maxlen=1024)
        times.append(now)
        _forget_before(times, now - residency.USAGE_WINDOW)

    def __getitem__(self, model: str) -> Usage:
        # Read on every plan: the times left after pruning are the window's, counted
        # in constant time (a busy model has hundreds).
        times = self._times[model]
        _forget_before(times, time.time() - residency.USAGE_WINDOW)
        if not times:
            raise KeyError(model)
        return Usage(len(times), times[-1], times[0])

    def __iter__(self) -> Iterator[str]:
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())

    def _live(self) -> list[str]:
        cutoff = time.time() - residency.USAGE_WINDOW
        for times in self._times.values():
            _forget_before(times, cutoff)
        return [m for m, times in self._times.items() if times]


def _forget_before(times: collections.deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


class Slot:
    """One generation's hold on a backend slot (Scheduler.admit): a plain class, as a
    generator-based context manager costs several microseconds per request."""

    __slots__ = ("backend", "held", "intent", "model")

    def __init__(self, backend: Backend, intent: Intent, model: str | None) -> None:
        self.backend, self.intent, self.model, self.held = backend, intent, model, False

    async def __aenter__(self) -> bool:
        backend = self.backend
        if not await backend.limiter.acquire(self.intent):
            return False
        self.held = True
        backend.residency.started(self.model)
        return True

    async def __aexit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            self.backend.residency.finished(self.model)
            self.backend.limiter.release()


class Scheduler:
    def __init__(self, config: Config, state: StateStore) -> None:
        self.config = config
        self.state = state
        self.backends: dict[str, Backend] = {}
        self.usage = UsageBook()
        self.facts: Callable[[], Mapping[str, ModelFacts]] = lambda: _NO_FACTS
        # (model, backends in plan order): fetch the model's shape off the request path.
        self.want_facts: Callable[[str, list[Backend]], object] = lambda model, backends: None
        # A served answer that loaded a model: read that backend's /api/ps now.
        self.read_loaded: Callable[[Backend], object] = lambda backend: None
        self.status_changed: Callable[[], None] = lambda: None
        # The client preloads go through (the request path's pools; set by Harbor).
        self.pools = Pools()
        self._meminfo_text: str | None = None
        # (request, what the plan read) -> (plan, reusable until, model facts known)
        self._plans: dict[tuple[object, ...], tuple[Plan, float, bool]] = {}
        self._configured = 0  # build_backends calls: a reload changes every plan
        self.build_backends(config)

    # -- the backends ------------------------------------------------------------

    def build_backends(self, config: Config) -> list[str]:
        """Keep what still exists, make what is new; returns the names removed."""
        self.config = config
        self._configured += 1
        removed = [name for name in self.backends if name not in config.backends]
        fresh: dict[str, Backend] = {}
        for name, backend_config in config.backends.items():
            backend = self.backends.get(name)
            if backend is None:
                backend = Backend(name, backend_config)
                backend.on_change = self._backend_changed
            elif backend.config != backend_config:
                backend.reconfigure(backend_config)
            # The routing table's queue order applies to every backend's limiter.
            backend.limiter.fast_head_start = config.routing.fast_head_start
            # A CPU backend on this host without `ram` has this host's memory.
            meminfo = self._meminfo() if on_this_host(backend_config.url) else None
            configured = config.routing.ram_reserve
            reserve = int(configured) if configured is not None else None
            if (backend.host_meminfo, backend.ram_reserve) != (meminfo, reserve):
                backend.host_meminfo, backend.ram_reserve = meminfo, reserve
                backend.changed()
            fresh[name] = backend
        self.backends = fresh
        self.state.affinity_ttl = config.routing.affinity_ttl
        return removed

    def _meminfo(self) -> str | None:
        """This host's /proc/meminfo, read once (the machine's memory does not change)."""
        if self._meminfo_text is None:
            try:
                with open(MEMINFO, encoding="ascii", errors="replace") as file:
                    self._meminfo_text = file.read(16384)
            except OSError:
                self._meminfo_text = ""
        return self._meminfo_text or None

    def _backend_changed(self, backend: Backend) -> None:
        if backend.came_up:
            backend.came_up = False
            self.state.drop_affinity_away_from(backend.name, self.views())
        self.status_changed()

    def views(self) -> list[BackendView]:
        return [b.view for b in self.backends.values()]

    def reachable(self) -> list[Backend]:
        """Backends worth asking now (aggregated reads), in configuration order."""
        names = policy.reachable(self.views())
        return [self.backends[name] for name in names]

    # -- placement ---------------------------------------------------------------

    def place(self, request: RouteRequest) -> Plan:
        """The plan for a request about to be sent: counted as fast use of its model.
        The same request gets the same plan object for PLAN_REUSE_S while the facts it
        was made of are the same (`_plan_key`)."""
        now = time.time()
        key = self._plan_key(request)
        known = self.facts()
        reused = self._plans.get(key)
        if reused is not None and reused[1] > now and (reused[0].model in known) == reused[2]:
            plan = reused[0]
        else:
            plan = self.preview(request)
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[key] = (plan, now + PLAN_REUSE_S, plan.model in known)
        model = plan.model
        if model is not None:
            if plan.intent == "fast" and not plan.forced and not plan.background:
                self.usage.record(model, now)
            for backend in self.backends.values():
                backend.residency.requested(model)
        return plan

    def _plan_key(self, request: RouteRequest) -> tuple[object, ...]:
        """What a plan is made of, but the clock, service times and usage: the request,
        the configuration, pins and affinity (StateStore.generation), and per backend
        its facts (Backend.generation), its load and the models running there. Values
        that come back (a load of 3, one model running) make the same key again."""
        key: list[object] = [request, self._configured, self.state.generation]
        for backend in self.backends.values():
            limiter = backend.limiter
            key += (backend.generation, limiter.active, limiter.queued, *backend.residency.running)
            key.append(None)  # where one backend's running models end
        return tuple(key)

    def preview(self, request: RouteRequest) -> Plan:
        """The plan a request would get (`harborctl route`), without counting it as one;
        the model's shape is fetched for later plans if it is not known."""
        plan = self.plan_only(request)
        model = plan.model
        if model is not None and model not in self.facts():
            # Never waited for: this plan goes without; a later one has the facts.
            # Asked of the backend the plan goes to first, about to load the model.
            self.want_facts(model, [self.backends[name] for name in plan.backends])
        return plan

    def plan_only(self, request: RouteRequest) -> Plan:
        """The plan a request would get, without counting it as one (route, keep-hot)."""
        routing = self.config.routing
        facts = self.facts()
        now = time.time()
        return policy.plan(
            request,
            self.views(),  # brings each view's load up to date
            self.state.pins,
            self.state.affinity,
            self.config.models,
            routing.default_intent,
            now,
            model_facts=facts,
            affinity_ttl=routing.affinity_ttl,
            cpu_slowdown=routing.cpu_slowdown,
            usage=self.usage,
        )

    def place_without_model(self, forced: str | None) -> Plan:
        return policy.plan_without_model(self.views(), forced)

    def place_unload(self, model: str, forced: str | None) -> Plan:
        """Where an unload goes; the user's own unload is remembered, so the model is not
        kept hot against their wish (until it is asked for again)."""
        plan = policy.plan_unload(self.views(), model, forced)
        for name in plan.backends:
            self.backends[name].residency.user_unloaded(model)
        return plan

    # -- admission ---------------------------------------------------------------

    def admit(self, backend: Backend, intent: Intent, model: str | None) -> Slot:
        """A slot on `backend` for one generation, as `async with ... as admitted`:
        False when its queue is full or the wait ran out (the caller moves on), True
        while the slot is held."""
        return Slot(backend, intent, model)

    async def preload(
        self, backend: Backend, model: str, keep_alive: str | int | None
    ) -> str | None:
        """Load `model` on `backend` with an empty generate (warm-up, keep-hot), holding a
        slot like any request; None when it loaded, else what went wrong."""
        body: dict[str, object] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        config = backend.config
        # The empty generate answers once, when the model is loaded.
        timeout = config.connect_timeout + config.first_byte_timeout
        async with self.admit(backend, "fast", model) as admitted:
            if not admitted:
                return "no free slot"
            started = time.monotonic()
            try:
                answer = await self.pools.fetch(
                    config.url, "POST", "/api/generate", timeout, msgspec.json.encode(body)
                )
            except StatusError as err:
                return f"the backend answered {err.status}"
            except UpstreamError as err:
                return type(err).__name__
        ms = (time.monotonic() - started) * 1000
        load = learning.load_duration_ms(answer[-512:])
        self.report(
            Outcome(backend.name, config.kind, model, "/api/generate", served=True, load_ms=load)
        )
        log.info("loaded %s on %s in %.1fs", model, backend.name, ms / 1000)
        return None

    # -- accounting --------------------------------------------------------------

    def report(self, outcome: Outcome, plan: Plan | None = None) -> None:
        """Apply what one attempt teaches (learning.learn) to the facts and the pins."""
        backend = self.backends.get(outcome.backend)
        if backend is None:
            return  # removed by a reload while the request ran
        oom = outcome.error_class == "oom"
        lessons = learning.learn(outcome, self._cpu_backend(outcome.backend, plan) if oom else None)
        if lessons.healthy:
            backend.record_success()
        if lessons.failure and outcome.error_class is not None:
            backend.record_failure(outcome.error_class, outcome.text, refused=outcome.refused)
        if lessons.pin is not None:
            pin = lessons.pin
            self.state.pin(
                pin.model, pin.backend, pin.reason, self.config.routing.oom_pin_for, "oom"
            )
        model = outcome.model
        if model is None:
            return
        if lessons.service_ms is not None:
            backend.record_service(model, lessons.service_ms)
        if lessons.resident and backend.answered(model, time.time(), lessons.load_ms):
            self.read_loaded(backend)

    def served(self, backend: Backend, plan: Plan | None) -> None:
        """The first byte of an answer: where the model stays loaded (affinity)."""
        if plan is not None:
            self.state.learn_affinity(plan, backend.name)

    def may_move_on(self, plan: Plan, backend: Backend, error_class: str) -> bool:
        return policy.may_move_on(plan, backend.config.kind, error_class)

    def _cpu_backend(self, failed: str, plan: Plan | None) -> str | None:
        """Where an out-of-memory error pins a model: the plan's first CPU backend,
        else the configuration's."""
        backends = self.backends
        names: list[str] = [*(plan.backends if plan is not None else ()), *backends]
        for name in names:
            backend = backends.get(name)
            if backend is not None and backend.config.kind == "cpu" and name != failed:
                return name
        return None
