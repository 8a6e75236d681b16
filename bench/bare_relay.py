#!/usr/bin/env python3
"""Two reference relays, to show what a Python proxy hop costs without harbord's logic:

  --impl aiohttp  the bare aiohttp-to-aiohttp relay the issue mentions: aiohttp server, one
                  ClientSession upstream, uvloop; no routing, no bookkeeping. Streams with
                  readany()/write() like harbord's relay does.
  --impl raw      raw asyncio protocols on uvloop: the request head and body are forwarded as
                  they came, and the backend's answer bytes (head and chunked body as they are)
                  go to the client as they arrive; the HTTP framing is only tracked to know
                  where an answer ends. A pool of keep-alive upstream connections.

Both listen on a Unix socket and relay everything to one backend:

    python3 bench/bare_relay.py --impl raw --socket /tmp/r.sock --upstream 127.0.0.1:11434
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections import deque

# --------------------------------------------------------------------------- aiohttp


async def serve_aiohttp(sock_path: str, upstream: str) -> None:
    import aiohttp
    from aiohttp import web

    base = f"http://{upstream}"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                    skip_auto_headers=("User-Agent", "Accept-Encoding"))
    drop = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        async with session.request(request.method, base + request.path_qs, data=body, headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in drop | {"date", "server"}}
            if up.content_type in ("application/x-ndjson", "text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers=out_headers)
                await resp.prepare(request)
                while True:
                    chunk = await up.content.readany()
                    if not chunk:
                        break
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            return web.Response(status=up.status, body=await up.read(), headers=out_headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, sock_path, backlog=4096).start()
    await _wait_for_signal()
    await runner.cleanup()
    await session.close()


# --------------------------------------------------------------------------- raw


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend; forwards an answer's bytes to `client`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Downstream | None = None
        self.buf = bytearray()
        self.state = 0  # 0 head, 1 content-length, 2 chunk size line, 3 chunk data, 4 trailer, 5 until close
        self.remaining = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client, self.client = self.client, None
        if client is not None:
            client.upstream_done(self, ok=self.state == 5)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        client.send(data)  # verbatim, as it arrived
        # Track the framing only to find where this answer ends.
        buf = self.buf
        buf += data
        while True:
            st = self.state
            if st == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.state = 2
                else:
                    i = head.find(b"\r\ncontent-length:")
                    if i >= 0:
                        self.remaining = int(head[i + 17:].split(b"\r\n", 1)[0])
                        self.state = 1
                    else:
                        self.state = 5
                        return
                    if self.remaining == 0:
                        return self._done()
            elif st == 1:
                take = min(len(buf), self.remaining)
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    return self._done()
                return
            elif st == 2:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    self.state = 4
                else:
                    self.remaining = size + 2
                    self.state = 3
            elif st == 3:
                take = min(len(buf), self.remaining)
                del buf[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self.state = 2
            elif st == 4:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                del buf[: eol + 2]
                if eol == 0:
                    return self._done()
            else:
                buf.clear()
                return

    def _done(self) -> None:
        client, self.client = self.client, None
        self.state = 0
        self.buf.clear()
        self.pool.put(self)
        if client is not None:
            client.upstream_done(self, ok=True)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[Upstream] = deque()

    async def get(self) -> Upstream:
        while self.idle:
            up = self.idle.pop()
            if not up.closed:
                return up
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        return up

    def put(self, up: Upstream) -> None:
        if not up.closed:
            self.idle.append(up)


class Downstream(asyncio.Protocol):
    """One client connection on the Unix socket; one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.close_after = False
        self.upstream: Upstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        up, self.upstream = self.upstream, None
        if up is not None and up.transport is not None:
            up.client = None
            up.transport.close()  # the client left: cut the backend off

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end])
        low = head.lower()
        length = 0
        i = low.find(b"\r\ncontent-length:")
        if i >= 0:
            length = int(low[i + 17:].split(b"\r\n", 1)[0])
        if len(buf) < end + 4 + length:
            return
        request = bytes(buf[: end + 4 + length])
        del buf[: end + 4 + length]
        self.close_after = b"\r\nconnection: close" in low
        self.busy = True
        asyncio.get_running_loop().create_task(self._forward(request))

    async def _forward(self, request: bytes) -> None:
        try:
            up = await self.pool.get()
        except OSError:
            self.send(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.upstream_done(None, ok=True)
            return
        self.upstream = up
        up.client = self
        assert up.transport is not None
        up.transport.write(request)

    def upstream_done(self, up: Upstream | None, ok: bool) -> None:
        self.upstream = None
        self.busy = False
        if (not ok or self.close_after) and self.transport is not None:
            self.transport.close()
            return
        if self.buf:
            self._next()


async def serve_raw(sock_path: str, upstream: str) -> None:
    host, port = upstream.rsplit(":", 1)
    pool = Pool(host, int(port))
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Downstream(pool), sock_path, backlog=4096)
    await _wait_for_signal()
    server.close()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=["aiohttp", "raw"], required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the backend")
    a = p.parse_args()
    if os.path.exists(a.socket):
        os.unlink(a.socket)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner((serve_aiohttp if a.impl == "aiohttp" else serve_raw)(a.socket, a.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
