"""Classify a backend failure from its HTTP status and JSON error text.

Exceptions are classified by type (a refused or reset connection, a timeout),
never by their text: aiohttp's messages hold only a status line and a URL.
Words match on boundaries that also exclude '.', '-' and '_', so "chip" is not
"hip", "room" is not "oom", and a host name like "cuda-box.lan" is no driver.
"""

from __future__ import annotations

import re

import msgspec

from harbord.schemas import ErrorBody, ErrorClass


def _words(*words: str) -> re.Pattern[str]:
    alternatives = "|".join(words)
    return re.compile(rf"(?<![\w.\-/])(?:{alternatives})(?![\w\-/]|\.\w)", re.IGNORECASE)


_OOM = _words(
    r"out[ -]of[ -]memory",
    r"oom",
    r"vram",
    r"insufficient memory",
    r"cudaMalloc\w*",
    r"requires more system memory",
    r"unable to allocate",
    r"failed to allocate",
    r"not enough memory",
)
_DRIVER = _words(
    r"cuda\w*",
    r"vulkan",
    r"cublas\w*",
    r"hip",
    r"rocm",
    r"runner process has terminated",
    r"model runner has unexpectedly stopped",
    r"failed to create context",
    r"ggml_(?:cuda|vulkan|hip|rocm)\w*",
)
_MODEL = _words(
    r"not found",
    r"corrupt\w*",
    r"invalid file format",
    r"unsupported model format",
    r"unknown model architecture",
    r"model format",
)
_BUSY = _words(r"server busy", r"maximum pending requests")


def error_text(body: bytes) -> str:
    """The `error` text of an Ollama or OpenAI-style error body, else the body itself."""
    # msgspec refuses a string that is not UTF-8 (UnicodeDecodeError): read it with
    # replacement characters, as the text is only for people and for classify().
    text = body.decode("utf-8", "replace")
    try:
        found = _error_field(text)
    except RecursionError:  # nested too deeply to be an error object
        found = None
    return text[:500].strip() if found is None else found


def _error_field(text: str) -> str | None:
    try:
        return msgspec.json.decode(text, type=ErrorBody).error
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError:
        return None
    try:
        decoded = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    if isinstance(decoded, dict):
        inner = decoded.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])  # OpenAI shape, as Ollama's /v1 writes it
        if isinstance(inner, str):
            return inner
    return None


def classify(status: int, text: str) -> ErrorClass:
    """The class of an error answer (status >= 400, or an error line in a 200)."""
    if _OOM.search(text):
        return "oom"
    if status == 503 or _BUSY.search(text):
        return "busy"
    if status == 404:
        return "model"
    if 400 <= status < 500:
        # 400 "model is required", "does not support chat": the request is at fault.
        return "client"
    if _MODEL.search(text):
        return "model"
    if _DRIVER.search(text):
        return "driver"
    if status in (502, 504):
        return "network"  # something between us and Ollama gave up
    return "other"


def is_retryable(error_class: ErrorClass) -> bool:
    """Whether another backend may serve a request that failed this way."""
    return error_class != "client"
