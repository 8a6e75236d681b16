"""Typed messages: everything that crosses the socket or touches disk.

Decoding happens at the edges with these schemas; the rest of the daemon
passes the typed values around.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# What decoding untrusted bytes with msgspec can raise: its own errors (ValidationError
# is a DecodeError), UnicodeDecodeError for a string that is not UTF-8, and
# RecursionError for arrays or objects nested too deeply.
UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

Intent = Literal["fast", "heavy"]
INTENTS: tuple[Intent, ...] = ("fast", "heavy")
BackendKind = Literal["gpu", "cpu"]
# Error classes, from the backend's status and JSON error text (see classify.py).
ErrorClass = Literal["oom", "network", "model", "driver", "busy", "client", "other"]
# up: answering; degraded: answering but a driver error was seen; down: the
# probe fails; unknown: not probed yet.
Health = Literal["unknown", "up", "degraded", "down"]


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Ollama's error shape, also used for harbord's own errors."""

    error: str


class RequestOptions(msgspec.Struct):
    num_ctx: int | None = None  # the context the model is loaded with: its KV cache's size


class RequestFacts(msgspec.Struct):
    """The only fields of a request body that routing reads."""

    model: str | None = None
    name: str | None = None  # /api/show and model management still accept `name`
    stream: bool | None = None
    intent: str | None = None
    options: RequestOptions | None = None

    @property
    def model_name(self) -> str | None:
        return self.model or self.name


# --- persisted state -------------------------------------------------------


class Pin(msgspec.Struct, omit_defaults=True):
    backend: str
    reason: str
    since: float  # unix time
    until: float | None = None  # unix time; None = until unpinned
    source: Literal["oom", "operator"] = "operator"

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


class Affinity(msgspec.Struct):
    backend: str
    since: float  # when the model was first served there
    # The last answer it served there: affinity expires `routing.affinity_ttl` after
    # it, as the backend's keep-alive unloads an idle model. None: `since` counts.
    last_served: float | None = None


class StateFile(msgspec.Struct):
    version: int = 1
    pins: dict[str, Pin] = {}
    affinity: dict[str, Affinity] = {}


# --- routing plan ----------------------------------------------------------


class PlanStep(msgspec.Struct):
    backend: str
    reasons: list[str]


class Plan(msgspec.Struct):
    model: str | None
    intent: Intent
    intent_source: str  # header, body, model rule, default
    steps: list[PlanStep]
    # Backends left out of the plan (cooling down after a refused connection).
    excluded: list[PlanStep] = []
    forced: bool = False
    notes: list[str] = []
    # Which rule put the first step first (see policy.py), for /metrics and `route`.
    rule: PlacementRule = "order"
    pinned: str | None = None  # the backend the model is pinned to, if any
    # Why the request is refused before any backend is asked: the model fits none.
    refused: str | None = None
    # Background work (rules.Request.background): not counted as interactive use.
    background: bool = False
    num_ctx: int | None = None  # the request's options.num_ctx
    estimates: list[BackendEstimate] = []  # per backend, in the order of `steps`

    @property
    def backends(self) -> list[str]:
        return [step.backend for step in self.steps]


class Attempt(msgspec.Struct, omit_defaults=True):
    backend: str
    outcome: Literal["served", "failed", "skipped"]
    error_class: ErrorClass | None = None
    error: str | None = None
    status: int | None = None
    ms: float = 0.0
    after_first_byte: bool = False


class Decision(msgspec.Struct):
    """One request to a backend-bound path, as logged and as `harborctl explain` shows it.

    `plan` (and so `intent`) is None for a request refused before it was planned,
    with harbord's message in `error`."""

    id: str
    time: float
    method: str
    path: str
    model: str | None = None
    intent: Intent | None = None
    plan: Plan | None = None
    error: str | None = None
    attempts: list[Attempt] = []
    served_by: str | None = None
    status: int = 0
    duration_ms: float = 0.0
    first_byte_ms: float | None = None
    # Whether the client asked for a stream: a non-streaming answer arrives whole,
    # when it is done, so it waits for answer_timeout instead of first_byte_timeout.
    stream: bool = True


# --- status ----------------------------------------------------------------


class LoadedModel(msgspec.Struct):
    name: str
    size: int = 0
    size_vram: int = 0
    expires_at: str | None = None
    context_length: int = 0  # the context it was loaded with; 0: the backend did not say


class UnitStatus(msgspec.Struct, omit_defaults=True):
    name: str
    active_state: str = "unknown"
    sub_state: str = "unknown"
    main_pid: int = 0
    n_restarts: int = 0
    since: str | None = None
    supervised: bool = False
    harbor_restarts: int = 0
    last_restart: float | None = None
    budget_exhausted: bool = False
    note: str | None = None


class BackendStatus(msgspec.Struct):
    name: str
    url: str
    kind: BackendKind
    unit: str
    health: Health
    version: str | None
    latency_ms: float | None
    in_flight: int
    queued: int
    last_error: str | None
    last_error_class: ErrorClass | None
    last_change: float
    cooldown: bool
    models: list[str]
    loaded: list[LoadedModel]
    memory_pressure: list[str]
    unit_status: UnitStatus | None = None
    served: int = 0
    ttfb_p50_ms: float | None = None  # over the recent requests this backend served
    # Placement (issue 11): the memory figure used and its source, the parallel
    # capacity, the spills learned (model -> context) and recent durations (model -> ms).
    memory_budget: MemoryBudget | None = None
    parallel: int = 1
    spilled_contexts: dict[str, int] = {}
    service_ms: dict[str, float] = {}
    # GPU backends: the memory sources looked at and not found, when none was.
    memory_note: str | None = None
    default_context: int | None = None
    # Residency (issue 16): how many models it holds at once and how that is known,
    # the models harbord loaded again to keep them hot, and per model the loads and
    # evictions seen here and the learned load time (ms).
    capacity: int | None = None
    capacity_source: CapacitySource | None = None
    kept_hot: list[str] = []
    loads: dict[str, int] = {}
    evictions: dict[str, int] = {}
    load_ms: dict[str, float] = {}


class Counters(msgspec.Struct):
    requests: int = 0
    served: int = 0
    failed: int = 0
    fallbacks: int = 0
    client_errors: int = 0
    by_backend: dict[str, int] = {}


class Status(msgspec.Struct):
    version: str
    pid: int
    started_at: float
    uptime_s: float
    socket: str
    backends: list[BackendStatus]
    pins: dict[str, Pin]
    affinity: dict[str, Affinity]
    counters: Counters
    in_flight: int
    state_note: str | None = None
    supervision: str = "off"


class CheckEntry(msgspec.Struct):
    """The seed's `check` shape, kept for scripts that parse it."""

    status: Literal["healthy", "unhealthy"]
    version: str | None
    url: str
    is_gpu: bool


class PinRequest(msgspec.Struct, forbid_unknown_fields=True):
    backend: str
    for_seconds: float | None = None
    reason: str = "pinned by operator"


class Inventory(msgspec.Struct):
    backends: dict[str, list[str]]
    models: dict[str, list[str]]  # model -> backends that have it


# --- Ollama shapes we read from the backends --------------------------------


class TagModel(msgspec.Struct):
    name: str
    size: int = 0


class Tags(msgspec.Struct):
    models: list[TagModel] | None = None


class PsModel(msgspec.Struct):
    name: str
    size: int = 0
    size_vram: int = 0
    expires_at: str | None = None
    context_length: int = 0  # the context it was loaded with (0: an Ollama that does not say)


class Ps(msgspec.Struct):
    models: list[PsModel] | None = None


class Version(msgspec.Struct):
    version: str = ""


# --- placement facts (issue 11) ----------------------------------------------

KvCacheType = Literal["f16", "q8_0", "q4_0"]
# The rule that decided a plan, strongest first (policy.py); "order" = the
# configuration's order, or the only backend left.
PlacementRule = Literal[
    "forced",
    "health",
    "inventory",
    "pin",
    "memory",
    "spill",
    "residency",
    "busy-spill",
    "intent",
    "affinity",
    "order",
]
# How a backend's model capacity (OLLAMA_MAX_LOADED_MODELS) is known (residency.py).
CapacitySource = Literal["config", "unit", "learned", "default"]
BudgetSource = Literal["config", "journal", "sysfs", "nvidia-smi", "/api/ps", "meminfo"]


class ModelFacts(msgspec.Struct, frozen=True):
    """What the memory estimate needs from `/api/show`'s `model_info` (model_size.py)."""

    architecture: str
    block_count: int
    embedding_length: int
    head_count: int  # the largest, where layers differ
    head_count_kv: int  # the largest, where layers differ
    # Per-head key and value widths where the model states them (0: embedding / heads).
    key_length: int = 0
    value_length: int = 0
    context_length: int = 0  # the longest context the model was trained for; 0: unknown
    # Per layer, for hybrid models (0: a layer without attention, i.e. recurrent);
    # (): every layer has head_count / head_count_kv.
    head_count_layers: tuple[int, ...] = ()
    head_count_kv_layers: tuple[int, ...] = ()
    sliding_window: int = 0  # tokens a sliding-window layer attends to; 0: none stated
    vocab_size: int = 0  # 0: unknown
    expert_count: int = 0  # mixture of experts: experts per layer, and used per token
    expert_used_count: int = 0
    # Recurrent (SSM) layers' state: what it takes is independent of the context.
    ssm_conv_kernel: int = 0
    ssm_inner_size: int = 0
    ssm_state_size: int = 0
    ssm_group_count: int = 0
    embedding: bool = False  # an embedding model (`<arch>.pooling_type` present)
    file_type: int = 0  # general.file_type: the weights' quantization
    # The vision encoder (`<arch>.vision.*`), whose worst-case image sizes a graph.
    vision_block_count: int = 0
    vision_embedding_length: int = 0
    vision_head_count: int = 0
    vision_image_size: int = 0
    vision_patch_size: int = 0
    vision_num_channels: int = 0
    vision_max_pixels: int = 0


class MemoryEstimate(msgspec.Struct, frozen=True):
    """What a model takes loaded, in bytes, part by part (model_size.estimate_memory)."""

    weights: int  # the size in /api/tags (a vision projector's tensors included)
    kv: int  # KV cache, and recurrent state
    graph: int  # the compute graph for one batch
    projector: int  # the vision encoder's graph for its worst-case image
    reserve: int  # what Ollama keeps free per GPU; 0 on a CPU
    num_ctx: int  # the context estimated for, after the cap at the trained length
    parallel: int  # parallel slots estimated for (1 for an embedding model)
    kv_cache_type: KvCacheType  # the cache type in effect (f16 without flash attention)
    total: int


class MeasuredSize(msgspec.Struct, frozen=True):
    """What `/api/ps` showed a model take on one backend, and what it was loaded with."""

    size: int
    num_ctx: int  # /api/ps `context_length`
    parallel: int


class GpuMemory(msgspec.Struct, frozen=True, omit_defaults=True):
    """One GPU's memory as one source reports it, in bytes."""

    total: int
    available: int | None = None
    name: str = ""


class MemoryBudget(msgspec.Struct, frozen=True, omit_defaults=True):
    """The memory a backend can give one model, and where the figure came from."""

    bytes: int
    source: BudgetSource
    detail: str = ""  # e.g. the device name, or the model whose spill showed it


class BackendEstimate(msgspec.Struct, omit_defaults=True):
    """The numbers behind one backend's place in a plan (`harborctl route`, `explain`)."""

    backend: str
    num_ctx: int  # the context the estimate is for
    needs: int | None = None  # bytes: weights + KV cache + allowance; None: size unknown
    budget: int | None = None  # bytes the backend can give the model (GPU backends)
    budget_source: BudgetSource | None = None
    parallel: int = 1
    in_flight: int = 0
    queued: int = 0
    service_ms: float | None = None  # recent duration of this model here (moving average)
    expected_finish_ms: float | None = None
    # Residency (issue 16): whether the model is loaded here (None: not known), the load
    # it would take, whether that time was learned here or estimated from its size, the
    # models the load would evict and the reloads that costs interactive work, and the
    # request's expected time here (load + service + evictions' cost), all in ms.
    resident: bool | None = None
    load_ms: float | None = None
    load_learned: bool = False
    evicts: list[str] = []
    eviction_ms: float = 0.0
    expected_ms: float | None = None
    capacity: int | None = None
    capacity_source: CapacitySource | None = None
    # Memory (issue 17): `needs`' parts, bytes (model_size.estimate_memory), and whether
    # it is what /api/ps measured (at `measured_at` context, moved to this one) or an
    # estimate.
    weights: int | None = None
    kv: int | None = None
    graph: int | None = None
    projector: int | None = None
    reserve: int | None = None
    needs_source: Literal["measured", "estimated"] | None = None
    measured_at: int | None = None
