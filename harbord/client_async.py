"""The asyncio client of harbord (AsyncHarborClient), and the one-call face built on it:
Router, get_router and smart_chat, the seed's API.

Import these names from harbord.client, whose docstring shows how to use them; the
blocking twin, HarborClient, is there, and what both share is in client_wire.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import httpx
import msgspec

from harbord import harbor_endpoints as api
from harbord.client_wire import (
    BASE_URL,
    Chunk,
    ClientBase,
    Message,
    Reply,
    Tools,
    chat_body,
    checked,
    decode,
    endpoint_reply,
    endpoint_request,
    first_backend,
    ollama_request,
    parse_chunk,
    transport_errors,
)
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

A = TypeVar("A")  # an endpoint's answer type
B = TypeVar("B")  # an endpoint's body type


class AsyncHarborClient(ClientBase):
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
        return first_backend(await self.route(model, intent))

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
