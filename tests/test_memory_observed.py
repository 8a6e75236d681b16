"""The estimate against what real Ollama servers reported, from public issue threads.

Each row: the source, the model's facts (its GGUF metadata as the thread's log or the
model's card states it), how it was loaded, and what Ollama reported: the server
log's `memory.required.full` ("full", Ollama's own estimate, which also decided the
load) or `/api/ps`'s `size` ("ps", what the runner really allocated, without the
per-GPU reserve, so the estimate is compared without it). Weights are what the
thread's log counted (`memory.weights.total` + `projector.weights`) where it says,
else the model's size on ollama.com (what `/api/tags` gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harbord.model_size import GIB, MIB, estimate_memory, parse_model_info
from harbord.schemas import BackendKind, KvCacheType, ModelFacts


def info(arch: str, **keys: object) -> dict[str, object]:
    """A model_info as /api/show gives it: keys under the architecture's prefix."""
    out: dict[str, object] = {"general.architecture": arch}
    for key, value in keys.items():
        name = key.replace("__", ".")
        out[name if name.startswith(("general.", "tokenizer.")) else f"{arch}.{name}"] = value
    return out


def facts(arch: str, **keys: object) -> ModelFacts:
    parsed = parse_model_info(info(arch, **keys))
    assert parsed is not None
    return parsed


GEMMA3_VISION = {
    "vision__block_count": 27,
    "vision__embedding_length": 1152,
    "vision__attention__head_count": 16,
    "vision__image_size": 896,
    "vision__patch_size": 14,
    "vision__num_channels": 3,
}
# gpt-oss:20b (GGUF metadata printed in ollama/ollama#11718 and the model card).
GPT_OSS_20B = facts(
    "gptoss",
    block_count=24,
    embedding_length=2880,
    attention__head_count=64,
    attention__head_count_kv=8,
    attention__key_length=64,
    attention__value_length=64,
    attention__sliding_window=128,
    context_length=131072,
    vocab_size=201088,
    expert_count=32,
    expert_used_count=4,
)
# gemma3:4b and :12b (google/gemma-3-*-it config.json; ollama.com/library/gemma3 metadata).
GEMMA3_4B = facts(
    "gemma3",
    block_count=34,
    embedding_length=2560,
    attention__head_count=8,
    attention__head_count_kv=4,
    attention__key_length=256,
    attention__value_length=256,
    attention__sliding_window=1024,
    context_length=131072,
    vocab_size=262144,
    **GEMMA3_VISION,
)
GEMMA3_12B = facts(
    "gemma3",
    block_count=48,
    embedding_length=3840,
    attention__head_count=16,
    attention__head_count_kv=8,
    attention__key_length=256,
    attention__value_length=256,
    attention__sliding_window=1024,
    context_length=131072,
    vocab_size=262144,
    **GEMMA3_VISION,
)
GEMMA3_27B = facts(
    "gemma3",
    block_count=62,
    embedding_length=5376,
    attention__head_count=32,
    attention__head_count_kv=16,
    attention__key_length=128,
    attention__value_length=128,
    attention__sliding_window=1024,
    context_length=131072,
    vocab_size=262144,
    **GEMMA3_VISION,
)
# mistral-small3.1/3.2:24b, architecture mistral3 (GGUF metadata in ollama/ollama#10553).
MISTRAL3_24B = facts(
    "mistral3",
    block_count=40,
    embedding_length=5120,
    attention__head_count=32,
    attention__head_count_kv=8,
    attention__key_length=128,
    attention__value_length=128,
    context_length=131072,
    vocab_size=131072,
    vision__block_count=24,
    vision__embedding_length=1024,
    vision__attention__head_count=16,
    vision__image_size=1540,
    vision__patch_size=14,
    vision__num_channels=3,
)
# llama3.2:3b (GGUF metadata printed in ollama/ollama#7673).
LLAMA32_3B = facts(
    "llama",
    block_count=28,
    embedding_length=3072,
    attention__head_count=24,
    attention__head_count_kv=8,
    attention__key_length=128,
    attention__value_length=128,
    context_length=131072,
    vocab_size=128256,
)
# llama3:70b (Meta-Llama-3-70B config.json: 80 layers, 8192 wide, 64 heads, 8 KV heads).
LLAMA3_70B = facts(
    "llama",
    block_count=80,
    embedding_length=8192,
    attention__head_count=64,
    attention__head_count_kv=8,
    context_length=8192,
    vocab_size=128256,
)
# qwen3:32b (GGUF metadata printed in ollama/ollama#10740 itself).
QWEN3_32B = facts(
    "qwen3",
    block_count=64,
    embedding_length=5120,
    attention__head_count=64,
    attention__head_count_kv=8,
    attention__key_length=128,
    attention__value_length=128,
    context_length=40960,
    vocab_size=151936,
)

# qwen3:235b-a22b, architecture qwen3moe (Qwen/Qwen3-235B-A22B config.json: 94 layers,
# hidden 4096, 64 heads, 4 KV heads of 128, 128 experts with 8 used, vocab 151936).
QWEN3MOE_235B = facts(
    "qwen3moe",
    block_count=94,
    embedding_length=4096,
    attention__head_count=64,
    attention__head_count_kv=4,
    attention__key_length=128,
    attention__value_length=128,
    context_length=40960,
    expert_count=128,
    expert_used_count=8,
    vocab_size=151936,
)
# llama3.1:8b (the GGUF metadata printed in ollama/ollama#7673 and #11292: 32 blocks,
# 4096 wide, 32 heads, 8 KV heads, vocab 128256).
LLAMA31_8B = facts(
    "llama",
    block_count=32,
    embedding_length=4096,
    attention__head_count=32,
    attention__head_count_kv=8,
    context_length=131072,
    vocab_size=128256,
)

NOMIC_EMBED = ModelFacts("nomic-bert", 12, 768, 12, 12, context_length=2048, embedding=True)


@dataclass(frozen=True)
class Observed:
    model: str
    facts: ModelFacts
    weights: int
    num_ctx: int
    parallel: int
    reported: int
    what: str  # "full": the log's memory.required.full; "ps": /api/ps size
    kind: BackendKind = "gpu"
    flash_attention: bool | None = False
    kv_cache_type: KvCacheType = "f16"
    gpus: int = 1


OBSERVED = [
    # https://github.com/ollama/ollama/issues/11711 (0.11.x, one RTX 4060 Ti): num_ctx 8192,
    # parallel 1, flash attention not used; weights.total 11.7 GiB; kv 300 MiB;
    # memory.required.full 16.9 GiB.
    Observed("gpt-oss:20b", GPT_OSS_20B, int(11.7 * GIB), 8192, 1, int(16.9 * GIB), "full"),
    # https://github.com/ollama/ollama/issues/9848 (0.6.x, one 16 GiB GPU): parallel=4 at
    # the then default context 2048; ollama.com gemma3:4b is 3.3GB;
    # required="6.2 GiB".
    Observed("gemma3:4b", GEMMA3_4B, 3_300_000_000, 2048, 4, int(6.2 * GIB), "full"),
    # https://github.com/ollama/ollama/issues/10341 (0.6.5, RTX 3060): kv 608 MiB, which
    # is num_ctx 2048, parallel 1; ollama.com gemma3:12b is 8.1GB;
    # memory.required.full 10.3 GiB.
    Observed("gemma3:12b", GEMMA3_12B, 8_100_000_000, 2048, 1, int(10.3 * GIB), "full"),
    # https://github.com/atineiatte/deep-research-at-home/issues/14 (a CPU-only server,
    # library=cpu): --ctx-size 8192 --parallel 2 (num_ctx 4096 x 2); weights.total 6.8 GiB
    # + projector.weights 795.9 MiB; memory.required.full 10.5 GiB.
    Observed(
        "gemma3:12b",
        GEMMA3_12B,
        int(6.8 * GIB + 795.9 * MIB),
        4096,
        2,
        int(10.5 * GIB),
        "full",
        kind="cpu",
    ),
    # https://github.com/ollama/ollama/issues/9678 (0.6.0, RTX 4090): flash attention on,
    # OLLAMA_KV_CACHE_TYPE=q8_0, num_ctx 20000 (the report says 20k); weights.total
    # 19.1 GiB; memory.required.full 22.5 GiB (that version charged every gemma3
    # layer the full context: kv 4.7 GiB, where later ones charge 1.1).
    Observed(
        "gemma3:27b",
        GEMMA3_27B,
        int(19.1 * GIB),
        20000,
        1,
        int(22.5 * GIB),
        "full",
        flash_attention=True,
        kv_cache_type="q8_0",
    ),
    # https://github.com/ollama/ollama/pull/11090 (new memory management, measured):
    # mistral-small3.2:24b-instruct-2506-q8_0 at 131072: /api/ps total=87836872554
    # (81.8 GiB), split over two GPUs (VRAM 51.7 GiB); ollama.com lists it at 26GB.
    Observed(
        "mistral-small3.2:24b-q8_0",
        MISTRAL3_24B,
        26_000_000_000,
        131072,
        1,
        87_836_872_554,
        "ps",
        gpus=2,
    ),
    # https://github.com/ollama/ollama/issues/10615 (two 24 GiB GPUs, layers.split=10,27):
    # mistral-small3.1:24b q4 at 64k; weights.total 13.1 GiB + projector.weights
    # 769.3 MiB; memory.required.full 48.0 GiB.
    Observed(
        "mistral-small3.1:24b",
        MISTRAL3_24B,
        int(13.1 * GIB + 769.3 * MIB),
        65536,
        1,
        int(48.0 * GIB),
        "full",
        gpus=2,
    ),
    # https://github.com/ollama/ollama/issues/8098 (one 80 GiB GPU): llama3.2:3b (28 blocks,
    # kv 896 MiB) with --ctx-size 8192 --parallel 4 (num_ctx 2048 x 4); weights.total
    # 2.4 GiB; memory.required.full 3.7 GiB.
    Observed("llama3.2:3b", LLAMA32_3B, int(2.4 * GIB), 2048, 4, int(3.7 * GIB), "full"),
    # https://github.com/ollama/ollama/issues/5913 (RX 7900 XTX, ROCm): llama3:70b,
    # --ctx-size 2048 --parallel 1; weights.total 39.9 GiB; kv 640 MiB;
    # memory.required.full 43.1 GiB.
    Observed("llama3:70b", LLAMA3_70B, int(39.9 * GIB), 2048, 1, int(43.1 * GIB), "full"),
    # https://github.com/ollama/ollama/issues/10740 (three RTX 3090): Qwen3-32B-Q6_K at a 32k
    # context, "the logs report a total required memory of 67.3 GiB"; Q6_K of its
    # 32.8B parameters is 26.9 GB (6.56 bits a weight).
    Observed(
        "qwen3:32b-q6_K", QWEN3_32B, 26_900_000_000, 32768, 1, int(67.3 * GIB), "full", gpus=3
    ),
    # https://github.com/ollama/ollama/issues/10810 (five 24 GiB GPUs): qwen3:235b, a
    # mixture of experts; memory.required.kv 752.0 MiB, which is 4096 tokens of its 188 KiB
    # a token; weights.total 132.3 GiB; graph.full 2.0 GiB (the fallback, 16 x KV / 6, on
    # each GPU); memory.required.full 152.6 GiB.
    Observed(
        "qwen3:235b", QWEN3MOE_235B, int(132.3 * GIB), 4096, 1, int(152.6 * GIB), "full", gpus=5
    ),
    # https://github.com/ollama/ollama/issues/11292 (one 16 GiB GPU, 0.9.x): Meta Llama 3.1
    # 8B Instruct, layers.model 33; memory.required.kv 1.0 GiB (8192 tokens: the then
    # default 2048 context for 4 slots); weights.total 4.3 GiB; graph.full 560.0 MiB;
    # memory.required.full 6.5 GiB.
    Observed("llama3.1:8b", LLAMA31_8B, int(4.3 * GIB), 2048, 4, int(6.5 * GIB), "full"),
    # https://github.com/intel/ipex-llm/issues/12912 (ollama 0.5.4 as ipex-llm builds it;
    # layers.offload=0, so the CPU): nomic-embed-text, --ctx-size 8192 --parallel 1;
    # weights.total 240.1 MiB; memory.required.full 352.9 MiB. An embedding model: one slot,
    # and the estimate's context capped at the trained 2048.
    Observed(
        "nomic-embed-text",
        NOMIC_EMBED,
        int(240.1 * MIB),
        8192,
        1,
        int(352.9 * MIB),
        "full",
        kind="cpu",
    ),
    # https://github.com/Crosstalk-Solutions/project-nomad/issues/1268 (`ollama ps` on an
    # RTX 5060 Ti): nomic-embed-text:v1.5, SIZE 323 MB, 100% GPU, CONTEXT 2048; ollama.com
    # lists it at 274MB.
    Observed("nomic-embed-text:v1.5", NOMIC_EMBED, 274_000_000, 2048, 1, 323_000_000, "ps"),
]


def _estimated(row: Observed) -> int:
    part = estimate_memory(
        row.facts,
        row.weights,
        row.num_ctx,
        row.kind,
        row.parallel,
        row.kv_cache_type,
        row.flash_attention,
        gpus=row.gpus,
    )
    # /api/ps reports what was allocated: Ollama's per-GPU reserve is not in it.
    return part.total - part.reserve if row.what == "ps" else part.total


@pytest.mark.parametrize("row", OBSERVED, ids=[f"{r.model}@{r.num_ctx}" for r in OBSERVED])
def test_estimate_matches_what_ollama_reported(row: Observed) -> None:
    estimated = _estimated(row)
    allowed = max(row.reported // 5, 256 * MIB)
    assert abs(estimated - row.reported) <= allowed, (
        f"{row.model}: estimated {estimated / GIB:.2f} GiB, Ollama {row.reported / GIB:.2f} GiB "
        f"({(estimated - row.reported) / row.reported:+.0%})"
    )


def test_the_table_covers_the_kinds_of_model() -> None:
    archs = {row.facts.architecture for row in OBSERVED}
    assert len(OBSERVED) >= 12 and len(archs) >= 6
    assert {"gemma3", "gptoss"} <= archs  # sliding window
    assert any(row.facts.vision_block_count for row in OBSERVED)  # vision
    assert any(row.facts.expert_count for row in OBSERVED)  # mixture of experts
    assert any(row.facts.embedding for row in OBSERVED)  # embedding
    assert any(row.gpus > 1 for row in OBSERVED)  # the graph charged per GPU
    assert any(row.kind == "cpu" for row in OBSERVED)


# Parts the logs print separately, which the estimate must reproduce (within 2 %).
@pytest.mark.parametrize(
    ("model_facts", "num_ctx", "parallel", "kind", "part", "reported"),
    [
        # ollama/ollama#10341: memory.required.kv="608.0 MiB" (sliding layers at the window).
        (GEMMA3_12B, 2048, 1, "gpu", "kv", 608 * MIB),
        # deep-research-at-home#14: kv 1.3 GiB, graph.full 519.5 MiB, projector.graph 1.0 GiB.
        (GEMMA3_12B, 4096, 2, "cpu", "kv", int(1.3 * GIB)),
        (GEMMA3_12B, 4096, 2, "cpu", "graph", int(519.5 * MIB)),
        (GEMMA3_12B, 4096, 2, "cpu", "projector", int(1.0 * GIB)),
        # ollama/ollama#8098: kv 896.0 MiB, graph.full 424.0 MiB (a CPU load charges full).
        (LLAMA32_3B, 2048, 4, "gpu", "kv", 896 * MIB),
        (LLAMA32_3B, 2048, 4, "cpu", "graph", 424 * MIB),
        # ollama/ollama#10615 at 128k: kv 20.0 GiB, graph 13.3 GiB, projector.graph 8.8 GiB.
        (MISTRAL3_24B, 131072, 1, "cpu", "kv", 20 * GIB),
        (MISTRAL3_24B, 131072, 1, "cpu", "graph", int(13.3 * GIB)),
        (MISTRAL3_24B, 131072, 1, "cpu", "projector", int(8.8 * GIB)),
        # ollama/ollama#11711: kv 300.0 MiB (even layers at 4096 + batch).
        (GPT_OSS_20B, 8192, 1, "gpu", "kv", 300 * MIB),
        # ollama/ollama#11790: OLLAMA_NUM_PARALLEL=3 at 128k: kv 9.3 GiB.
        (GPT_OSS_20B, 131072, 3, "gpu", "kv", int(9.3 * GIB)),
        # ollama/ollama#5913: llama3:70b at 2048: kv 640.0 MiB.
        (LLAMA3_70B, 2048, 1, "gpu", "kv", 640 * MIB),
    ],
)
def test_parts_match_the_log(
    model_facts: ModelFacts,
    num_ctx: int,
    parallel: int,
    kind: BackendKind,
    part: str,
    reported: int,
) -> None:
    estimate = estimate_memory(model_facts, 0, num_ctx, kind, parallel, flash_attention=False)
    value = getattr(estimate, part)
    assert abs(value - reported) <= reported // 50, f"{part}: {value / MIB:.1f} MiB"
