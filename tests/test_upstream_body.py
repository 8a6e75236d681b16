"""harbord.upstream: request bodies streamed to a scripted backend over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from harbord import upstream
from harbord.upstream import Disconnected, Pools, RequestBodyError
from tests.scripted_server import Serve, read_request


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line[:-2], 16)
        if not size:
            assert await reader.readuntil(b"\r\n") == b"\r\n"
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


def answer(body: bytes, status: int = 200) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


class Body:
    """A request body from `pieces`; counts what was taken and sees being stopped."""

    def __init__(self, pieces: list[bytes], fail_after: int | None = None) -> None:
        self.pieces, self.fail_after = pieces, fail_after
        self.taken = 0
        self.stopped = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for i, piece in enumerate(self.pieces):
                if i == self.fail_after:
                    raise ConnectionResetError("the client went away")
                self.taken += 1
                yield piece
                await asyncio.sleep(0)
        finally:
            self.stopped = True


async def test_chunked_upload(serve: Serve) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head
        seen.append(await read_chunked(reader))
        writer.write(answer(b"got %d" % len(seen[0])))
        head, _ = await read_request(reader)  # the connection is reused afterwards
        writer.write(answer(b"again"))
        await reader.read()

    server = await serve(handler)
    pools = Pools()
    pieces = [b"abc", b"", b"d" * 100_000, b"e"]  # the empty piece must not end the body
    ex = await pools.request(server.url, "POST", "/api/blobs/x", [], Body(pieces), 1)
    await ex.body_sent()
    assert not seen or seen == [b"".join(pieces)]  # written, not necessarily read yet
    assert (await ex.response_head())[0] == 200
    assert await ex.read_body() == b"got 100004"
    assert seen == [b"".join(pieces)]
    ex = await pools.request(server.url, "GET", "/", [], b"", 1)
    assert await ex.read_body() == b"again"
    assert server.connections == 1
    pools.close()


async def test_content_length_upload(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        assert b"Transfer-Encoding" not in head
        writer.write(answer(body[::-1]))
        await reader.read()

    server = await serve(handler)
    pools = Pools()
    ex = await pools.request(server.url, "PUT", "/", [], Body([b"ab", b"cd"]), 1, content_length=4)
    assert await ex.read_body() == b"dcba"
    pools.close()


@pytest.mark.parametrize(
    ("pieces", "words"), [([b"ab"], "after 2 of 4"), ([b"abc", b"de"], "longer")]
)
async def test_content_length_mismatch_aborts(
    serve: Serve, pieces: list[bytes], words: str
) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.append(await reader.read())  # until the abort

    server = await serve(handler)
    ex = await Pools().request(server.url, "POST", "/", [], Body(pieces), 1, content_length=4)
    with pytest.raises(RequestBodyError, match=words) as info:
        await ex.response_head()
    assert info.value.error_class == "client"
    await asyncio.wait_for(server.closed.wait(), 2)
    assert len(got[0]) <= 4  # never more than promised


async def test_client_body_failing_aborts_the_backend(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with pytest.raises(asyncio.IncompleteReadError):
            await read_chunked(reader)  # no final chunk: the backend sees a cut, not an end

    server = await serve(handler)
    body = Body([b"a" * 1000] * 5, fail_after=2)
    ex = await Pools().request(server.url, "POST", "/", [], body, 1)
    with pytest.raises(RequestBodyError):
        await ex.body_sent()
    with pytest.raises(RequestBodyError) as info:
        await ex.response_head()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    assert not isinstance(info.value, Disconnected)
    await asyncio.wait_for(server.closed.wait(), 2)


async def test_early_answer_while_uploading(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b'{"error":"too large"}', 413))  # before reading the body
        await writer.drain()
        await reader.read()

    server = await serve(handler)
    pools = Pools()
    body = Body([b"x" * 65536] * 100_000)  # 6.5 GB, were it all taken
    ex = await pools.request(server.url, "POST", "/api/blobs/x", [], body, 1)
    assert (await ex.response_head())[0] == 413
    assert await ex.read_body() == b'{"error":"too large"}'
    await ex.body_sent()  # the answer ended the upload: nothing to wait for
    assert body.stopped and body.taken < 100_000
    assert not pools.get(server.url).idle  # the body was not finished: not reusable
    await asyncio.wait_for(server.closed.wait(), 2)


async def test_close_stops_the_upload(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await serve(handler)
    body = Body([b"y" * 1000] * 1_000_000)
    ex = await Pools().request(server.url, "POST", "/", [], body, 1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the relay's deadline around the head
            await ex.response_head()
    ex.close()
    await asyncio.sleep(0)
    assert body.stopped
    await asyncio.wait_for(server.closed.wait(), 2)


async def test_streamed_body_never_reuses_or_retries(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"chunked" in head:
            await read_chunked(reader)
            return  # close without answering
        writer.write(answer(b""))  # a GET without a body
        await reader.read()

    server = await serve(handler)
    pools = Pools()
    await (await pools.request(server.url, "GET", "/", [], b"", 1)).read_body()
    assert len(pools.get(server.url).idle) == 1
    ex = await pools.request(server.url, "PUT", "/", [], Body([b"z"]), 1)
    with pytest.raises(Disconnected):
        await ex.response_head()
    assert server.connections == 2  # a new connection, and no second attempt
    assert len(pools.get(server.url).idle) == 1
    pools.close()


async def test_pause_and_resume_writing(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    paused: list[bool] = []
    pause, resume = upstream.Conn.pause_writing, upstream.Conn.resume_writing

    def on_pause(self: upstream.Conn) -> None:
        paused.append(True)
        pause(self)

    def on_resume(self: upstream.Conn) -> None:
        paused.append(False)
        resume(self)

    monkeypatch.setattr(upstream.Conn, "pause_writing", on_pause)
    monkeypatch.setattr(upstream.Conn, "resume_writing", on_resume)
    go = asyncio.Event()
    piece = bytes(range(256)) * 1024  # 256 KiB
    count = 256  # 64 MiB in all

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await go.wait()  # read nothing until told
        body = await read_chunked(reader)
        writer.write(answer(b"%d %d" % (len(body), body.count(piece))))

    server = await serve(handler)
    body = Body([piece] * count)
    ex = await Pools().request(server.url, "POST", "/", [], body, 1)
    for _ in range(500):
        if paused:
            break
        await asyncio.sleep(0.01)
    assert paused == [True]
    taken = body.taken
    for _ in range(20):
        await asyncio.sleep(0)
    assert body.taken == taken < count  # the writer waits for the transport to drain
    go.set()
    assert await ex.read_body() == b"%d %d" % (len(piece) * count, count)
    assert False in paused
