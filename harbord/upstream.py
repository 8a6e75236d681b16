"""A small HTTP/1.1 client to the backends, on raw asyncio protocols: sending a request
(Pools.request) and reading its answer (Exchange); harbord's own small requests off the
request path (the prober, model facts, warm-up) go through Pools.fetch and fetch_json.

The relay's hop to a backend is its hottest path: this client writes the request head
harbord builds (and a request body, whole or streamed), and hands over the answer's body
bytes as they arrive, framed by http1.ResponseParser, pausing the backend while the reader
lags. Connections (upstream_conn) are kept alive per backend and reused only after a
complete answer; `Exchange.close()` aborts an unfinished one at once, so the backend sees
the client go away. Every failure is an UpstreamError (defined in upstream_conn, imported
from here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TypeVar

import msgspec
from multidict import CIMultiDict

from harbord.http1 import DONE, ParseError, ResponseParser
from harbord.schemas import UNDECODABLE
from harbord.upstream_conn import (
    KEEPALIVE,
    MAX_IDLE,
    AnswerTimeout,
    BadResponse,
    Conn,
    ConnectError,
    ConnectTimeout,
    Disconnected,
    Pool,
    RequestBodyError,
    StatusError,
    Undecodable,
    UpstreamError,
)

# What callers import from here, whichever module defines it.
__all__ = [
    "HIGH_WATER",
    "KEEPALIVE",
    "LOW_WATER",
    "MAX_IDLE",
    "AnswerTimeout",
    "BadResponse",
    "Conn",
    "ConnectError",
    "ConnectTimeout",
    "Disconnected",
    "Exchange",
    "Pool",
    "Pools",
    "RequestBodyError",
    "StatusError",
    "Undecodable",
    "UpstreamError",
]

HIGH_WATER = 256 * 1024  # buffered body bytes before the backend is paused
LOW_WATER = 64 * 1024

FETCH_LIMIT = 16 * 1024 * 1024  # the largest answer Pools.fetch reads (a long /api/tags)

_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_JSON = (("Content-Type", "application/json"),)

T = TypeVar("T")


class Pools:
    """One pool per backend URL."""

    def __init__(self) -> None:
        self.pools: dict[str, Pool] = {}

    def get(self, url: str) -> Pool:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = Pool(url)
        return pool

    async def request(
        self,
        url: str,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes],
        connect_timeout: float,
        content_length: int | None = None,
    ) -> Exchange:
        """Send one request; the answer is read with the returned Exchange.

        `body` is bytes, or an async iterable of bytes streamed to the backend as it comes:
        chunked, or with `content_length` exactly that many bytes. A streamed body always
        goes on a new connection and is never sent twice; the answer can be read while it
        is still being written (a backend may answer before the body's end).
        """
        pool = self.get(url)
        lines = [f"{method} {path_qs} HTTP/1.1\r\n".encode(), b"Host: ", pool.host_header]
        for name, value in headers:
            lines.append(f"\r\n{name}: {value}".encode("utf-8", "surrogateescape"))
        if isinstance(body, bytes):
            if content_length is not None and content_length != len(body):
                raise ValueError(f"content_length {content_length} but {len(body)} bytes")
            lines.append(b"\r\nContent-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
            message = b"".join(lines)
            conn = pool.take()
            # A reused connection the backend closed before answering is tried again once on
            # a new one, for the methods aiohttp would retry (a POST is not sent twice).
            retry = conn is not None and method in _IDEMPOTENT
            if conn is None:
                conn = await pool.connect(connect_timeout)
            exchange = Exchange(pool, conn, method == "HEAD", message, connect_timeout, retry)
            conn.transport.write(message)
            return exchange
        if content_length is None:
            lines.append(b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif content_length < 0:
            raise ValueError(f"content_length {content_length} < 0")
        else:
            lines.append(b"\r\nContent-Length: %d\r\n\r\n" % content_length)
        message = b"".join(lines)
        # A pooled connection may have been closed by the backend since: the body could not
        # be sent again, so it gets a fresh one.
        conn = await pool.connect(connect_timeout)
        exchange = Exchange(pool, conn, method == "HEAD", message, connect_timeout, False)
        conn.transport.write(message)
        exchange._start_body(body, content_length)
        return exchange

    async def answer(
        self,
        url: str,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        connect_timeout: float,
        limit: int,
    ) -> tuple[Exchange, bytes]:
        """One request whose answer is wanted whole (its first `limit` bytes), not relayed:
        the exchange (status, headers) and the body; the connection is pooled again or,
        when the answer was cut short or left unread, closed."""
        exchange = await self.request(url, method, path_qs, headers, body, connect_timeout)
        try:
            await exchange.response_head()
            return exchange, await exchange.read_body(limit)
        finally:
            exchange.close()

    async def fetch(
        self, url: str, method: str, path: str, timeout: float, body: bytes = b""
    ) -> bytes:
        """One of harbord's own requests (a JSON body, if any), its 200 answer read whole
        within `timeout` seconds. Raises the UpstreamError family only: ConnectError,
        ConnectTimeout or AnswerTimeout (`.timeout`), StatusError for another status."""
        headers = _JSON if body else ()
        try:
            async with asyncio.timeout(timeout) as deadline:
                exchange, answer = await self.answer(
                    url, method, path, headers, body, timeout, FETCH_LIMIT
                )
        except TimeoutError:
            if deadline.expired():
                raise AnswerTimeout(f"no whole answer within {timeout:g}s") from None
            raise
        if exchange.status != 200:
            raise StatusError(exchange.status, path)
        return answer

    async def fetch_json(
        self,
        url: str,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[T],
        timeout: float,
        body: bytes = b"",
    ) -> T:
        """`fetch`, its answer decoded; Undecodable when the decoder refuses it."""
        answer = await self.fetch(url, method, path, timeout, body)
        try:
            return decoder.decode(answer)
        except UNDECODABLE as err:
            raise Undecodable(f"{path}: {err}") from err

    def keep(self, urls: set[str]) -> None:
        """Close the pools of backends no longer configured (a reload changed their URL)."""
        for url in [u for u in self.pools if u not in urls]:
            self.pools.pop(url).close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class Exchange:
    """One request's answer: its head, then its body as it arrives."""

    def __init__(
        self, pool: Pool, conn: Conn, head_only: bool, message: bytes, timeout: float, retry: bool
    ) -> None:
        self.pool = pool
        self.status = 0
        self.content_type = "application/octet-stream"
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._head_only = head_only
        self._message, self._timeout, self._retry = message, timeout, retry
        self._writer: asyncio.Task[None] | None = None  # streams the request body
        self._reset(conn)

    def _reset(self, conn: Conn) -> None:
        self.conn: Conn | None = conn
        conn.exchange = self
        self._parser = ResponseParser(self._head_only)
        self._got_bytes = False
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- the reading side (relay.py) --------------------------------------------

    async def response_head(self) -> tuple[int, str, CIMultiDict[str]]:
        while not self._parser.head_ready:
            if self._error is not None:
                if self._retry and not self._got_bytes and isinstance(self._error, Disconnected):
                    self._retry = False
                    self._reset(conn := await self.pool.connect(self._timeout))
                    conn.transport.write(self._message)
                    continue
                raise self._error
            await self._wait()
        return self.status, self.content_type, self.headers

    async def body_sent(self) -> None:
        """Wait until a streamed request body is all written (at once for bytes, or once the
        answer came early): a deadline for the answer can start here rather than before a
        long upload. Raises the exchange's error, if it failed."""
        writer = self._writer
        if writer is not None:
            await asyncio.wait((writer,))
        if self._error is not None:
            raise self._error

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call; b"" at the end of the body."""
        parser = self._parser
        chunks = parser.chunks
        while not chunks:
            if parser.state == DONE:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        parser.size = 0
        if self._paused:
            self._paused = False
            if self.conn is not None:
                self.conn.transport.resume_reading()
        return data

    async def read_body(self, limit: int | None = None) -> bytes:
        """The whole body (or its first `limit` bytes)."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            part = await self.read_chunk()
            if not part:
                break
            parts.append(part)
            size += len(part)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    def close(self) -> None:
        """Done with this answer: abort the connection unless the answer was complete."""
        self._stop_body()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.transport.abort()
        if self._parser.state != DONE and self._error is None:
            self._error = Disconnected("closed by harbord")
        self._wake()

    async def _wait(self) -> None:
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the writing side: a streamed request body --------------------------------

    def _start_body(self, body: AsyncIterable[bytes], length: int | None) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._send_body(body, length))

    def _stop_body(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    async def _send_body(self, body: AsyncIterable[bytes], length: int | None) -> None:
        conn = self.conn
        assert conn is not None
        pieces = aiter(body)
        try:
            await self._write_body(conn, pieces, length)
        finally:
            close = getattr(pieces, "aclose", None)  # an async generator: run its cleanup now
            if close is not None:
                with contextlib.suppress(Exception):  # its failure is no news to anyone
                    await close()

    async def _write_body(
        self, conn: Conn, pieces: AsyncIterator[bytes], length: int | None
    ) -> None:
        transport = conn.transport
        sent = 0
        while True:
            try:
                piece = await anext(pieces)
            except StopAsyncIteration:
                break
            except Exception as err:  # the client went away, or its body broke
                return self._body_failed(f"reading the request body failed: {err!r}", err)
            if self.conn is not conn:
                return  # the answer is over (or failed): the rest is not needed
            if not piece:
                continue  # an empty chunk would end a chunked body
            sent += len(piece)
            if length is None:
                transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
            elif sent > length:
                return self._body_failed(f"the request body is longer than {length} bytes")
            else:
                transport.write(piece)
            if conn.write_paused and not await conn.drain():
                return  # the backend went away: the reading side says so
        if self.conn is not conn:
            return
        if length is None:
            transport.write(b"0\r\n\r\n")
        elif sent < length:
            self._body_failed(f"the request body ended after {sent} of {length} bytes")
        self._writer = None

    def _body_failed(self, message: str, cause: Exception | None = None) -> None:
        self._writer = None
        if self._parser.state == DONE or self._error is not None:
            return  # the answer is complete (or already failed): nothing more to say
        error = RequestBodyError(message)
        error.__cause__ = cause
        self._error = error
        self.close()  # aborts the backend's connection

    # -- the protocol side (Conn) ----------------------------------------------

    def lost(self, exc: Exception | None) -> None:
        self.conn = None
        self._stop_body()  # nobody left to send it to
        if self._parser.eof():
            self._finish()
        elif self._error is None:
            reason = f": {exc}" if exc else ""
            self._error = Disconnected(f"the backend closed the connection{reason}")
        self._wake()

    def _fail(self, message: str) -> None:
        self._error = BadResponse(message)
        self.close()

    def feed(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self._parser
        try:
            parser.feed(data)
        except ParseError as err:
            return self._fail(str(err))
        except Exception as err:  # a parser bug must not escape data_received either
            return self._fail(f"unparsable answer ({type(err).__name__}: {err})")
        if parser.head_ready and not self.status:
            self.status, self.content_type = parser.status, parser.content_type
            self.headers = parser.headers
        if parser.state == DONE:
            self._finish()
        elif parser.size > HIGH_WATER and not self._paused and self.conn is not None:
            self._paused = True
            self.conn.transport.pause_reading()
        if parser.chunks or parser.head_ready:
            self._wake()

    def _finish(self) -> None:
        """The answer is complete: the connection goes back to the pool if it can."""
        self._wake()
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.exchange = None
        body_unsent = self._writer is not None
        self._stop_body()
        if self._paused:
            conn.transport.resume_reading()
        parser = self._parser
        if parser.keep_alive and not parser.extra and not conn.closed and not body_unsent:
            self.pool.put(conn)
        else:
            conn.transport.abort()
