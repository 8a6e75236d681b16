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
This module holds the blocking client, HarborClient; the asyncio one and the one-call
face (Router, get_router, smart_chat) are in client_async. The two clients differ only in
the transport call; what they share is in client_wire.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import httpx

from harbord import harbor_endpoints as api
from harbord.client_async import AsyncHarborClient, Router, get_router, smart_chat
from harbord.client_wire import (
    BASE_URL,
    CONNECT_TIMEOUT,
    Chunk,
    ClientBase,
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
    first_backend,
    ollama_request,
    parse_chunk,
    socket_path,
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


class HarborClient(ClientBase):
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
        return first_backend(self.route(model, intent))

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
