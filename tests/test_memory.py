"""Memory facts and load facts, table-driven: estimates, VRAM figures, formats, queues."""

from __future__ import annotations

import pytest

from harbord.memory import (
    GIB,
    MIB,
    choose_budget,
    default_context,
    effective_context,
    estimate,
    format_context,
    format_gb,
    format_gib,
    kv_cache_bytes,
    ollama_default_context,
    parse_human_bytes,
    parse_inference_compute,
    parse_model_info,
    parse_nvidia_smi,
    parse_sysfs_vram,
    spill_budget,
    update_spills,
)
from harbord.model_size import GPU_RESERVE, estimate_memory
from harbord.queueing import WaitQueue, ewma, expected_finish_ms, serve_order, wait_key
from harbord.schemas import GpuMemory, MemoryBudget, ModelFacts, PsModel

# /api/show model_info of llama3.1:8b, trimmed to what matters and a few keys around it.
LLAMA_INFO: dict[str, object] = {
    "general.architecture": "llama",
    "general.parameter_count": 8030261248,
    "llama.block_count": 32,
    "llama.context_length": 131072,
    "llama.embedding_length": 4096,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.rope.freq_base": 500000,
    "tokenizer.ggml.model": "gpt2",
}
LLAMA = ModelFacts("llama", 32, 4096, 32, 8, context_length=131072)


@pytest.mark.parametrize(
    ("info", "facts"),
    [
        (LLAMA_INFO, LLAMA),
        # No head_count_kv: one KV head per attention head.
        (
            {k: v for k, v in LLAMA_INFO.items() if "head_count_kv" not in k},
            ModelFacts("llama", 32, 4096, 32, 32, context_length=131072),
        ),
        # Another architecture's prefix, explicit key/value widths (qwen3, gemma do this).
        (
            {
                "general.architecture": "qwen3",
                "qwen3.block_count": 36,
                "qwen3.embedding_length": 2560,
                "qwen3.attention.head_count": 32,
                "qwen3.attention.head_count_kv": 8,
                "qwen3.attention.key_length": 128,
                "qwen3.attention.value_length": 128,
            },
            ModelFacts("qwen3", 36, 2560, 32, 8, key_length=128, value_length=128),
        ),
        # Per-layer lists count by their largest entry.
        (
            {**LLAMA_INFO, "llama.attention.head_count_kv": [4, 8, 8, 2]},
            LLAMA,
        ),
        ({k: v for k, v in LLAMA_INFO.items() if k != "general.architecture"}, None),
        ({**LLAMA_INFO, "llama.block_count": None}, None),
        ({**LLAMA_INFO, "llama.attention.head_count": "32"}, None),
        ({**LLAMA_INFO, "general.architecture": "mistral"}, None),  # keys under another prefix
        ({}, None),
    ],
    ids=[
        "llama",
        "no kv heads",
        "qwen3 key/value",
        "per-layer list",
        "no arch",
        "null",
        "str",
        "prefix",
        "empty",
    ],
)
def test_parse_model_info(info: dict[str, object], facts: ModelFacts | None) -> None:
    assert parse_model_info(info) == facts


@pytest.mark.parametrize(
    ("facts", "num_ctx", "kv_type", "parallel", "kv"),
    [
        (LLAMA, 4096, "f16", 1, GIB // 2),  # 128 KiB per token
        (LLAMA, 65536, "f16", 1, 8 * GIB),
        (LLAMA, 65536, "q8_0", 1, 8 * GIB * 34 // 64),
        (LLAMA, 65536, "q4_0", 1, 8 * GIB * 18 // 64),
        (LLAMA, 16384, "f16", 2, 4 * GIB),  # Ollama's cache holds num_ctx * parallel tokens
        (ModelFacts("qwen3", 36, 2560, 32, 8, 128, 128), 32768, "f16", 1, 36 * 8 * 256 * 2 * 32768),
        (
            ModelFacts("x", 10, 1000, 10, 10, key_length=64, value_length=32),
            100,
            "f16",
            1,
            10 * 10 * 96 * 2 * 100,
        ),
    ],
)
def test_kv_cache_bytes(
    facts: ModelFacts, num_ctx: int, kv_type: str, parallel: int, kv: int
) -> None:
    assert kv_cache_bytes(facts, num_ctx, kv_type, parallel) == kv  # type: ignore[arg-type]


def test_estimate_is_the_breakdowns_total_on_a_gpu() -> None:
    total = estimate(LLAMA, 4_900_000_000, 65536)
    part = estimate_memory(LLAMA, 4_900_000_000, 65536)
    assert total == part.total == 4_900_000_000 + 8 * GIB + part.graph + part.reserve
    # The GPU reserve and the one layer Ollama's fit check counts twice.
    assert part.reserve == GPU_RESERVE + 4_900_000_000 // 32 + 8 * GIB // 32
    # No facts (no /api/show yet): weights and the GPU reserve, no KV cache.
    assert estimate(None, 4_900_000_000, 65536) == 4_900_000_000 + GPU_RESERVE


@pytest.mark.parametrize(
    ("num_ctx", "facts", "effective"),
    [
        (65536, LLAMA, 65536),
        (262144, LLAMA, 131072),
        (65536, None, 65536),
        (65536, ModelFacts("llama", 32, 4096, 32, 8), 65536),
    ],
)
def test_effective_context(num_ctx: int, facts: ModelFacts | None, effective: int) -> None:
    assert effective_context(num_ctx, facts) == effective


@pytest.mark.parametrize(
    ("configured", "gpu_total", "context"),
    [
        (None, None, 4096),  # a cpu backend
        (None, 8 * GIB, 4096),
        (None, 24 * GIB - 1, 4096),
        (None, 24 * GIB, 32768),
        (None, 48 * GIB, 262144),
        (65536, 8 * GIB, 65536),  # OLLAMA_CONTEXT_LENGTH in the unit, said in config
    ],
)
def test_default_context(configured: int | None, gpu_total: int | None, context: int) -> None:
    assert default_context(configured, gpu_total) == context
    if configured is None:
        assert ollama_default_context(gpu_total) == context


@pytest.mark.parametrize(
    ("known", "ps", "learned"),
    [
        ({}, ("m", 32768, 10, 6), {"m": 32768}),  # spilled: learned
        ({"m": 65536}, ("m", 32768, 10, 6), {"m": 32768}),  # spilled at less: the smaller
        ({"m": 16384}, ("m", 32768, 10, 6), {"m": 16384}),
        ({"m": 32768}, ("m", 32768, 10, 10), {}),  # fits now at that context: forgotten
        ({"m": 32768}, ("m", 65536, 10, 10), {}),
        ({"m": 32768}, ("m", 4096, 10, 10), {"m": 32768}),  # fits at less: says nothing
        ({}, ("m", 32768, 10, 0), {}),  # all on the cpu: not a spill
        ({"x": 4096}, ("m", 0, 10, 6), {"x": 4096}),  # no context_length (old server)
    ],
)
def test_update_spills(
    known: dict[str, int], ps: tuple[str, int, int, int], learned: dict[str, int]
) -> None:
    before = dict(known)
    assert update_spills(known, *ps) == learned
    assert known == before  # pure


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("23.6 GiB", int(23.6 * GIB)),
        ("582.4 MiB", int(582.4 * MIB)),
        ("0 B", 0),
        ("4.9 GB", 4_900_000_000),
        ("12 KiB", 12 * 1024),
        ("lots", None),
        ("3 parsecs", None),
        ("", None),
    ],
)
def test_parse_human_bytes(text: str, size: int | None) -> None:
    assert parse_human_bytes(text) == size


# Real shapes of the line, from several Ollama versions, as journalctl prints them.
OLD_LINE = (
    "Dec 02 09:00:01 box ollama[811]: time=2025-07-27T14:39:19.833Z level=INFO source=types.go:130 "
    'msg="inference compute" id=GPU-5c1a2b3c library=cuda variant=v12 compute=8.9 driver=12.4 '
    'name="NVIDIA GeForce RTX 4070" total="11.7 GiB" available="11.2 GiB"'
)
NEW_LINE = (
    'time=2026-02-26T04:45:48.892-05:00 level=INFO source=types.go:60 msg="inference compute" id=0 '
    'library=CUDA compute=12.0 name=CUDA0 description="NVIDIA GeForce RTX 5070 Ti" '
    "libdirs=ollama,cuda_v13 "
    'driver=13.2 pci_id=0000:01:00.0 type=discrete total="15.9 GiB" available="14.7 GiB"'
)
ROCM_LINE = (
    'level=INFO source=types.go:60 msg="inference compute" id=1 library=ROCm compute=gfx1100 '
    'name=ROCm1 description="AMD Radeon RX 7900 XTX" driver=60342.13 type=discrete '
    'total="24.0 GiB" available="23.5 GiB"'
)
CPU_LINE = (
    'level=INFO source=types.go:129 msg="inference compute" id=cpu library=cpu compute="" name=cpu '
    'description=cpu libdirs=ollama driver="" pci_id="" type="" total="31.3 GiB" '
    'available="22.2 GiB"'
)


@pytest.mark.parametrize(
    ("lines", "devices"),
    [
        ([OLD_LINE], [GpuMemory(int(11.7 * GIB), int(11.2 * GIB), "NVIDIA GeForce RTX 4070")]),
        ([NEW_LINE], [GpuMemory(int(15.9 * GIB), int(14.7 * GIB), "NVIDIA GeForce RTX 5070 Ti")]),
        (
            [NEW_LINE, ROCM_LINE],
            [
                GpuMemory(int(15.9 * GIB), int(14.7 * GIB), "NVIDIA GeForce RTX 5070 Ti"),
                GpuMemory(24 * GIB, int(23.5 * GIB), "AMD Radeon RX 7900 XTX"),
            ],
        ),
        ([CPU_LINE], []),  # no GPU found
        ([NEW_LINE, "something else", CPU_LINE], []),  # the last start found none
        (
            [CPU_LINE, NEW_LINE],
            [GpuMemory(int(15.9 * GIB), int(14.7 * GIB), "NVIDIA GeForce RTX 5070 Ti")],
        ),
        (
            [OLD_LINE, OLD_LINE.replace("11.7 GiB", "8.0 GiB")],
            [GpuMemory(8 * GIB, int(11.2 * GIB), "NVIDIA GeForce RTX 4070")],
        ),
        (['msg="inference compute" id=0 library=CUDA total="?"'], []),
        (['msg="listening" total="8 GiB"'], []),
    ],
    ids=[
        "old",
        "new",
        "two gpus",
        "cpu",
        "gpu then cpu",
        "cpu then gpu",
        "restart",
        "bad total",
        "other msg",
    ],
)
def test_parse_inference_compute(lines: list[str], devices: list[GpuMemory]) -> None:
    assert parse_inference_compute(lines) == devices


@pytest.mark.parametrize(
    ("total", "used", "memory"),
    [
        ("25753026560\n", "1073741824\n", GpuMemory(25753026560, 25753026560 - GIB)),
        ("8589934592", None, GpuMemory(8 * GIB)),
        ("0\n", None, None),
        ("garbage", None, None),
        ("8589934592", "x", None),
    ],
)
def test_parse_sysfs_vram(total: str, used: str | None, memory: GpuMemory | None) -> None:
    assert parse_sysfs_vram(total, used) == memory


@pytest.mark.parametrize(
    ("output", "devices"),
    [
        ("24564, 1234\n", [GpuMemory(24564 * MIB, (24564 - 1234) * MIB)]),
        ("12282, 500\n8192, 8192\n", [GpuMemory(12282 * MIB, 11782 * MIB), GpuMemory(8 * GIB, 0)]),
        ("[N/A], [N/A]\n", []),
        ("", []),
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", []),
    ],
)
def test_parse_nvidia_smi(output: str, devices: list[GpuMemory]) -> None:
    assert parse_nvidia_smi(output) == devices


def test_spill_budget_from_api_ps() -> None:
    loaded = [
        PsModel("small:latest", 2 * GIB, 2 * GIB),  # fully on the GPU: says nothing
        PsModel("big:13b", 14 * GIB, 7 * GIB),
        PsModel("mid:7b", 10 * GIB, 6 * GIB),
        PsModel("cpu:only", 5 * GIB, 0),
    ]
    assert spill_budget(loaded) == MemoryBudget(7 * GIB, "/api/ps", "big:13b spilled past it")
    assert spill_budget(loaded[:1]) is None


JOURNAL = [GpuMemory(int(11.7 * GIB), int(11.2 * GIB), "RTX 4070")]


@pytest.mark.parametrize(
    ("kwargs", "budget"),
    [
        (
            {"configured": 8 * GIB, "journal": JOURNAL},
            MemoryBudget(8 * GIB, "config", "backend key vram"),
        ),
        (
            {"configured": None, "journal": JOURNAL, "sysfs": [GpuMemory(99)]},
            MemoryBudget(int(11.2 * GIB), "journal", "RTX 4070"),
        ),
        ({"configured": None, "journal": [GpuMemory(6 * GIB)]}, MemoryBudget(6 * GIB, "journal")),
        (
            {
                "configured": None,
                "journal": [GpuMemory(8 * GIB, 7 * GIB, "a"), GpuMemory(8 * GIB, 8 * GIB, "b")],
            },
            MemoryBudget(15 * GIB, "journal", "a, b"),
        ),
        (
            {"configured": None, "sysfs": [GpuMemory(24 * GIB, GIB)], "nvidia_smi": [GpuMemory(1)]},
            MemoryBudget(24 * GIB, "sysfs"),
        ),
        (
            {"configured": None, "nvidia_smi": [GpuMemory(12 * GIB, GIB)]},
            MemoryBudget(12 * GIB, "nvidia-smi"),
        ),
        (
            {"configured": None, "ps": MemoryBudget(7 * GIB, "/api/ps")},
            MemoryBudget(7 * GIB, "/api/ps"),
        ),
        ({"configured": None}, None),
    ],
    ids=[
        "config first",
        "journal available",
        "journal total",
        "two gpus add",
        "sysfs",
        "nvidia-smi",
        "ps",
        "none",
    ],
)
def test_choose_budget(kwargs: dict[str, object], budget: MemoryBudget | None) -> None:
    assert choose_budget(**kwargs) == budget  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fn", "value", "text"),
    [
        (format_gb, 12_700_000_000, "12.7 GB"),
        (format_gb, 4_900_000_000, "4.9 GB"),
        (format_gib, 8 * GIB, "8 GiB"),
        (format_gib, int(11.7 * GIB), "11.7 GiB"),
        (format_gib, 512 * MIB, "0.5 GiB"),
        (format_context, 65536, "64k"),
        (format_context, 4096, "4k"),
        (format_context, 131072, "128k"),
        (format_context, 5000, "5000"),
        (format_context, 512, "512"),
    ],
)
def test_formats(fn: object, value: int, text: str) -> None:
    assert fn(value) == text  # type: ignore[operator]


# --- queueing: moving averages, expected finish, wait order --------------------------


def test_ewma() -> None:
    assert ewma(None, 1000.0) == 1000.0
    assert ewma(1000.0, 2000.0) == pytest.approx(1300.0)
    assert ewma(1000.0, 2000.0, weight=1.0) == 2000.0
    value = None
    for _ in range(20):
        value = ewma(value, 500.0)
    assert value == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("service", "in_flight", "queued", "parallel", "finish"),
    [
        (1000.0, 0, 0, 1, 1000.0),  # idle: its own time
        (1000.0, 1, 0, 1, 2000.0),  # one running: waits for it
        (1000.0, 1, 3, 1, 5000.0),
        (1000.0, 0, 0, 2, 1000.0),
        (1000.0, 1, 0, 2, 1000.0),  # a free slot
        (1000.0, 2, 0, 2, 2000.0),
        (1000.0, 2, 1, 2, 2000.0),  # the queued one and this one share the next batch
        (1000.0, 2, 2, 2, 3000.0),
        (1000.0, 1, 0, 0, 2000.0),  # a parallel of 0 counts as 1
    ],
)
def test_expected_finish_ms(
    service: float, in_flight: int, queued: int, parallel: int, finish: float
) -> None:
    assert expected_finish_ms(service, in_flight, queued, parallel) == finish


@pytest.mark.parametrize(
    ("waiting", "order"),
    [
        ([("heavy", 0.0), ("fast", 1.0)], [1, 0]),  # fast first
        ([("heavy", 0.0), ("fast", 9.9)], [1, 0]),
        ([("heavy", 0.0), ("fast", 10.0)], [0, 1]),  # equal due: first come
        ([("heavy", 0.0), ("fast", 11.0)], [0, 1]),  # heavy waited past the head start
        ([("fast", 0.0), ("fast", 1.0), ("heavy", 0.5)], [0, 1, 2]),
        ([("heavy", 0.0), ("heavy", 1.0)], [0, 1]),
        ([], []),
    ],
)
def test_serve_order(waiting: list[tuple[str, float]], order: list[int]) -> None:
    assert serve_order(waiting, fast_head_start=10.0) == order  # type: ignore[arg-type]


def test_heavy_never_starves() -> None:
    """A stream of fast arrivals, one a second: the heavy waiter is served within the head start."""
    heavy = wait_key("heavy", 0.0, 0, 10.0)
    fast_ahead = [t for t in range(100) if wait_key("fast", float(t), t + 1, 10.0) < heavy]
    assert fast_ahead == list(range(10))


def test_wait_queue_serves_fast_first_and_ages_heavy() -> None:
    queue: WaitQueue[str] = WaitQueue(fast_head_start=10.0)
    queue.push("heavy-0", "heavy", 0.0)
    queue.push("fast-1", "fast", 1.0)
    queue.push("fast-5", "fast", 5.0)
    queue.push("fast-13", "fast", 13.0)  # arrived after heavy-0 and heavy-2 had waited 10 s
    queue.push("heavy-2", "heavy", 2.0)
    assert len(queue) == 5
    assert [queue.pop() for _ in range(5)] == ["fast-1", "fast-5", "heavy-0", "heavy-2", "fast-13"]
    with pytest.raises(IndexError):
        queue.pop()


def test_wait_queue_remove() -> None:
    queue: WaitQueue[object] = WaitQueue(fast_head_start=10.0)
    waiters = [object() for _ in range(4)]
    for i, waiter in enumerate(waiters):
        queue.push(waiter, "fast" if i % 2 else "heavy", float(i))
    assert queue.remove(waiters[1]) is True
    assert queue.remove(waiters[1]) is False  # gone already
    assert queue.remove(object()) is False
    assert [queue.pop() for _ in range(3)] == [waiters[3], waiters[0], waiters[2]]
