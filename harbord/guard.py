"""Who may talk to harbord, and how long they may take to say what they want.

- On the Unix socket every connection's peer credentials (SO_PEERCRED) are
  checked once, when it is accepted: only the daemon's own user, and root
  when `allow_root` is on, is served; anyone else gets a 403 and the door.
- A new connection must deliver its first request head within
  `client_timeout` seconds, so clients that trickle headers cannot hold
  connections open (aiohttp's keep-alive timeout bounds later heads, and the
  routed handler bounds bodies). The end of the head is found however large
  the head and however it is split across reads, keeping only three bytes.
- The optional TCP listener serves the same API; when a token file is set,
  every request needs `Authorization: Bearer <token>`, compared in constant
  time. A non-loopback listener without a token is refused by the config
  (config.is_loopback).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

log = logging.getLogger(__name__)

# struct ucred: pid_t is signed, uid_t and gid_t are not (a uid may pass 2**31).
_UCRED = struct.Struct("iII")
_HEAD_END = b"\r\n\r\n"  # the only head end aiohttp's parsers accept
# Room for a thousand clients connecting at once (the kernel caps it at somaxconn).
BACKLOG = 4096
_FORBIDDEN_BODY = b'{"error":"forbidden: this harbord serves only its own user"}'
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_FORBIDDEN_BODY)).encode() + b"\r\n\r\n" + _FORBIDDEN_BODY
)


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The peer's uid on a Unix socket; None when it can't be known (not AF_UNIX)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(data)
    return int(uid)


class HeadEndScanner:
    """Finds the blank line that ends a request head in data that comes in pieces.

    Only the last three bytes of what came before are kept, so the end is found
    where it straddles two reads, in constant memory however long the head.
    """

    __slots__ = ("_tail", "ended")

    def __init__(self) -> None:
        self._tail = b""
        self.ended = False

    def feed(self, data: bytes) -> bool:
        """Whether the head has ended, in this piece, across its start or before it."""
        if not self.ended:
            keep = len(_HEAD_END) - 1
            if _HEAD_END in self._tail + data[:keep] or _HEAD_END in data:
                self.ended, self._tail = True, b""
            else:
                self._tail = (self._tail + data[-keep:])[-keep:]
        return self.ended


class PeerPolicy:
    def __init__(self, allow_root: bool) -> None:
        self.uid = os.getuid()
        self.allow_root = allow_root

    def admits(self, uid: int | None) -> bool:
        if uid is None:
            return True  # not a Unix socket: the TCP listener's token check applies
        return uid == self.uid or (uid == 0 and self.allow_root)


class GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol: checks the peer, and times the first request head."""

    __slots__ = ("_head", "_head_timeout", "_inner", "_policy", "_refused", "_timer")

    def __init__(
        self, inner: asyncio.Protocol, policy: PeerPolicy | None, head_timeout: float
    ) -> None:
        self._inner: asyncio.Protocol | None = inner
        self._policy = policy
        self._head_timeout = head_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._head = HeadEndScanner()
        self._refused: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._policy is not None:
            try:
                uid = peer_uid(transport)
            except OSError:
                uid = -1
            if not self._policy.admits(uid):
                # Answer once the request arrives: closing with it unread would make the
                # kernel reset the connection, and the client would never see why.
                log.warning("refused a connection from uid %s", uid)
                self._inner = None
                self._refused = cast(
                    asyncio.WriteTransport, transport
                )  # uvloop's are not subclasses
                self._timer = asyncio.get_running_loop().call_later(
                    self._head_timeout, transport.close
                )
                return
        assert self._inner is not None
        self._inner.connection_made(transport)
        self._timer = asyncio.get_running_loop().call_later(
            self._head_timeout, self._too_slow, transport
        )

    def _too_slow(self, transport: asyncio.BaseTransport) -> None:
        self._timer = None
        log.info(
            "closed a connection that sent no complete request head in %gs", self._head_timeout
        )
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            if self._refused is not None:
                self._refused.write(FORBIDDEN)
                self._refused.close()
                self._refused = None
            return
        if self._timer is not None and self._head.feed(data):
            self._timer.cancel()
            self._timer = None
        self._inner.data_received(data)

    @property
    def awaiting_head(self) -> bool:
        """Whether the first request head is still being timed."""
        return self._timer is not None

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """An aiohttp site on an already-bound socket, with the guards above."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        policy: PeerPolicy | None,
        head_timeout: float,
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self._policy = policy
        self._head_timeout = head_timeout

    @property
    def name(self) -> str:
        name = self._sock.getsockname()
        return f"unix:{name}" if isinstance(name, str) else f"http://{name[0]}:{name[1]}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        policy, timeout = self._policy, self._head_timeout

        def factory() -> asyncio.Protocol:
            return GuardedProtocol(server(), policy, timeout)

        loop = asyncio.get_running_loop()
        # Pass the backlog again: create_server() listens anew, with 100 by default.
        self._server = await loop.create_server(factory, sock=self._sock, backlog=BACKLOG)


def bearer_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "unauthorized: send Authorization: Bearer <token>"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check_token


def read_token(path: str) -> str:
    """The bearer token from its file; refuses an empty or world-readable file."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} is readable by others; chmod 600 it")
    with open(path, encoding="utf-8") as handle:
        token = handle.read().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the token must be at least 16 characters")
    return token
