"""What a model needs in memory, what a GPU has, and how to say both: pure functions.

The daemon gathers the raw facts (`/api/show`, the GPU unit's journal, sysfs,
`nvidia-smi`, `/api/ps`); this module turns them into numbers the policy compares.
No I/O here.

What a model takes loaded is model_size.py's (estimate_memory, as Ollama sizes it);
`estimate` and `kv_elements_per_token` here are the older, simpler names for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from harbord.model_size import (
    GIB,
    KV_BYTES_PER_ELEMENT,
    MIB,
    estimate_memory,
    parse_model_info,
)
from harbord.schemas import GpuMemory, KvCacheType, MemoryBudget, ModelFacts, PsModel

__all__ = ["GIB", "KV_BYTES_PER_ELEMENT", "MIB", "parse_model_info"]

# The flat figure policy.py's inlined estimate adds for graph and GPU context, until
# it calls model_size.estimate_memory, which sizes both as Ollama does.
ALLOWANCE = 512 * MIB

# Ollama's default context when neither num_ctx nor OLLAMA_CONTEXT_LENGTH says
# (docs: "The default context length in Ollama is 4096 tokens"); current servers
# raise it with the GPU's memory (ollama_default_context).
OLLAMA_DEFAULT_CONTEXT = 4096


# -- model facts and the estimate ---------------------------------------------


def kv_elements_per_token(facts: ModelFacts) -> int:
    """K and V values one token keeps, over all layers."""
    head_width = facts.embedding_length // facts.head_count
    key = facts.key_length or head_width
    value = facts.value_length or head_width
    return facts.block_count * facts.head_count_kv * (key + value)


def kv_cache_bytes(facts: ModelFacts, num_ctx: int, kv_type: KvCacheType, parallel: int = 1) -> int:
    return int(kv_elements_per_token(facts) * num_ctx * parallel * KV_BYTES_PER_ELEMENT[kv_type])


def effective_context(num_ctx: int, facts: ModelFacts | None) -> int:
    """Ollama caps a request's context at the model's trained length."""
    if facts is not None and 0 < facts.context_length < num_ctx:
        return facts.context_length
    return num_ctx


def estimate(
    facts: ModelFacts | None,
    weights: int,
    num_ctx: int,
    kv_type: KvCacheType = "f16",
    parallel: int = 1,
) -> int:
    """Bytes the model takes loaded on a GPU at `num_ctx`, as Ollama sizes it.

    The total of model_size.estimate_memory (weights, KV cache, graph, projector,
    reserve), with flash attention as Ollama's default for the model. Without facts
    (no `/api/show` yet) only weights and reserve: a low estimate never keeps a model
    off a GPU it would fit.
    """
    return estimate_memory(facts, weights, num_ctx, "gpu", parallel, kv_type).total


def ollama_default_context(gpu_total: int | None) -> int:
    """Ollama's default context for a server with this much GPU memory (None/0: none).

    Current servers pick it from VRAM: 4k under 24 GiB, 32k under 48 GiB, 256k above.
    """
    if not gpu_total or gpu_total < 24 * GIB:
        return OLLAMA_DEFAULT_CONTEXT
    return 32768 if gpu_total < 48 * GIB else 262144


def default_context(configured: int | None, gpu_total: int | None) -> int:
    """A backend's context for requests without `num_ctx` (BackendView.default_context)."""
    return configured if configured else ollama_default_context(gpu_total)


# -- spills learned -------------------------------------------------------------


def update_spills(
    known: Mapping[str, int], model: str, context_length: int, size: int, size_vram: int
) -> dict[str, int]:
    """Learn from one `/api/ps` entry of a GPU backend: model -> smallest context that spilled.

    Partly off the GPU (0 < size_vram < size): remember the context. Wholly on the
    GPU at a context at least as large as the one remembered: it fits now (another
    model was unloaded, the budget grew): forget it.
    """
    if context_length <= 0 or size <= 0:
        return dict(known)
    learned = dict(known)
    previous = learned.get(model)
    if 0 < size_vram < size:
        learned[model] = context_length if previous is None else min(previous, context_length)
    elif size_vram >= size and previous is not None and context_length >= previous:
        del learned[model]
    return learned


# -- GPU memory figures -----------------------------------------------------------

_HUMAN_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": MIB,
    "gib": GIB,
    "tib": 1024**4,
}
_HUMAN_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*")
# slog's text handler: key=value, the value quoted (Go escapes) when it has spaces.
_PAIR_RE = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_human_bytes(text: str) -> int | None:
    """Ollama's printed sizes ("23.6 GiB", "582.4 MiB", "0 B", "4.9 GB") -> bytes."""
    match = _HUMAN_RE.fullmatch(text)
    if match is None or match.group(2).lower() not in _HUMAN_UNITS:
        return None
    return int(float(match.group(1)) * _HUMAN_UNITS[match.group(2).lower()])


def _slog_fields(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for key, raw in _PAIR_RE.findall(line):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        fields[key] = raw
    return fields


def parse_inference_compute(lines: Iterable[str]) -> list[GpuMemory]:
    """The GPUs in Ollama's start-up lines `msg="inference compute" ... total=".." available=".."`.

    One line per device; journal prefixes are ignored. `library=cpu` lines (no GPU
    found) are left out. Only the last start's lines count: a line whose `id` was
    seen already begins a new start.
    """
    devices: dict[str, GpuMemory] = {}
    for line in lines:
        if 'msg="inference compute"' not in line:
            continue
        fields = _slog_fields(line)
        if fields.get("library", "").lower() == "cpu":
            devices.clear()  # a start that found no GPU supersedes older ones
            continue
        total = parse_human_bytes(fields.get("total", ""))
        if not total:
            continue
        device_id = fields.get("id", "")
        if device_id in devices:
            devices.clear()  # the same device again: the server started anew
        name = fields.get("description") or fields.get("name", "")
        devices[device_id] = GpuMemory(
            total=total, available=parse_human_bytes(fields.get("available", "")), name=name
        )
    return list(devices.values())


def parse_sysfs_vram(total_text: str, used_text: str | None = None) -> GpuMemory | None:
    """AMD's `/sys/class/drm/card*/device/mem_info_vram_total` (and `_used`): bytes as text."""
    try:
        total = int(total_text.strip())
        used = int(used_text.strip()) if used_text is not None else None
    except ValueError:
        return None
    if total <= 0:
        return None
    available = max(total - used, 0) if used is not None else None
    return GpuMemory(total=total, available=available)


def parse_nvidia_smi(output: str) -> list[GpuMemory]:
    """`nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader,nounits`: MiB."""
    devices: list[GpuMemory] = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            total, used = int(float(parts[0]) * MIB), int(float(parts[1]) * MIB)
        except ValueError:  # "[N/A]", "[Not Supported]"
            continue
        if total > 0:
            devices.append(GpuMemory(total=total, available=max(total - used, 0)))
    return devices


def spill_budget(loaded: Iterable[PsModel]) -> MemoryBudget | None:
    """What `/api/ps` shows of a GPU's size: a spilled model filled what Ollama could use."""
    best: PsModel | None = None
    for model in loaded:
        if 0 < model.size_vram < model.size and (best is None or model.size_vram > best.size_vram):
            best = model
    if best is None:
        return None
    return MemoryBudget(best.size_vram, "/api/ps", f"{best.name} spilled past it")


def choose_budget(
    configured: int | None,
    journal: Iterable[GpuMemory] = (),
    sysfs: Iterable[GpuMemory] = (),
    nvidia_smi: Iterable[GpuMemory] = (),
    ps: MemoryBudget | None = None,
) -> MemoryBudget | None:
    """The first figure known: config `vram`, the journal, sysfs, nvidia-smi, `/api/ps`.

    The journal's `available` is what was free when Ollama started, before it loaded
    anything: the best measure of what it can use. sysfs and nvidia-smi are read
    while models are loaded, so their `used` includes ours: the total counts. Several
    GPUs add up, as Ollama splits a model across them.
    """
    if configured:
        return MemoryBudget(configured, "config", "backend key vram")
    devices = list(journal)
    if devices:
        size = sum(d.available if d.available is not None else d.total for d in devices)
        return MemoryBudget(size, "journal", ", ".join(d.name for d in devices if d.name))
    total = sum(d.total for d in sysfs)
    if total:
        return MemoryBudget(total, "sysfs")
    total = sum(d.total for d in nvidia_smi)
    if total:
        return MemoryBudget(total, "nvidia-smi")
    return ps


# -- a CPU backend's memory -------------------------------------------------------

# What the desktop keeps when `ram` is not configured: a tenth of the machine, at most this.
RAM_RESERVE_CAP = 4 * GIB


def parse_meminfo_total(text: str) -> int | None:
    """`/proc/meminfo`'s MemTotal ("MemTotal:  32767436 kB") in bytes."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "MemTotal":
            parts = rest.split()
            if parts and parts[0].isdigit():
                unit = parts[1].lower() if len(parts) > 1 else "b"
                return int(parts[0]) * (1024 if unit == "kb" else 1)
    return None


def cpu_budget(
    configured: int | None, meminfo: str | None, reserve: int | None = None
) -> MemoryBudget | None:
    """The memory a CPU backend can give its models: config `ram`, else the machine's.

    The machine's is `/proc/meminfo` MemTotal (read on this host, so only for a
    backend on it) less `reserve` for the desktop; None: a tenth, at most 4 GiB.
    None when neither is known.
    """
    if configured:
        return MemoryBudget(configured, "config", "backend key ram")
    total = parse_meminfo_total(meminfo) if meminfo else None
    if not total:
        return None
    kept = min(total // 10, RAM_RESERVE_CAP) if reserve is None else reserve
    detail = f"MemTotal {format_gib(total)} less {format_gib(kept)} for the desktop"
    return MemoryBudget(max(total - kept, 0), "meminfo", detail)


# -- how the numbers are written ---------------------------------------------------


def format_gb(size: int) -> str:
    """Decimal gigabytes, as Ollama prints model sizes: 12.7 GB."""
    return f"{size / 1e9:.1f} GB"


def format_gib(size: int) -> str:
    """Binary gibibytes, as GPU memory is sold and logged: 8 GiB, 11.7 GiB."""
    text = f"{size / GIB:.1f}"
    return f"{text[:-2] if text.endswith('.0') else text} GiB"


def format_context(tokens: int) -> str:
    """A context length as people say it: 4096 -> 4k, 65536 -> 64k, 5000 -> 5000."""
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)
