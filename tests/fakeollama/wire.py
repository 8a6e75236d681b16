"""Constants, JSON and time helpers, and request decoding as Go's decoder reports it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiohttp import web

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
