"""The model catalogue: names, architectures, sizes and deterministic embeddings."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Final

from .wire import (
    BLOB_DIR,
    EMBED_DIM,
    _iso_at,
)


def normalize_name(name: str) -> str:
    """Ollama-style model name: drop the default registry/namespace, add ``:latest``."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        if name.lower().startswith(prefix):
            name = name[len(prefix) :]
    slash = name.rfind("/")
    if ":" not in name[slash + 1 :]:
        name += ":latest"
    return name


def _key(name: str) -> str:
    return normalize_name(name).lower()


def embed_vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic, L2-normalised embedding of ``text``."""
    raw = b""
    seed = text.encode()
    while len(raw) < dim * 4:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    vals = [
        (int.from_bytes(raw[i * 4 : i * 4 + 4], "little") / 4294967296.0) * 2.0 - 1.0
        for i in range(dim)
    ]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 7) for v in vals]


# --------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True, slots=True)
class Arch:
    """The model_info numbers that decide a model's KV cache (``--model-info``)."""

    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    context_length: int

    @classmethod
    def for_params(cls, params: float, embedding: bool) -> Arch:
        """Typical Llama-style numbers for a model of ``params`` parameters."""
        if embedding:
            return cls(12, 768, 12, 12, 2048)
        for limit, arch in (
            (2e9, cls(16, 2048, 32, 8, 131072)),
            (5e9, cls(28, 3072, 24, 8, 131072)),
            (10e9, cls(32, 4096, 32, 8, 131072)),
            (20e9, cls(40, 5120, 40, 40, 16384)),
            (40e9, cls(64, 5120, 40, 8, 131072)),
        ):
            if params < limit:
                return arch
        return cls(80, 8192, 64, 8, 131072)


@dataclass(slots=True)
class ModelInfo:
    name: str  # normalised display name, e.g. "llama3.2:latest"
    size: int
    digest: str  # 64 hex digits
    modified_at: str
    family: str
    parameter_size: str
    quantization: str
    embedding: bool
    arch: Arch

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def blob_path(self) -> str:
        return f"{BLOB_DIR}/sha256-{self.digest}"

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    @property
    def context_max(self) -> int:
        return self.arch.context_length

    def kv_cache_bytes(self, num_ctx: int) -> int:
        """f16 K and V for ``num_ctx`` tokens, as Ollama estimates it from model_info."""
        a = self.arch
        return (
            2 * a.block_count * num_ctx * (a.embedding_length // a.head_count) * a.head_count_kv * 2
        )

    @property
    def capabilities(self) -> list[str]:
        return ["embedding"] if self.embedding else ["completion", "tools"]


_FAMILIES: Final = (
    ("codellama", "llama"),
    ("llama", "llama"),
    ("qwen3", "qwen3"),
    ("qwen2", "qwen2"),
    ("qwen", "qwen2"),
    ("nomic-embed", "nomic-bert"),
    ("mxbai-embed", "bert"),
    ("all-minilm", "bert"),
    ("gemma3", "gemma3"),
    ("gemma", "gemma"),
    ("mistral", "llama"),
    ("phi3", "phi3"),
    ("deepseek", "qwen2"),
)


def _make_model(name: str, size: int, modified_epoch: float, arch: Arch | None = None) -> ModelInfo:
    name = normalize_name(name)
    base = name.rsplit("/", 1)[-1].split(":", 1)[0].lower()
    family = next((fam for prefix, fam in _FAMILIES if base.startswith(prefix)), "")
    if not family:
        m = re.match(r"[a-z]+", base)
        family = m.group(0) if m else "llama"
    embedding = "embed" in base or "minilm" in base or base.startswith("bge")
    params = size / (2.0 if embedding else 0.6)
    psize = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{max(params / 1e6, 1):.0f}M"
    return ModelInfo(
        name=name,
        size=int(size),
        digest=hashlib.sha256(name.encode()).hexdigest(),
        modified_at=_iso_at(modified_epoch),
        family=family,
        parameter_size=psize,
        quantization="F16" if embedding else "Q4_K_M",
        embedding=embedding,
        arch=arch or Arch.for_params(params, embedding),
    )
