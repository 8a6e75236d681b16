"""Python client for harbord: Ollama's chat plus the /harbor/* API, over the Unix socket.

    with HarborClient() as harbor:
        reply = harbor.chat("llama3.2", [{"role": "user", "content": "hi"}], intent="fast")
        print(reply["message"]["content"], "served by", harbor.last_backend)

    async with AsyncHarborClient() as harbor:
        async for chunk in await harbor.chat("qwen3:32b", messages, intent="heavy", stream=True):
            print(chunk["message"]["content"], end="")

Answers keep Ollama's shape: which backend served a chat is not added to them but kept
in `client.last` (a `Served`: backend, fallbacks, request id), set as soon as the answer's
headers arrive. Tasks that share one client overwrite it; give each task its own client
when it needs to know.

harbord's own endpoints are the table in harbord.harbor_endpoints: each has a method
here (status, pins, route ...), and any entry can be called as `client.call(ENTRY,
**params)` for its typed answer, or `client.fetch(...)` for the bytes as they came too.
The two clients differ only in the transport call; the rest is in client_wire.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import httpx
import msgspec

from harbord import harbor_endpoints as api
from harbord.client_wire import (
    Chunk,
    HarborError,
    HarborUnavailable,
    Message,
    Reply,
    Served,
    Tools,
    chat_body,
    checked,
    decode,
    endpoint_reply,
    endpoint_request,
    ollama_request,
    parse_chunk,
    transport_errors,
)
from harbord.config import default_socket
from harbord.harbor_endpoints import Endpoint, Param
from harbord.schemas import (
    Affinity,
    CheckEntry,
    Decision,
    Intent,
    Inventory,
    Pin,
    PinRequest,
    Plan,
    Status,
)

BASE_URL = "http://harbor"
CONNECT_TIMEOUT = 5.0
A = TypeVar("A")  # an endpoint's answer type
B = TypeVar("B")  # an endpoint's body type
# What callers import from here, whichever module defines it.
__all__ = [
    "BASE_URL",
    "CONNECT_TIMEOUT",
    "AsyncHarborClient",
    "Chunk",
    "HarborClient",
    "HarborError",
    "HarborUnavailable",
    "Message",
    "Reply",
    "Router",
    "Served",
    "Tools",
    "decode",
    "get_router",
    "smart_chat",
    "socket_path",
]


def socket_path(socket: str | Path | None = None) -> Path:
    """The given socket, else $HARBOR_SOCKET, else $XDG_RUNTIME_DIR/harbor.sock."""
    return Path(socket) if socket is not None else default_socket(os.environ)


def _first(plan: Plan) -> str | None:
    return plan.steps[0].backend if plan.steps else None


class _Base:
    def __init__(self, socket: str | Path | None, timeout: float | None) -> None:
        self.socket = socket_path(socket)
        connect = CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT)
        self.timeout = httpx.Timeout(timeout, connect=connect)
        self.last: Served | None = None

    @property
    def last_backend(self) -> str | None:
        """The backend that served (or, on an error answer, last failed) the latest chat."""
        return self.last.backend if self.last else None

    def _served(self, resp: httpx.Response) -> httpx.Response:
        """Notes who served a routed request, then raises for an error answer."""
        self.last = Served.from_headers(resp.headers)
        return checked(resp)


class HarborClient(_Base):
    """Blocking client. `timeout`: seconds to wait for an answer; None: no limit."""

    def __init__(self, socket: str | Path | None = None, timeout: float | None = None) -> None:
        super().__init__(socket, timeout)
        transport = httpx.HTTPTransport(uds=str(self.socket))
        self._http = httpx.Client(transport=transport, base_url=BASE_URL, timeout=self.timeout)

    def __enter__(self) -> HarborClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        with transport_errors(self.socket):
            resp = self._http.send(request, stream=stream)
            if stream and resp.is_error:
                try:
                    resp.read()
                finally:
                    resp.close()
        return resp

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request (`kw` as for httpx: params, json, headers); an error answer raises
        HarborError, no answer HarborUnavailable."""
        return checked(self._send(self._http.build_request(method, path, **kw)))

    def fetch(
        self, endpoint: Endpoint[B, A], /, body: B | None = None, **params: Param
    ) -> Reply[A]:
        """One of harbord's endpoints (harbor_endpoints), its path and query parameters as
        keywords: the answer as it came and decoded."""
        return endpoint_reply(
            endpoint, self._send(endpoint_request(self._http, endpoint, body, params))
        )

    def call(self, endpoint: Endpoint[B, A], /, body: B | None = None, **params: Param) -> A:
        """fetch(), the decoded answer only."""
        return self.fetch(endpoint, body, **params).value

    def status(self) -> Status:
        return self.call(api.STATUS)

    def check(self) -> dict[str, CheckEntry]:
        return self.call(api.CHECK)

    def models(self) -> Inventory:
        return self.call(api.MODELS)

    def route(self, model: str, intent: Intent | None = None, num_ctx: int | None = None) -> Plan:
        return self.call(api.ROUTE, model=model, intent=intent, num_ctx=num_ctx)

    def affinity(self) -> dict[str, Affinity]:
        """Where each model last ran, by model (the tie-breaker among equal backends)."""
        return self.call(api.AFFINITY)

    def reset_affinity(self, model: str | None = None) -> list[str]:
        """Forget MODEL's affinity (every model's when None); the models forgotten.
        HarborError (404) when MODEL had none."""
        if model is None:
            return self.call(api.RESET_AFFINITY).reset
        return self.call(api.RESET_MODEL_AFFINITY, model=model).reset

    def which_backend(self, model: str, intent: Intent | None = None) -> str | None:
        return _first(self.route(model, intent))

    def pins(self) -> dict[str, Pin]:
        return self.call(api.PINS)

    def pin(self, model: str, backend: str, for_seconds: float | None = None,
            reason: str = "pinned by operator") -> dict[str, Pin]:  # fmt: skip
        """Returns {normalised model name: the pin}."""
        return self.call(api.PIN, PinRequest(backend, for_seconds, reason), model=model)

    def unpin(self, model: str) -> str:
        """Returns the normalised model name; HarborError (404) when it was not pinned."""
        return self.call(api.UNPIN, model=model).unpinned

    def restart(self, backend: str) -> str:
        """Restarts the backend's unit; harbord's message, or HarborError (409, 501)."""
        return self.call(api.RESTART, name=backend).message

    def decisions(self, limit: int = 20) -> list[Decision]:
        """The latest routing decisions, newest first."""
        return self.call(api.DECISIONS, limit=limit)

    def decision(self, request_id: str) -> Decision:
        """How one recent request was routed; HarborError (404) once it is forgotten."""
        return self.call(api.DECISION, id=request_id)

    def metrics(self) -> str:
        """harbord's Prometheus metrics, in the text format."""
        return self.call(api.METRICS)

    @overload
    def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
             intent: Intent | None = None, stream: Literal[False] = False,
             backend: str | None = None, **fields: Any) -> Chunk: ...  # fmt: skip
    @overload
    def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
             intent: Intent | None = None, stream: Literal[True],
             backend: str | None = None, **fields: Any) -> Iterator[Chunk]: ...  # fmt: skip
    def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
             intent: Intent | None = None, stream: bool = False,
             backend: str | None = None, **fields: Any) -> Chunk | Iterator[Chunk]:  # fmt: skip
        """POST /api/chat. stream=True: the chunks, each as soon as its line arrives."""
        body = chat_body(model, messages, tools, stream, fields)
        resp = self._post("/api/chat", body, intent, backend, stream)
        return self._chunks(resp) if stream else decode(resp.content, dict[str, Any])

    def pull(self, model: str, *, backend: str | None = None) -> Iterator[Chunk]:
        """POST /api/pull through `backend` (harbord's choice by default): Ollama's progress
        chunks as they come; `last` says which backend pulls before the first one."""
        resp = self._post("/api/pull", {"model": model, "stream": True}, None, backend, True)
        return self._chunks(resp)

    def _post(self, path: str, body: dict[str, Any], intent: Intent | None,
              backend: str | None, stream: bool) -> httpx.Response:  # fmt: skip
        request = ollama_request(self._http, path, body, intent, backend)
        return self._served(self._send(request, stream))

    def _chunks(self, resp: httpx.Response) -> Iterator[Chunk]:
        try:
            with transport_errors(self.socket):
                for line in resp.iter_lines():
                    if (chunk := parse_chunk(line)) is not None:
                        yield chunk
        finally:
            resp.close()


class AsyncHarborClient(_Base):
    """HarborClient for asyncio: the same methods, awaited."""

    def __init__(self, socket: str | Path | None = None, timeout: float | None = None) -> None:
        super().__init__(socket, timeout)
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        self._http = httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=self.timeout)

    async def __aenter__(self) -> AsyncHarborClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        with transport_errors(self.socket):
            resp = await self._http.send(request, stream=stream)
            if stream and resp.is_error:
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
        return resp

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return checked(await self._send(self._http.build_request(method, path, **kw)))

    async def fetch(
        self, endpoint: Endpoint[B, A], /, body: B | None = None, **params: Param
    ) -> Reply[A]:
        request = endpoint_request(self._http, endpoint, body, params)
        return endpoint_reply(endpoint, await self._send(request))

    async def call(self, endpoint: Endpoint[B, A], /, body: B | None = None, **params: Param) -> A:
        return (await self.fetch(endpoint, body, **params)).value

    async def status(self) -> Status:
        return await self.call(api.STATUS)

    async def check(self) -> dict[str, CheckEntry]:
        return await self.call(api.CHECK)

    async def models(self) -> Inventory:
        return await self.call(api.MODELS)

    async def route(
        self, model: str, intent: Intent | None = None, num_ctx: int | None = None
    ) -> Plan:
        return await self.call(api.ROUTE, model=model, intent=intent, num_ctx=num_ctx)

    async def affinity(self) -> dict[str, Affinity]:
        return await self.call(api.AFFINITY)

    async def reset_affinity(self, model: str | None = None) -> list[str]:
        if model is None:
            return (await self.call(api.RESET_AFFINITY)).reset
        return (await self.call(api.RESET_MODEL_AFFINITY, model=model)).reset

    async def which_backend(self, model: str, intent: Intent | None = None) -> str | None:
        return _first(await self.route(model, intent))

    async def pins(self) -> dict[str, Pin]:
        return await self.call(api.PINS)

    async def pin(self, model: str, backend: str, for_seconds: float | None = None,
                  reason: str = "pinned by operator") -> dict[str, Pin]:  # fmt: skip
        return await self.call(api.PIN, PinRequest(backend, for_seconds, reason), model=model)

    async def unpin(self, model: str) -> str:
        return (await self.call(api.UNPIN, model=model)).unpinned

    async def restart(self, backend: str) -> str:
        return (await self.call(api.RESTART, name=backend)).message

    async def decisions(self, limit: int = 20) -> list[Decision]:
        return await self.call(api.DECISIONS, limit=limit)

    async def decision(self, request_id: str) -> Decision:
        return await self.call(api.DECISION, id=request_id)

    async def metrics(self) -> str:
        return await self.call(api.METRICS)

    @overload
    async def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
                   intent: Intent | None = None, stream: Literal[False] = False,
                   backend: str | None = None, **fields: Any) -> Chunk: ...  # fmt: skip
    @overload
    async def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
                   intent: Intent | None = None, stream: Literal[True],
                   backend: str | None = None,
                   **fields: Any) -> AsyncIterator[Chunk]: ...  # fmt: skip
    async def chat(self, model: str, messages: Sequence[Message], *, tools: Tools = None,
                   intent: Intent | None = None, stream: bool = False, backend: str | None = None,
                   **fields: Any) -> Chunk | AsyncIterator[Chunk]:  # fmt: skip
        """POST /api/chat; an error before the first chunk raises here, at the await."""
        body = chat_body(model, messages, tools, stream, fields)
        resp = await self._post("/api/chat", body, intent, backend, stream)
        return self._chunks(resp) if stream else decode(resp.content, dict[str, Any])

    async def pull(self, model: str, *, backend: str | None = None) -> AsyncIterator[Chunk]:
        resp = await self._post("/api/pull", {"model": model, "stream": True}, None, backend, True)
        return self._chunks(resp)

    async def _post(self, path: str, body: dict[str, Any], intent: Intent | None,
                    backend: str | None, stream: bool) -> httpx.Response:  # fmt: skip
        request = ollama_request(self._http, path, body, intent, backend)
        return self._served(await self._send(request, stream))

    async def _chunks(self, resp: httpx.Response) -> AsyncIterator[Chunk]:
        try:
            with transport_errors(self.socket):
                async for line in resp.aiter_lines():
                    if (chunk := parse_chunk(line)) is not None:
                        yield chunk
        finally:
            await resp.aclose()


# --- the seed's one-call API ---------------------------------------------------


class Router(AsyncHarborClient):
    """The seed's router: `health_check`, `list_models`, `chat`, `which_backend`, `aclose`."""

    async def health_check(self) -> dict[str, Any]:
        """{"gpu": {"status": "healthy", "version": ..., "url": ..., "is_gpu": True}, ...}"""
        result: dict[str, Any] = msgspec.to_builtins(await self.check())
        return result

    async def list_models(self) -> dict[str, list[str]]:
        """Each model with the backends that have it."""
        return (await self.models()).models

    async def which_backend(self, model: str, intent: Intent | None = "fast") -> str | None:
        return await super().which_backend(model, intent)


async def get_router(socket: str | Path | None = None) -> Router:
    """A new Router on harbord's socket; `await router.aclose()` when done."""
    return Router(socket)


@overload
async def smart_chat(model: str, messages: Sequence[Message], tools: Tools = None,
                     intent: Intent = "fast", stream: Literal[False] = False,
                     **kwargs: Any) -> Chunk: ...  # fmt: skip
@overload
async def smart_chat(model: str, messages: Sequence[Message], tools: Tools = None,
                     intent: Intent = "fast", *, stream: Literal[True],
                     **kwargs: Any) -> AsyncIterator[Chunk]: ...  # fmt: skip
async def smart_chat(model: str, messages: Sequence[Message], tools: Tools = None,
                     intent: Intent = "fast", stream: bool = False,
                     **kwargs: Any) -> Chunk | AsyncIterator[Chunk]:  # fmt: skip
    """One chat through harbord on a client of its own; `kwargs` are more body fields."""
    client = AsyncHarborClient()
    chunks: AsyncIterator[Chunk] | None = None
    try:
        if not stream:
            return await client.chat(
                model, messages, tools=tools, intent=intent, stream=False, **kwargs
            )
        chunks = await client.chat(
            model, messages, tools=tools, intent=intent, stream=True, **kwargs
        )
        return _closing(chunks, client)  # closes the client after the last chunk
    finally:
        if chunks is None:
            await client.aclose()


async def _closing(chunks: AsyncIterator[Chunk], client: AsyncHarborClient) -> AsyncIterator[Chunk]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await client.aclose()
