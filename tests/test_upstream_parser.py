"""harbord.http1 through harbord.upstream: every way an answer is refused, without sockets.

The answer's bytes go into the real protocol (`Conn.data_received`) over a fake transport,
so these tests also check that nothing raises out of data_received and that a refused
answer aborts the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harbord import http1, upstream
from harbord.upstream import (
    BadResponse,
    ConnectError,
    ConnectTimeout,
    Disconnected,
    RequestBodyError,
    UpstreamError,
)


class FakeTransport(asyncio.Transport):
    """Records what the protocol does to it; abort() reports the loss as a socket would."""

    def __init__(self, conn: upstream.Conn) -> None:
        super().__init__()
        self.conn = conn
        self.aborted = False
        self.reading = True
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Fed:
    """One answer fed to an Exchange in pieces; `error` is what reading it raised."""

    def __init__(self, pieces: list[bytes], head_only: bool = False, eof: bool = True) -> None:
        self.pool = upstream.Pool("http://127.0.0.1:9")
        self.conn = upstream.Conn()
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)
        self.exchange = upstream.Exchange(self.pool, self.conn, head_only, b"", 1, False)
        self.pieces, self.eof = pieces, eof
        self.status = 0
        self.body = b""
        self.error: UpstreamError | None = None

    async def run(self) -> Fed:
        for piece in self.pieces:
            if self.conn.closed or self.transport.aborted:
                break
            self.conn.data_received(piece)  # raising here would fail the test
        if self.eof and not self.transport.aborted:
            self.transport.aborted = True  # the backend closed the connection
            self.conn.connection_lost(None)
        try:
            self.status = (await self.exchange.response_head())[0]
            self.body = await self.exchange.read_body()
        except UpstreamError as err:
            self.error = err
        return self


async def feed(wire: bytes, head_only: bool = False, eof: bool = True) -> Fed:
    return await Fed([wire], head_only, eof).run()


async def rejected(wire: bytes, match: str) -> None:
    fed = await feed(wire)
    assert isinstance(fed.error, BadResponse), (wire, fed.error)
    assert match in str(fed.error)
    assert fed.transport.aborted


def ok_head(*fields: str) -> bytes:
    return "".join(["HTTP/1.1 200 OK\r\n", *(f + "\r\n" for f in fields), "\r\n"]).encode()


CHUNKED = ok_head("Transfer-Encoding: chunked")


def test_error_classes() -> None:
    assert UpstreamError.error_class == "network"
    assert ConnectError(ConnectionRefusedError(111, "x")).reason == "Connection refused"
    assert ConnectError.refused and ConnectError.error_class == "network"
    assert ConnectTimeout.timeout and not ConnectTimeout.refused
    assert not issubclass(ConnectTimeout, TimeoutError)  # the head deadline's stays distinct
    assert Disconnected.error_class == "network" and not Disconnected.refused
    assert BadResponse.error_class == "other"
    assert RequestBodyError.error_class == "client"
    for cls in (ConnectError, ConnectTimeout, Disconnected, BadResponse, RequestBodyError):
        assert issubclass(cls, UpstreamError)


async def test_whole_answer_and_reuse() -> None:
    fed = await feed(
        ok_head("Content-Length: 3", "Content-Type: text/plain; x=1") + b"abc", eof=False
    )
    assert (fed.status, fed.body, fed.exchange.content_type) == (200, b"abc", "text/plain")
    assert fed.pool.idle[0] is fed.conn  # complete and keep-alive: pooled


@pytest.mark.parametrize(
    ("fields", "reused"),
    [
        (("Content-Length: 0",), True),
        (("Content-Length: 0", "Connection: keep-alive, Close"), False),
        (("Transfer-Encoding: chunked", "Content-Length: 5"), False),  # TE wins, no reuse
    ],
)
async def test_reuse_rules(fields: tuple[str, ...], reused: bool) -> None:
    body = b"0\r\n\r\n" if "chunked" in str(fields) else b""
    fed = await feed(ok_head(*fields) + body, eof=False)
    assert fed.error is None and fed.body == b""
    assert bool(fed.pool.idle) is reused
    assert fed.transport.aborted is not reused


async def test_http10_not_reused_and_until_close() -> None:
    fed = await feed(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", eof=False)
    assert fed.body == b"hi" and not fed.pool.idle
    fed = await feed(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    assert (fed.error, fed.body) == (None, b"until close")


async def test_bytes_after_the_answer_close_the_connection() -> None:
    fed = await feed(ok_head("Content-Length: 1") + b"ab", eof=False)
    assert fed.body == b"a" and not fed.pool.idle and fed.transport.aborted


async def test_informational_then_answer() -> None:
    wire = b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n" + ok_head("Content-Length: 1")
    fed = await feed(wire + b"x", eof=False)
    assert (fed.status, fed.body) == (200, b"x")
    assert fed.pool.idle  # the 100's Connection field is not the answer's


async def test_trailers_read_and_dropped() -> None:
    fed = await feed(CHUNKED + b"2;a=b\r\nhi\r\n0\r\nX-T: 1\r\nY-T: 2\r\n\r\n", eof=False)
    assert fed.body == b"hi" and "X-T" not in fed.exchange.headers and fed.pool.idle


async def test_head_request_and_204_have_no_body() -> None:
    fed = await feed(ok_head("Content-Length: 10"), head_only=True, eof=False)
    assert (fed.error, fed.body) == (None, b"")
    fed = await feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n", eof=False)
    assert (fed.status, fed.body) == (204, b"")


async def test_cut_short_is_disconnected_not_bad() -> None:
    for wire in (b"HTTP/1.1 200", ok_head("Content-Length: 5") + b"ab", CHUNKED + b"5\r\nab"):
        fed = await feed(wire)
        assert isinstance(fed.error, Disconnected), wire


@pytest.mark.parametrize(
    "value",
    ["\u0663", "\u00b2", "-1", "+5", "0x5", "5 5", "", "1234567890123456789", "5;x"],
)
async def test_bad_content_length(value: str) -> None:
    await rejected(ok_head(f"Content-Length: {value}") + b"12345", "Content-Length")


async def test_content_length_repeats() -> None:
    fed = await feed(ok_head("Content-Length: 2, 2", "Content-Length: 2") + b"ab", eof=False)
    assert fed.body == b"ab"
    await rejected(ok_head("Content-Length: 2, 3") + b"ab", "conflicting Content-Length values")
    await rejected(
        ok_head("Content-Length: 2", "Content-Length: 3") + b"ab",
        "conflicting Content-Length fields",
    )


@pytest.mark.parametrize(
    "size", [b"0x1f", b"1_f", b"+a", b"-1", b" a", b"a ", b"", b"g", b"1" * 17]
)
async def test_bad_chunk_size(size: bytes) -> None:
    await rejected(CHUNKED + size + b"\r\n" + b"x" * 40 + b"\r\n0\r\n\r\n", "bad chunk-size line")


async def test_chunk_size_line_too_long() -> None:
    await rejected(CHUNKED + b"1;" + b"e" * http1.MAX_CHUNK_LINE, "chunk-size line too long")


@pytest.mark.parametrize("after", [b"XY", b"\r", b"\rX", b"X"])
async def test_chunk_not_followed_by_crlf(after: bytes) -> None:
    # b"\r" alone waits for more, then the cut says Disconnected; the rest are refused at once.
    fed = await feed(CHUNKED + b"1\r\na" + after)
    if after == b"\r":
        assert isinstance(fed.error, Disconnected)
    else:
        assert isinstance(fed.error, BadResponse) and "not followed by CRLF" in str(fed.error)


@pytest.mark.parametrize(
    "trailer",
    [
        b"X" * (http1.MAX_TRAILER + 1),  # no line end in sight
        b"X-T: " + b"v" * http1.MAX_TRAILER + b"\r\n\r\n",
        b"X-T: v\r\n" * (http1.MAX_HEADERS + 1) + b"\r\n",
    ],
)
async def test_trailer_too_large(trailer: bytes) -> None:
    await rejected(CHUNKED + b"0\r\n" + trailer, "trailer too large")


async def test_malformed_trailer() -> None:
    await rejected(CHUNKED + b"0\r\nno colon\r\n\r\n", "malformed trailer line")


@pytest.mark.parametrize("wire", [b"SSH-2.0-OpenSSH\r\n", b"<html>\r\n\r\n", b"\r\n\r\nHTTP/1.1"])
async def test_not_http(wire: bytes) -> None:
    await rejected(wire, "not an HTTP answer")


async def test_head_too_large() -> None:
    big = b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * http1.MAX_HEAD
    await rejected(big, "response head too large")  # no end in sight
    await rejected(big + b"\r\n\r\n", "response head too large")  # one piece, over the cap


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/2.0 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 200OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 \xd9\xa3\xd9\xa3\xd9\xa3 OK",
        b"HTTP/1.1 200 O\x01K",
        b"HTTP/1.1\t200 OK",
    ],
)
async def test_bad_status_line(line: bytes) -> None:
    await rejected(line + b"\r\nContent-Length: 0\r\n\r\n", "bad status line")


async def test_status_below_100_and_101() -> None:
    await rejected(b"HTTP/1.1 099 Huh\r\n\r\n", "bad status 99")
    await rejected(b"HTTP/1.1 101 Switching\r\n\r\n", "101 Switching Protocols")


async def test_too_many_fields() -> None:
    await rejected(ok_head(*["X-A: b"] * (http1.MAX_HEADERS + 1)), "more than 100 header fields")
    fed = await feed(ok_head(*["X-A: b"] * (http1.MAX_HEADERS - 1), "Content-Length: 0"))
    assert fed.error is None


async def test_obsolete_line_folding() -> None:
    await rejected(ok_head("X-A: b", " folded", "Content-Length: 0"), "obsolete line folding")
    await rejected(ok_head("X-A: b", "\tfolded", "Content-Length: 0"), "obsolete line folding")


@pytest.mark.parametrize(
    "field",
    [
        b"X-A : b",
        b"no colon",
        b": empty name",
        b"X@A: b",
        b"X-A: b\x00c",
        b"X-A: b\x7f",
        b"X-A: b\nc",
    ],
)
async def test_malformed_field(field: bytes) -> None:
    await rejected(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 0\r\n\r\n", "header line")


@pytest.mark.parametrize(
    "fields",
    [
        ("Transfer-Encoding: gzip, chunked",),
        ("Transfer-Encoding: chunked, gzip",),
        ("Transfer-Encoding: chunked, chunked",),
        ("Transfer-Encoding: identity",),
        ("Transfer-Encoding: gzip",),
    ],
)
async def test_unsupported_transfer_encoding(fields: tuple[str, ...]) -> None:
    await rejected(ok_head(*fields) + b"0\r\n\r\n", "unsupported Transfer-Encoding")


async def test_two_transfer_encoding_fields() -> None:
    wire = ok_head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked") + b"0\r\n\r\n"
    await rejected(wire, "more than one Transfer-Encoding field")
    fed = await feed(ok_head("transfer-encoding: CHUNKED") + b"0\r\n\r\n", eof=False)
    assert fed.error is None


async def test_a_parser_bug_is_a_bad_response(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: http1.ResponseParser, data: bytes) -> None:
        raise IndexError("oops")

    monkeypatch.setattr(http1.ResponseParser, "feed", broken)
    await rejected(ok_head("Content-Length: 0"), "unparsable answer (IndexError: oops)")


async def test_flow_control_pauses_and_resumes_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "HIGH_WATER", 10)
    fed = Fed([ok_head("Content-Length: 30") + b"a" * 20], eof=False)
    fed.conn.data_received(fed.pieces[0])
    assert not fed.transport.reading
    assert await fed.exchange.read_chunk() == b"a" * 20
    assert fed.transport.reading
    fed.conn.data_received(b"b" * 10)
    assert await fed.exchange.read_body() == b"b" * 10
