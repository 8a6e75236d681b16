"""What went wrong with one attempt, and what the client gets when every attempt failed.

A `Failure` is made in one of three ways: from the backend client's exception
(`from_error`), from a backend's error answer before anything reached the client
(`from_answer`), or by the relay itself (hung backend, queue full, a broken first
line). `verdict` turns the failures of a whole request into the client's answer:
the backend's own 4xx as it is, or harbord's Problem with the status that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from harbord.classify import classify, error_text
from harbord.errors import Problem
from harbord.schemas import ErrorClass
from harbord.upstream import ConnectError, UpstreamError

MAX_ERROR_BODY = 64 * 1024

# What a newcomer whose Ollama is not running needs to read, after the list of URLs.
START_HINT = (
    "start the Ollama backends (`harborctl setup` installs and enables their user units) "
    "or point harbord at running ones with OLLAMA_GPU_URL / OLLAMA_CPU_URL"
)


@dataclass(slots=True)
class Failure:
    error_class: ErrorClass
    text: str
    status: int | None = None  # the backend's status, when it answered
    body: bytes | None = None
    content_type: str | None = None
    timeout: bool = False
    refused: bool = False  # the connection was refused: cool the backend down


def from_error(backend: str, err: UpstreamError, connect_timeout: float) -> Failure:
    """A failure of the backend client (upstream.py), before the first byte."""
    if isinstance(err, ConnectError):
        return Failure("network", f"cannot connect to {backend}: {err.reason}", refused=True)
    if err.timeout:
        return Failure(
            "network", f"connecting to {backend} timed out after {connect_timeout:g}s", timeout=True
        )
    if err.error_class == "other":
        return Failure("other", f"{backend} sent a malformed answer: {err}")
    return Failure(err.error_class, f"{backend} broke the connection ({type(err).__name__})")


def hung(backend: str) -> Failure:
    return Failure("network", f"{backend} is hung (probes time out)", timeout=True)


def from_answer(status: int, body: bytes, content_type: str) -> Failure:
    text = error_text(body) or f"HTTP {status}"
    return Failure(classify(status, text), text, status, body, content_type)


def fallbacks_header(failures: list[tuple[str, Failure]]) -> str:
    """X-Harbor-Fallbacks: the backends that failed before, with their error classes."""
    return ", ".join(f"{name}={failure.error_class}" for name, failure in failures)


def verdict(
    failures: list[tuple[str, Failure]],
    request_id: str,
    tried: list[tuple[str, str]],
    answer_as_is: bool = False,
) -> web.Response:
    """The answer when no backend served: returned when it is a backend's own, else raised.

    `tried` is every backend of the plan with its URL, for a message that says where
    harbord looked when none could be reached. `answer_as_is`: any 4xx of the last
    backend is its own answer (a path harbord does not know: its 404 is the backend's)."""
    headers = {"X-Harbor-Request-Id": request_id}
    if not failures:
        raise Problem(503, none_reachable(tried), {**headers, "Retry-After": "5"})
    headers["X-Harbor-Fallbacks"] = fallbacks_header(failures)
    name, last = failures[-1]
    own = last.error_class == "client" or (answer_as_is and (last.status or 500) < 500)
    if own and last.status is not None and last.body is not None:
        # The backend's own 4xx answer goes back as it is.
        headers["X-Harbor-Backend"] = name
        return web.Response(
            status=last.status,
            body=last.body,
            content_type=last.content_type or "application/json",
            headers=headers,
        )
    classes = {f.error_class for _, f in failures}
    summary = "; ".join(f"{n}: {f.text}" for n, f in failures)
    if classes == {"model"}:
        raise Problem(404, failures[0][1].text, headers)
    if any(f.timeout for _, f in failures) and classes <= {"network", "busy"}:
        raise Problem(504, f"backend timeout: {summary}", headers)
    if classes <= {"network", "busy"}:
        message = f"no backend available: {summary}"
        if all(f.refused for _, f in failures):
            message += f"; {START_HINT}"
        raise Problem(503, message, {**headers, "Retry-After": "5"})
    status = last.status if last.status and last.status >= 500 else 502
    raise Problem(status, summary, headers)


def none_reachable(tried: list[tuple[str, str]]) -> str:
    """harbord's 503 message when none of `tried` (backend, URL) could be reached."""
    if not tried:
        return "no backend available"
    where = ", ".join(f"{name} at {url}" for name, url in tried)
    return f"no backend available: {where} cannot be reached; {START_HINT}"
