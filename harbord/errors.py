"""harbord's own errors: one problem type, rendered in the shape of each API family.

A handler anywhere on the request path raises `Problem(status, message)`; the
middleware in server.py renders it. Which shape the client gets depends only
on the path, the way Ollama answers: `{"error": "..."}` on its native API,
OpenAI's error object on `/v1` (the Responses API included), Anthropic's on
`/v1/messages`. An error that ends a stream after its first byte
(`stream_error`) is the last event each API's clients know how to read; the
Responses API is its own family there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec
from aiohttp import web

Family = Literal["ollama", "openai", "responses", "anthropic"]

_encode = msgspec.json.Encoder().encode

# Anthropic's error types by status (docs: "Errors"); 503 is how Ollama says busy,
# which Anthropic's SDK knows as overloaded (its own 529).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class Problem(Exception):
    """A request harbord refuses or cannot serve, with the status to answer."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def family_of(path: str) -> Family:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama"


def _openai_type(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, family: Family) -> bytes:
    if family in ("openai", "responses"):
        error = {"message": message, "type": _openai_type(status), "param": None, "code": None}
        return _encode({"error": error})
    if family == "anthropic":
        error = {"type": _anthropic_type(status), "message": message}
        return _encode({"type": "error", "error": error})
    return _encode({"error": message})


def render(problem: Problem, family: Family) -> web.Response:
    return web.Response(
        status=problem.status,
        body=error_body(problem.status, problem.message, family),
        content_type="application/json",
        headers=problem.headers,
    )


def stream_error(message: str, family: Family, sse: bool, sequence_number: int = 0) -> bytes:
    """The last message of a stream that broke after its first byte.

    `sequence_number` is the Responses API's: one more than the last event's."""
    if not sse:
        return _encode({"error": message}) + b"\n"
    if family == "anthropic":
        payload = _encode({"type": "error", "error": {"type": "api_error", "message": message}})
    elif family == "responses":
        payload = _encode(_responses_error(message, sequence_number))
    else:
        payload = _encode({"error": {"message": message, "type": "api_error"}})
    return b"event: error\ndata: " + payload + b"\n\n"


def _responses_error(message: str, sequence_number: int) -> dict[str, object]:
    """The Responses API's `error` event: the fields OpenAI documents at the top level, and
    the nested `error` object its servers send, which is what the openai SDK (1.69 and
    later) raises as `APIError` out of `responses.create(stream=True)`; without it older
    SDKs hand the event on unparsed. A `response.failed` would need the stream's response
    id (the SDK's stream helper checks it), which harbord does not read."""
    code = "server_error"
    return {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence_number,
        "error": {"type": code, "code": code, "message": message, "param": None},
    }
