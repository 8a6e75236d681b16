"""What a model takes loaded, as Ollama sizes it: pure functions of `/api/show`'s facts.

Ollama (fs/ggml/ggml.go GraphSize, llm/memory.go, ml/device.go) charges a load
  weights                      the `size` in `/api/tags` (projector tensors included)
+ KV cache                     per layer: tokens x (key + value width) x KV heads x bytes;
                               full-attention layers hold num_ctx x parallel tokens,
                               sliding-window layers their window, recurrent layers a
                               context-free state
+ compute graph                a per-architecture formula, or (heads / KV heads) x KV / 6
+ projector graph              a vision model's worst-case image
+ reserve                      per GPU (CUDA/ROCm 457 MiB + OLLAMA_GPU_OVERHEAD) and one
                               layer counted twice by its fit check; none on a CPU
The graph and the reserve are charged on every GPU a model is split over.
A model's facts are reduced once to a `_Shape` (cached by identity): an estimate is then
a handful of multiplications, cheap enough for every request and backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from harbord.schemas import BackendKind, KvCacheType, MeasuredSize, MemoryEstimate, ModelFacts

GIB = 1024**3
MIB = 1024**2

# Bytes per KV-cache element: f16 is 2; ggml's q8_0 stores a block of 32 values in
# 34 bytes (32 int8 + an f16 scale), q4_0 in 18 (16 bytes of nibbles + the scale).
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
RECURRENT_BYTES = 4  # recurrent (SSM) state is kept in f32
BATCH = 512  # Ollama's num_batch: one batch's activations size the graph
GPU_RESERVE = 457 * MIB  # ml/device.go: the minimum Ollama keeps free on a CUDA/ROCm GPU
GEMMA3_GLOBAL_EVERY = 6  # gemma3: every 6th layer attends globally, the rest to a window
GPTOSS_WINDOW = 4096  # what Ollama's estimate gives gpt-oss's sliding (even) layers
# Architectures Ollama turns flash attention on for when OLLAMA_FLASH_ATTENTION is unset.
FLASH_ATTENTION_BY_DEFAULT = frozenset({"gemma3", "gptoss", "gpt-oss", "qwen3", "qwen3moe"})
_GEMMA = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})

MeasureSource = Literal["measured", "estimated"]


# -- model_info -> ModelFacts ---------------------------------------------------------


def _number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value)


def _int(info: Mapping[str, object], key: str) -> int:
    """An integer field; a per-layer list counts by its largest entry."""
    value = info.get(key)
    if isinstance(value, list):
        return max((_number(v) for v in value), default=0)
    return _number(value)


def _layers(info: Mapping[str, object], key: str, blocks: int) -> tuple[int, ...]:
    """A per-layer list (hybrid models give one); () for a single number or none."""
    value = info.get(key)
    if isinstance(value, list) and len(value) == blocks:
        return tuple(_number(v) for v in value)
    return ()


def _hidden(info: Mapping[str, object], key: str) -> bool:
    """/api/show without `verbose` sends a list longer than 5 as null or []."""
    return key in info and (info[key] is None or info[key] == [])


def _tensor_layers(
    tensors: Sequence[tuple[str, Sequence[int]]], tensor: str, width: int, blocks: int
) -> tuple[int, ...]:
    """Heads per layer from `blk.N.<tensor>.weight` shapes (0 where a layer has none)."""
    heads = [0] * blocks
    suffix = f".{tensor}.weight"
    for name, shape in tensors:
        if name.startswith("blk.") and name.endswith(suffix) and len(shape) >= 2 and width:
            index = name[4 : -len(suffix)]
            if index.isdigit() and int(index) < blocks:
                heads[int(index)] = shape[1] // width
    return tuple(heads)


def parse_model_info(
    model_info: Mapping[str, object], tensors: Sequence[tuple[str, Sequence[int]]] = ()
) -> ModelFacts | None:
    """`/api/show`'s `model_info` (and its `tensors`' names and shapes) -> ModelFacts.

    None when the shape facts are missing. Keys carry the architecture as a prefix
    (`llama.block_count`); without `head_count_kv` every head has its own K and V.
    The tensors give the vocabulary and, where `/api/show` hid a per-layer list
    (hybrid models), which layers have attention.
    """
    arch = model_info.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return None
    p = f"{arch}."
    blocks = _int(model_info, p + "block_count")
    width = _int(model_info, p + "embedding_length")
    heads = _int(model_info, p + "attention.head_count")
    heads_key, kv_key = p + "attention.head_count", p + "attention.head_count_kv"
    key_length = _int(model_info, p + "attention.key_length")
    hidden = _hidden(model_info, heads_key) or _hidden(model_info, kv_key)
    head_width = key_length or (width // heads if heads else 0)
    layer_kv = _layers(model_info, kv_key, blocks)
    if not layer_kv and hidden and tensors:
        layer_kv = _tensor_layers(tensors, "attn_k", head_width, blocks)
        heads = heads or max(_tensor_layers(tensors, "attn_q", head_width, blocks), default=0)
    if blocks <= 0 or width <= 0 or heads <= 0:
        return None
    vocab = _int(model_info, p + "vocab_size")
    tokens = model_info.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        vocab = len(tokens)
    for name, shape in tensors:
        if name == "token_embd.weight" and len(shape) >= 2:
            vocab = shape[1]
    v = p + "vision."
    return ModelFacts(
        architecture=arch,
        block_count=blocks,
        embedding_length=width,
        head_count=heads,
        head_count_kv=_int(model_info, kv_key) or max(layer_kv, default=0) or heads,
        key_length=key_length,
        value_length=_int(model_info, p + "attention.value_length"),
        context_length=_int(model_info, p + "context_length"),
        head_count_layers=_layers(model_info, heads_key, blocks),
        head_count_kv_layers=layer_kv,
        sliding_window=_int(model_info, p + "attention.sliding_window"),
        vocab_size=vocab,
        expert_count=_int(model_info, p + "expert_count"),
        expert_used_count=_int(model_info, p + "expert_used_count"),
        ssm_conv_kernel=_int(model_info, p + "ssm.conv_kernel"),
        ssm_inner_size=_int(model_info, p + "ssm.inner_size"),
        ssm_state_size=_int(model_info, p + "ssm.state_size"),
        ssm_group_count=_int(model_info, p + "ssm.group_count"),
        embedding=(p + "pooling_type") in model_info,
        file_type=_int(model_info, "general.file_type"),
        vision_block_count=_int(model_info, v + "block_count"),
        vision_embedding_length=_int(model_info, v + "embedding_length"),
        vision_head_count=_int(model_info, v + "attention.head_count"),
        vision_image_size=_int(model_info, v + "image_size"),
        vision_patch_size=_int(model_info, v + "patch_size"),
        vision_num_channels=_int(model_info, v + "num_channels"),
        vision_max_pixels=_int(model_info, v + "max_pixels"),
    )


# -- the model's shape, once ------------------------------------------------------------


class _Shape:
    """What the estimate needs of a model, summed over its layers once."""

    __slots__ = (
        "all_layers",
        "arch",
        "embedding",
        "full",
        "gqa",
        "head_width",
        "heads",
        "heads_kv",
        "key",
        "quantizable",
        "recurrent",
        "vision",
        "vocab",
        "window",
        "windowed",
    )

    def __init__(self, facts: ModelFacts) -> None:
        arch = facts.architecture
        blocks = facts.block_count
        head_width = facts.embedding_length // facts.head_count
        key = facts.key_length or head_width
        width = key + (facts.value_length or head_width)
        heads = facts.head_count_layers or (facts.head_count,) * blocks
        heads_kv = facts.head_count_kv_layers or (facts.head_count_kv,) * blocks
        self.arch = arch
        self.full = self.windowed = self.all_layers = self.recurrent = 0
        self.window = 0
        state = 0
        if facts.ssm_state_size:
            conv = (facts.ssm_conv_kernel - 1) * (
                facts.ssm_inner_size + 2 * facts.ssm_group_count * facts.ssm_state_size
            )
            state = (max(conv, 0) + facts.ssm_state_size * facts.ssm_inner_size) * RECURRENT_BYTES
        for i, (h, h_kv) in enumerate(zip(heads, heads_kv, strict=False)):
            if h <= 0 or h_kv <= 0:
                self.recurrent += state  # no attention: a recurrent layer, context-free
                continue
            elements = width * h_kv  # K and V values one token keeps in this layer
            self.all_layers += elements
            sliding = (arch == "gemma3" and (i + 1) % GEMMA3_GLOBAL_EVERY != 0) or (
                arch in ("gptoss", "gpt-oss") and i % 2 == 0
            )
            if sliding:
                self.windowed += elements
            else:
                self.full += elements
        if arch == "gemma3":
            self.window = facts.sliding_window
        elif arch in ("gptoss", "gpt-oss"):
            self.window = GPTOSS_WINDOW
        self.heads = max(heads)
        self.heads_kv = max(heads_kv)
        self.gqa = self.heads // max(min(heads_kv), 1)
        self.key = key
        self.head_width = head_width
        self.embedding = facts.embedding_length
        self.vocab = facts.vocab_size
        self.vision = _vision_graph(facts)
        # Ollama quantizes the cache only where flash attention works: not for an
        # embedding model, gemma2, or keys and values of different widths.
        self.quantizable = not facts.embedding and arch != "gemma2" and width == 2 * key


def _vision_graph(f: ModelFacts) -> int:
    """The vision encoder's compute graph for its worst-case image (ggml.go VisionGraphSize)."""
    if not f.vision_block_count or not f.vision_patch_size:
        return 0
    size, patch, channels = f.vision_image_size, f.vision_patch_size, f.vision_num_channels
    heads, width = f.vision_head_count, f.vision_embedding_length
    if f.architecture in ("gemma3", "mistral3"):
        patches = (size // patch) ** 2
        return 4 * (size * size * channels + width * patch + patches * patches * heads)
    if f.architecture == "qwen25vl":
        pixels = f.vision_max_pixels or 28 * 28 * 1280
        patches = pixels // (patch * patch)
        return 4 * (
            2 * pixels * channels
            + patches * channels * patch * patch
            + patches * patches * heads
            + width * patches
        )
    return 0


_shapes: dict[int, tuple[ModelFacts, _Shape]] = {}


def _shape(facts: ModelFacts) -> _Shape:
    """The facts' shape, kept by identity: the facts cache holds its entries for long."""
    entry = _shapes.get(id(facts))
    if entry is not None and entry[0] is facts:
        return entry[1]
    if len(_shapes) > 4096:
        _shapes.clear()
    shape = _Shape(facts)
    _shapes[id(facts)] = (facts, shape)
    return shape


# -- the estimate ----------------------------------------------------------------------


def _graph(
    s: _Shape,
    tokens: int,
    batch: int,
    kv_default: int,
    kv: int,
    parallel: int,
    flash: bool,
    kind: BackendKind,
) -> int:
    """Ollama's compute-graph charge: on a GPU the larger of its full- and
    partial-offload figures (what its fit check uses), on a CPU the full one."""
    e, v, h, c, b = s.embedding, s.vocab, s.heads, tokens, batch
    full = partial = 0
    arch = s.arch
    if arch in ("llama", "llama4"):
        full = max(4 * b * (1 + 4 * e + c * (1 + h)), 4 * b * (e + v))
        partial = 4 * b * e + max(
            4 * b * (1 + e + max(c, e))
            + e * e * 9 // 16
            + 4 * c * (b * h + s.head_width * s.heads_kv),
            4 * b * (e + v) + e * v * 105 // 128,
        )
    elif arch in _GEMMA:
        k = s.key
        full = max(4 * b * (e + v), 4 * b * (2 + c + c * h + 2 * e + 2 * k * h))
        partial = max(
            4 * e * b + e * v * 105 // 128 + 4 * v * b,
            4 * b * (2 * e + 1 + 2 * k * h + c + c * h) + 4 * k * c * 8 + e * k * h * 9 // 16,
        )
        if arch == "gemma3n":
            full, partial = full * 4, partial * 4
    elif arch == "command-r":
        full = max(4 * b * (e + v), 4 * b * (2 + 4 * e + c * (1 + h)))
        partial = max(
            4 * b * (e + v) + e * v * 105 // 128,
            4 * b * (1 + 2 * e + c * (1 + h)) + 4 * e * c + e * e * 9 // 16,
        )
    elif arch == "qwen2":
        full = max(4 * b * (e + v), 4 * b * (1 + 2 * e + c + c * h))
        partial = max(
            4 * b * (e + v) + e * v * 105 // 128,
            4 * (b * (1 + 2 * e + c * (1 + h)) + e * (1 + c)),
        )
    elif arch == "phi2":
        full = max(4 * b * (e + v), 4 * b * (1 + 4 * e + c + c * h))
        partial = max(4 * b * (2 * e + v) + e * v * 105 // 128, 4 * b * (2 + 3 * e + c + c * h))
    elif arch == "stablelm":
        full = 4 * b * (c * (1 + h) + 3 * e + 2)
        partial = max(4 * b * (v + 2 * e), full)
    elif arch == "deepseek2":
        hkv, k = s.heads_kv, s.key
        full = max(4 * b * (3 * e + v), 4 * b * (3 * e + 2 + c * (1 + hkv) + 2 * k * hkv))
        partial = max(
            4 * b * (3 * e + v) + e * v * 105 // 128,
            4 * b * (2 * e + 1 + 2 * k * hkv + c + c * hkv)
            + 4 * k * c * hkv
            + e * k * hkv * 9 // 16,
        )
    elif arch == "chatglm":
        full = 4 * b * (e + v)
        partial = full + e * v * 105 // 128
    elif arch in ("gptoss", "gpt-oss"):
        # Without flash attention, charged as if every layer held the whole context.
        flash_graph = (4 * parallel + (c >> 10) + 110) * MIB
        partial = flash_graph if flash else 2 * s.gqa * kv_default // 6
    if not partial:  # Ollama's fallback for the architectures without a formula
        partial = s.gqa * kv // 6
    if not full:
        full = partial
    return full if kind == "cpu" else max(full, partial)


def estimate_memory(
    facts: ModelFacts | None,
    weights: int,
    num_ctx: int,
    kind: BackendKind = "gpu",
    parallel: int = 1,
    kv_cache_type: KvCacheType = "f16",
    flash_attention: bool | None = None,
    gpu_overhead: int = 0,
    gpus: int = 1,
) -> MemoryEstimate:
    """What Ollama takes to load the model at `num_ctx` on a backend of this kind.

    `weights`: the model's size in `/api/tags`. `flash_attention` None: Ollama's own
    default for the architecture. `gpus`: the GPUs the backend splits a model over.
    Without facts (no `/api/show` yet) only the weights and the reserve are known: a
    low estimate never keeps a model off a GPU it fits.
    """
    gpus = max(gpus, 1) if kind == "gpu" else 1
    reserve = (GPU_RESERVE + gpu_overhead) * gpus if kind == "gpu" else 0
    if facts is None:
        return MemoryEstimate(
            weights, 0, 0, 0, reserve, num_ctx, parallel, "f16", weights + reserve
        )
    s = _shape(facts)
    ctx = facts.context_length if 0 < facts.context_length < num_ctx else num_ctx
    if facts.embedding:
        parallel = 1  # Ollama serves an embedding model one request at a time
    parallel = max(parallel, 1)
    flash = flash_attention if flash_attention is not None else s.arch in FLASH_ATTENTION_BY_DEFAULT
    flash = flash and s.quantizable
    kv_type: KvCacheType = kv_cache_type if flash else "f16"
    per_element = KV_BYTES_PER_ELEMENT[kv_type]
    tokens = ctx * parallel
    batch = min(ctx, BATCH)
    kv = int((s.full * tokens + s.windowed * (parallel * s.window + batch)) * per_element)
    kv += s.recurrent
    kv_default = int(s.all_layers * tokens * per_element)
    graph = _graph(s, tokens, batch, kv_default, kv, parallel, flash, kind) * gpus
    if kind == "gpu":  # llm/memory.go: a GPU takes layers only with room for one more
        reserve += weights // facts.block_count + kv // facts.block_count
    total = weights + kv + graph + s.vision + reserve
    return MemoryEstimate(weights, kv, graph, s.vision, reserve, ctx, parallel, kv_type, total)


def context_cost(estimate: MemoryEstimate) -> int:
    """The part of an estimate that changes with context and parallel: KV, graph, projector."""
    return estimate.kv + estimate.graph + estimate.projector


def size_from_measurement(
    measured: MeasuredSize | None,
    facts: ModelFacts | None,
    weights: int,
    num_ctx: int,
    kind: BackendKind = "gpu",
    parallel: int = 1,
    kv_cache_type: KvCacheType = "f16",
    flash_attention: bool | None = None,
    gpu_overhead: int = 0,
    gpus: int = 1,
) -> tuple[int, MeasureSource, MemoryEstimate]:
    """The bytes a load needs, trusting what Ollama measured over what is estimated.

    `measured`: the `size` `/api/ps` showed for this model on this backend, with the
    context and parallel it was loaded at (the reserve is not in it, so it is added).
    At another context or parallel the measurement moves by the estimate's difference
    in KV cache and graph. Without a measurement, or without facts to move it by, the
    estimate. Returns (bytes, source, the estimate at `num_ctx`).
    """
    estimate = estimate_memory(
        facts, weights, num_ctx, kind, parallel, kv_cache_type, flash_attention, gpu_overhead, gpus
    )
    if measured is None or measured.size <= 0:
        return estimate.total, "estimated", estimate
    same = measured.num_ctx == estimate.num_ctx and measured.parallel == estimate.parallel
    if same:
        return measured.size + estimate.reserve, "measured", estimate
    if facts is None:
        return estimate.total, "estimated", estimate
    then = estimate_memory(
        facts,
        weights,
        measured.num_ctx,
        kind,
        measured.parallel,
        kv_cache_type,
        flash_attention,
        gpu_overhead,
        gpus,
    )
    moved = measured.size + context_cost(estimate) - context_cost(then)
    return max(moved, weights) + estimate.reserve, "measured", estimate
