"""A client's request body: read under a hard limit, and decoded with every refusal a 400.

Shared by the routed handler (server.py) and pass-through (passthrough.py), so a body
limit or a decoding rule is the same on every path that reaches a backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from harbord.errors import Problem

_T = TypeVar("_T")


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (before reading it) anything over `limit` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if request.content.is_eof():  # a small body arrives with the head: no timer needed
        return await _read_capped(request, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_capped(request, limit)
    except TimeoutError:
        raise Problem(408, f"request body not received within {timeout:g}s") from None


async def _read_capped(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"request body over the {limit} byte limit")


def decode(decoder: Callable[[bytes], _T], body: bytes) -> _T:
    """msgspec's decode, with every way it refuses untrusted bytes a 400.

    Invalid UTF-8 in a decoded string is a UnicodeDecodeError up to msgspec 0.19
    and a DecodeError ("Invalid UTF-8 encoded string") from 0.20 on; arrays or
    objects nested deeper than the recursion limit raise RecursionError.
    """
    try:
        return decoder(body)
    except UnicodeDecodeError:
        raise Problem(400, "invalid JSON: a string is not valid UTF-8") from None
    except RecursionError:
        raise Problem(400, "invalid JSON: nested too deeply") from None
    except msgspec.ValidationError as err:
        raise Problem(400, f"invalid request: {err}") from None
    except msgspec.DecodeError as err:
        if "utf-8" in str(err).lower():
            raise Problem(400, "invalid JSON: a string is not valid UTF-8") from None
        raise Problem(400, f"invalid JSON: {err}") from None
