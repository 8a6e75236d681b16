"""The connection guard: peer credentials, and the timer on the first request head."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from harbord.guard import GuardedProtocol, GuardedSite, HeadEndScanner, PeerPolicy, peer_uid

# A head longer than the 4 KiB the timer used to look at: 60 headers of 100 bytes.
BIG_HEAD = (
    b"POST /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n"
    + b"".join(b"X-Pad-%02d: " % i + b"p" * 88 + b"\r\n" for i in range(60))
    + b"\r\n"
)
BODY = b"{}"


# -- peer credentials ----------------------------------------------------------------


class FakeUnixSocket:
    family = socket.AF_UNIX

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.ucred = struct.pack("iII", pid, uid, gid)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        assert size == len(self.ucred)
        return self.ucred


class FakeTransport(asyncio.Transport):
    def __init__(self, sock: object = None) -> None:
        super().__init__()
        self.sock = sock
        self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class RecordingProtocol(asyncio.Protocol):
    """Stands in for aiohttp's protocol: remembers what reached it."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


@pytest.mark.parametrize("uid", [1000, 2**31 - 1, 2**31, 2**31 + 5, 2**32 - 2])
def test_peer_uid_is_unsigned(uid: int) -> None:
    transport = FakeTransport(FakeUnixSocket(pid=4321, uid=uid, gid=2**32 - 3))
    assert peer_uid(transport) == uid


def test_peer_uid_is_none_off_a_unix_socket() -> None:
    assert peer_uid(FakeTransport(None)) is None
    tcp = socket.socket(socket.AF_INET)
    try:
        assert peer_uid(FakeTransport(tcp)) is None
    finally:
        tcp.close()


@pytest.mark.parametrize("uid", [2**31 + 5, 2**32 - 2])
async def test_an_owner_with_a_large_uid_is_served(uid: int) -> None:
    policy = PeerPolicy(allow_root=False)
    policy.uid = uid  # as if harbord ran as that user
    inner = RecordingProtocol()
    guarded = GuardedProtocol(inner, policy, head_timeout=60)
    transport = FakeTransport(FakeUnixSocket(pid=1, uid=uid, gid=uid))
    guarded.connection_made(transport)
    try:
        assert inner.transport is transport
        guarded.data_received(b"GET / HTTP/1.1\r\n\r\n")
        assert inner.received == b"GET / HTTP/1.1\r\n\r\n"
        assert transport.written == b""
    finally:
        guarded.connection_lost(None)


async def test_another_large_uid_is_refused() -> None:
    policy = PeerPolicy(allow_root=False)
    policy.uid = 2**31 + 5
    inner = RecordingProtocol()
    guarded = GuardedProtocol(inner, policy, head_timeout=60)
    transport = FakeTransport(FakeUnixSocket(pid=1, uid=2**32 - 2, gid=0))
    guarded.connection_made(transport)
    try:
        assert inner.transport is None
        guarded.data_received(b"GET / HTTP/1.1\r\n\r\n")
        assert transport.written.startswith(b"HTTP/1.1 403")
        assert transport.closed
        assert inner.received == b""
    finally:
        guarded.connection_lost(None)


# -- finding the end of the head -------------------------------------------------------------


def pieces_at(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def three_way_splits(length: int, near: int) -> Iterator[tuple[int, int]]:
    """Every pair of cuts within 6 bytes of `near` (the end of the head)."""
    span = range(max(0, near - 6), min(length, near + 2) + 1)
    for first in span:
        for second in span:
            if first <= second:
                yield first, second


def scanner_verdicts(pieces: list[bytes]) -> list[bool]:
    scanner = HeadEndScanner()
    return [scanner.feed(piece) for piece in pieces]


def expected_verdicts(pieces: list[bytes], head_length: int) -> list[bool]:
    """True from the first piece whose end reaches the end of the head."""
    verdicts, seen = [], 0
    for piece in pieces:
        seen += len(piece)
        verdicts.append(seen >= head_length)
    return verdicts


def test_the_head_end_is_found_at_every_two_way_split() -> None:
    request = BIG_HEAD + BODY
    for cut in range(len(request) + 1):
        pieces = pieces_at(request, cut)
        assert scanner_verdicts(pieces) == expected_verdicts(pieces, len(BIG_HEAD)), cut


def test_the_head_end_is_found_at_every_three_way_split_near_it() -> None:
    request = BIG_HEAD + BODY
    for cuts in three_way_splits(len(request), len(BIG_HEAD)):
        pieces = pieces_at(request, *cuts)
        assert scanner_verdicts(pieces) == expected_verdicts(pieces, len(BIG_HEAD)), cuts


def test_the_head_end_is_found_one_byte_at_a_time() -> None:
    pieces = [BIG_HEAD[i : i + 1] for i in range(len(BIG_HEAD))]
    verdicts = scanner_verdicts(pieces)
    assert verdicts[-1] is True
    assert not any(verdicts[:-1])


def test_lone_line_feeds_and_a_single_crlf_are_not_the_end() -> None:
    scanner = HeadEndScanner()
    for piece in (b"GET / HTTP/1.1\r\n", b"A: b\n\n", b"\r\n", b"C: d\r", b"\n\r", b"\r\n\n"):
        assert not scanner.feed(piece), piece
    assert scanner.feed(b"\r\n\r\n")


# -- the protocol, driven with a fake transport ---------------------------------------------


async def test_the_timer_stops_at_the_head_end_at_every_split() -> None:
    request = BIG_HEAD + BODY
    splits: list[tuple[int, ...]] = [(cut,) for cut in range(len(request) + 1)]
    splits += list(three_way_splits(len(request), len(BIG_HEAD)))
    for cuts in splits:
        inner = RecordingProtocol()
        guarded = GuardedProtocol(inner, None, head_timeout=60)
        transport = FakeTransport()
        guarded.connection_made(transport)
        pieces, seen = pieces_at(request, *cuts), 0
        for piece in pieces:
            guarded.data_received(piece)
            seen += len(piece)
            assert guarded.awaiting_head is (seen < len(BIG_HEAD)), (cuts, seen)
        assert inner.received == request, cuts
        assert not transport.closed
        guarded.connection_lost(None)


async def test_a_complete_head_is_not_cut_and_a_partial_one_is() -> None:
    complete, partial = FakeTransport(), FakeTransport()
    for transport, data in ((complete, BIG_HEAD), (partial, BIG_HEAD[:-1])):
        guarded = GuardedProtocol(RecordingProtocol(), None, head_timeout=0.01)
        guarded.connection_made(transport)
        for i in range(0, len(data), 1000):
            guarded.data_received(data[i : i + 1000])
    # The timers were due long before this sleep ends (the loop runs them in order).
    await asyncio.sleep(0.2)
    assert not complete.closed
    assert partial.closed


# -- a real socket and a real aiohttp server ------------------------------------------------

HEAD_TIMEOUT = 0.3


async def stream(request: web.Request) -> web.StreamResponse:
    """Answers in two chunks, the second well after the head timer would have fired."""
    await request.read()
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"part":1}\n')
    await asyncio.sleep(HEAD_TIMEOUT * 4)
    await response.write(b'{"part":2}\n')
    await response.write_eof()
    return response


@pytest.fixture
async def guarded_socket(tmp_path: Path) -> AsyncIterator[Path]:
    app = web.Application()
    app.router.add_post("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "guard.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    site = GuardedSite(runner, sock, PeerPolicy(allow_root=os.getuid() == 0), HEAD_TIMEOUT)
    await site.start()
    try:
        yield path
    finally:
        await runner.cleanup()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(30):  # only so a broken guard cannot hang the test
        return await reader.read()


@pytest.mark.parametrize("split", [None, len(BIG_HEAD) - 2, 4096])
async def test_a_large_head_streams_past_the_head_timeout(
    guarded_socket: Path, split: int | None
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(guarded_socket))
    request = BIG_HEAD + BODY
    for piece in [request] if split is None else [request[:split], request[split:]]:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0)
    answer = await read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"Transfer-Encoding: chunked" in answer
    assert b'{"part":1}' in answer
    assert b'{"part":2}' in answer
    assert answer.endswith(b"\r\n0\r\n\r\n"), answer[-100:]  # the chunked body is complete


async def test_a_slow_large_head_is_still_cut(guarded_socket: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(guarded_socket))
    writer.write(BIG_HEAD[:-2])  # all but the last CRLF, which never comes
    await writer.drain()
    assert await read_all(reader) == b""  # closed by the guard, nothing answered
    writer.close()
