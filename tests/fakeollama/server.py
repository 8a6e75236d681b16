"""FakeServer: the API families put together on one aiohttp application."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final

from aiohttp import web

from .anthropic_api import AnthropicAPI
from .control import ControlAPI
from .faults import Faults
from .management import ManagementAPI
from .models import Arch, ModelInfo, _key, _make_model
from .native import NativeAPI
from .openai_api import OpenAIAPI
from .plumbing import Record, _is_logged
from .responses_api import ResponsesAPI
from .scheduler import DEFAULT_MAX_LOADED, Loaded, PerModel, Scheduler, Tally
from .wire import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODELS,
    DEFAULT_TOKENS,
    DEFAULT_VERSION,
    MAX_LOG,
    Handler,
    _dumpb,
)


class FakeServer(NativeAPI, ManagementAPI, OpenAIAPI, AnthropicAPI, ResponsesAPI, ControlAPI):
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
        show_info: Mapping[str, Mapping[str, Any]] | None = None,
        context_length: int = DEFAULT_CONTEXT,
        parallel: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_loaded_models: int | None = DEFAULT_MAX_LOADED,
        load_time: float | Mapping[str, float] = 0.0,
        prompt_delay: float | Mapping[str, float] = 0.0,
        embed_time: float | Mapping[str, float] = 0.0,
        ram: int | None = None,
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
        # Raw /api/show model_info per model, for architectures beyond --model-info's
        # llama-style numbers (a gemma3's sliding window, an embedding model's pooling).
        self.show_info = {_key(k): dict(v) for k, v in (show_info or {}).items()}
        items = models.items() if isinstance(models, Mapping) else models
        for i, (mname, size) in enumerate(DEFAULT_MODELS if items is None else items):
            epoch = self.started - 86400.0 * (i + 1)
            info = _make_model(mname, int(size), epoch, archs.get(_key(mname)))
            self.models[info.key] = info
        # max_loaded_models None or 0: no limit
        self.sched = Scheduler(parallel, max_queue, max_loaded_models or None)
        self.ram = ram
        self.load_time = PerModel(load_time)
        self.prompt_delay = PerModel(prompt_delay)
        self.embed_time = PerModel(embed_time)
        self.tally = Tally()
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
