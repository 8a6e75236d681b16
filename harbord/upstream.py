"""A small HTTP/1.1 client to the backends, on raw asyncio protocols.

The relay's hop to a backend is its hottest path: this client writes the request head
harbord builds, parses the answer's head with bytes.find and decodes Content-Length or
chunked bodies, handing the body bytes over as they arrive. Connections are kept alive per
backend and reused only after a complete answer; `Exchange.close()` aborts an unfinished
one at once, so the backend sees the client go away.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDict

KEEPALIVE = 30.0  # seconds an idle connection is kept
MAX_IDLE = 256  # idle connections kept per backend
MAX_HEAD = 64 * 1024
HIGH_WATER = 256 * 1024  # buffered body bytes before the backend is paused
LOW_WATER = 64 * 1024

_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_HEAD, _LENGTH, _SIZE, _DATA, _CRLF, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamError(Exception):
    """The backend broke the exchange: closed mid-answer, or sent something not HTTP."""


class ConnectError(UpstreamError):
    """The backend could not be reached (refused, unreachable, no such host)."""

    def __init__(self, err: OSError) -> None:
        # asyncio's own loop says "Connect call failed (...)" where uvloop says the errno's text.
        self.reason = (os.strerror(err.errno) if err.errno else err.strerror) or type(err).__name__
        super().__init__(self.reason)


class ConnectTimeout(UpstreamError):
    """Connecting took longer than connect_timeout."""


class Disconnected(UpstreamError):
    """The backend closed the connection before its answer was complete."""


class BadResponse(UpstreamError):
    """The backend's answer is not well-formed HTTP/1.1."""


class _Conn(asyncio.Protocol):
    """One connection to a backend; `exchange` is the request it is answering, if any."""

    transport: asyncio.Transport  # set by connection_made, before the connection is used

    def __init__(self) -> None:
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange._lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange._feed(data)
        else:
            self.transport.abort()  # bytes nobody asked for: this connection is unusable


class Pool:
    """Keep-alive connections to one backend."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        self.host_header = parts.netloc.encode()
        self.idle: collections.deque[_Conn] = collections.deque()

    async def connect(self, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout) as deadline:
                _, conn = await loop.create_connection(_Conn, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            if deadline.expired():
                raise ConnectTimeout(f"connect timeout after {timeout:g}s") from None
            raise
        except OSError as err:
            raise ConnectError(err) from err
        return conn

    def take(self) -> _Conn | None:
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn
            conn.transport.abort()
        return None

    def put(self, conn: _Conn) -> None:
        conn.idle_since = now = time.monotonic()
        idle = self.idle
        idle.append(conn)
        while idle and (len(idle) > MAX_IDLE or now - idle[0].idle_since >= KEEPALIVE):
            idle.popleft().transport.abort()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().transport.abort()


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
        body: bytes,
        connect_timeout: float,
    ) -> Exchange:
        """Send one request; the answer is read with the returned Exchange."""
        pool = self.get(url)
        lines = [f"{method} {path_qs} HTTP/1.1\r\n".encode(), b"Host: ", pool.host_header]
        for name, value in headers:
            lines.append(f"\r\n{name}: {value}".encode("utf-8", "surrogateescape"))
        lines.append(b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        message = b"".join(lines)
        conn = pool.take()
        # A reused connection the backend closed before answering is tried again once on a
        # new one, for the methods aiohttp would retry (a POST is not sent twice).
        retry = conn is not None and method in _IDEMPOTENT
        if conn is None:
            conn = await pool.connect(connect_timeout)
        exchange = Exchange(pool, conn, method == "HEAD", message, connect_timeout, retry)
        conn.transport.write(message)
        return exchange

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
        self, pool: Pool, conn: _Conn, head_only: bool, message: bytes, timeout: float, retry: bool
    ) -> None:
        self.pool = pool
        self.status = 0
        self.content_type = "application/octet-stream"
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._head_only = head_only
        self._message, self._timeout, self._retry = message, timeout, retry
        self._reset(conn)

    def _reset(self, conn: _Conn) -> None:
        self.conn: _Conn | None = conn
        conn.exchange = self
        self._state = _HEAD
        self._buf = b""
        self._remaining = 0
        self._keep_alive = True
        self._got_bytes = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head_ready = False

    # -- the reading side (relay.py) --------------------------------------------

    async def response_head(self) -> tuple[int, str, CIMultiDict[str]]:
        while not self._head_ready:
            if self._error is not None:
                if self._retry and not self._got_bytes and isinstance(self._error, Disconnected):
                    self._retry = False
                    self._reset(conn := await self.pool.connect(self._timeout))
                    conn.transport.write(self._message)
                    continue
                raise self._error
            await self._wait()
        return self.status, self.content_type, self.headers

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call; b"" at the end of the body."""
        while not self._chunks:
            if self._state == _DONE:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
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
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.transport.abort()
        if self._state != _DONE and self._error is None:
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

    # -- the protocol side (_Conn) ----------------------------------------------

    def _lost(self, exc: Exception | None) -> None:
        self.conn = None
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
        elif self._state != _DONE and self._error is None:
            reason = f": {exc}" if exc else ""
            self._error = Disconnected(f"the backend closed the connection{reason}")
        self._wake()

    def _fail(self, message: str) -> None:
        self._error = BadResponse(message)
        self.close()

    def _feed(self, data: bytes) -> None:
        self._got_bytes = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        end = len(data)
        chunks = self._chunks
        before = len(chunks)
        while pos < end:
            state = self._state
            if state in (_DATA, _LENGTH):
                take = min(self._remaining, end - pos)
                chunks.append(data[pos : pos + take] if pos or take < end else data)
                self._size += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == _LENGTH:
                        self._finish(pos < end)
                        break
                    self._state = _CRLF
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        return self._fail("chunk size line too long")
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    return self._fail("bad chunk size")
                if size < 0:
                    return self._fail("bad chunk size")
                pos = eol + 2
                self._state, self._remaining = (_DATA, size) if size else (_TRAILER, 0)
            elif state == _CRLF:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    return self._fail("chunk not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                done = eol == pos
                pos = eol + 2
                if done:
                    self._finish(pos < end)
                    break
            elif state == _HEAD:
                cut = data.find(b"\r\n\r\n", pos)
                if cut < 0:
                    if end - pos > MAX_HEAD:
                        return self._fail("response head too large")
                    break
                if not self._parse_head(data[pos:cut]):
                    return
                pos = cut + 4
                if self._state == _LENGTH and not self._remaining:
                    self._finish(pos < end)  # HEAD, 204, 304 or Content-Length: 0
                    break
            elif state == _UNTIL_CLOSE:
                chunks.append(data[pos:] if pos else data)
                self._size += end - pos
                pos = end
            else:  # _DONE: bytes after the answer
                self._keep_alive = False
                break
        if pos < end and self._state != _DONE:
            self._buf = data[pos:]
        if len(chunks) != before or self._state == _DONE or self._head_ready:
            self._wake()
        if self._size > HIGH_WATER and not self._paused and self.conn is not None:
            self._paused = True
            self.conn.transport.pause_reading()

    def _parse_head(self, head: bytes) -> bool:
        eol = head.find(b"\r\n")
        status_line = head if eol < 0 else head[:eol]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._fail("not an HTTP/1.1 answer")
            return False
        status = int(parts[1])
        if 100 <= status < 200:  # 100 Continue and the like: the answer follows
            return True
        headers: CIMultiDict[str] = CIMultiDict()
        length: int | None = None
        chunked = False
        if eol >= 0:
            for line in head[eol + 2 :].split(b"\r\n"):
                colon = line.find(b":")
                if colon <= 0:
                    self._fail("malformed header line")
                    return False
                name = line[:colon].strip().decode("latin-1")
                value = line[colon + 1 :].strip().decode("utf-8", "surrogateescape")
                headers.add(name, value)
                low = name.lower()
                if low == "content-length":
                    if not value.isdigit() or (length is not None and int(value) != length):
                        self._fail("bad Content-Length")
                        return False
                    length = int(value)
                elif low == "transfer-encoding":
                    chunked = value.lower().endswith("chunked")
                elif low == "connection" and "close" in value.lower():
                    self._keep_alive = False
                elif low == "content-type":
                    self.content_type = value.split(";", 1)[0].strip().lower()
        self.status, self.headers, self._head_ready = status, headers, True
        if self._head_only or status in (204, 304):
            self._state, self._remaining = _LENGTH, 0
        elif chunked:
            self._state = _SIZE
        elif length is not None:
            self._state, self._remaining = _LENGTH, length
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False
        return True

    def _finish(self, extra: bool) -> None:
        self._state = _DONE
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.exchange = None
        if self._paused:
            conn.transport.resume_reading()
        if self._keep_alive and not extra and not conn.closed:
            self.pool.put(conn)
        else:
            conn.transport.abort()
