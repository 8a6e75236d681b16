"""Hostile and bad input on the socket: every error of harbord's own is JSON with the right
status, never a 500, never a traceback, and nothing invalid reaches a backend.

One daemon (body limit 1 MiB) in front of two fake Ollama servers for the module.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakeproc import FakeOllama
from tests.harness import Harbord, gpu_cpu

pytestmark = pytest.mark.e2e

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    with FakeOllama.start("gpu") as gpu, FakeOllama.start("cpu", cpu=True) as cpu:
        yield gpu, cpu


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, backends: tuple[FakeOllama, FakeOllama]
) -> Iterator[Harbord]:
    gpu, cpu = backends
    daemon = Harbord.start(
        tmp_path_factory.mktemp("hostile"),
        gpu_cpu(gpu, cpu),
        extra_config='max_body_size = "1MiB"\nclient_timeout = "3s"\n',
    )
    try:
        yield daemon
        log = daemon.log()
        assert "internal error" not in log
        assert "Traceback" not in log, log[-3000:]
    finally:
        assert daemon.stop() == 0


@pytest.fixture
def client(daemon: Harbord) -> Iterator[httpx.Client]:
    with daemon.client(timeout=10.0) as client:
        yield client


def assert_json_error(response: httpx.Response, status: int, text: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert isinstance(message, str) and message
    assert text in message, message
    assert "Traceback" not in response.text


def raw_exchange(path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are, read until the daemon closes or stops talking."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def chat_requests(gpu: FakeOllama, cpu: FakeOllama) -> list[dict[str, Any]]:
    """Requests relayed to the fakes, without the /api/show harbord sends for a model's shape."""
    return [
        r
        for fake in (gpu, cpu)
        for r in fake.requests()
        if r["path"].startswith(("/api/", "/v1/")) and r["path"] != "/api/show"
    ]


# --- bodies -------------------------------------------------------------------------


BAD_BODIES = [
    (b"{nope", 400, "invalid JSON"),
    (b"[", 400, "invalid"),
    (b'{"model": "llama3.2"', 400, "invalid JSON"),
    (b'{"model": "llama3.2"} trailing', 400, "invalid JSON"),
    (b"\xff\xfe{\x00}", 400, "invalid JSON"),
    (b'{"model": "llama\xff\xfe3.2"}', 400, "invalid JSON"),
    (b'{"model": "llama3.2", "intent": "heavy", "x": "\xff"}', 400, "invalid JSON"),
    (b"null", 400, "invalid request"),
    (b'"llama3.2"', 400, "invalid request"),
    (b"123", 400, "invalid request"),
    (b"[]", 400, "invalid request"),
    (b'{"model": 7}', 400, "invalid request"),
    (b'{"model": ["llama3.2"]}', 400, "invalid request"),
    (b'{"model": {"name": "llama3.2"}}', 400, "invalid request"),
    (b'{"model": true}', 400, "invalid request"),
    (b'{"model": "llama3.2", "stream": "yes"}', 400, "invalid request"),
    (b'{"model": "llama3.2", "intent": 5}', 400, "invalid request"),
    (b'{"name": 1.5}', 400, "invalid request"),
    (b"", 400, "missing request body"),
    (b"{}", 400, "model is required"),
    (b'{"model": ""}', 400, "model is required"),
    (b'{"model": null}', 400, "model is required"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model is required"),
    (b'{"model": "llama3.2", "intent": "turbo"}', 400, "unknown intent"),
    (b'{"model": "llama3.2", "intent": ""}', 400, "unknown intent"),
    (b'{"model": "llama3.2", "intent": "FAST"}', 400, "unknown intent"),
]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/api/show"])
def test_bad_bodies_are_400_and_never_reach_a_backend(
    client: httpx.Client, backends: tuple[FakeOllama, FakeOllama], path: str
) -> None:
    gpu, cpu = backends
    gpu.clear_requests()
    cpu.clear_requests()
    for body, status, text in BAD_BODIES:
        assert_json_error(client.post(path, content=body), status, text)
    assert chat_requests(gpu, cpu) == []


def test_openai_paths_answer_in_openai_shape(client: httpx.Client) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        for body, status, text in BAD_BODIES:
            response = client.post(path, content=body)
            assert_json_error(response, status, text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and "param" in error


def test_deeply_nested_json_is_a_400(
    client: httpx.Client, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    gpu.clear_requests()
    cpu.clear_requests()
    for depth in (1_500, 100_000):
        nested = b"[" * depth + b"]" * depth
        assert_json_error(
            client.post("/api/chat", content=b'{"model": "llama3.2", "messages": ' + nested + b"}"),
            400,
            "nested",
        )
        # A top-level "intent" makes harbord decode the whole body to remove it.
        assert_json_error(
            client.post(
                "/api/chat",
                content=b'{"model": "llama3.2", "intent": "heavy", "x": ' + nested + b"}",
            ),
            400,
            "nested",
        )
        assert_json_error(client.post("/api/chat", content=nested), 400, "")
    # Legitimately nested requests (tool schemas nest a few levels) still go through.
    deep_ok = {
        "model": "llama3.2",
        "stream": False,
        "messages": [{"role": "user", "content": "hi"}],
        "format": json.loads('{"a": ' * 50 + "1" + "}" * 50),
    }
    assert client.post("/api/chat", json=deep_ok).status_code == 200
    assert len(chat_requests(gpu, cpu)) == 1


# --- names ---------------------------------------------------------------------------


EVIL_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "llama3.2; rm -rf ~",
    "$(id)",
    "`id`",
    "a|b",
    "a&&b",
    "a b",
    "a\tb",
    "-rf",
    ".hidden",
    "x" * 201,
    "llama3.2\x00",
    "llama3.2\n",
    "ll\u00e4ma",
    "a>b",
    "a'b",
    'a"b',
    "a\\b",
    "%2e%2e%2f",
    "{a}",
    "*",
]


def test_model_names_with_metacharacters_are_refused(
    client: httpx.Client, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    gpu.clear_requests()
    cpu.clear_requests()
    for name in EVIL_NAMES:
        for path in ("/api/chat", "/v1/chat/completions", "/api/show"):
            assert_json_error(client.post(path, json={"model": name}), 400, "invalid model name")
        assert_json_error(client.post("/api/show", json={"name": name}), 400, "invalid model name")
        if not name.endswith("\n"):  # see the next test
            assert_json_error(client.get("/harbor/route", params={"model": name}), 400, "model")
    assert chat_requests(gpu, cpu) == []


def test_trailing_newline_in_a_model_name_is_refused_everywhere(client: httpx.Client) -> None:
    assert_json_error(client.get("/harbor/route", params={"model": "llama3.2\n"}), 400, "model")


def test_pin_endpoints_validate_names(client: httpx.Client, daemon: Harbord) -> None:
    for name in EVIL_NAMES:
        quoted = "/harbor/pins/" + urllib.parse.quote(name, safe="")
        for response in (client.put(quoted, json={"backend": "cpu"}), client.delete(quoted)):
            assert response.status_code in (400, 404, 405), (
                name,
                response.status_code,
                response.text,
            )
            assert response.headers["Content-Type"].startswith("application/json")
    for backend in ("$(id)", "../cpu", "cpu; reboot", "", "CPU", "cpu\n"):
        assert_json_error(
            client.put("/harbor/pins/llama3.2", json={"backend": backend}), 400, "unknown backend"
        )
    for bad in (
        b"{",
        b"[]",
        b'{"backend": 1}',
        b'{"backend": "cpu", "for_seconds": -1}',
        b'{"backend": "cpu", "for_seconds": 0}',
        b'{"backend": "cpu", "for_seconds": 1e999}',
        b'{"backend": "cpu", "surprise": 1}',
        b'{"backend": "cpu", "for_seconds": "1h"}',
    ):
        assert_json_error(client.put("/harbor/pins/llama3.2", content=bad), 400)
    assert client.get("/harbor/pins").json() == {}
    assert daemon.status()["pins"] == {}


def test_pin_request_that_is_not_utf8_is_a_400(
    tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends  # its own daemon: the module's must end with a clean log
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        with daemon.client() as client:
            response = client.put("/harbor/pins/llama3.2", content=b'{"backend": "\xff"}')
        assert_json_error(response, 400)
    finally:
        daemon.stop()


def test_unknown_intent_and_backend_headers(client: httpx.Client) -> None:
    body = {"model": "llama3.2", "stream": False}
    for value in ("turbo", "", "fast heavy", "fast,heavy", "HEAVY", "\u00e9"):
        assert_json_error(
            client.post("/api/chat", json=body, headers={"X-Harbor-Intent": value.encode()}),
            400,
            "unknown intent",
        )
    for value in ("tpu", "", "../gpu", "gpu; reboot", "$(id)", "GPU"):
        assert_json_error(
            client.post("/api/chat", json=body, headers={"X-Harbor-Backend": value}),
            400,
            "unknown backend",
        )
        assert_json_error(
            client.post("/api/pull", json={"model": "x"}, headers={"X-Harbor-Backend": value}),
            400,
            "unknown backend",
        )
    for name in ("tpu", "..", "gpu;reboot", "$(id)"):
        assert_json_error(client.post(f"/harbor/backends/{name}/restart"), 404)
    # A known backend without systemd supervision: refused, not attempted.
    assert_json_error(client.post("/harbor/backends/gpu/restart"), 501, "supervision")


def test_query_parameters(client: httpx.Client) -> None:
    assert_json_error(
        client.get("/harbor/route", params={"model": "llama3.2", "intent": "x"}),
        400,
        "unknown intent",
    )
    assert_json_error(client.get("/harbor/route"), 400, "model")
    assert_json_error(client.get("/harbor/decisions", params={"limit": "many"}), 400, "limit")
    for limit in ("-5", "0", "99999999999999999999"):
        assert client.get("/harbor/decisions", params={"limit": limit}).status_code == 200
    assert_json_error(client.get("/harbor/decisions/nope"), 404, "no recent request")


# --- paths and methods ----------------------------------------------------------------


def test_unknown_paths_and_methods(client: httpx.Client) -> None:
    # harbord's own namespace keeps its own JSON 404 and 405.
    for path in ("/harbor/nothing", "/harbor", "/harbor/status/x"):
        assert_json_error(client.get(path), 404, "no such endpoint")
    for method, path in (
        ("PATCH", "/harbor/pins/x"),
        ("POST", "/harbor/status"),
        ("DELETE", "/metrics"),
    ):
        response = client.request(method, path)
        assert_json_error(response, 405, "not allowed")
        assert response.headers.get("Allow")
    # Every other path and method passes through (issue 12): Ollama's own 404 comes back,
    # odd paths included, and harbord never answers 404 for them itself.
    for method, path in (
        ("GET", "/api/nothing"),
        ("GET", "/v1/nothing"),
        ("GET", "/api"),
        ("GET", "/api/chat/x"),
        ("GET", "/%2e%2e/etc/passwd"),
        ("GET", "/api/tags/../../x"),
        ("GET", "/api/chat"),
        ("PUT", "/api/chat"),
        ("DELETE", "/api/tags"),
        ("GET", "/v1/chat/completions"),
        ("OPTIONS", "/api/generate"),
    ):
        response = client.request(method, path)
        assert (response.status_code, response.text) == (404, "404 page not found"), path
        assert response.headers["X-Harbor-Backend"] == "gpu"


# --- the HTTP layer -------------------------------------------------------------------


def test_malformed_http_is_refused_without_a_500(daemon: Harbord) -> None:
    cases = [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # huge header
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # huge request line
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
        b"GARBAGE\r\n\r\n",
        b"BREW /api/chat HTTP/1.1\r\nHost: x\r\n\r\n",  # a method llhttp does not know
        b"GET /api/ch\xffat HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/chat?x=%ZZ&y=\xff HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
    ]
    for data in cases:
        raw = raw_exchange(daemon.socket, data, timeout=3.0)
        if raw:  # some are answered, the rest closed; none crash or hang the daemon
            status, _, _ = split_response(raw)
            assert 400 <= status < 500, raw[:300]
    assert daemon.proc is not None and daemon.proc.poll() is None
    with daemon.client() as client:
        assert client.get("/harbor/status").status_code == 200
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]


def test_non_utf8_header_values_are_handled(
    daemon: Harbord, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    body = b'{"model":"llama3.2","stream":false}'
    for name, expected in (
        (b"X-Harbor-Intent", 400),
        (b"X-Harbor-Backend", 400),
        (b"X-Odd", 200),
        (b"User-Agent", 200),
    ):
        raw = raw_exchange(
            daemon.socket,
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + name
            + b": \xff\xfe\x80 caf\xc3\xa9\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body,
        )
        status, headers, _ = split_response(raw)
        assert status == expected, raw[:400]
        assert headers["content-type"].startswith("application/json")


# --- bodies over the limit ----------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_body_over_limit_is_413_without_reading_it(daemon: Harbord) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    declared, sent_target = 1024 * 1024 * 1024, 96 * 1024 * 1024
    before = rss_kib(pid)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % declared
    )
    started = time.monotonic()
    sent = 0

    def push() -> None:  # keeps sending while the test reads the answer
        nonlocal sent
        chunk = b'{"model": "llama3.2", "x": "' + b"x" * (1 << 20)
        try:
            while sent < sent_target:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        answer += sock.recv(4096)
    elapsed = time.monotonic() - started
    status, headers, body = split_response(answer)
    assert status == 413 and headers["content-type"].startswith("application/json")
    assert "limit" in json.loads(body)["error"]
    assert elapsed < 2.0
    pusher.join(20)
    peak = rss_kib(pid)
    sock.close()
    # The daemon discarded what it was sent: its RSS did not grow by the bytes pushed.
    grown_mib = (peak - before) / 1024
    assert grown_mib < 16, f"RSS grew {grown_mib:.1f} MiB after {sent >> 20} MiB were pushed"
    with daemon.client() as client:
        assert client.get("/harbor/status").status_code == 200


def test_chunked_body_over_limit_is_413(daemon: Harbord) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "llama3.2", "x": "'
        for _ in range(8):
            yield b"x" * (512 * 1024)

    with daemon.client() as client:
        response = client.post("/api/chat", content=chunks())
    assert_json_error(response, 413, "limit")
    with daemon.client() as client:
        pull = client.post("/api/pull", content=b'{"model": "' + b"x" * (2 * LIMIT) + b'"}')
        assert_json_error(pull, 413)
        pin = client.put(
            "/harbor/pins/llama3.2", content=b'{"backend": "' + b"x" * (2 * LIMIT) + b'"}'
        )
        assert_json_error(pin, 413)
