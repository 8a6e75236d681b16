"""harbord.upstream: the relay's raw-protocol HTTP/1.1 client, against a scripted server."""

from __future__ import annotations

import asyncio
import socket

import pytest

from harbord import upstream
from harbord.upstream import ConnectError, Disconnected, Pools
from tests.scripted_server import Serve, read_request


async def test_content_length_and_keep_alive(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            assert head.startswith(b"POST /api/x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"\r\nX-Test: v\r\n" in head
            answer = b'{"got":"' + body + b'"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )

    server = await serve(handler)
    pools = Pools()
    for i in range(3):
        ex = await pools.request(server.url, "POST", "/api/x?a=1", [("X-Test", "v")], b"%d" % i, 1)
        status, content_type, _ = await ex.response_head()
        assert (status, content_type) == (200, "application/json")
        assert await ex.read_body() == b'{"got":"%d"}' % i
        ex.close()
    assert server.connections == 1
    pools.close()


async def test_chunked_in_pieces(serve: Serve) -> None:
    payload = b"".join(b'{"n":%d}\n' % i for i in range(50))
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    wire += b"Transfer-Encoding: chunked\r\n\r\n"
    for i in range(0, len(payload), 7):
        piece = payload[i : i + 7]
        wire += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
    wire += b"0\r\nX-Trailer: t\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for i in range(0, len(wire), 5):
                writer.write(wire[i : i + 5])
                await writer.drain()
                await asyncio.sleep(0)

    server = await serve(handler)
    pools = Pools()
    for _ in range(2):
        ex = await pools.request(server.url, "GET", "/", [], b"", 1)
        assert (await ex.response_head())[:2] == (200, "application/x-ndjson")
        got = b""
        while chunk := await ex.read_chunk():
            got += chunk
        assert got == payload
        ex.close()
    assert server.connections == 1


async def test_flow_control(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "HIGH_WATER", 1024)
    payload = bytes(range(256)) * 4096

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()
        await asyncio.sleep(1)

    server = await serve(handler)
    ex = await Pools().request(server.url, "GET", "/", [], b"", 1)
    await ex.response_head()
    got = b""
    while chunk := await ex.read_chunk():
        got += chunk
        await asyncio.sleep(0)
    assert got == payload


async def test_cut_mid_answer(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()

    server = await serve(handler)
    ex = await Pools().request(server.url, "GET", "/", [], b"", 1)
    await ex.response_head()
    assert await ex.read_chunk() == b"abc"
    with pytest.raises(Disconnected):
        await ex.read_chunk()


async def test_close_aborts(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the client went away

    server = await serve(handler)
    ex = await Pools().request(server.url, "GET", "/", [], b"", 1)
    await ex.response_head()
    ex.close()
    await asyncio.wait_for(server.closed.wait(), 2)


async def test_head_and_204(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = await serve(handler)
    pools = Pools()
    ex = await pools.request(server.url, "HEAD", "/", [], b"", 1)
    assert (await ex.response_head())[0] == 200
    assert await ex.read_body() == b""
    ex = await pools.request(server.url, "DELETE", "/", [], b"", 1)
    assert (await ex.response_head())[0] == 204
    assert await ex.read_body() == b""
    assert server.connections == 1


async def test_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectError) as info:
        await Pools().request(f"http://127.0.0.1:{port}", "GET", "/", [], b"", 1)
    assert info.value.reason == "Connection refused"


async def test_keep_closes_dropped_pools(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert await reader.read() == b""  # the idle connection is closed

    server = await serve(handler)
    pools = Pools()
    ex = await pools.request(server.url, "GET", "/", [], b"", 1)
    await ex.response_head()
    assert len(pools.get(server.url).idle) == 1
    pools.keep({server.url})
    assert len(pools.get(server.url).idle) == 1
    pools.keep(set())
    assert not pools.pools
    await asyncio.wait_for(server.closed.wait(), 2)
