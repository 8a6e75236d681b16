"""What the policy sees: an immutable snapshot of each backend, and model names.

The lowest floor of placement: the policy, its rules, affinity and the daemon's
backend state all read these, and none of them is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from harbord.memory import OLLAMA_DEFAULT_CONTEXT
from harbord.residency import OLLAMA_DEFAULT_MAX_LOADED, Resident
from harbord.schemas import (
    BackendKind,
    CapacitySource,
    Health,
    KvCacheType,
    MeasuredSize,
    MemoryBudget,
)


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
    # What the backend can give one model, with the figure's source: a GPU's memory
    # (memory.choose_budget), a CPU's RAM (memory.cpu_budget).
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
    # Residency (issue 16): what is loaded here now (None: not known yet, and the
    # residency rule stays out), how many models the backend holds at once, and the
    # learned load time per model, ms (residency.py).
    resident: Mapping[str, Resident] | None = None
    capacity: int = OLLAMA_DEFAULT_MAX_LOADED
    capacity_source: CapacitySource = "default"
    load_ms: Mapping[str, float] = field(default_factory=dict)
    running: Mapping[str, int] = field(default_factory=dict)  # model -> requests running
    # Memory (issue 17): the unit's OLLAMA_FLASH_ATTENTION (None: Ollama's default per
    # model), and what /api/ps showed each model take here (trusted over estimates).
    flash_attention: bool | None = None
    measured: Mapping[str, MeasuredSize] = field(default_factory=dict)


def normalize_model(name: str) -> str:
    """Ollama's canonical form: a name without a tag means `:latest`."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"
