"""Connections to the backends: the one exception family of the upstream client, one
connection's asyncio protocol, and the keep-alive pool of idle connections per backend.

A connection hands the bytes it receives, and its end, to the exchange it is serving
(harbord.upstream.Exchange, which reads one answer); between answers it waits in its
backend's Pool, up to KEEPALIVE seconds. Import these names from harbord.upstream.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
import time
from typing import ClassVar, Protocol
from urllib.parse import urlsplit

from harbord.schemas import ErrorClass

KEEPALIVE = 30.0  # seconds an idle connection is kept
MAX_IDLE = 256  # idle connections kept per backend


class UpstreamError(Exception):
    """The exchange with a backend failed. One family the relay catches once: each class says
    how the relay files it (`error_class`), and whether it was a refusal or a timeout."""

    error_class: ClassVar[ErrorClass] = "network"
    refused: ClassVar[bool] = False  # the backend refused the connection: cool it down
    timeout: ClassVar[bool] = False


class ConnectError(UpstreamError):
    """The backend could not be reached (refused, unreachable, no such host)."""

    refused = True

    def __init__(self, err: OSError) -> None:
        # asyncio's own loop says "Connect call failed (...)" where uvloop says the errno's text.
        self.reason = (os.strerror(err.errno) if err.errno else err.strerror) or type(err).__name__
        super().__init__(self.reason)


class ConnectTimeout(UpstreamError):
    """Connecting took longer than connect_timeout (not a TimeoutError: the relay's own
    deadline around the answer's head raises that)."""

    timeout = True


class Disconnected(UpstreamError):
    """The backend closed the connection before its answer was complete."""


class BadResponse(UpstreamError):
    """The backend's answer is not well-formed HTTP/1.1."""

    error_class = "other"


class RequestBodyError(UpstreamError):
    """Reading the caller's streamed request body failed (the client went away, or sent more
    or less than its Content-Length): the client's fault, not the backend's. The backend
    connection is aborted; `__cause__` holds the body's own exception, if any."""

    error_class = "client"


class AnswerTimeout(UpstreamError):
    """The answer to one of harbord's own requests (Pools.fetch) was not complete within
    its deadline."""

    timeout = True


class StatusError(UpstreamError):
    """One of harbord's own requests (Pools.fetch) was answered with a status but 200."""

    error_class = "other"

    def __init__(self, status: int, path: str) -> None:
        self.status = status
        super().__init__(f"{path} answered {status}")


class Undecodable(UpstreamError):
    """An answer to one of harbord's own requests (Pools.fetch_json) is not what Ollama
    sends: not JSON, or not of the expected shape."""

    error_class = "other"


class Receiver(Protocol):
    """What a connection serves: the exchange reading one answer (upstream.Exchange)."""

    def feed(self, data: bytes) -> None:
        """Bytes of the answer, as they arrive."""

    def lost(self, exc: Exception | None) -> None:
        """The connection is gone (`exc`: why, if it failed)."""


class Conn(asyncio.Protocol):
    """One connection to a backend; `exchange` is the request it is answering, if any."""

    transport: asyncio.Transport  # set by connection_made, before the connection is used

    def __init__(self) -> None:
        self.exchange: Receiver | None = None
        self.closed = False
        self.idle_since = 0.0
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_writer()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(data)
        else:
            self.transport.abort()  # bytes nobody asked for: this connection is unusable

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> bool:
        """Wait until the transport takes more bytes; False once the connection is gone."""
        while self.write_paused and not self.closed:
            self._drain = waiter = asyncio.get_running_loop().create_future()
            await waiter
        return not self.closed


class Pool:
    """Keep-alive connections to one backend."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        self.host_header = parts.netloc.encode()
        self.idle: collections.deque[Conn] = collections.deque()

    async def connect(self, timeout: float) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout) as deadline:
                _, conn = await loop.create_connection(Conn, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            if deadline.expired():
                raise ConnectTimeout(f"connect timeout after {timeout:g}s") from None
            raise
        except OSError as err:
            raise ConnectError(err) from err
        return conn

    def take(self) -> Conn | None:
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                return conn
            conn.transport.abort()
        return None

    def put(self, conn: Conn) -> None:
        conn.idle_since = now = time.monotonic()
        idle = self.idle
        idle.append(conn)
        while idle and (len(idle) > MAX_IDLE or now - idle[0].idle_since >= KEEPALIVE):
            idle.popleft().transport.abort()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().transport.abort()
