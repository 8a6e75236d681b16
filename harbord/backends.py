"""One Ollama backend as the daemon sees it: health, inventory, load, limits.

The prober (health.py) and real requests (relay.py) change this state; the
policy reads it through `view`, an immutable snapshot rebuilt only when
something it shows changes, so a routing decision never waits for I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from types import MappingProxyType

from harbord.admission import Limiter
from harbord.config import BackendConfig
from harbord.gpu_memory import GpuFigures
from harbord.memory import choose_budget, cpu_budget, default_context, spill_budget, update_spills
from harbord.queueing import ewma
from harbord.residency_facts import ResidencyFacts
from harbord.schemas import (
    BackendStatus,
    ErrorClass,
    Health,
    KvCacheType,
    LoadedModel,
    MeasuredSize,
    MemoryBudget,
    PsModel,
    UnitStatus,
)
from harbord.views import BackendView, normalize_model

log = logging.getLogger(__name__)

PS_REREAD = 10.0  # seconds before an answer for the same model asks /api/ps again


class Backend:
    def __init__(self, name: str, config: BackendConfig) -> None:
        self.name = name
        self.config = config
        self.health: Health = "unknown"
        self.cooldown = False
        self.hung = False
        self.version: str | None = None
        self.latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_error_class: ErrorClass | None = None
        self.last_change = time.time()
        self.probe_timeouts = 0  # consecutive probes that timed out
        self.models: dict[str, int] | None = None
        self.loaded: list[PsModel] = []
        self._ps_asked: dict[str, float] = {}  # model -> monotonic time of its last ps read
        self.inventory_at = 0.0
        self.limiter = Limiter(config.max_concurrency, config.max_queue, config.queue_timeout)
        # Requests still waiting for their first byte: the prober ends them when
        # it declares the backend hung, so they move on to the next backend.
        self.waiting: set[asyncio.Timeout] = set()
        self.wake = asyncio.Event()
        self.unit_status: UnitStatus | None = None
        self.on_change: Callable[[Backend], None] | None = None
        # Placement facts (issue 11). Model -> moving average of a request's duration
        # here, ms: updated in place per answer, read live through the view's proxy.
        self.service_ms: dict[str, float] = {}
        self._service_view = MappingProxyType(self.service_ms)
        # Model -> the smallest context /api/ps showed it spilled at (GPU backends).
        self.spilled_contexts: dict[str, int] = {}
        self.gpu_figures = GpuFigures()  # what gpu_memory.discover found
        # A cpu backend's budget without `ram`: this host's /proc/meminfo (set by the
        # scheduler for a backend on this host) less the desktop's reserve.
        self.host_meminfo: str | None = None
        # What the supervised unit's environment says, where the configuration does not.
        self.unit_flash_attention: bool | None = None
        self.unit_kv_cache_type: KvCacheType | None = None
        self.ram_reserve: int | None = None
        # Model -> what /api/ps showed it take here, at its context (issue 17): trusted
        # over the estimate, read live through the view.
        self.measured: dict[str, MeasuredSize] = {}
        self._measured_view = MappingProxyType(self.measured)
        self.budget: MemoryBudget | None = None
        # Set when the backend comes up from down or unknown: Harbor drops affinity
        # pointing away from it, and the prober reads the GPU's memory again.
        self.came_up = False
        self.rediscover = asyncio.Event()
        # Residency (issue 16): what is loaded here, its slots, loads and evictions.
        self.residency = ResidencyFacts(name, config.max_loaded, self.changed)
        self._view: BackendView
        self._rebuilt = 0  # views built: see `generation`
        self.changed()

    @property
    def in_flight(self) -> int:
        """Generations holding a slot here: the limiter's count, the only one."""
        return self.limiter.active

    # -- the policy's snapshot ------------------------------------------------

    @property
    def default_context(self) -> int:
        """The context of a request without num_ctx here: configured, else Ollama's own
        default for this GPU's memory (a cpu backend's Ollama sees no GPU)."""
        total = (self.gpu_figures.total or self.config.vram) if self.config.kind == "gpu" else None
        return default_context(self.config.default_context, total)

    def _build_view(self) -> BackendView:
        gpu = self.config.kind == "gpu"
        spilled: dict[str, tuple[int, int]] = {}
        if gpu:
            for model in self.loaded:
                if 0 < model.size_vram < model.size:
                    spilled[normalize_model(model.name)] = (model.size, model.size_vram)
            figures = self.gpu_figures
            vram = self.config.vram
            self.budget = choose_budget(
                int(vram) if vram else None,  # a plain int: ByteSize does not encode in status
                figures.journal,
                figures.sysfs,
                figures.nvidia_smi,
                spill_budget(self.loaded),
            )
        else:
            ram = self.config.ram
            self.budget = cpu_budget(int(ram) if ram else None, self.host_meminfo, self.ram_reserve)
        return BackendView(
            name=self.name,
            kind=self.config.kind,
            health=self.health,
            cooldown=self.cooldown,
            models=self.models,
            spilled=spilled,
            memory_limit=self.config.memory_limit if gpu else None,
            budget=self.budget,
            default_context=self.default_context,
            kv_cache_type=self.kv_cache_type,
            parallel=self.config.parallel,
            in_flight=self.in_flight,
            queued=self.limiter.queued,
            service_ms=self._service_view,
            spilled_contexts=self.spilled_contexts,
            resident=self.residency.view,
            capacity=self.residency.capacity.models,
            capacity_source=self.residency.capacity.source,
            load_ms=self.residency.load_view,
            running=self.residency.running_view,
            flash_attention=(
                self.config.flash_attention
                if self.config.flash_attention is not None
                else self.unit_flash_attention
            ),
            measured=self._measured_view,
        )

    @property
    def view(self) -> BackendView:
        """The policy's snapshot. Rebuilt whole when a fact changes (`changed`); the
        load (in flight, queued), which changes per request, is brought up to date
        in place when a plan reads it: the view is frozen to its readers, and
        rebuilding its fields per request would cost more than the rest of a plan."""
        view = self._view
        in_flight, queued = self.limiter.active, self.limiter.queued
        if view.in_flight != in_flight or view.queued != queued:
            object.__setattr__(view, "in_flight", in_flight)
            object.__setattr__(view, "queued", queued)
        return view

    @property
    def generation(self) -> int:
        """Changes when anything the policy reads here changes, but the load (in flight,
        queued), the models running (read beside it), service times and the last use of
        resident models; two counters that only grow, so their sum changes whenever
        either does."""
        return self._rebuilt + self.residency.generation

    def changed(self) -> None:
        self._view = self._build_view()
        self._rebuilt += 1
        if self.on_change is not None:
            self.on_change(self)

    def record_service(self, model: str, duration_ms: float) -> None:
        """A request for `model` took `duration_ms` here (the relay, per answer served)."""
        name = normalize_model(model)
        self.service_ms[name] = ewma(self.service_ms.get(name), duration_ms)

    def answered(self, model: str, now: float, load_ms: float | None) -> bool:
        """`model` answered here just now: it is loaded. Returns whether /api/ps is worth
        reading (the answer loaded it, or it was not known to be here): then what it
        evicted, a spill, and the slots are learned from what /api/ps shows."""
        news = self.residency.answered(model, now, load_ms)
        if load_ms is not None:
            # A real load (Ollama said so): what it evicted is worth a read every time.
            self._ps_asked[model] = now
            return True
        return news and self.answer_loaded(model, now)

    @property
    def kv_cache_type(self) -> KvCacheType:
        """The configured OLLAMA_KV_CACHE_TYPE; left at its default, the unit's."""
        configured = self.config.kv_cache_type
        if configured == "f16" and self.unit_kv_cache_type is not None:
            return self.unit_kv_cache_type
        return configured

    def set_unit_memory_settings(
        self, flash_attention: bool | None, kv_cache_type: str | None
    ) -> None:
        """OLLAMA_FLASH_ATTENTION and OLLAMA_KV_CACHE_TYPE from the unit's environment."""
        kv: KvCacheType | None = None
        for known in ("f16", "q8_0", "q4_0"):
            if kv_cache_type == known:
                kv = known
        if (flash_attention, kv) != (self.unit_flash_attention, self.unit_kv_cache_type):
            self.unit_flash_attention, self.unit_kv_cache_type = flash_attention, kv
            self.changed()

    def set_gpu_figures(self, figures: GpuFigures) -> None:
        if figures != self.gpu_figures:
            self.gpu_figures = figures
            self.changed()

    def reconfigure(self, config: BackendConfig) -> None:
        self.config = config
        self.limiter.limit = config.max_concurrency
        self.limiter.max_queue = config.max_queue
        self.limiter.queue_timeout = config.queue_timeout
        self.rediscover.set()  # vram or the unit may have changed
        self.residency.reconfigure(config.max_loaded)
        self.changed()

    # -- health transitions -----------------------------------------------------

    def mark_up(self, version: str | None = None, latency_ms: float | None = None) -> None:
        self.probe_timeouts = 0
        if version is not None:
            self.version = version
        if latency_ms is not None:
            self.latency_ms = latency_ms
        if self.health in ("up", "degraded") and not self.cooldown and not self.hung:
            return
        if self.health != "up":
            log.info(
                "backend %s is up%s", self.name, f" (ollama {self.version})" if self.version else ""
            )
        self._coming_up()
        # A degraded backend stays degraded until a request succeeds on it.
        self.health = "degraded" if self.health == "degraded" else "up"
        self.cooldown = False
        self.hung = False
        self.last_change = time.time()
        self.changed()

    def _coming_up(self) -> None:
        if self.health in ("down", "unknown"):
            self.came_up = True
            self.rediscover.set()

    def mark_down(
        self, reason: str, error_class: ErrorClass = "network", cooldown: bool = False
    ) -> None:
        self.last_error, self.last_error_class = reason, error_class
        if self.health == "down" and self.cooldown == (cooldown or self.cooldown):
            return
        if self.health != "down":
            log.warning("backend %s is down: %s", self.name, reason)
            self.last_change = time.time()
        self.health = "down"
        self.cooldown = self.cooldown or cooldown
        self.changed()
        self.wake.set()

    def mark_hung(self, reason: str) -> None:
        """The port accepts but does not answer: free the requests waiting on it."""
        self.hung = True
        self.mark_down(reason)
        loop = asyncio.get_running_loop()
        for pending in list(self.waiting):
            pending.reschedule(loop.time())

    def record_success(self) -> None:
        if self.health != "up" or self.cooldown:
            self._coming_up()
            self.health = "up"
            self.cooldown = False
            self.hung = False
            self.last_change = time.time()
            self.changed()

    def record_failure(self, error_class: ErrorClass, text: str, refused: bool = False) -> None:
        self.last_error, self.last_error_class = text, error_class
        if error_class == "network":
            self.mark_down(text, cooldown=refused)
        elif error_class == "driver" and self.health != "degraded":
            log.warning("backend %s is degraded: %s", self.name, text)
            self.health = "degraded"
            self.last_change = time.time()
            self.changed()

    # -- inventory ------------------------------------------------------------

    def set_inventory(self, models: dict[str, int] | None, loaded: list[PsModel] | None) -> None:
        changed = False
        if models is not None and models != self.models:
            self.models = models
            changed = True
        if loaded is not None:
            self.residency.sync(loaded, self.budget)
        if loaded is not None and loaded != self.loaded:
            self.loaded = loaded
            self._learn_sizes(loaded)
            self._learn_spills(loaded)
            changed = True
        self.inventory_at = time.monotonic()
        if changed:
            self.changed()

    def is_loaded(self, model: str) -> bool:
        """Whether the last /api/ps read showed `model` loaded here (a normalised name)."""
        return any(normalize_model(entry.name) == model for entry in self.loaded)

    def answer_loaded(self, model: str, now: float) -> bool:
        """Whether an answer for `model` just now was a load worth an /api/ps read (the
        relay then calls Prober.after_load): the last read did not show it loaded, and
        it was not asked about in the last PS_REREAD seconds. Without that bound, a model
        /api/ps never lists (unloaded at once, keep_alive 0) costs a read per answer."""
        if self.is_loaded(model) or now - self._ps_asked.get(model, -math.inf) < PS_REREAD:
            return False
        self._ps_asked[model] = now
        return True

    def set_loaded(self, loaded: list[PsModel]) -> None:
        """What /api/ps shows loaded now (Prober.after_load): spills are learned at once."""
        self.residency.sync(loaded, self.budget)
        if loaded != self.loaded:
            self.loaded = loaded
            self._learn_sizes(loaded)
            self._learn_spills(loaded)
            self.changed()

    def _learn_sizes(self, loaded: list[PsModel]) -> None:
        """What Ollama allocated for each loaded model, at its context: measurements."""
        for entry in loaded:
            if entry.size > 0 and entry.context_length > 0:
                self.measured[normalize_model(entry.name)] = MeasuredSize(
                    entry.size, entry.context_length, self.config.parallel
                )

    def _learn_spills(self, loaded: list[PsModel]) -> None:
        if self.config.kind != "gpu":
            return
        learned = self.spilled_contexts
        for entry in loaded:
            name, ctx = normalize_model(entry.name), entry.context_length
            learned = update_spills(learned, name, ctx, entry.size, entry.size_vram)
        if learned != self.spilled_contexts:
            for name, ctx in learned.items():
                if self.spilled_contexts.get(name) != ctx:
                    log.warning("%s spilled to system RAM on %s at %d", name, self.name, ctx)
            self.spilled_contexts = learned

    def status(self) -> BackendStatus:
        return BackendStatus(
            name=self.name,
            url=self.config.url,
            kind=self.config.kind,
            unit=self.config.unit,
            health=self.health,
            version=self.version,
            latency_ms=self.latency_ms,
            in_flight=self.in_flight,
            queued=self.limiter.queued,
            last_error=self.last_error,
            last_error_class=self.last_error_class,
            last_change=self.last_change,
            cooldown=self.cooldown,
            models=sorted(self.models or ()),
            loaded=[
                LoadedModel(m.name, m.size, m.size_vram, m.expires_at, m.context_length)
                for m in self.loaded
            ],
            memory_pressure=sorted(self._view.spilled),
            unit_status=self.unit_status,
            memory_budget=self.budget,
            parallel=self.config.parallel,
            spilled_contexts=dict(self.spilled_contexts),
            service_ms={m: round(ms, 1) for m, ms in self.service_ms.items()},
            memory_note=self._memory_note(),
            default_context=self.default_context,
            capacity=self.residency.capacity.models,
            capacity_source=self.residency.capacity.source,
            kept_hot=self.residency.hot_now(),
            loads=dict(self.residency.loads),
            evictions=dict(self.residency.evictions),
            load_ms={m: round(ms, 1) for m, ms in self.residency.load_ms.items()},
        )

    def _memory_note(self) -> str | None:
        if self.config.kind != "gpu" or self.budget is not None:
            return None
        missing = self.gpu_figures.missing
        return "; ".join(missing) if missing else "not looked for yet"
