"""harbord's own requests off the request path (upstream.Pools.fetch and fetch_json), and
the prober reading through them: each failure comes as one class of the UpstreamError
family, and a probe's timeouts are counted for hung detection."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest

from harbord.backends import Backend
from harbord.config import BackendConfig, RoutingConfig, Seconds
from harbord.health import Prober
from harbord.schemas import Version
from harbord.upstream import (
    AnswerTimeout,
    ConnectError,
    Pools,
    StatusError,
    Undecodable,
    UpstreamError,
)
from tests.scripted_server import Serve, read_request

_version = msgspec.json.Decoder(Version)


def answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


async def test_fetch_json_posts_json_and_keeps_the_connection(serve: Serve) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            heads.append(head)
            writer.write(answer(200, b'{"version":"0.9.' + body[-3:-2] + b'"}'))

    server = await serve(handler)
    pools = Pools()
    got = [
        await pools.fetch_json(server.url, "POST", "/api/show", _version, 1, b'{"n":"%d"}' % i)
        for i in range(2)
    ]
    assert [v.version for v in got] == ["0.9.0", "0.9.1"]
    assert heads[0].startswith(b"POST /api/show HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in heads[0]
    assert server.connections == 1
    pools.close()


@pytest.mark.parametrize(
    ("wire", "error", "error_class"),
    [
        (answer(500, b'{"error":"boom"}'), StatusError, "other"),
        (answer(200, b"not json"), Undecodable, "other"),
        (answer(200, b'{"version":7}'), Undecodable, "other"),  # JSON of another shape
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", UpstreamError, "network"),  # cut
    ],
)
async def test_fetch_failures_are_upstream_errors(
    serve: Serve, wire: bytes, error: type[UpstreamError], error_class: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(wire)
        await writer.drain()

    server = await serve(handler)
    pools = Pools()
    with pytest.raises(error) as caught:
        await pools.fetch_json(server.url, "GET", "/api/version", _version, 1)
    assert caught.value.error_class == error_class and not caught.value.timeout
    if isinstance(caught.value, StatusError):
        assert (caught.value.status, str(caught.value)) == (500, "/api/version answered 500")
    pools.close()


async def test_a_hung_answer_times_out_and_its_connection_is_closed(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when harbord hangs up

    server = await serve(handler)
    pools = Pools()
    with pytest.raises(AnswerTimeout) as caught:
        await pools.fetch(server.url, "GET", "/api/version", 0.2)
    assert caught.value.timeout
    await server.closed.wait()  # the stuck connection was aborted, not pooled
    assert not pools.get(server.url).idle
    pools.close()


async def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_the_prober_counts_timeouts_towards_hung_and_files_refusals(
    serve: Serve,
) -> None:
    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    server = await serve(hung)
    routing = RoutingConfig(probe_timeout=Seconds(0.2), hung_after_probes=2)
    prober = Prober(routing)
    backend = Backend("gpu", BackendConfig(url=server.url, kind="gpu"))
    await prober.probe(backend)
    assert (backend.probe_timeouts, backend.hung) == (1, False)
    await prober.probe(backend)
    assert (backend.probe_timeouts, backend.hung, backend.health) == (2, True, "down")
    assert backend.last_error == "hung: 2 probes timed out"

    refused = Backend("cpu", BackendConfig(url=await _refused_url(), kind="cpu"))
    refused.probe_timeouts = 1
    await prober.probe(refused)
    assert (refused.health, refused.cooldown, refused.probe_timeouts) == ("down", True, 0)
    assert refused.last_error == "connection refused (Connection refused)"
    await prober.stop()


async def test_the_prober_files_a_bad_status_and_a_foreign_answer(serve: Serve) -> None:
    wires = [answer(503, b"{}"), answer(200, b"<html>")]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while wires:
            await read_request(reader)
            writer.write(wires.pop(0))

    server = await serve(handler)
    prober = Prober(RoutingConfig())
    backend = Backend("gpu", BackendConfig(url=server.url, kind="gpu"))
    await prober.probe(backend)
    assert (backend.last_error, backend.last_error_class, backend.cooldown) == (
        "probe: /api/version answered 503",
        "network",
        False,
    )
    await prober.probe(backend)
    assert (backend.last_error, backend.last_error_class) == (
        "probe: /api/version did not answer like Ollama",
        "other",
    )
    await prober.stop()


async def test_connect_error_is_a_refusal() -> None:
    pools = Pools()
    with pytest.raises(ConnectError) as caught:
        await pools.fetch(await _refused_url(), "GET", "/api/ps", 1)
    assert caught.value.refused and caught.value.reason == "Connection refused"
    pools.close()
