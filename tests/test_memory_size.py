"""model_size: parsing /api/show, the estimate's rules, CPU budgets, measured sizes."""

from __future__ import annotations

import pytest

from harbord.memory import cpu_budget, parse_meminfo_total
from harbord.model_size import (
    GIB,
    GPU_RESERVE,
    MIB,
    estimate_memory,
    parse_model_info,
    size_from_measurement,
)
from harbord.schemas import MeasuredSize, MemoryBudget, ModelFacts

LLAMA = ModelFacts("llama", 32, 4096, 32, 8, context_length=131072, vocab_size=128256)
GEMMA3 = ModelFacts("gemma3", 12, 1024, 4, 4, 256, 256, 131072, sliding_window=512)
NOMIC = ModelFacts("nomic-bert", 12, 768, 12, 12, context_length=2048, embedding=True)
# A hybrid: every 4th layer attends, the rest are recurrent (SSM) layers.
HYBRID = ModelFacts(
    "granitehybrid",
    8,
    1024,
    8,
    2,
    head_count_layers=(0, 0, 0, 8) * 2,
    head_count_kv_layers=(0, 0, 0, 2) * 2,
    ssm_conv_kernel=4,
    ssm_inner_size=2048,
    ssm_state_size=128,
    ssm_group_count=1,
)


def test_parse_reads_what_the_estimate_needs() -> None:
    info: dict[str, object] = {
        "general.architecture": "gemma3",
        "general.file_type": 15,
        "gemma3.block_count": 34,
        "gemma3.embedding_length": 2560,
        "gemma3.attention.head_count": 8,
        "gemma3.attention.head_count_kv": 4,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.attention.sliding_window": 1024,
        "gemma3.context_length": 131072,
        "gemma3.vision.block_count": 27,
        "gemma3.vision.image_size": 896,
        "gemma3.vision.patch_size": 14,
        "tokenizer.ggml.tokens": None,  # /api/show hides long lists without verbose
    }
    facts = parse_model_info(info, [("token_embd.weight", [2560, 262144])])
    assert facts is not None
    assert (facts.sliding_window, facts.vocab_size, facts.file_type) == (1024, 262144, 15)
    assert (facts.vision_block_count, facts.vision_image_size, facts.vision_patch_size) == (
        27,
        896,
        14,
    )
    assert not facts.embedding
    embed = parse_model_info(
        {
            "general.architecture": "nomic-bert",
            "nomic-bert.block_count": 12,
            "nomic-bert.embedding_length": 768,
            "nomic-bert.attention.head_count": 12,
            "nomic-bert.pooling_type": 1,
        }
    )
    assert embed is not None and embed.embedding


def test_parse_per_layer_lists_and_hidden_ones() -> None:
    base: dict[str, object] = {
        "general.architecture": "h",
        "h.block_count": 4,
        "h.embedding_length": 512,
        "h.attention.key_length": 64,
    }
    given = parse_model_info(
        {**base, "h.attention.head_count": [0, 8, 0, 8], "h.attention.head_count_kv": [0, 2, 0, 2]}
    )
    assert given is not None
    assert (given.head_count_layers, given.head_count_kv_layers) == ((0, 8, 0, 8), (0, 2, 0, 2))
    # Hidden (null): which layers attend comes from the attn_k / attn_q tensor shapes.
    tensors = [
        ("blk.1.attn_k.weight", [512, 128]),
        ("blk.3.attn_k.weight", [512, 128]),
        ("blk.1.attn_q.weight", [512, 512]),
    ]
    hidden = parse_model_info(
        {**base, "h.attention.head_count": None, "h.attention.head_count_kv": None}, tensors
    )
    assert hidden is not None
    assert (hidden.head_count, hidden.head_count_kv_layers) == (8, (0, 2, 0, 2))


def test_sliding_window_layers_hold_their_window() -> None:
    # gemma3: layers 6 and 12 global, the other 10 at the window + one batch.
    short = estimate_memory(GEMMA3, 0, 1024, flash_attention=False)
    long = estimate_memory(GEMMA3, 0, 65536, flash_attention=False)
    per_token = 4 * 512 * 2  # KV heads x (key + value) x f16
    assert long.kv == (2 * 65536 + 10 * (512 + 512)) * per_token
    assert long.kv - short.kv == 2 * (65536 - 1024) * per_token


def test_recurrent_layers_are_context_free() -> None:
    a = estimate_memory(HYBRID, 0, 4096, "cpu")
    b = estimate_memory(HYBRID, 0, 8192, "cpu")
    attention = 2 * 2 * 256 * 2  # 2 attending layers x 2 KV heads x (128 + 128) x f16
    assert b.kv - a.kv == attention * 4096
    state = (3 * (2048 + 2 * 128) + 128 * 2048) * 4  # conv + ssm state, f32
    assert a.kv == attention * 4096 + 6 * state


def test_embedding_models() -> None:
    # Context capped at the trained 2048, parallel forced to 1, f16 (no flash attention).
    e = estimate_memory(
        NOMIC, 274_000_000, 8192, "cpu", parallel=4, kv_cache_type="q8_0", flash_attention=True
    )
    assert (e.num_ctx, e.parallel, e.kv_cache_type, e.reserve) == (2048, 1, "f16", 0)
    assert e.kv == 12 * 12 * 128 * 2 * 2048
    assert e.total < 400 * MIB


def test_quantized_cache_only_with_flash_attention() -> None:
    off = estimate_memory(LLAMA, 0, 8192, kv_cache_type="q8_0", flash_attention=False)
    on = estimate_memory(LLAMA, 0, 8192, kv_cache_type="q8_0", flash_attention=True)
    assert (off.kv_cache_type, on.kv_cache_type) == ("f16", "q8_0")
    assert on.kv == off.kv * 34 // 64
    # Ollama's default: on for gemma3, gpt-oss, qwen3; off for llama.
    assert estimate_memory(LLAMA, 0, 8192, kv_cache_type="q4_0").kv_cache_type == "f16"
    assert estimate_memory(GEMMA3, 0, 8192, kv_cache_type="q4_0").kv_cache_type == "q4_0"


def test_reserve_on_gpus_only_and_per_gpu() -> None:
    cpu = estimate_memory(LLAMA, 4 * GIB, 4096, "cpu")
    one = estimate_memory(LLAMA, 4 * GIB, 4096, "gpu")
    two = estimate_memory(LLAMA, 4 * GIB, 4096, "gpu", gpus=2)
    assert cpu.reserve == 0 and one.reserve >= GPU_RESERVE
    assert two.reserve - one.reserve == GPU_RESERVE and two.graph == 2 * one.graph
    assert estimate_memory(LLAMA, 4 * GIB, 4096, gpu_overhead=GIB).reserve == one.reserve + GIB
    assert estimate_memory(None, 4 * GIB, 4096, "cpu").total == 4 * GIB


def test_measured_size_is_trusted_and_moved_by_the_estimate() -> None:
    weights = 4_900_000_000
    measured = MeasuredSize(size=7 * GIB, num_ctx=8192, parallel=1)
    size, source, est = size_from_measurement(measured, LLAMA, weights, 8192)
    assert (size, source) == (7 * GIB + est.reserve, "measured")
    # At 16k: the measurement plus what the estimate adds in KV cache and graph.
    at_8k = estimate_memory(LLAMA, weights, 8192)
    size, source, est = size_from_measurement(measured, LLAMA, weights, 16384)
    moved = est.kv + est.graph - at_8k.kv - at_8k.graph
    assert (size, source) == (7 * GIB + moved + est.reserve, "measured")
    assert est.kv - at_8k.kv == 8192 * 128 * 1024  # 128 KiB a token
    # None measured, or no facts to move it by: the estimate.
    assert size_from_measurement(None, LLAMA, weights, 16384)[1] == "estimated"
    assert size_from_measurement(measured, None, weights, 16384)[1] == "estimated"
    assert size_from_measurement(measured, None, weights, 8192)[1] == "measured"


MEMINFO = "MemTotal:       32768000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


@pytest.mark.parametrize(
    ("configured", "meminfo", "reserve", "budget"),
    [
        (24 * GIB, MEMINFO, None, MemoryBudget(24 * GIB, "config", "backend key ram")),
        (
            None,
            MEMINFO,
            None,
            MemoryBudget(
                32768000 * 1024 - 32768000 * 1024 // 10,
                "meminfo",
                "MemTotal 31.2 GiB less 3.1 GiB for the desktop",
            ),
        ),
        (
            None,
            "MemTotal: 134217728 kB\n",
            None,  # 128 GiB: a tenth is capped at 4 GiB
            MemoryBudget(124 * GIB, "meminfo", "MemTotal 128 GiB less 4 GiB for the desktop"),
        ),
        (
            None,
            MEMINFO,
            2 * GIB,
            MemoryBudget(
                32768000 * 1024 - 2 * GIB, "meminfo", "MemTotal 31.2 GiB less 2 GiB for the desktop"
            ),
        ),
        (None, None, None, None),
        (None, "garbage", None, None),
    ],
)
def test_cpu_budget(
    configured: int | None, meminfo: str | None, reserve: int | None, budget: MemoryBudget | None
) -> None:
    assert cpu_budget(configured, meminfo, reserve) == budget


def test_parse_meminfo_total() -> None:
    assert parse_meminfo_total(MEMINFO) == 32768000 * 1024
    assert parse_meminfo_total("MemFree: 1 kB\n") is None
