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
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote

import httpx
import msgspec

from harbord.config import default_socket
from harbord.schemas import CheckEntry, Intent, Inventory, Pin, PinRequest, Plan, Status

BASE_URL = "http://harbor"
CONNECT_TIMEOUT = 5.0
T = TypeVar("T")
Chunk = dict[str, Any]
Message = Mapping[str, Any]
Tools = Sequence[Mapping[str, Any]] | None


class HarborError(Exception):
    """harbord answered with an error. `status` is the HTTP status, or None when there was
    none to give: no answer at all, or an `{"error"}` line in a stream that had started."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HarborUnavailable(HarborError):
    """Nothing answers on the socket: it is missing, refuses, or may not be opened."""

    def __init__(self, socket: Path, reason: str) -> None:
        super().__init__(None, f"cannot reach harbord at {socket}: {reason}")
        self.socket = socket
        self.reason = reason


@dataclass(frozen=True)
class Served:
    """Who served a routed request, from harbord's response headers."""

    backend: str | None
    fallbacks: tuple[str, ...]  # failed attempts before it, e.g. ("gpu=oom",)
    request_id: str | None  # for `harborctl explain ID`

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> Served:
        fallbacks = headers.get("X-Harbor-Fallbacks", "")
        return cls(
            headers.get("X-Harbor-Backend"),
            tuple(f.strip() for f in fallbacks.split(",") if f.strip()),
            headers.get("X-Harbor-Request-Id"),
        )


def socket_path(socket: str | Path | None = None) -> Path:
    """The given socket, else $HARBOR_SOCKET, else $XDG_RUNTIME_DIR/harbor.sock."""
    return Path(socket) if socket is not None else default_socket(os.environ)


def quote_path(value: str) -> str:
    """A model name or id as one path segment: ':', '/' and '%' are escaped."""
    return quote(value, safe="")


def decode(content: bytes, tp: type[T]) -> T:
    try:
        return msgspec.json.decode(content, type=tp)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise HarborError(
            None, f"unexpected answer from harbord ({err}); versions differ?"
        ) from None


def _error_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # OpenAI's error object, restart's answer
        return _error_text(value.get("error")) or _error_text(value.get("message"))
    return None


def _checked(resp: httpx.Response) -> httpx.Response:
    if resp.is_success:
        return resp
    try:
        text = _error_text(msgspec.json.decode(resp.content))
    except msgspec.DecodeError:
        text = resp.text.strip()[:300]
    raise HarborError(resp.status_code, text or f"HTTP {resp.status_code} {resp.reason_phrase}")


def _chunk(line: str) -> Chunk | None:
    if not line.strip():
        return None
    try:
        chunk = msgspec.json.decode(line)
    except msgspec.DecodeError:
        raise HarborError(None, f"harbord sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise HarborError(None, f"harbord sent a line that is not an object: {line[:80]!r}")
    if "error" in chunk:
        raise HarborError(None, _error_text(chunk) or line[:300])
    return chunk


@contextmanager
def _errors(socket: Path) -> Iterator[None]:
    """httpx's transport errors as HarborUnavailable / HarborError."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as err:
        raise HarborUnavailable(socket, str(err) or type(err).__name__) from None
    except httpx.TimeoutException:
        raise HarborError(None, "harbord did not answer in time (see --timeout)") from None
    except httpx.TransportError as err:
        raise HarborError(
            None, f"connection to harbord broke: {err or type(err).__name__}"
        ) from None


def _chat_request(
    model: str,
    messages: Sequence[Message],
    tools: Tools,
    intent: Intent | None,
    stream: bool,
    backend: str | None,
    fields: Mapping[str, Any],
) -> dict[str, Any]:
    body = {"model": model, "messages": list(messages), "stream": stream, **fields}
    if tools is not None:
        body["tools"] = list(tools)
    headers: dict[str, str] = {"X-Harbor-Intent": intent} if intent else {}
    if backend:
        headers["X-Harbor-Backend"] = backend
    return {"json": body, "headers": headers}


def _route_params(model: str, intent: Intent | None) -> dict[str, str]:
    return {"model": model, "intent": intent} if intent else {"model": model}


def _pin(model: str, backend: str, for_seconds: float | None, reason: str) -> dict[str, Any]:
    body = msgspec.to_builtins(PinRequest(backend, for_seconds, reason))
    return {"method": "PUT", "path": f"/harbor/pins/{quote_path(model)}", "json": body}


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

    def _send(self, method: str, path: str, stream: bool = False, **kw: Any) -> httpx.Response:
        with _errors(self.socket):
            resp = self._http.send(self._http.build_request(method, path, **kw), stream=stream)
            if stream and resp.is_error:
                try:
                    resp.read()
                finally:
                    resp.close()
        return resp

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request (`kw` as for httpx: params, json, headers); an error answer raises
        HarborError, no answer HarborUnavailable."""
        return _checked(self._send(method, path, **kw))

    def _get(self, path: str, tp: type[T], **params: str) -> T:
        return decode(self.request("GET", path, params=params).content, tp)

    def status(self) -> Status:
        return self._get("/harbor/status", Status)

    def check(self) -> dict[str, CheckEntry]:
        return self._get("/harbor/check", dict[str, CheckEntry])

    def models(self) -> Inventory:
        return self._get("/harbor/models", Inventory)

    def route(self, model: str, intent: Intent | None = None) -> Plan:
        return self._get("/harbor/route", Plan, **_route_params(model, intent))

    def which_backend(self, model: str, intent: Intent | None = None) -> str | None:
        return _first(self.route(model, intent))

    def pins(self) -> dict[str, Pin]:
        return self._get("/harbor/pins", dict[str, Pin])

    def pin(self, model: str, backend: str, for_seconds: float | None = None,
            reason: str = "pinned by operator") -> dict[str, Pin]:  # fmt: skip
        """Returns {normalised model name: the pin}."""
        return decode(
            self.request(**_pin(model, backend, for_seconds, reason)).content, dict[str, Pin]
        )

    def unpin(self, model: str) -> str:
        """Returns the normalised model name; HarborError (404) when it was not pinned."""
        resp = self.request("DELETE", f"/harbor/pins/{quote_path(model)}")
        return decode(resp.content, dict[str, str])["unpinned"]

    def restart(self, backend: str) -> str:
        """Restarts the backend's unit; harbord's message, or HarborError (409, 501)."""
        resp = self.request("POST", f"/harbor/backends/{quote_path(backend)}/restart")
        return str(decode(resp.content, dict[str, Any]).get("message", "restarted"))

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
        kw = _chat_request(model, messages, tools, intent, stream, backend, fields)
        resp = self._send("POST", "/api/chat", stream, **kw)
        self.last = Served.from_headers(resp.headers)
        _checked(resp)
        return self._chunks(resp) if stream else decode(resp.content, dict[str, Any])

    def _chunks(self, resp: httpx.Response) -> Iterator[Chunk]:
        try:
            with _errors(self.socket):
                for line in resp.iter_lines():
                    if (chunk := _chunk(line)) is not None:
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

    async def _send(
        self, method: str, path: str, stream: bool = False, **kw: Any
    ) -> httpx.Response:
        with _errors(self.socket):
            request = self._http.build_request(method, path, **kw)
            resp = await self._http.send(request, stream=stream)
            if stream and resp.is_error:
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
        return resp

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return _checked(await self._send(method, path, **kw))

    async def _get(self, path: str, tp: type[T], **params: str) -> T:
        return decode((await self.request("GET", path, params=params)).content, tp)

    async def status(self) -> Status:
        return await self._get("/harbor/status", Status)

    async def check(self) -> dict[str, CheckEntry]:
        return await self._get("/harbor/check", dict[str, CheckEntry])

    async def models(self) -> Inventory:
        return await self._get("/harbor/models", Inventory)

    async def route(self, model: str, intent: Intent | None = None) -> Plan:
        return await self._get("/harbor/route", Plan, **_route_params(model, intent))

    async def which_backend(self, model: str, intent: Intent | None = None) -> str | None:
        return _first(await self.route(model, intent))

    async def pins(self) -> dict[str, Pin]:
        return await self._get("/harbor/pins", dict[str, Pin])

    async def pin(self, model: str, backend: str, for_seconds: float | None = None,
                  reason: str = "pinned by operator") -> dict[str, Pin]:  # fmt: skip
        resp = await self.request(**_pin(model, backend, for_seconds, reason))
        return decode(resp.content, dict[str, Pin])

    async def unpin(self, model: str) -> str:
        resp = await self.request("DELETE", f"/harbor/pins/{quote_path(model)}")
        return decode(resp.content, dict[str, str])["unpinned"]

    async def restart(self, backend: str) -> str:
        resp = await self.request("POST", f"/harbor/backends/{quote_path(backend)}/restart")
        return str(decode(resp.content, dict[str, Any]).get("message", "restarted"))

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
        kw = _chat_request(model, messages, tools, intent, stream, backend, fields)
        resp = await self._send("POST", "/api/chat", stream, **kw)
        self.last = Served.from_headers(resp.headers)
        _checked(resp)
        return self._chunks(resp) if stream else decode(resp.content, dict[str, Any])

    async def _chunks(self, resp: httpx.Response) -> AsyncIterator[Chunk]:
        try:
            with _errors(self.socket):
                async for line in resp.aiter_lines():
                    if (chunk := _chunk(line)) is not None:
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
