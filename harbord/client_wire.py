"""What the sync and async clients of harbord.client share: the socket, the base class
(timeouts, who served), the errors, and the requests they build and the answers they read,
apart from the transport call.

Internal to the client library: import the public names from harbord.client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from harbord.config import default_socket
from harbord.harbor_endpoints import Endpoint, Param
from harbord.schemas import Intent, Plan

T = TypeVar("T")
A = TypeVar("A")  # an endpoint's answer type
B = TypeVar("B")  # an endpoint's body type
Chunk = dict[str, Any]
Message = Mapping[str, Any]
Tools = Sequence[Mapping[str, Any]] | None
BASE_URL = "http://harbor"
CONNECT_TIMEOUT = 5.0


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


def decode(content: bytes, tp: type[T]) -> T:
    try:
        return msgspec.json.decode(content, type=tp)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise unexpected(err) from None


def unexpected(err: Exception) -> HarborError:
    return HarborError(None, f"unexpected answer from harbord ({err}); versions differ?")


@dataclass(frozen=True)
class Reply(Generic[A]):
    """An answer from one of harbord's endpoints: the bytes and what they decode to."""

    raw: bytes  # harbord's answer as it came (JSON, or the text of /metrics)
    value: A  # decoded with the endpoint's answer type


def error_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # OpenAI's error object, restart's answer
        return error_text(value.get("error")) or error_text(value.get("message"))
    return None


def checked(resp: httpx.Response) -> httpx.Response:
    if resp.is_success:
        return resp
    try:
        text = error_text(msgspec.json.decode(resp.content))
    except msgspec.DecodeError:
        text = resp.text.strip()[:300]
    raise HarborError(resp.status_code, text or f"HTTP {resp.status_code} {resp.reason_phrase}")


def parse_chunk(line: str) -> Chunk | None:
    if not line.strip():
        return None
    try:
        chunk = msgspec.json.decode(line)
    except msgspec.DecodeError:
        raise HarborError(None, f"harbord sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise HarborError(None, f"harbord sent a line that is not an object: {line[:80]!r}")
    if "error" in chunk:
        raise HarborError(None, error_text(chunk) or line[:300])
    return chunk


@contextmanager
def transport_errors(socket: Path) -> Iterator[None]:
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


def endpoint_request(
    http: httpx.Client | httpx.AsyncClient,
    endpoint: Endpoint[B, A],
    body: B | None,
    params: Mapping[str, Param],
) -> httpx.Request:
    if (body is None) != (endpoint.body is None):
        needs = "needs a body" if body is None else "takes no body"
        raise TypeError(f"{endpoint.name} {needs}")
    path, query = endpoint.target(params)
    if body is None:
        return http.build_request(endpoint.method, path, params=query)
    content = endpoint.encode_body(body)
    headers = {"Content-Type": "application/json"}
    return http.build_request(endpoint.method, path, params=query, content=content, headers=headers)


def endpoint_reply(endpoint: Endpoint[Any, A], resp: httpx.Response) -> Reply[A]:
    raw = checked(resp).content
    try:
        return Reply(raw, endpoint.decode_answer(raw))
    except msgspec.DecodeError as err:  # ValidationError is one
        raise unexpected(err) from None


def ollama_request(
    http: httpx.Client | httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    intent: Intent | None,
    backend: str | None,
) -> httpx.Request:
    """A request to one of Ollama's endpoints, with harbord's routing headers."""
    headers: dict[str, str] = {"X-Harbor-Intent": intent} if intent else {}
    if backend:
        headers["X-Harbor-Backend"] = backend
    return http.build_request("POST", path, json=body, headers=headers)


def chat_body(
    model: str, messages: Sequence[Message], tools: Tools, stream: bool, fields: Mapping[str, Any]
) -> dict[str, Any]:
    body = {"model": model, "messages": list(messages), "stream": stream, **fields}
    if tools is not None:
        body["tools"] = list(tools)
    return body


def socket_path(socket: str | Path | None = None) -> Path:
    """The given socket, else $HARBOR_SOCKET, else $XDG_RUNTIME_DIR/harbor.sock."""
    return Path(socket) if socket is not None else default_socket(os.environ)


def first_backend(plan: Plan) -> str | None:
    return plan.steps[0].backend if plan.steps else None


class ClientBase:
    """The socket, the timeouts and who served the latest chat: what both clients hold."""

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
