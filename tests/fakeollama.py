#!/usr/bin/env python3
"""A fake Ollama server for harbord's tests and benchmarks.

Speaks Ollama's native API (``/api/*``), its OpenAI-compatible API (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/models[/{model}]``, ``/v1/responses``) and its
Anthropic-compatible API (``/v1/messages``, ``/v1/messages/count_tokens``) with the shapes,
statuses, SSE event names and error texts of a real server, and answers
deterministically: N tokens (``options.num_predict``/``max_tokens`` if given, with
done_reason "length", else ``--tokens``, default 8; Anthropic's ``max_tokens`` and the
Responses ``max_output_tokens`` only cap it), the first of which names the server
(``"[gpu] "``, ``"tok1 "``, ``"tok2 "`` ...). Every response carries
``X-Fake-Backend: NAME``. A path Ollama does not serve answers Gin's ``404 page not
found`` and is logged. Ollama's Anthropic stream sends no ``ping`` event, so neither
does this.

Memory and placement, as Ollama's scheduler behaves: a loaded model takes its weights
(``--model NAME=SIZE``) plus an f16 KV cache of ``2 * block_count * num_ctx *
embedding_length / head_count * head_count_kv * 2`` bytes, from the model's
``model_info`` (``/api/show``; ``--model-info`` sets it, else typical numbers for its
parameter count). ``num_ctx`` is ``options.num_ctx``, else ``--context-length``; a
different context reloads the model. ``/api/ps`` shows ``size``, ``size_vram`` and
``context_length``: a server named ``cpu`` or started with ``--cpu`` reports
``size_vram: 0``; with ``--vram`` a load past that memory spills (``size_vram < size``).
``load_duration`` is ``--load-time`` when the request loaded the model, near zero when it
was loaded already. ``--max-loaded-models 1`` is a GPU that holds one model: loading
another evicts it, once its running requests are done. ``--parallel N`` requests run per
model at once, the rest wait inside the server (their order is in the request log's
``admitted_seq``/``finished_seq``), and past ``--max-queue`` waiting requests a 503
"server busy". ``--prompt-delay`` and ``--tokens-per-second`` time each generation.
An empty prompt/messages with ``keep_alive: 0`` unloads (done_reason "unload"); with any
other keep_alive it loads (done_reason "load").

    python3 tests/fakeollama.py --port 11434 [--host 127.0.0.1] [--name gpu]
        [--version 0.14.3] [--model NAME[=SIZE_BYTES]]... [--vram BYTES] [--cpu]
        [--model-info NAME=BLOCKS,EMBED,HEADS,KV_HEADS[,CTX]]... [--context-length N]
        [--parallel N] [--max-queue N] [--max-loaded-models N] [--load-time S]
        [--prompt-delay S] [--tokens-per-second R] [--silent-sse-errors]
        [--tokens N] [--token-delay S] [--faults JSON|@FILE] [--ready-file PATH]
        [--exit-with-parent]

``--port 0`` picks a free port; ``--ready-file`` receives the port once listening.

Control endpoints (not Ollama's; never faulted):
    GET    /_fake/requests[?path=&state=]  log of model-endpoint and unknown-path requests
           (last 10,000): {id, path, method, headers, body, model, state, status,
           chunks_sent, started, finished, admitted_seq, finished_seq}; state is
           running|completed|cancelled|failed; *_seq order slot grants and ends
    DELETE /_fake/requests                 clear the log
    GET    /_fake/faults, POST /_fake/faults  show / REPLACE the fault set
    GET    /_fake/stats                    request counts per path (all endpoints),
                                           running requests, loaded models, requests
                                           waiting for a slot, running per model

Fault keys (all optional; "model" faults follow Ollama-style names, ``x`` = ``x:latest``):
    oom_models [names]   500 with oom_text (default: model requires more system memory ...)
    missing_models [names]  404 and hidden from tags/ps/v1 models (a pull un-hides one)
    driver_error bool    500 "llama runner process has terminated: error:failed to
                         create context with model '...'" (driver_text overrides)
    busy bool            503 "server busy, please try again.  maximum pending requests exceeded"
    hang bool            read requests, answer nothing (control endpoints excepted);
                         hung requests resume when the fault is lifted
    hang_generation bool only chat/generate/embed/embeddings/v1 hang; probes answer
    load_delay s         wait before the first byte (before OOM/driver errors too)
    token_delay s        between streamed chunks (overrides --token-delay); a
                         non-streaming reply waits as long as the stream would take
    die_after_chunks N   abort the TCP connection after N chunks (no final chunk;
                         non-streaming: abort without any response)
    error_after_chunks N after N chunks write {"error": error_text} and end (/v1 chat and
                         completions: an SSE data: {"error": {...}} event; /v1/messages:
                         event: error in Anthropic's shape; /v1/responses: a
                         response.failed event; with --silent-sse-errors those two
                         just end, as Ollama's converters drop the error; non-streaming: 500)
    error_text str       default "an error was encountered while running the model:
                         CUDA error: out of memory"
    garbage kind         nonjson | truncated | html | wrong_ctype | error200
    status {code, error} answer every model endpoint with that status
    pull_total int       bytes of the big layer in /api/pull progress (default 1e6)
    pull_error str       /api/pull fails with {"error": pull_error} after the manifest
    only_models [names]  restrict the model-independent faults above to these models
Load-time faults (busy, load_delay, oom, driver) and the chunk faults apply to
chat, generate, embed, embeddings, /v1 chat/completions/embeddings, /v1/messages and
/v1/responses, each in its API's error shape (Anthropic: {"type": "error", "error":
{"type": "not_found_error"|"overloaded_error"|..., "message"}}); status and garbage
also to /api/show; hang to everything but /_fake.

Importable: :func:`build_app` returns an :class:`aiohttp.web.Application` for
in-process tests and :class:`FakeServer` is the state behind it. Needs only the
standard library and aiohttp (3.11 or newer); uses uvloop when importable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "SERVER_KEY",
    "Arch",
    "FakeServer",
    "Faults",
    "build_app",
    "embed_vector",
    "main",
    "normalize_name",
    "serve",
]

log = logging.getLogger("fakeollama")

DEFAULT_VERSION: Final = "0.14.3"
DEFAULT_TOKENS: Final = 8
DEFAULT_MODELS: Final[tuple[tuple[str, int], ...]] = (
    ("llama3.2:latest", 2_000_000_000),
    ("qwen2.5-coder:7b", 4_700_000_000),
    ("codellama:13b", 7_400_000_000),
    ("nomic-embed-text:latest", 270_000_000),
)
DEFAULT_MODEL_SIZE: Final = 2_000_000_000
DEFAULT_KEEP_ALIVE_S: Final = 300.0
DEFAULT_CONTEXT: Final = 4096
FOREVER_S: Final = 9_223_372_036.0  # Go's largest time.Duration, as Ollama uses for "-1"
EMBED_DIM: Final = 8
DEFAULT_MAX_QUEUE: Final = 512  # OLLAMA_MAX_QUEUE
MAX_LOG: Final = 10_000

OOM_TEXT: Final = "model requires more system memory (10.9 GiB) than is available (7.6 GiB)"
DRIVER_TEXT: Final = (
    "llama runner process has terminated: error:failed to create context with model '{path}'"
)
BUSY_TEXT: Final = "server busy, please try again.  maximum pending requests exceeded"
MIDSTREAM_TEXT: Final = (
    "an error was encountered while running the model: CUDA error: out of memory"
)
BLOB_DIR: Final = "/usr/share/ollama/.ollama/models/blobs"

NDJSON: Final = "application/x-ndjson"
SSE: Final = "text/event-stream"
JSON_CT: Final = "application/json; charset=utf-8"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumpb(obj: Any) -> bytes:
    """Compact JSON bytes, as Go's encoder writes them."""
    return _encode(obj).encode()


async def _sleep_at_least(seconds: float) -> None:
    """Sleep no less than ``seconds`` by the wall clock (uvloop's timers may fire early)."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        await asyncio.sleep(left)


def _now_iso() -> str:
    """The current UTC time in RFC 3339 with nanoseconds, like Go's time.Time."""
    ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def _iso_at(epoch: float) -> str:
    sec = math.floor(epoch)
    frac = int((epoch - sec) * 1e9)
    if sec > 253_402_300_799:  # past year 9999: clamp
        sec = 253_402_300_799
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


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


@dataclass(slots=True)
class Loaded:
    info: ModelInfo
    expires: float  # epoch seconds
    size: int  # weights + KV cache for context_length
    size_vram: int
    context_length: int


# --------------------------------------------------------------------------------------
# Faults

GARBAGE_KINDS: Final = frozenset({"nonjson", "truncated", "html", "wrong_ctype", "error200"})
FAULT_KEYS: Final = frozenset(
    {
        "oom_models",
        "oom_text",
        "missing_models",
        "driver_error",
        "driver_text",
        "busy",
        "hang",
        "hang_generation",
        "load_delay",
        "token_delay",
        "die_after_chunks",
        "error_after_chunks",
        "error_text",
        "garbage",
        "status",
        "pull_total",
        "pull_error",
        "only_models",
    }
)


def _names(raw: Any, key: str) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f"fault {key!r} must be a list of model names")
    return frozenset(_key(x) for x in raw)


def _num(raw: Any, key: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError(f"fault {key!r} must be a non-negative number")
    return float(raw)


def _int(raw: Any, key: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"fault {key!r} must be a non-negative integer")
    return raw


def _flag(raw: Any, key: str) -> bool:
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise ValueError(f"fault {key!r} must be true or false")
    return raw


def _text(raw: Any, key: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"fault {key!r} must be a string")
    return raw


@dataclass(frozen=True, slots=True)
class Faults:
    """A parsed fault set; see the module's CLI help for what each key does."""

    oom_models: frozenset[str] = frozenset()
    oom_text: str = OOM_TEXT
    missing_models: frozenset[str] = frozenset()
    driver_error: bool = False
    driver_text: str | None = None
    busy: bool = False
    hang: bool = False
    hang_generation: bool = False
    load_delay: float = 0.0
    token_delay: float | None = None
    die_after_chunks: int | None = None
    error_after_chunks: int | None = None
    error_text: str = MIDSTREAM_TEXT
    garbage: str | None = None
    status: tuple[int, str] | None = None
    pull_total: int = 1_000_000
    pull_error: str | None = None
    only_models: frozenset[str] | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Faults:
        """Validate a fault set given as JSON; raises ValueError on bad input."""
        if not isinstance(raw, Mapping):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(raw) - FAULT_KEYS)
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
        garbage = _text(raw.get("garbage"), "garbage")
        if garbage is not None and garbage not in GARBAGE_KINDS:
            raise ValueError(f"fault 'garbage' must be one of {', '.join(sorted(GARBAGE_KINDS))}")
        status: tuple[int, str] | None = None
        st = raw.get("status")
        if st is not None:
            if (
                not isinstance(st, Mapping)
                or isinstance(st.get("code"), bool)
                or not isinstance(st.get("code"), int)
                or not 100 <= st["code"] <= 599
            ):
                raise ValueError('fault \'status\' must be {"code": int, "error": str}')
            status = (int(st["code"]), str(st.get("error", "")))
        pull_total = _int(raw.get("pull_total"), "pull_total")
        only = raw.get("only_models")
        return cls(
            oom_models=_names(raw.get("oom_models"), "oom_models"),
            oom_text=_text(raw.get("oom_text"), "oom_text") or OOM_TEXT,
            missing_models=_names(raw.get("missing_models"), "missing_models"),
            driver_error=_flag(raw.get("driver_error"), "driver_error"),
            driver_text=_text(raw.get("driver_text"), "driver_text"),
            busy=_flag(raw.get("busy"), "busy"),
            hang=_flag(raw.get("hang"), "hang"),
            hang_generation=_flag(raw.get("hang_generation"), "hang_generation"),
            load_delay=_num(raw.get("load_delay"), "load_delay") or 0.0,
            token_delay=_num(raw.get("token_delay"), "token_delay"),
            die_after_chunks=_int(raw.get("die_after_chunks"), "die_after_chunks"),
            error_after_chunks=_int(raw.get("error_after_chunks"), "error_after_chunks"),
            error_text=_text(raw.get("error_text"), "error_text") or MIDSTREAM_TEXT,
            garbage=garbage,
            status=status,
            pull_total=1_000_000 if pull_total is None else pull_total,
            pull_error=_text(raw.get("pull_error"), "pull_error"),
            only_models=None if only is None else _names(only, "only_models"),
        )

    def applies(self, model: str) -> bool:
        """Whether the model-independent faults hit a request for ``model``."""
        if self.only_models is None or not model:
            return True
        return _key(model) in self.only_models


# --------------------------------------------------------------------------------------
# Request log


class Record:
    """One request on a model endpoint, as ``GET /_fake/requests`` shows it."""

    __slots__ = (
        "admitted_seq",
        "body",
        "chunks_sent",
        "finished",
        "finished_seq",
        "headers",
        "id",
        "method",
        "model",
        "path",
        "started",
        "state",
        "status",
    )

    def __init__(self, rid: int, request: web.Request) -> None:
        self.id = rid
        self.path = request.path
        self.method = request.method
        self.headers = dict(request.headers)
        self.body: Any = None
        self.model: str | None = None
        self.state = "running"
        self.status: int | None = None
        self.chunks_sent = 0
        self.started = time.time()
        self.finished: float | None = None
        # positions in the server's event order: when a slot was granted, when it ended
        self.admitted_seq: int | None = None
        self.finished_seq: int | None = None

    def finish(self, state: str, status: int | None) -> None:
        if self.state == "running":
            self.state = state
            self.status = status
            self.finished = time.time()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "method": self.method,
            "headers": self.headers,
            "body": self.body,
            "model": self.model,
            "state": self.state,
            "status": self.status,
            "chunks_sent": self.chunks_sent,
            "started": self.started,
            "finished": self.finished,
            "admitted_seq": self.admitted_seq,
            "finished_seq": self.finished_seq,
        }


class Reply(Exception):
    """Raised inside a handler to answer at once with ``response``."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class Ctx:
    __slots__ = ("kind", "rec", "request", "resp", "slot", "unload", "v1")

    def __init__(self, request: web.Request, rec: Record, kind: str) -> None:
        self.request = request
        self.rec = rec
        self.kind = kind
        self.v1 = kind.startswith("v1")
        self.resp: web.StreamResponse | None = None
        self.unload: str | None = None
        self.slot: str | None = None  # model key whose parallel slot this request holds


@dataclass(slots=True)
class Plan:
    """What a generation answers, independent of the wire protocol."""

    model: str  # as the client named it
    piece_json: list[bytes]  # content pieces, JSON-encoded
    text: str  # all content
    thinking: str | None
    tool_calls: list[dict[str, Any]] | None
    done_reason: str
    prompt_tokens: int
    t0: int
    load_ns: int
    prompt_ns: int = 0

    @property
    def n_events(self) -> int:
        return (self.thinking is not None) + len(self.piece_json) + (self.tool_calls is not None)

    @property
    def eval_count(self) -> int:
        return max(len(self.piece_json), 1 if self.tool_calls else 0)

    def stats(self) -> dict[str, int]:
        total = max(time.perf_counter_ns() - self.t0, 3)
        load = min(max(self.load_ns, 1), total - 2)
        gen = total - load
        prompt = min(max(self.prompt_ns, gen // 10, 1), max(gen - 1, 1))
        return {
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": self.eval_count,
            "eval_duration": max(gen - prompt, 1),
        }


class Scheduler:
    """Ollama's request scheduling, reduced to what placement can observe.

    ``parallel`` requests per loaded model run at once (OLLAMA_NUM_PARALLEL), at most
    ``max_loaded`` models are loaded (OLLAMA_MAX_LOADED_MODELS): a request for another
    model waits until enough running models are idle to evict. Waiting requests past
    ``max_queue`` (OLLAMA_MAX_QUEUE) are refused with 503 busy.
    """

    def __init__(self, parallel: int | None, max_queue: int, max_loaded: int | None) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_loaded = max_loaded
        self.active: dict[str, int] = {}
        self.waiting = 0
        self._seq = 0
        self._cond: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def limited(self) -> bool:
        return self.parallel is not None or self.max_loaded is not None

    def tick(self) -> int:
        """The next position in the server's event order (admissions and finishes)."""
        self._seq += 1
        return self._seq

    def has_room(self) -> bool:
        return self.waiting < self.max_queue

    def _can_run(self, key: str) -> bool:
        if self.parallel is not None and self.active.get(key, 0) >= self.parallel:
            return False
        if self.max_loaded is not None:
            busy_others = sum(1 for k, n in self.active.items() if n > 0 and k != key)
            if busy_others >= self.max_loaded:
                return False
        return True

    async def acquire(self, key: str) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        self.waiting += 1
        try:
            async with cond:
                await cond.wait_for(lambda: self._can_run(key))
                self.active[key] = self.active.get(key, 0) + 1
        finally:
            self.waiting -= 1

    def release(self, key: str) -> None:
        self.active[key] = max(self.active.get(key, 0) - 1, 0)
        if self._cond is not None:
            # called from a handler's finally (maybe cancelled): wake the queue from a task
            task = asyncio.get_running_loop().create_task(self._wake(self._cond))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _wake(cond: asyncio.Condition) -> None:
        async with cond:
            cond.notify_all()


# --------------------------------------------------------------------------------------
# Request decoding helpers


def _go_char(c: str) -> str:
    if c == "'":
        return "'\\''"
    return repr(c) if c != '"' else "'\"'"


def _container_at(doc: str, pos: int) -> str:
    """The innermost open container ('{' or '[') at ``pos``, ignoring strings."""
    stack: list[str] = []
    in_str = esc = False
    for ch in doc[:pos]:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def go_json_error(doc: str, err: json.JSONDecodeError) -> str:
    """Translate a Python JSON error into the text Go's decoder would give."""
    pos = err.pos
    if pos >= len(doc) or err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    c = _go_char(doc[pos])
    msg = err.msg
    if msg.startswith("Expecting value"):
        return f"invalid character {c} looking for beginning of value"
    if msg.startswith("Expecting property name"):
        return f"invalid character {c} looking for beginning of object key string"
    if msg.startswith("Expecting ':'"):
        return f"invalid character {c} after object key"
    if msg.startswith("Expecting ','"):
        if _container_at(doc, pos) == "[":
            return f"invalid character {c} after array element"
        return f"invalid character {c} after object key:value pair"
    if msg.startswith("Invalid control character"):
        return f"invalid character {c} in string literal"
    if msg.startswith("Invalid \\escape") or msg.startswith("Invalid \\u"):
        return f"invalid character {c} in string escape code"
    return f"invalid character {c} looking for beginning of value"


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# field -> (accepted python types, Go type name); checked on the top-level request body
_FIELD_TYPES: Final[dict[str, tuple[tuple[type, ...], str]]] = {
    "model": ((str,), "string"),
    "name": ((str,), "string"),
    "messages": ((list,), "[]api.Message"),
    "prompt": ((str,), "string"),
    "options": ((dict,), "map[string]interface {}"),
    "tools": ((list,), "api.Tools"),
    "stream": ((bool,), "bool"),
}

_GO_REQUEST_TYPES: Final = {
    "chat": "api.ChatRequest",
    "generate": "api.GenerateRequest",
    "embed": "api.EmbedRequest",
    "embeddings": "api.EmbeddingRequest",
    "show": "api.ShowRequest",
    "pull": "api.PullRequest",
    "push": "api.PushRequest",
    "create": "api.CreateRequest",
    "copy": "api.CopyRequest",
    "delete": "api.DeleteRequest",
    "v1chat": "openai.ChatCompletionRequest",
    "v1completions": "openai.CompletionRequest",
    "v1embeddings": "openai.EmbedRequest",
    "anthropic": "anthropic.MessagesRequest",
    "count_tokens": "anthropic.CountTokensRequest",
    "v1responses": "openai.ResponsesRequest",
}

_GENERATION_KINDS: Final = frozenset(
    {
        "chat",
        "generate",
        "embed",
        "embeddings",
        "v1chat",
        "v1completions",
        "v1embeddings",
        "anthropic",
        "v1responses",
    }
)
_ANTHROPIC_KINDS: Final = frozenset({"anthropic", "count_tokens"})
# Anthropic's error type per status, as Ollama's anthropic.NewError maps them
_ANTHROPIC_ERRORS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def parse_keep_alive(raw: Any) -> float | None:
    """Seconds from an Ollama ``keep_alive`` (number or Go duration); None = default.

    Negative means forever. Raises ValueError with Go's text on a bad duration.
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ValueError(f"json: cannot unmarshal bool into Go value of type {'api.Duration'}")
    if isinstance(raw, int | float):
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError("invalid keep_alive")
    s = raw.strip()
    with contextlib.suppress(ValueError):
        return float(s)
    m = re.fullmatch(r"([-+]?)((?:\d*\.?\d+(?:ns|us|µs|ms|s|m|h))+)", s)
    if not m:
        raise ValueError(f'time: invalid duration "{raw}"')
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = sum(
        float(num) * units[unit]
        for num, unit in re.findall(r"(\d*\.?\d+)(ns|us|µs|ms|s|m|h)", m[2])
    )
    return -total if m[1] == "-" else total


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    return 0


def _sample_for_schema(schema: Mapping[str, Any], name: str) -> Any:
    props = schema.get("properties")
    if isinstance(props, Mapping) and props:
        return {k: _sample_value(v, name) for k, v in props.items()}
    return {"backend": name, "answer": "test"}


def _sample_value(schema: Any, name: str) -> Any:
    typ = schema.get("type") if isinstance(schema, Mapping) else None
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    if typ == "integer":
        return 1
    if typ == "number":
        return 1.5
    if typ == "boolean":
        return True
    if typ == "array":
        return []
    if typ == "object" and isinstance(schema, Mapping):
        return _sample_for_schema(schema, name)
    if isinstance(schema, Mapping) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    return "test"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _v1_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return ""


# --------------------------------------------------------------------------------------
# The server


class FakeServer:
    """State and handlers of one fake Ollama server."""

    def __init__(
        self,
        *,
        name: str = "fake",
        version: str = DEFAULT_VERSION,
        models: Iterable[tuple[str, int]] | Mapping[str, int] | None = None,
        vram: int | None = None,
        cpu: bool = False,
        tokens: int = DEFAULT_TOKENS,
        token_delay: float = 0.0,
        faults: Mapping[str, Any] | None = None,
        model_info: Mapping[str, Arch] | None = None,
        context_length: int = DEFAULT_CONTEXT,
        parallel: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_loaded_models: int | None = None,
        load_time: float = 0.0,
        prompt_delay: float = 0.0,
        tokens_per_second: float | None = None,
        silent_sse_errors: bool = False,
    ) -> None:
        self.name = name
        self.version = version
        self.vram = vram
        self.cpu = cpu or name.lower() == "cpu"
        self.tokens = tokens
        self.token_delay = 1.0 / tokens_per_second if tokens_per_second else token_delay
        self.context_length = context_length
        self.started = time.time()
        self.models: dict[str, ModelInfo] = {}
        archs = {_key(k): v for k, v in (model_info or {}).items()}
        items = models.items() if isinstance(models, Mapping) else models
        for i, (mname, size) in enumerate(DEFAULT_MODELS if items is None else items):
            epoch = self.started - 86400.0 * (i + 1)
            info = _make_model(mname, int(size), epoch, archs.get(_key(mname)))
            self.models[info.key] = info
        self.sched = Scheduler(parallel, max_queue, max_loaded_models)
        self.load_time = load_time
        self.prompt_delay = prompt_delay
        self.silent_sse_errors = silent_sse_errors
        self.loaded: dict[str, Loaded] = {}
        self.blobs: set[str] = set()
        self.log: deque[Record] = deque(maxlen=MAX_LOG)
        self.counts: dict[str, int] = {}
        self._next_id = 1
        self._hang_clear = asyncio.Event()
        self._hang_gen_clear = asyncio.Event()
        self.faults = Faults()
        self.faults_raw: dict[str, Any] = {}
        self.set_faults(faults or {})
        # pre-encoded reply pieces: the first names the server
        self._tok_text: list[str] = [f"[{name}] "]
        self._tok_json: list[bytes] = [_dumpb(self._tok_text[0])]
        self._text_cache: dict[int, str] = {}
        self._name_b = _dumpb(name)
        self.app = self._make_app()

    # ---- faults -----------------------------------------------------------------------

    def set_faults(self, raw: Mapping[str, Any]) -> Faults:
        """Replace the fault set (raises ValueError if it does not parse)."""
        faults = Faults.parse(raw)
        self.faults = faults
        self.faults_raw = dict(raw)
        # wake every waiter so it re-checks the new fault set, then re-arm
        for flag, event in (
            (faults.hang, self._hang_clear),
            (faults.hang_generation, self._hang_gen_clear),
        ):
            event.set()
            if flag:
                event.clear()
        return faults

    # ---- app --------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        app.on_response_prepare.append(self._on_prepare)
        r = app.router
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_post("/api/chat", self._wrap("chat", self._chat))
        r.add_post("/api/generate", self._wrap("generate", self._generate))
        r.add_post("/api/embed", self._wrap("embed", self._embed))
        r.add_post("/api/embeddings", self._wrap("embeddings", self._embeddings))
        r.add_post("/api/show", self._wrap("show", self._show))
        r.add_post("/api/pull", self._wrap("pull", self._pull))
        r.add_post("/api/push", self._wrap("push", self._push))
        r.add_post("/api/create", self._wrap("create", self._create))
        r.add_post("/api/copy", self._wrap("copy", self._copy))
        r.add_delete("/api/delete", self._wrap("delete", self._delete))
        r.add_route("HEAD", "/api/blobs/{digest}", self._blob_head)
        r.add_post("/api/blobs/{digest}", self._blob_post)
        r.add_post("/v1/chat/completions", self._wrap("v1chat", self._v1_chat))
        r.add_post("/v1/completions", self._wrap("v1completions", self._v1_completions))
        r.add_post("/v1/embeddings", self._wrap("v1embeddings", self._v1_embeddings))
        r.add_post("/v1/messages", self._wrap("anthropic", self._messages))
        r.add_post("/v1/messages/count_tokens", self._wrap("count_tokens", self._count_tokens))
        r.add_post("/v1/responses", self._wrap("v1responses", self._responses))
        r.add_get("/v1/models", self._v1_models)
        r.add_get("/v1/models/{model:.+}", self._v1_model)
        r.add_get("/_fake/requests", self._fake_requests)
        r.add_delete("/_fake/requests", self._fake_clear)
        r.add_get("/_fake/faults", self._fake_faults_get)
        r.add_post("/_fake/faults", self._fake_faults_set)
        r.add_put("/_fake/faults", self._fake_faults_set)
        r.add_get("/_fake/stats", self._fake_stats)
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Fake-Backend"] = self.name

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        self.counts[path] = self.counts.get(path, 0) + 1
        # logged endpoints hang inside their handler, so the hang shows in the log
        if self.faults.hang and not path.startswith("/_fake/") and not _is_logged(path):
            await self._wait_hang()
        return await handler(request)

    async def _wait_hang(self) -> None:
        while self.faults.hang:
            await self._hang_clear.wait()

    async def _wait_hang_generation(self, model: str) -> None:
        while self.faults.hang_generation and self.faults.applies(model):
            await self._hang_gen_clear.wait()

    # ---- response helpers -------------------------------------------------------------

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=_dumpb(obj), headers={"Content-Type": JSON_CT})

    def _err(self, ctx: Ctx | None, status: int, message: str) -> web.Response:
        if ctx is not None and ctx.kind in _ANTHROPIC_KINDS:
            etype = _ANTHROPIC_ERRORS.get(status, "api_error")
            body = {
                "type": "error",
                "error": {"type": etype, "message": message},
                "request_id": "req_" + secrets.token_hex(12),
            }
            return self._json(body, status)
        if ctx is not None and ctx.v1:
            etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
            return self._json(body, status)
        return self._json({"error": message}, status)

    def _wrap(self, kind: str, fn: Callable[[Ctx], Awaitable[web.StreamResponse]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            rec = Record(self._next_id, request)
            self._next_id += 1
            self.log.append(rec)
            ctx = Ctx(request, rec, kind)
            try:
                resp = await fn(ctx)
            except Reply as reply:
                resp = reply.response
                rec.finish(
                    "failed" if resp.status >= 400 or self._is_garbage() else "completed",
                    resp.status,
                )
            except asyncio.CancelledError:
                rec.finish("cancelled", 499)
                raise
            except ConnectionError:
                rec.finish("cancelled", 499)
                return ctx.resp if ctx.resp is not None else web.Response(status=499)
            except Exception:
                rec.finish("failed", 500)
                raise
            else:
                rec.finish("completed" if resp.status < 400 else "failed", resp.status)
            finally:
                if ctx.unload is not None:
                    self.loaded.pop(ctx.unload, None)
                if ctx.slot is not None:
                    self.sched.release(ctx.slot)
                rec.finished_seq = self.sched.tick()
            return resp

        return handler

    def _is_garbage(self) -> bool:
        return self.faults.garbage is not None

    async def _body(self, ctx: Ctx) -> dict[str, Any]:
        """Read and decode the request body, answering 400 as Ollama does when it is bad.

        A hung server (faults ``hang``/``hang_generation``) stops here, after reading
        the request and before answering anything, bad requests included.
        """
        raw = await ctx.request.read()
        doc = raw.decode("utf-8", "replace").lstrip()
        body: Any = None
        error: str | None = None
        if not doc.strip():
            error = "EOF" if ctx.v1 or ctx.kind in _ANTHROPIC_KINDS else "missing request body"
        else:
            try:
                # Go's decoder reads one value and ignores what follows it
                body, _ = json.JSONDecoder().raw_decode(doc)
            except json.JSONDecodeError as exc:
                error = go_json_error(doc, exc)
        ctx.rec.body = body
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str):
            ctx.rec.model = model
        if self.faults.hang:
            await self._wait_hang()
        if ctx.kind in _GENERATION_KINDS:
            await self._wait_hang_generation(model if isinstance(model, str) else "")
        if error is not None:
            raise Reply(self._err(ctx, 400, error))
        if body is None:
            body = {}
        gotype = _GO_REQUEST_TYPES.get(ctx.kind, "api.Request")
        if not isinstance(body, dict):
            msg = f"json: cannot unmarshal {_go_type(body)} into Go value of type {gotype}"
            raise Reply(self._err(ctx, 400, msg))
        for fname, value in body.items():
            spec = _FIELD_TYPES.get(fname)
            if spec is None or value is None:
                continue
            types, goname = spec
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                struct_name = gotype.split(".", 1)[1]
                msg = (
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                    f"{struct_name}.{fname} of type {goname}"
                )
                raise Reply(self._err(ctx, 400, msg))
        return body

    def lookup(self, model: str) -> ModelInfo | None:
        key = _key(model)
        if key in self.faults.missing_models:
            return None
        return self.models.get(key)

    def _visible_models(self) -> list[ModelInfo]:
        hidden = self.faults.missing_models
        infos = [m for k, m in self.models.items() if k not in hidden]
        infos.sort(key=lambda m: (m.modified_at, m.name), reverse=True)
        return infos

    def _missing_text(self, ctx: Ctx, model: str) -> str:
        if ctx.kind == "embeddings":
            return f'model "{model}" not found, try pulling it first'
        if ctx.kind == "show":
            return f"model '{normalize_name(model)}' not found"
        return f"model '{model}' not found"

    async def _gate(self, ctx: Ctx, body: Mapping[str, Any], model: str) -> ModelInfo:
        """Hang, status/garbage faults, model presence: the common request prelude."""
        ctx.rec.model = model
        f = self.faults
        if f.applies(model):
            if f.status is not None:
                raise Reply(self._err(ctx, f.status[0], f.status[1]))
            if f.garbage is not None:
                raise Reply(await self._garbage(ctx, f.garbage, model))
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, self._missing_text(ctx, model)))
        return info

    async def _load(
        self,
        ctx: Ctx,
        info: ModelInfo,
        model: str,
        body: Mapping[str, Any],
        keep_alive: float | None,
    ) -> int:
        """Queue for a slot, scheduler faults, then load (or reuse) the model.

        Returns the load time in ns: ``load_time`` (plus any ``load_delay`` fault)
        when this request loaded the model, near zero when it was already loaded.
        """
        f = self.faults
        applies = f.applies(model)
        if f.busy and applies:
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        await self._admit(ctx, info)
        t = time.perf_counter_ns()
        if f.load_delay > 0.0 and applies:
            await _sleep_at_least(f.load_delay)
        f = self.faults
        if info.key in f.oom_models:
            raise Reply(self._err(ctx, 500, f.oom_text))
        if f.driver_error and f.applies(model):
            text = f.driver_text or DRIVER_TEXT.format(path=info.blob_path)
            raise Reply(self._err(ctx, 500, text))
        opts = _mapping(body.get("options"))
        num_ctx = opts.get("num_ctx")
        ctx_len = min(
            num_ctx
            if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx > 0
            else self.context_length,
            info.context_max,
        )
        size = info.size + info.kv_cache_bytes(ctx_len)
        if self.cpu or opts.get("num_gpu") == 0:
            size_vram = 0
        elif self.vram is None:
            size_vram = size
        else:
            size_vram = min(size, self.vram)  # past the GPU's memory, the rest spills to RAM
        now = time.time()
        current = self.loaded.get(info.key)
        if (
            current is None
            or current.expires <= now
            or current.context_length != ctx_len
            or current.size_vram != size_vram
        ):
            self._evict_for(info.key)
            if self.load_time > 0.0:
                await _sleep_at_least(self.load_time)
        ka = DEFAULT_KEEP_ALIVE_S if keep_alive is None else keep_alive
        expires = time.time() + (FOREVER_S if ka < 0 else ka)
        self.loaded[info.key] = Loaded(info, expires, size, size_vram, ctx_len)
        if ka == 0:
            ctx.unload = info.key
        return time.perf_counter_ns() - t

    async def _admit(self, ctx: Ctx, info: ModelInfo) -> None:
        """Wait for a slot as Ollama's scheduler does; 503 busy when the queue is full."""
        if not self.sched.limited:
            ctx.rec.admitted_seq = self.sched.tick()
            return
        if not self.sched.has_room():
            raise Reply(self._err(ctx, 503, BUSY_TEXT))
        await self.sched.acquire(info.key)
        ctx.slot = info.key
        ctx.rec.admitted_seq = self.sched.tick()

    def _evict_for(self, key: str) -> None:
        """Make room for ``key`` under the loaded-model limit: unload idle models first."""
        self.loaded.pop(key, None)
        limit = self.sched.max_loaded
        if limit is None:
            return
        others = [k for k in self.loaded if k != key]
        others.sort(key=lambda k: (self.sched.active.get(k, 0) > 0, self.loaded[k].expires))
        while len(others) >= limit:
            self.loaded.pop(others.pop(0), None)

    def _keep_alive(self, ctx: Ctx, body: Mapping[str, Any]) -> float | None:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise Reply(self._err(ctx, 400, str(exc))) from None

    async def _garbage(self, ctx: Ctx, kind: str, model: str) -> web.StreamResponse:
        if kind == "nonjson":
            return web.Response(
                status=200, body=b"not json at all", headers={"Content-Type": JSON_CT}
            )
        if kind == "html":
            return web.Response(
                status=502,
                body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                headers={"Content-Type": "text/html"},
            )
        if kind == "error200":
            return self._json({"error": "something went wrong"})
        if kind == "wrong_ctype":
            obj = {
                "model": model,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": self._tok_text[0]},
                "done": True,
                "done_reason": "stop",
            }
            return web.Response(
                status=200, body=_dumpb(obj), headers={"Content-Type": "text/plain; charset=utf-8"}
            )
        # truncated: a 200 stream whose first line stops mid-object
        sse = ctx.v1 or ctx.kind in _ANTHROPIC_KINDS
        resp = web.StreamResponse(status=200, headers={"Content-Type": SSE if sse else NDJSON})
        resp.force_close()
        ctx.resp = resp
        await resp.prepare(ctx.request)
        if sse:
            partial = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choi'
        else:
            partial = (
                b'{"model":'
                + _dumpb(model)
                + b',"created_at":"'
                + _now_iso().encode()
                + b'","message":{"role":"assis'
            )
        await resp.write(partial)
        ctx.rec.chunks_sent = 1
        return resp

    # ---- reply planning ---------------------------------------------------------------

    def _pieces(self, n: int) -> tuple[list[bytes], str]:
        while len(self._tok_text) < n:
            t = f"tok{len(self._tok_text)} "
            self._tok_text.append(t)
            self._tok_json.append(_dumpb(t))
        text = self._text_cache.get(n)
        if text is None:
            text = "".join(self._tok_text[:n])
            if len(self._text_cache) < 64:
                self._text_cache[n] = text
        return self._tok_json[:n], text

    def _plan(
        self,
        *,
        model: str,
        body: Mapping[str, Any],
        num_predict: Any,
        think: Any,
        fmt: Any,
        tools: Any,
        last_role: str | None,
        prompt_tokens: int,
        t0: int,
        load_ns: int,
    ) -> Plan:
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
            n, reason = num_predict, "length"
        else:
            n, reason = self.tokens, "stop"
        thinking = (
            f"[{self.name}] thinking about it." if think not in (None, False, "none", "") else None
        )
        if isinstance(tools, list) and tools and last_role != "tool":
            tool = tools[0] if isinstance(tools[0], Mapping) else {}
            fn = _mapping(tool.get("function"))
            params = _mapping(fn.get("parameters"))
            required = params.get("required")
            required = required if isinstance(required, list) else []
            call = {
                "id": "call_" + secrets.token_hex(4),
                "function": {
                    "index": 0,
                    "name": str(fn.get("name", "")),
                    "arguments": {p: "test" for p in required if isinstance(p, str)},
                },
            }
            return Plan(model, [], "", thinking, [call], "stop", prompt_tokens, t0, load_ns)
        if fmt not in (None, "", False):
            if isinstance(fmt, Mapping):
                obj = _sample_for_schema(fmt, self.name)
            else:
                obj = {"backend": self.name, "answer": "test"}
            content = _encode(obj)
            return Plan(
                model,
                [_dumpb(content)],
                content,
                thinking,
                None,
                "stop",
                prompt_tokens,
                t0,
                load_ns,
            )
        pieces, text = self._pieces(n)
        return Plan(model, pieces, text, thinking, None, reason, prompt_tokens, t0, load_ns)

    # ---- streaming core ---------------------------------------------------------------

    def _delay(self) -> float:
        d = self.faults.token_delay
        return self.token_delay if d is None else d

    async def _prompt(self, plan: Plan) -> None:
        """Prompt evaluation: ``prompt_delay`` before the first token."""
        if self.prompt_delay > 0.0:
            t = time.perf_counter_ns()
            await _sleep_at_least(self.prompt_delay)
            plan.prompt_ns = time.perf_counter_ns() - t

    def _stop_point(self, model: str, n_events: int) -> tuple[int | None, bool]:
        """(chunks before the fault fires or None, True if it is a connection abort)."""
        f = self.faults
        if not f.applies(model):
            return None, False
        die, err = f.die_after_chunks, f.error_after_chunks
        if die is None and err is None:
            return None, False
        if err is None or (die is not None and die <= err):
            return min(die if die is not None else 0, n_events), True
        return min(err, n_events), False

    async def _stream(
        self,
        ctx: Ctx,
        plan: Plan,
        content_type: str,
        chunks: Iterator[bytes],
        final: Callable[[], bytes],
        error_chunk: Callable[[str], bytes],
    ) -> web.StreamResponse:
        await self._prompt(plan)
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        rec = ctx.rec
        delay = self._delay()
        stop_at, abort = self._stop_point(plan.model, plan.n_events)
        sent = 0
        write = resp.write
        for chunk in chunks:
            if sent == stop_at:
                break
            if delay > 0.0:
                if sent:
                    await _sleep_at_least(delay)
            elif sent & 255 == 255:
                await asyncio.sleep(0)
            await write(chunk)
            sent += 1
            rec.chunks_sent = sent
        if stop_at is not None:
            if abort:
                rec.finish("failed", 200)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                return resp
            if delay > 0.0 and sent:
                await _sleep_at_least(delay)
            await write(error_chunk(self.faults.error_text))
            rec.chunks_sent = sent + 1
            rec.finish("failed", 200)
            return resp
        if delay > 0.0 and sent:
            await _sleep_at_least(delay)
        await write(final())
        rec.chunks_sent = sent + 1
        return resp

    async def _whole(self, ctx: Ctx, plan: Plan, build: Callable[[], Any]) -> web.StreamResponse:
        """A non-streaming reply: wait as long as generating would take, then answer."""
        await self._prompt(plan)
        delay = self._delay()
        stop_at, abort = self._stop_point(plan.model, plan.n_events)
        steps = plan.n_events if stop_at is None else stop_at
        if delay > 0.0 and steps:
            await _sleep_at_least(delay * steps)
        if stop_at is not None:
            if abort:
                ctx.rec.finish("failed", None)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                return web.Response(status=500)
            raise Reply(self._err(ctx, 500, self.faults.error_text))
        resp = self._json(build())
        ctx.rec.chunks_sent = 1
        return resp

    # ---- native chat / generate -------------------------------------------------------

    def _native_error_chunk(self, text: str) -> bytes:
        return _dumpb({"error": text}) + b"\n"

    def _chat_chunks(self, plan: Plan) -> Iterator[bytes]:
        pre = b'{"model":' + _dumpb(plan.model) + b',"created_at":"'
        if plan.thinking is not None:
            yield (
                pre
                + _now_iso().encode()
                + b'","message":{"role":"assistant","content":"","thinking":'
                + _dumpb(plan.thinking)
                + b'},"done":false}\n'
            )
        mid = b'","message":{"role":"assistant","content":'
        end = b'},"done":false}\n'
        for pj in plan.piece_json:
            yield pre + _now_iso().encode() + mid + pj + end
        if plan.tool_calls is not None:
            msg = {"role": "assistant", "content": "", "tool_calls": plan.tool_calls}
            yield pre + _now_iso().encode() + b'","message":' + _dumpb(msg) + b',"done":false}\n'

    def _chat_final(self, plan: Plan, whole: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text if whole else ""}
        if whole and plan.thinking is not None:
            message["thinking"] = plan.thinking
        if whole and plan.tool_calls is not None:
            message["tool_calls"] = plan.tool_calls
        out: dict[str, Any] = {
            "model": plan.model,
            "created_at": _now_iso(),
            "message": message,
            "done": True,
            "done_reason": plan.done_reason,
        }
        out.update(plan.stats())
        return out

    def _generate_chunks(self, plan: Plan) -> Iterator[bytes]:
        pre = b'{"model":' + _dumpb(plan.model) + b',"created_at":"'
        if plan.thinking is not None:
            yield (
                pre
                + _now_iso().encode()
                + b'","response":"","thinking":'
                + _dumpb(plan.thinking)
                + b',"done":false}\n'
            )
        mid = b'","response":'
        end = b',"done":false}\n'
        for pj in plan.piece_json:
            yield pre + _now_iso().encode() + mid + pj + end

    def _generate_final(self, plan: Plan, whole: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": plan.model,
            "created_at": _now_iso(),
            "response": plan.text if whole else "",
        }
        if whole and plan.thinking is not None:
            out["thinking"] = plan.thinking
        out["done"] = True
        out["done_reason"] = plan.done_reason
        out["context"] = [1, 2, 3]
        out.update(plan.stats())
        return out

    def _load_reply(
        self, ctx: Ctx, model: str, generate: bool, unload: bool, info: ModelInfo
    ) -> web.Response:
        if unload:
            self.loaded.pop(info.key, None)
        out: dict[str, Any] = {"model": model, "created_at": _now_iso()}
        if generate:
            out["response"] = ""
        else:
            out["message"] = {"role": "assistant", "content": ""}
        out["done"] = True
        out["done_reason"] = "unload" if unload else "load"
        ctx.rec.chunks_sent = 1
        return self._json(out)

    async def _chat(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        keep_alive = self._keep_alive(ctx, body)
        messages = body.get("messages") or []
        if not messages:
            if keep_alive == 0:
                return self._load_reply(ctx, model, False, True, info)
            await self._load(ctx, info, model, body, keep_alive)
            return self._load_reply(ctx, model, False, False, info)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        opts = body.get("options") or {}
        last = messages[-1] if isinstance(messages[-1], Mapping) else {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=opts.get("num_predict"),
            think=body.get("think"),
            fmt=body.get("format"),
            tools=body.get("tools"),
            last_role=last.get("role") if isinstance(last.get("role"), str) else None,
            prompt_tokens=max(
                1, sum(_words(m.get("content")) for m in messages if isinstance(m, Mapping))
            ),
            t0=t0,
            load_ns=load_ns,
        )
        if body.get("stream") is False:
            return await self._whole(ctx, plan, lambda: self._chat_final(plan, True))
        return await self._stream(
            ctx,
            plan,
            NDJSON,
            self._chat_chunks(plan),
            lambda: _dumpb(self._chat_final(plan, False)) + b"\n",
            self._native_error_chunk,
        )

    async def _generate(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support generate'))
        keep_alive = self._keep_alive(ctx, body)
        prompt = body.get("prompt") or ""
        if not prompt:
            if keep_alive == 0:
                return self._load_reply(ctx, model, True, True, info)
            await self._load(ctx, info, model, body, keep_alive)
            return self._load_reply(ctx, model, True, False, info)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        opts = body.get("options") or {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=opts.get("num_predict"),
            think=body.get("think"),
            fmt=body.get("format"),
            tools=None,
            last_role=None,
            prompt_tokens=max(1, _words(prompt) + _words(body.get("system"))),
            t0=t0,
            load_ns=load_ns,
        )
        if body.get("stream") is False:
            return await self._whole(ctx, plan, lambda: self._generate_final(plan, True))
        return await self._stream(
            ctx,
            plan,
            NDJSON,
            self._generate_chunks(plan),
            lambda: _dumpb(self._generate_final(plan, False)) + b"\n",
            self._native_error_chunk,
        )

    # ---- embeddings -------------------------------------------------------------------

    async def _embed_common(
        self, ctx: Ctx, body: Mapping[str, Any], model: str
    ) -> tuple[ModelInfo, int]:
        info = await self._gate(ctx, body, model)
        keep_alive = self._keep_alive(ctx, body)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        stop_at, abort = self._stop_point(model, 1)
        if stop_at is not None:
            if abort:
                ctx.rec.finish("failed", None)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                raise Reply(web.Response(status=500))
            raise Reply(self._err(ctx, 500, self.faults.error_text))
        return info, load_ns

    @staticmethod
    def _dims(raw: Any) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < EMBED_DIM:
            return raw
        return EMBED_DIM

    async def _embed(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        _, load_ns = await self._embed_common(ctx, body, model)
        raw = body.get("input")
        if raw is None or raw == "":
            inputs: list[str] = []
        elif isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        else:
            raise Reply(self._err(ctx, 400, "invalid input type"))
        dim = self._dims(body.get("dimensions"))
        out = {
            "model": model,
            "embeddings": [embed_vector(t, dim) for t in inputs],
            "total_duration": max(time.perf_counter_ns() - t0, 1),
            "load_duration": max(load_ns, 1),
            "prompt_eval_count": sum(max(1, _words(t)) for t in inputs),
        }
        ctx.rec.chunks_sent = 1
        return self._json(out)

    async def _embeddings(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or ""
        await self._embed_common(ctx, body, model)
        prompt = body.get("prompt") or ""
        ctx.rec.chunks_sent = 1
        return self._json({"embedding": embed_vector(prompt) if prompt else []})

    # ---- model management -------------------------------------------------------------

    async def _show(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or body.get("name") or ""
        info = await self._gate(ctx, body, model)
        fam = info.family
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
        params = 'stop                           "<|eot_id|>"\ntemperature                    0.7'
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {info.name}\n\n"
            f"FROM {info.blob_path}\n"
            f'TEMPLATE """{template}"""\n'
            'PARAMETER stop "<|eot_id|>"\n'
            "PARAMETER temperature 0.7\n"
        )
        param_count = int(info.size / (2.0 if info.embedding else 0.6))
        out = {
            "license": "Fake license for tests.",
            "modelfile": modelfile,
            "parameters": params,
            "template": template,
            "details": info.details(),
            "model_info": {
                "general.architecture": fam,
                "general.basename": info.name.split(":", 1)[0],
                "general.file_type": 1 if info.embedding else 15,
                "general.parameter_count": param_count,
                "general.quantization_version": 2,
                f"{fam}.context_length": info.arch.context_length,
                f"{fam}.embedding_length": info.arch.embedding_length,
                f"{fam}.block_count": info.arch.block_count,
                f"{fam}.attention.head_count": info.arch.head_count,
                f"{fam}.attention.head_count_kv": info.arch.head_count_kv,
            },
            "tensors": [],
            "capabilities": info.capabilities,
            "modified_at": info.modified_at,
        }
        ctx.rec.chunks_sent = 1
        return self._json(out)

    @staticmethod
    def _admin_model(ctx: Ctx, body: Mapping[str, Any]) -> str:
        model = str(body.get("model") or body.get("name") or "")
        ctx.rec.model = model
        return model

    async def _progress(
        self, ctx: Ctx, stream: bool, lines: Iterable[dict[str, Any]], on_done: Callable[[], None]
    ) -> web.StreamResponse:
        """Write progress objects one per line (or only the last one, non-streaming)."""
        delay = self._delay()
        if not stream:
            last: dict[str, Any] = {}
            for i, line in enumerate(lines):
                if "error" in line:
                    raise Reply(self._err(ctx, 500, str(line["error"])))
                if delay > 0.0 and i:
                    await asyncio.sleep(delay)
                last = line
            on_done()
            ctx.rec.chunks_sent = 1
            return self._json(last)
        resp = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        for sent, line in enumerate(lines, 1):
            if delay > 0.0 and sent > 1:
                await asyncio.sleep(delay)
            await resp.write(_dumpb(line) + b"\n")
            ctx.rec.chunks_sent = sent
            if "error" in line:
                ctx.rec.finish("failed", 200)
                return resp
        on_done()
        return resp

    async def _pull(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        f = self.faults
        total = f.pull_total
        existing = self.models.get(_key(model))
        digest = "sha256:" + hashlib.sha256(normalize_name(model).encode()).hexdigest()
        small = [
            ("sha256:" + hashlib.sha256(f"{model}/{n}".encode()).hexdigest(), size)
            for n, size in (("template", 1429), ("params", 96))
        ]
        pull_error = f.pull_error

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            if pull_error is not None:
                yield {"error": pull_error}
                return
            for step in range(5):
                yield {
                    "status": f"pulling {digest[7:19]}",
                    "digest": digest,
                    "total": total,
                    "completed": total * step // 4,
                }
            for d, size in small:
                yield {
                    "status": f"pulling {d[7:19]}",
                    "digest": d,
                    "total": size,
                    "completed": size,
                }
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        def done() -> None:
            size = existing.size if existing is not None else total + sum(s for _, s in small)
            arch = existing.arch if existing is not None else None
            info = _make_model(model, size, time.time(), arch)
            self.models[info.key] = info
            self.blobs.add(digest)
            if info.key in self.faults.missing_models:
                raw = dict(self.faults_raw)
                raw["missing_models"] = [
                    m for m in raw.get("missing_models", []) if _key(m) != info.key
                ]
                self.set_faults(raw)

        return await self._progress(ctx, body.get("stream") is not False, lines(), done)

    async def _push(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, f"model '{model}' not found"))
        digest = "sha256:" + info.digest
        total = info.size

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "retrieving manifest"}
            for step in range(5):
                yield {
                    "status": f"pushing {info.digest[:12]}",
                    "digest": digest,
                    "total": total,
                    "completed": total * step // 4,
                }
            yield {"status": "pushing manifest"}
            yield {"status": "success"}

        return await self._progress(ctx, body.get("stream") is not False, lines(), lambda: None)

    async def _create(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        src = body.get("from")
        base = self.lookup(src) if isinstance(src, str) and src else None
        size = base.size if base is not None else DEFAULT_MODEL_SIZE
        layer = "sha256:" + (
            base.digest if base is not None else hashlib.sha256(model.encode()).hexdigest()
        )

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "gathering model components"}
            yield {"status": f"using existing layer {layer}"}
            if body.get("system") or body.get("template") or body.get("parameters"):
                yield {
                    "status": "creating new layer sha256:"
                    + hashlib.sha256(_dumpb(body)).hexdigest()
                }
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        def done() -> None:
            info = _make_model(model, size, time.time(), base.arch if base is not None else None)
            self.models[info.key] = info

        return await self._progress(ctx, body.get("stream") is not False, lines(), done)

    async def _copy(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        src = body.get("source")
        dst = body.get("destination")
        ctx.rec.model = src if isinstance(src, str) else None
        if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
            raise Reply(self._err(ctx, 400, "source and destination are required"))
        info = self.lookup(src)
        if info is None:
            raise Reply(self._err(ctx, 404, f'model "{src}" not found'))
        new = _make_model(dst, info.size, time.time(), info.arch)
        self.models[new.key] = new
        return web.Response(status=200)

    async def _delete(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, f"model '{model}' not found"))
        self.models.pop(info.key, None)
        self.loaded.pop(info.key, None)
        return web.Response(status=200)

    async def _blob_head(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def _blob_post(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = await request.read()
        if digest.startswith("sha256:"):
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if got != digest:
                return self._json(
                    {"error": f'digest mismatch, expected "{digest}", got "{got}"'}, 400
                )
        self.blobs.add(digest)
        return web.Response(status=201)

    # ---- listing ----------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return self._json({"version": self.version})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        return self._json({"models": [m.tag_entry() for m in self._visible_models()]})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        hidden = self.faults.missing_models
        out = []
        for key, ld in list(self.loaded.items()):
            if ld.expires <= now:
                del self.loaded[key]
                continue
            if key in hidden or key not in self.models:
                continue
            info = ld.info
            out.append(
                {
                    "name": info.name,
                    "model": info.name,
                    "size": ld.size,
                    "digest": info.digest,
                    "details": info.details(),
                    "expires_at": _iso_at(ld.expires),
                    "size_vram": ld.size_vram,
                    "context_length": ld.context_length,
                }
            )
        return self._json({"models": out})

    # ---- OpenAI compatibility ---------------------------------------------------------

    def _v1_model_obj(self, info: ModelInfo) -> dict[str, Any]:
        name = info.name
        owner = name.split("/", 1)[0] if "/" in name.split(":", 1)[0] else "library"
        return {
            "id": name,
            "object": "model",
            "created": int(self.started - 86400),
            "owned_by": owner,
        }

    async def _v1_models(self, request: web.Request) -> web.StreamResponse:
        data = [self._v1_model_obj(m) for m in self._visible_models()]
        return self._json({"object": "list", "data": data or None})

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        info = self.lookup(model)
        if info is None:
            body = {
                "error": {
                    "message": f"model '{model}' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            }
            return self._json(body, 404)
        obj = self._v1_model_obj(info)
        obj["id"] = model
        return self._json(obj)

    @staticmethod
    def _v1_usage(plan: Plan) -> dict[str, int]:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.eval_count,
            "total_tokens": plan.prompt_tokens + plan.eval_count,
        }

    @staticmethod
    def _v1_error_chunk(text: str) -> bytes:
        err = {"error": {"message": text, "type": "api_error", "param": None, "code": None}}
        return b"data: " + _dumpb(err) + b"\n\n"

    @staticmethod
    def _v1_tool_calls(plan: Plan) -> list[dict[str, Any]]:
        return [
            {
                "id": tc["id"],
                "index": tc["function"]["index"],
                "type": "function",
                "function": {
                    "name": tc["function"]["name"],
                    "arguments": json.dumps(
                        tc["function"]["arguments"], separators=(",", ":"), sort_keys=True
                    ),
                },
            }
            for tc in plan.tool_calls or []
        ]

    def _v1_finish(self, plan: Plan) -> str:
        return "tool_calls" if plan.tool_calls else plan.done_reason

    async def _v1_chat(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        messages = body.get("messages") or []
        load_ns = await self._load(ctx, info, model, body, None)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        rf = body.get("response_format")
        fmt: Any = None
        if isinstance(rf, Mapping):
            if rf.get("type") == "json_object":
                fmt = "json"
            elif rf.get("type") == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, Mapping) else None
                fmt = schema if isinstance(schema, Mapping) else "json"
        reasoning = body.get("reasoning")
        think = body.get("reasoning_effort")
        if think is None and isinstance(reasoning, Mapping):
            think = reasoning.get("effort")
        last = messages[-1] if messages and isinstance(messages[-1], Mapping) else {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=max_tokens,
            think=think,
            fmt=fmt,
            tools=body.get("tools"),
            last_role=last.get("role") if isinstance(last.get("role"), str) else None,
            prompt_tokens=max(
                1,
                sum(
                    len(_v1_text(m.get("content")).split())
                    for m in messages
                    if isinstance(m, Mapping)
                ),
            ),
            t0=t0,
            load_ns=load_ns,
        )
        cid = f"chatcmpl-{secrets.randbelow(1000)}"
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": plan.text}
                if plan.thinking is not None:
                    message["reasoning"] = plan.thinking
                if plan.tool_calls:
                    message["tool_calls"] = self._v1_tool_calls(plan)
                return {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": self._v1_finish(plan)}
                    ],
                    "usage": self._v1_usage(plan),
                }

            return await self._whole(ctx, plan, build)
        so = body.get("stream_options")
        include_usage = isinstance(so, Mapping) and bool(so.get("include_usage"))
        head = b'data: {"id":"' + cid.encode() + b'","object":"chat.completion.chunk","created":'
        model_b = (
            b',"model":'
            + _dumpb(model)
            + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":'
        )

        def chunks() -> Iterator[bytes]:
            if plan.thinking is not None:
                delta: dict[str, Any] = {
                    "role": "assistant",
                    "content": "",
                    "reasoning": plan.thinking,
                }
                yield (
                    head
                    + str(int(time.time())).encode()
                    + model_b
                    + _dumpb(delta)
                    + b',"finish_reason":null}]}\n\n'
                )
            mid = b'{"role":"assistant","content":'
            end = b'},"finish_reason":null}]}\n\n'
            for pj in plan.piece_json:
                yield head + str(int(time.time())).encode() + model_b + mid + pj + end
            if plan.tool_calls is not None:
                delta = {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": self._v1_tool_calls(plan),
                }
                yield (
                    head
                    + str(int(time.time())).encode()
                    + model_b
                    + _dumpb(delta)
                    + b',"finish_reason":null}]}\n\n'
                )

        def final() -> bytes:
            now = str(int(time.time())).encode()
            last_chunk = (
                head
                + now
                + model_b
                + b'{"role":"assistant","content":""},"finish_reason":'
                + _dumpb(self._v1_finish(plan))
                + b"}]}\n\n"
            )
            if include_usage:
                usage: dict[str, Any] = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": self._v1_usage(plan),
                }
                last_chunk += b"data: " + _dumpb(usage) + b"\n\n"
            return last_chunk + b"data: [DONE]\n\n"

        return await self._stream(ctx, plan, SSE, chunks(), final, self._v1_error_chunk)

    async def _v1_completions(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support generate'))
        load_ns = await self._load(ctx, info, model, body, None)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        plan = self._plan(
            model=model,
            body=body,
            num_predict=body.get("max_tokens"),
            think=None,
            fmt=None,
            tools=None,
            last_role=None,
            prompt_tokens=max(1, _words(prompt)),
            t0=t0,
            load_ns=load_ns,
        )
        cid = f"cmpl-{secrets.randbelow(1000)}"
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": plan.text, "index": 0, "finish_reason": plan.done_reason}],
                    "usage": self._v1_usage(plan),
                }

            return await self._whole(ctx, plan, build)
        so = body.get("stream_options")
        include_usage = isinstance(so, Mapping) and bool(so.get("include_usage"))
        head = b'data: {"id":"' + cid.encode() + b'","object":"text_completion","created":'
        tail = b',"model":' + _dumpb(model) + b',"system_fingerprint":"fp_ollama"}\n\n'

        def chunks() -> Iterator[bytes]:
            for pj in plan.piece_json:
                yield (
                    head
                    + str(int(time.time())).encode()
                    + b',"choices":[{"text":'
                    + pj
                    + b',"index":0,"finish_reason":null}]'
                    + tail
                )

        def final() -> bytes:
            out = (
                head
                + str(int(time.time())).encode()
                + b',"choices":[{"text":"","index":0,"finish_reason":'
                + _dumpb(plan.done_reason)
                + b"}]"
                + tail
            )
            if include_usage:
                usage: dict[str, Any] = {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "choices": [],
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "usage": self._v1_usage(plan),
                }
                out += b"data: " + _dumpb(usage) + b"\n\n"
            return out + b"data: [DONE]\n\n"

        return await self._stream(ctx, plan, SSE, chunks(), final, self._v1_error_chunk)

    async def _v1_embeddings(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or ""
        await self._embed_common(ctx, body, model)
        raw = body.get("input")
        if isinstance(raw, str) and raw:
            inputs = [raw]
        elif isinstance(raw, list) and raw:
            inputs = [x if isinstance(x, str) else _encode(x) for x in raw]
        else:
            raise Reply(self._err(ctx, 400, "invalid input"))
        dim = self._dims(body.get("dimensions"))
        b64 = str(body.get("encoding_format", "")).lower() == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = embed_vector(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = sum(max(1, _words(t)) for t in inputs)
        ctx.rec.chunks_sent = 1
        return self._json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # ---- Anthropic Messages (/v1/messages) --------------------------------------------

    @staticmethod
    def _anthropic_tools(raw: Any) -> list[dict[str, Any]] | None:
        """Anthropic tool definitions in the native ``function`` form _plan reads."""
        if not isinstance(raw, list) or not raw:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "parameters": _mapping(t.get("input_schema")),
                },
            }
            for t in raw
            if isinstance(t, Mapping)
        ]

    @staticmethod
    def _anthropic_text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(b.get("text", ""))
                for b in content
                if isinstance(b, Mapping) and b.get("type") == "text"
            )
        return ""

    def _cap(self, raw: Any) -> int | None:
        """A client's token limit as num_predict: only when it cuts the reply short."""
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < self.tokens:
            return raw
        return None

    @staticmethod
    def _stop_reason(plan: Plan) -> str:
        if plan.tool_calls:
            return "tool_use"
        return {"stop": "end_turn", "length": "max_tokens"}.get(plan.done_reason, "stop_sequence")

    def _anthropic_error_chunk(self, text: str) -> bytes:
        if self.silent_sse_errors:
            return b""
        err = {"type": "error", "error": {"type": "api_error", "message": text}}
        return b"event: error\ndata: " + _dumpb(err) + b"\n\n"

    async def _messages(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        ctx.rec.model = model
        max_tokens = body.get("max_tokens")
        messages = body.get("messages") or []
        # the middleware checks these before the chat handler sees the request
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise Reply(self._err(ctx, 400, "max_tokens is required and must be positive"))
        if not messages:
            raise Reply(self._err(ctx, 400, "messages is required"))
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        load_ns = await self._load(ctx, info, model, body, None)
        last = messages[-1] if isinstance(messages[-1], Mapping) else {}
        content = last.get("content")
        last_blocks: list[Any] = content if isinstance(content, list) else []
        answered = any(
            isinstance(b, Mapping) and b.get("type") == "tool_result" for b in last_blocks
        )
        thinking = _mapping(body.get("thinking"))
        system = self._anthropic_text(body.get("system"))
        plan = self._plan(
            model=model,
            body=body,
            num_predict=self._cap(max_tokens),
            think=thinking.get("type") == "enabled" or None,
            fmt=None,
            tools=self._anthropic_tools(body.get("tools")),
            last_role="tool" if answered else None,
            prompt_tokens=max(
                1,
                _words(system)
                + sum(
                    _words(self._anthropic_text(m.get("content")))
                    for m in messages
                    if isinstance(m, Mapping)
                ),
            ),
            t0=t0,
            load_ns=load_ns,
        )
        mid = "msg_" + secrets.token_hex(12)
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                content: list[dict[str, Any]] = []
                if plan.thinking is not None:
                    content.append({"type": "thinking", "thinking": plan.thinking})
                if plan.text:
                    content.append({"type": "text", "text": plan.text})
                for tc in plan.tool_calls or []:
                    fn = tc["function"]
                    content.append(
                        {
                            "type": "tool_use",
                            "id": tc["id"],
                            "name": fn["name"],
                            "input": fn["arguments"],
                        }
                    )
                return {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": self._stop_reason(plan),
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.eval_count},
                }

            return await self._whole(ctx, plan, build)
        index = [0]  # the current content block
        open_kind = [""]  # the open content block's kind, if any

        def sse(event: str, data: Any) -> bytes:
            return b"event: " + event.encode() + b"\ndata: " + _dumpb(data) + b"\n\n"

        def start() -> bytes:
            message: dict[str, Any] = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0},
            }
            return sse("message_start", {"type": "message_start", "message": message})

        def close_block() -> bytes:
            if not open_kind[0]:
                return b""
            out = sse("content_block_stop", {"type": "content_block_stop", "index": index[0]})
            index[0] += 1
            open_kind[0] = ""
            return out

        def open_block(kind: str, block: dict[str, Any]) -> bytes:
            out = b""
            if open_kind[0] != kind:
                out = close_block()
                out += sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index[0],
                        "content_block": block,
                    },
                )
                open_kind[0] = kind
            return out

        def chunks() -> Iterator[bytes]:
            head = start()
            if plan.thinking is not None:
                yield (
                    head
                    + open_block("thinking", {"type": "thinking", "thinking": ""})
                    + sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index[0],
                            "delta": {"type": "thinking_delta", "thinking": plan.thinking},
                        },
                    )
                )
                head = b""
            for pj in plan.piece_json:
                yield (
                    head
                    + open_block("text", {"type": "text", "text": ""})
                    + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                    + str(index[0]).encode()
                    + b',"delta":{"type":"text_delta","text":'
                    + pj
                    + b"}}\n\n"
                )
                head = b""
            for tc in plan.tool_calls or []:
                fn = tc["function"]
                block = {"type": "tool_use", "id": tc["id"], "name": fn["name"], "input": {}}
                delta = {"type": "input_json_delta", "partial_json": _encode(fn["arguments"])}
                out = head + close_block() + open_block("tool_use", block)
                out += sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index[0], "delta": delta},
                )
                yield out + close_block()
                head = b""

        def final() -> bytes:
            usage = {"input_tokens": plan.prompt_tokens, "output_tokens": plan.eval_count}
            return (
                (start() if plan.n_events == 0 else b"")
                + close_block()
                + sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": self._stop_reason(plan)},
                        "usage": usage,
                    },
                )
                + sse("message_stop", {"type": "message_stop"})
            )

        return await self._stream(ctx, plan, SSE, chunks(), final, self._anthropic_error_chunk)

    async def _count_tokens(self, ctx: Ctx) -> web.StreamResponse:
        """Ollama estimates, it does not tokenize: a quarter of the characters."""
        body = await self._body(ctx)
        model = body.get("model") or ""
        ctx.rec.model = model
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        chars = len(self._anthropic_text(body.get("system")))
        for m in body.get("messages") or []:
            if isinstance(m, Mapping):
                chars += len(str(m.get("role", ""))) + len(self._anthropic_text(m.get("content")))
        for t in body.get("tools") or []:
            if isinstance(t, Mapping):
                chars += len(str(t.get("name", ""))) + len(str(t.get("description", "")))
                chars += len(_encode(t.get("input_schema") or {}))
        tokens = chars // 4 or (1 if body.get("messages") or body.get("system") else 0)
        ctx.rec.chunks_sent = 1
        return self._json({"input_tokens": tokens})

    # ---- OpenAI Responses (/v1/responses) ---------------------------------------------

    @staticmethod
    def _responses_input(raw: Any) -> tuple[int, str | None]:
        """(prompt words, the last item's role) of a Responses ``input``."""
        if isinstance(raw, str):
            return _words(raw), "user"
        words, role = 0, None
        for item in raw if isinstance(raw, list) else []:
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type") or ("message" if item.get("role") else "")
            if kind == "function_call_output":
                role = "tool"
                words += _words(item.get("output"))
            elif kind == "message":
                role = str(item.get("role") or "user")
                content = item.get("content")
                if isinstance(content, list):
                    words += sum(_words(p.get("text")) for p in content if isinstance(p, Mapping))
                else:
                    words += _words(content)
        return words, role

    def _response_obj(
        self, rid: str, model: str, body: Mapping[str, Any], status: str, output: list[Any]
    ) -> dict[str, Any]:
        instructions = body.get("instructions") or None
        text = _mapping(body.get("text"))
        reasoning = _mapping(body.get("reasoning"))
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": model,
            "previous_response_id": None,
            "instructions": instructions,
            "output": output,
            "error": None,
            "tools": body.get("tools") or [],
            "tool_choice": "auto",
            "truncation": body.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": _mapping(text.get("format")) or {"type": "text"}},
            "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
            if reasoning
            else None,
            "usage": None,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": bool(body.get("background")),
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    @staticmethod
    def _responses_usage(plan: Plan) -> dict[str, Any]:
        return {
            "input_tokens": plan.prompt_tokens,
            "output_tokens": plan.eval_count,
            "total_tokens": plan.prompt_tokens + plan.eval_count,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    @staticmethod
    def _output_text(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    async def _responses(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        reasoning = _mapping(body.get("reasoning"))
        effort = reasoning.get("effort")
        if effort not in (None, "", "none", "low", "medium", "high", "max"):
            msg = (
                f'invalid reasoning value: "{effort}" '
                '(must be "high", "medium", "low", "max", or "none")'
            )
            raise Reply(self._err(ctx, 400, msg))
        load_ns = await self._load(ctx, info, model, body, None)
        words, last_role = self._responses_input(body.get("input"))
        raw_tools = body.get("tools")
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "parameters": _mapping(t.get("parameters")),
                },
            }
            for t in (raw_tools if isinstance(raw_tools, list) else [])
            if isinstance(t, Mapping) and t.get("type") == "function"
        ]
        plan = self._plan(
            model=model,
            body=body,
            num_predict=self._cap(body.get("max_output_tokens")),
            think=effort if effort not in ("", "none") else None,
            fmt=None,
            tools=tools or None,
            last_role=last_role,
            prompt_tokens=max(1, words + _words(body.get("instructions"))),
            t0=t0,
            load_ns=load_ns,
        )
        rid = f"resp_{secrets.randbelow(999999)}"
        item_id = f"msg_{secrets.randbelow(999999)}"
        rs_id = f"rs_{secrets.randbelow(999999)}"
        calls = [
            {
                "id": f"fc_{secrets.randbelow(999999)}_{i}",
                "type": "function_call",
                "status": "completed",
                "call_id": tc["id"],
                "name": tc["function"]["name"],
                "arguments": _encode(tc["function"]["arguments"]),
            }
            for i, tc in enumerate(plan.tool_calls or [])
        ]

        def reasoning_item() -> dict[str, Any]:
            summary = [{"type": "summary_text", "text": plan.thinking}]
            return {
                "id": rs_id,
                "type": "reasoning",
                "summary": summary,
                "encrypted_content": plan.thinking,
            }

        def message_item() -> dict[str, Any]:
            return {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [self._output_text(plan.text)],
            }

        def output() -> list[Any]:
            out: list[Any] = [reasoning_item()] if plan.thinking is not None else []
            return out + (calls if calls else [message_item()] if plan.text else [])

        if not body.get("stream"):

            def build() -> dict[str, Any]:
                obj = self._response_obj(rid, model, body, "completed", output())
                obj["completed_at"] = int(time.time())
                obj["usage"] = self._responses_usage(plan)
                return obj

            return await self._whole(ctx, plan, build)
        seq = [0]
        out_index = [0]

        def ev(event: str, data: dict[str, Any]) -> bytes:
            data = {"type": event, **data, "sequence_number": seq[0]}
            seq[0] += 1
            return b"event: " + event.encode() + b"\ndata: " + _dumpb(data) + b"\n\n"

        def head() -> bytes:
            obj = self._response_obj(rid, model, body, "in_progress", [])
            return ev("response.created", {"response": obj}) + ev(
                "response.in_progress", {"response": obj}
            )

        def finish_reasoning() -> bytes:
            if plan.thinking is None or out_index[0] > 0:
                return b""
            out = ev(
                "response.reasoning_summary_text.done",
                {"item_id": rs_id, "output_index": 0, "summary_index": 0, "text": plan.thinking},
            )
            out += ev("response.output_item.done", {"output_index": 0, "item": reasoning_item()})
            out_index[0] = 1
            return out

        def chunks() -> Iterator[bytes]:
            first = head()
            if plan.thinking is not None:
                item = {"id": rs_id, "type": "reasoning", "summary": []}
                yield (
                    first
                    + ev("response.output_item.added", {"output_index": 0, "item": item})
                    + ev(
                        "response.reasoning_summary_text.delta",
                        {
                            "item_id": rs_id,
                            "output_index": 0,
                            "summary_index": 0,
                            "delta": plan.thinking,
                        },
                    )
                )
                first = b""
            for i, pj in enumerate(plan.piece_json):
                out = first + finish_reasoning()
                if i == 0:
                    added = {
                        "id": item_id,
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                    out += ev(
                        "response.output_item.added", {"output_index": out_index[0], "item": added}
                    )
                    out += ev(
                        "response.content_part.added",
                        {
                            "item_id": item_id,
                            "output_index": out_index[0],
                            "content_index": 0,
                            "part": self._output_text(""),
                        },
                    )
                delta = json.loads(pj)
                out += ev(
                    "response.output_text.delta",
                    {
                        "item_id": item_id,
                        "output_index": out_index[0],
                        "content_index": 0,
                        "delta": delta,
                        "logprobs": [],
                    },
                )
                yield out
                first = b""
            if calls:
                out = first + finish_reasoning()
                for i, call in enumerate(calls):
                    idx = out_index[0] + i
                    added = {**call, "status": "in_progress", "arguments": ""}
                    out += ev("response.output_item.added", {"output_index": idx, "item": added})
                    out += ev(
                        "response.function_call_arguments.delta",
                        {"item_id": call["id"], "output_index": idx, "delta": call["arguments"]},
                    )
                    out += ev(
                        "response.function_call_arguments.done",
                        {
                            "item_id": call["id"],
                            "output_index": idx,
                            "arguments": call["arguments"],
                        },
                    )
                    out += ev("response.output_item.done", {"output_index": idx, "item": call})
                yield out

        def final() -> bytes:
            out = (head() if plan.n_events == 0 else b"") + finish_reasoning()
            if not calls and plan.piece_json:
                where = {"item_id": item_id, "output_index": out_index[0], "content_index": 0}
                out += ev("response.output_text.done", {**where, "text": plan.text, "logprobs": []})
                out += ev(
                    "response.content_part.done", {**where, "part": self._output_text(plan.text)}
                )
                out += ev(
                    "response.output_item.done",
                    {"output_index": out_index[0], "item": message_item()},
                )
            obj = self._response_obj(rid, model, body, "completed", output())
            obj["completed_at"] = int(time.time())
            obj["usage"] = self._responses_usage(plan)
            return out + ev("response.completed", {"response": obj})

        def error_chunk(text: str) -> bytes:
            if self.silent_sse_errors:
                return b""
            obj = self._response_obj(rid, model, body, "failed", [])
            obj["error"] = {"code": "server_error", "message": text}
            return ev("response.failed", {"response": obj})

        return await self._stream(ctx, plan, SSE, chunks(), final, error_chunk)

    # ---- control ----------------------------------------------------------------------

    async def _fake_requests(self, request: web.Request) -> web.StreamResponse:
        path = request.query.get("path")
        state = request.query.get("state")
        out = [
            r.as_json()
            for r in self.log
            if (path is None or r.path == path) and (state is None or r.state == state)
        ]
        return self._json(out)

    async def _fake_clear(self, request: web.Request) -> web.StreamResponse:
        n = len(self.log)
        self.log.clear()
        return self._json({"cleared": n})

    async def _fake_faults_get(self, request: web.Request) -> web.StreamResponse:
        return self._json(self.faults_raw)

    async def _fake_faults_set(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
            self.set_faults(data)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, 400)
        return self._json(self.faults_raw)

    async def _fake_stats(self, request: web.Request) -> web.StreamResponse:
        running = sum(1 for r in self.log if r.state == "running")
        return self._json(
            {
                "name": self.name,
                "pid": os.getpid(),
                "counts": self.counts,
                "running": running,
                "logged": len(self.log),
                "loaded": sorted(self.loaded),
                "waiting": self.sched.waiting,
                "active": {k: n for k, n in self.sched.active.items() if n},
            }
        )

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        """Gin's own 404 for a path Ollama does not serve, logged so pass-through shows."""
        rec = Record(self._next_id, request)
        self._next_id += 1
        self.log.append(rec)
        raw = await request.read()
        if request.content_type == "application/json" and raw.strip():
            with contextlib.suppress(ValueError):
                rec.body = json.loads(raw)
        elif raw:
            rec.body = {"bytes": len(raw), "content_type": request.content_type}
        if isinstance(rec.body, dict) and isinstance(rec.body.get("model"), str):
            rec.model = rec.body["model"]
        rec.finish("failed", 404)
        rec.finished_seq = self.sched.tick()
        return web.Response(status=404, text="404 page not found", content_type="text/plain")


_LOGGED_PREFIXES: Final = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/show",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
)


def _is_logged(path: str) -> bool:
    return path.startswith(_LOGGED_PREFIXES)


SERVER_KEY: Final = web.AppKey("fakeollama_server", FakeServer)


def build_app(**kwargs: Any) -> web.Application:
    """An application for in-process tests (e.g. pytest-aiohttp's ``aiohttp_client``).

    Takes :class:`FakeServer`'s keyword arguments; the server object is
    ``app[SERVER_KEY]``. Note that in-process test servers do not enable aiohttp's
    handler cancellation, so a disconnect is noticed only on the next write.
    """
    server = FakeServer(**kwargs)
    server.app[SERVER_KEY] = server
    return server.app


# --------------------------------------------------------------------------------------
# Process entry point


async def serve(
    server: FakeServer,
    host: str = "127.0.0.1",
    port: int = 11434,
    *,
    ready_file: str | None = None,
    exit_with_parent: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``server`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    runner = web.AppRunner(
        server.app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.2,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
    await site.start()
    actual_port = int(runner.addresses[0][1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready_file:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{actual_port}\n")
        os.replace(tmp, ready_file)
    watcher: asyncio.Task[None] | None = None
    if exit_with_parent:
        parent = os.getppid()

        async def watch() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
            stop.set()

        watcher = asyncio.create_task(watch())
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        # hung handlers are cancelled by aiohttp after shutdown_timeout
        await runner.cleanup()


def _parse_model(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"bad --model {spec!r}")
    try:
        return name, int(float(size)) if size else DEFAULT_MODEL_SIZE
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size in --model {spec!r}") from None


def _parse_arch(spec: str) -> tuple[str, Arch]:
    name, _, nums = spec.partition("=")
    try:
        vals = [int(x) for x in nums.split(",")]
    except ValueError:
        vals = []
    if not name or len(vals) not in (4, 5) or min(vals) <= 0 or vals[1] % vals[2]:
        raise argparse.ArgumentTypeError(f"bad --model-info {spec!r}")
    ctx_max = vals[4] if len(vals) == 5 else 131072
    return name, Arch(vals[0], vals[1], vals[2], vals[3], ctx_max)


def _parse_size(raw: str) -> int:
    try:
        return int(float(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad byte count {raw!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fakeollama",
        description="A fake Ollama server for tests.",
        epilog=(
            "Fault keys (--faults JSON or POST /_fake/faults): oom_models, oom_text, "
            "missing_models, driver_error, driver_text, busy, hang, hang_generation, "
            "load_delay, token_delay, die_after_chunks, error_after_chunks, error_text, "
            "garbage (nonjson|truncated|html|wrong_ctype|error200), status {code,error}, "
            "pull_total, pull_error, only_models."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port (see --ready-file)")
    p.add_argument("--name", default="fake", help="shown in replies ('[NAME] ') and X-Fake-Backend")
    p.add_argument("--version", default=DEFAULT_VERSION, help="what /api/version reports")
    p.add_argument("--model", action="append", type=_parse_model, metavar="NAME[=SIZE_BYTES]")
    p.add_argument("--vram", type=_parse_size, default=None, help="GPU memory in bytes")
    p.add_argument("--cpu", action="store_true", help="a CPU server: size_vram is always 0")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="reply length in tokens")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument(
        "--model-info",
        action="append",
        type=_parse_arch,
        metavar="NAME=BLOCKS,EMBED,HEADS,KV_HEADS[,CTX]",
        help="a model's architecture (model_info; decides its KV cache per token)",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=DEFAULT_CONTEXT,
        help="context when a request sets no num_ctx (OLLAMA_CONTEXT_LENGTH)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="requests per model at once (OLLAMA_NUM_PARALLEL)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="waiting requests before 503 busy (OLLAMA_MAX_QUEUE)",
    )
    p.add_argument(
        "--max-loaded-models",
        type=int,
        default=None,
        help="models loaded at once; 1 = a GPU that evicts (OLLAMA_MAX_LOADED_MODELS)",
    )
    p.add_argument(
        "--load-time", type=float, default=0.0, help="seconds a request waits to load its model"
    )
    p.add_argument(
        "--prompt-delay", type=float, default=0.0, help="seconds of prompt evaluation per request"
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        help="generation speed (overrides --token-delay)",
    )
    p.add_argument(
        "--silent-sse-errors",
        action="store_true",
        help="end /v1/messages and /v1/responses streams on an error without an error event",
    )
    p.add_argument("--faults", default=None, help="fault set as JSON (or @FILE)")
    p.add_argument("--ready-file", default=None, help="write the port here once listening")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent dies")
    return p.parse_args(argv)


def _load_faults(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    if raw.startswith("@"):
        with open(raw[1:]) as fh:
            raw = fh.read()
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("--faults must be a JSON object")
    return data


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="fakeollama %(levelname)s %(name)s: %(message)s",
    )
    try:
        faults = _load_faults(args.faults)
        Faults.parse(faults)
    except (OSError, ValueError) as exc:
        print(f"fakeollama: bad --faults: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        server = FakeServer(
            name=args.name,
            version=args.version,
            models=args.model,
            vram=args.vram,
            cpu=args.cpu,
            tokens=args.tokens,
            token_delay=args.token_delay,
            faults=faults,
            model_info=dict(args.model_info or ()),
            context_length=args.context_length,
            parallel=args.parallel,
            max_queue=args.max_queue,
            max_loaded_models=args.max_loaded_models,
            load_time=args.load_time,
            prompt_delay=args.prompt_delay,
            tokens_per_second=args.tokens_per_second,
            silent_sse_errors=args.silent_sse_errors,
        )
        await serve(
            server,
            args.host,
            args.port,
            ready_file=args.ready_file,
            exit_with_parent=args.exit_with_parent,
        )

    try:
        _run(run())
    except OSError as exc:
        print(f"fakeollama: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
