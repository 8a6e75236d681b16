"""Relaying a backend's answer to the client: the first line, then whole lines.

Bytes are relayed as they arrive; no chunk is decoded or re-encoded. A stream is
relayed in whole lines: the tail of a line is held back until its newline
arrives, so a stream cut short never leaves half a line behind. After the first
byte a failure ends the stream in the API's own way (`errors.stream_error`).
"""

from __future__ import annotations

import asyncio
import logging
import re

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from harbord.classify import classify, error_text
from harbord.errors import family_of, stream_error
from harbord.schemas import ErrorClass
from harbord.upstream import Exchange, UpstreamError

log = logging.getLogger("harbord.relay")

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
# A streamed line longer than this is relayed without waiting for its end.
MAX_LINE = 1024 * 1024
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


async def first_line(upstream: Exchange) -> bytes:
    """What the backend sent up to the end of its first line (or EOF, or MAX_LINE)."""
    data = await upstream.read_chunk()
    while data and b"\n" not in data and len(data) < MAX_LINE:
        more = await upstream.read_chunk()
        if not more:
            break
        data += more
    return data


def unfinished_line(data: bytes) -> bytes:
    """The unfinished last line of `data` (b"" when it ends in a newline)."""
    cut = data.rfind(b"\n") + 1
    if cut == 0 and len(data) >= MAX_LINE:
        return b""  # no newline in sight: relay it anyway
    return data[cut:]


def looks_like_error(chunk: bytes) -> bool:
    """A first line or body that is an error object: `{"error": ...}` (or SSE `data: {"error"`)."""
    head = chunk[:64].lstrip()
    if head.startswith(b"data:"):
        head = head[5:].lstrip()
    return head.startswith(b'{"error"') or head.startswith(b'{ "error"')


def is_json(body: bytes) -> bool:
    """Whether a non-empty body is one whole JSON value (checked, not built)."""
    if not body:
        return True  # a 200 with no body (copy, delete, HEAD) is not a broken JSON answer
    try:
        msgspec.json.decode(body, type=msgspec.Raw)
    except msgspec.DecodeError:
        return False
    except RecursionError:
        return True  # too deeply nested to check here; the client will judge
    return True


def error_in_lines(lines: bytes) -> tuple[ErrorClass, str] | None:
    """The class and text of an error line the backend wrote among `lines`, if any.

    Ollama ends a stream that fails while it runs with one `{"error": ...}` line (an
    SSE `data:` event on /v1): relayed as it is, but still worth learning from."""
    for line in lines.split(b"\n"):
        if looks_like_error(line):
            text = error_text(line.strip().removeprefix(b"data:").strip())
            if text:
                return classify(500, text), text
    return None


def next_sequence_number(sent: bytes) -> int:
    """One more than the last `sequence_number` in the bytes last sent (0 if none there)."""
    numbers = _SEQUENCE.findall(sent)
    return int(numbers[-1]) + 1 if numbers else 0


async def relay_stream(
    request: web.Request,
    upstream: Exchange,
    first: bytes,
    headers: CIMultiDict[str],
    backend_name: str,
    idle: float,
) -> tuple[web.StreamResponse, tuple[ErrorClass, str] | None, bytes]:
    """Send the answer's head and every whole line; returns the failure that ended it early:
    harbord's own (the backend broke off or went quiet) or the backend's error line, and
    the last bytes relayed (where Ollama's final chunk says how long its load took).

    Raises the upstream error when it was the client that left (nothing to tell anyone)."""
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    pending = unfinished_line(first)
    sent = first[: len(first) - len(pending)]
    await response.write(sent)
    # The last two writes: where an error must start a fresh line, and the Responses
    # API's next sequence number (the last write may be an `event:` line alone, the last
    # sequence number in the write before it). Every write is a whole line, never empty.
    earlier, last = b"", sent
    loop = asyncio.get_running_loop()
    read_chunk = upstream.read_chunk
    failure: tuple[ErrorClass, str] | None = None
    # The first read may hold more than the first line, the backend's error line too.
    backend_error = error_in_lines(sent) if b'"error"' in sent else None
    # Moving the deadline on every chunk costs a timer per token; moving it by 1.5 idle
    # periods at most every half period keeps it between idle and 1.5 idle after the
    # last chunk, for one timer per half period.
    rearm_at = loop.time() + idle / 2
    try:
        async with asyncio.timeout(idle * 1.5) as idle_deadline:
            while True:
                chunk = await read_chunk()
                if not chunk:
                    break
                now = loop.time()
                if now > rearm_at:
                    idle_deadline.reschedule(now + idle * 1.5)
                    rearm_at = now + idle / 2
                if pending:
                    chunk = pending + chunk
                pending = unfinished_line(chunk)
                if len(pending) < len(chunk):
                    whole = chunk[: len(chunk) - len(pending)]
                    await response.write(whole)  # a client that left raises here
                    if b'"error"' in whole:  # a memchr per chunk, and only then a look
                        backend_error = error_in_lines(whole) or backend_error
                    earlier, last = last, whole
        if pending:
            failure = "other", f"{backend_name} ended its stream inside a line"
    except TimeoutError:
        failure = "network", f"{backend_name} sent nothing for {idle:g}s"
    except UpstreamError as err:
        if request.transport is None or request.transport.is_closing():
            raise  # the client left, not the backend
        failure = "network", f"{backend_name} broke off the stream ({type(err).__name__})"
    if failure is not None:
        sse = upstream.content_type == "text/event-stream"
        sent_last = earlier + last
        ends = b"\n\n" if sse else b"\n"
        fresh = b"" if not sent_last or sent_last.endswith(ends) else b"\n"
        family = family_of(request.path)
        sequence = next_sequence_number(sent_last) if family == "responses" else 0
        await response.write(fresh + stream_error(failure[1], family, sse, sequence))
    await response.write_eof()
    return response, failure or backend_error, earlier + last
