"""A strict, incremental parser for the HTTP/1.1 answers of harbord's backends (no I/O).

`ResponseParser.feed` takes the bytes as they arrive and hands the body over in
`chunks`; anything that is not well-formed HTTP/1.1 raises `ParseError`, which
upstream.py turns into BadResponse. Stricter than RFC 9112 where a backend
(Ollama: Go's net/http) never needs the leniency: CRLF line ends only, no obsolete
line folding, no control characters in a field, `Transfer-Encoding: chunked` as
the one transfer coding. The body path (chunk sizes, data, CRLF) is the hot one:
a precompiled regex per chunk-size line and slices of the received bytes, no more.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

MAX_HEAD = 64 * 1024  # bytes in a response head (status line and fields)
MAX_HEADERS = 100  # fields in a head, and in the trailer
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_TRAILER = 16 * 1024  # bytes of trailer fields after the last chunk

HEAD, LENGTH, SIZE, DATA, CRLF, TRAILER, UNTIL_CLOSE, DONE = range(8)

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
# field-name is a token; the value is VCHAR / obs-text with inner SP/HTAB, outer OWS dropped.
_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*"
)
# 1-16 hex digits (a 64-bit size at most), then any extensions after ';'.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?")
_LENGTH = re.compile(rb"[0-9]{1,18}")


class ParseError(ValueError):
    """The bytes are not a well-formed HTTP/1.1 response."""


class ResponseParser:
    """One response: its head, then its body in `chunks` as it arrives; `done` at its end."""

    __slots__ = (
        "_buf",
        "_remaining",
        "_trailer_lines",
        "_trailer_size",
        "chunks",
        "content_type",
        "extra",
        "head_only",
        "head_ready",
        "headers",
        "keep_alive",
        "size",
        "state",
        "status",
    )

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only  # a HEAD request: the answer has no body
        self.state = HEAD
        self.status = 0
        self.content_type = "application/octet-stream"
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.head_ready = False
        self.keep_alive = True  # the connection may carry another request after this answer
        self.extra = False  # bytes arrived after the answer: the connection is not reused
        self.chunks: list[bytes] = []  # body bytes not taken yet
        self.size = 0  # their total length
        self._buf = b""
        self._remaining = 0
        self._trailer_lines = 0
        self._trailer_size = 0

    def eof(self) -> bool:
        """The connection closed: whether the answer was complete."""
        if self.state == UNTIL_CLOSE:
            self.state = DONE
        return self.state == DONE

    def feed(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        end = len(data)
        chunks = self.chunks
        while pos < end:
            state = self.state
            if state in (DATA, LENGTH):
                take = min(self._remaining, end - pos)
                chunks.append(data[pos : pos + take] if pos or take < end else data)
                self.size += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == LENGTH:
                        self._done(pos < end)
                        return
                    self.state = CRLF
            elif state == SIZE:
                eol = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if eol < 0:
                    if end - pos >= MAX_CHUNK_LINE:
                        raise ParseError("chunk-size line too long")
                    break
                match = _CHUNK_SIZE.fullmatch(data, pos, eol)
                if match is None:
                    raise ParseError(f"bad chunk-size line {data[pos:eol][:40]!r}")
                size = int(match[1], 16)
                pos = eol + 2
                if size:
                    self.state, self._remaining = DATA, size
                else:
                    self.state = TRAILER
            elif state == CRLF:
                if end - pos < 2:
                    if data[pos:] != b"\r":
                        raise ParseError("chunk data not followed by CRLF")
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ParseError("chunk data not followed by CRLF")
                pos += 2
                self.state = SIZE
            elif state == TRAILER:
                pos = self._trailer(data, pos, end)
                if self.state == DONE:
                    return
                if pos < 0:
                    pos = -pos - 1
                    break
            elif state == HEAD:
                pos = self._head(data, pos, end)
                if pos < 0:
                    pos = -pos - 1
                    break
                if self.state == LENGTH and not self._remaining:
                    self._done(pos < end)  # HEAD, 204, 304 or Content-Length: 0
                    return
            elif state == UNTIL_CLOSE:
                chunks.append(data[pos:] if pos else data)
                self.size += end - pos
                return
            else:  # DONE
                self.extra = True
                return
        if pos < end:
            self._buf = data[pos:]

    def _done(self, extra: bool) -> None:
        self.state = DONE
        self.extra = self.extra or extra

    def _trailer(self, data: bytes, pos: int, end: int) -> int:
        """Read trailer fields (checked, then dropped); -(pos + 1) when more bytes are needed."""
        while True:
            eol = data.find(b"\r\n", pos)
            limit = MAX_TRAILER - self._trailer_size
            if eol < 0:
                if end - pos > limit:
                    raise ParseError("trailer too large")
                return -(pos + 1)
            if eol == pos:
                self._done(eol + 2 < end)
                return eol + 2
            if eol - pos > limit or self._trailer_lines >= MAX_HEADERS:
                raise ParseError("trailer too large")
            if _FIELD.fullmatch(data, pos, eol) is None:
                raise ParseError(f"malformed trailer line {data[pos:eol][:40]!r}")
            self._trailer_size += eol + 2 - pos
            self._trailer_lines += 1
            pos = eol + 2

    def _head(self, data: bytes, pos: int, end: int) -> int:
        """Parse one head; the position after it, or -(pos + 1) when more bytes are needed."""
        if end - pos >= 5 and not data.startswith(b"HTTP/", pos):
            raise ParseError(f"not an HTTP answer: {data[pos : pos + 20]!r}")
        cut = data.find(b"\r\n\r\n", pos, pos + MAX_HEAD + 4)
        if cut < 0:
            if end - pos > MAX_HEAD:
                raise ParseError("response head too large")
            return -(pos + 1)
        lines = data[pos:cut].split(b"\r\n")
        status_line = _STATUS.fullmatch(lines[0])
        if status_line is None:
            raise ParseError(f"bad status line {lines[0][:60]!r}")
        if len(lines) > MAX_HEADERS + 1:
            raise ParseError(f"more than {MAX_HEADERS} header fields")
        status = int(status_line[2])
        if status < 100:
            raise ParseError(f"bad status {status}")
        if status == 101:
            raise ParseError("101 Switching Protocols, but no upgrade was asked for")
        headers: CIMultiDict[str] = CIMultiDict()
        length: bytes | None = None
        chunked = close = False
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            if field is None:
                if line[:1] in (b" ", b"\t"):
                    raise ParseError("obsolete line folding in the head")
                raise ParseError(f"malformed header line {line[:60]!r}")
            raw_name, raw_value = field[1], field[2]
            name = raw_name.decode("ascii")
            value = raw_value.decode("utf-8", "surrogateescape")
            headers.add(name, value)
            low = raw_name.lower()
            if low == b"content-length":
                # "5, 5" and repeated equal fields are one length (RFC 9110 §8.6).
                values = {v.strip() for v in raw_value.split(b",")}
                if len(values) != 1:
                    raise ParseError("conflicting Content-Length values")
                (one,) = values
                if _LENGTH.fullmatch(one) is None:
                    raise ParseError(f"bad Content-Length {raw_value[:30]!r}")
                if length is not None and one != length:
                    raise ParseError("conflicting Content-Length fields")
                length = one
            elif low == b"transfer-encoding":
                # Only chunked: the relay hands on decoded bytes and drops this field, so any
                # other coding would reach the client undecoded and unlabelled.
                if chunked:
                    raise ParseError("more than one Transfer-Encoding field")
                if raw_value.lower() != b"chunked":
                    raise ParseError(f"unsupported Transfer-Encoding {raw_value[:30]!r}")
                chunked = True
            elif low == b"connection":
                close = close or b"close" in (t.strip() for t in raw_value.lower().split(b","))
            elif low == b"content-type":
                self.content_type = value.split(";", 1)[0].strip().lower()
        if status < 200:  # 100 Continue and the like: the answer follows
            self.content_type = "application/octet-stream"
            return cut + 4
        # HTTP/1.0 assumes no persistent connection.
        self.keep_alive = not close and status_line[1] == b"1"
        self.status, self.headers, self.head_ready = status, headers, True
        if self.head_only or status == 204 or status == 304:
            self.state, self._remaining = LENGTH, 0
        elif chunked:
            self.state = SIZE
            if length is not None:
                self.keep_alive = False  # framed two ways: the chunks win, the connection goes
        elif length is not None:
            self.state, self._remaining = LENGTH, int(length)
        else:
            self.state, self.keep_alive = UNTIL_CLOSE, False
        return cut + 4
