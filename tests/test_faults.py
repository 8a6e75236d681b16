"""Faults survived, end to end: fake Ollama servers and harbord as real processes.

Each test injects one fault from issue 6 (a backend killed, frozen, hung, slow,
answering garbage, busy, out of memory; harbord itself killed while saving its
state) and checks what the client sees, what each backend was asked (so nothing
ran twice), and that harbord's log holds no traceback.

Each test uses its own model name, so affinity and pins learned in one test do
not steer another.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from harbord.schemas import StateFile
from tests.fakeproc import FakeOllama
from tests.harness import FAST_ROUTING, Harbord

pytestmark = pytest.mark.e2e

MODELS = [
    "killed-early",
    "killed-early-whole",
    "killed-mid",
    "killed-mid-sse",
    "hang-fb",
    "hang-fb-whole",
    "hang-idle",
    "hang-both",
    "connect",
    "garbage-sse",
    "garbage-both",
    "burst-a",
    "burst-b",
    "burst-oom",
    "burst-midstream",
    "down",
    "refused",
    "refused-after",
    "cold",
    "hung",
    "llama3.2",
]
GARBAGE_KINDS = ("error200", "html", "nonjson", "truncated", "wrong_ctype")
MODELS += [f"garbage-{kind}-{how}" for kind in GARBAGE_KINDS for how in ("stream", "whole")]
MODEL_SPECS = [f"{m}:latest=2000000000" for m in MODELS]

# The prober looks again at once after a failure (and every 0.2 s while a backend is
# down), but not for 30 s while it is up: what a request learns is not raced.
SLOW_ROUTING = FAST_ROUTING.replace('probe_interval = "0.5s"', 'probe_interval = "30s"')


def start_daemon(
    workdir: Path, urls: dict[str, str], backend_options: str = "", routing: str = FAST_ROUTING
) -> Harbord:
    """harbord for backends name -> url (the kind is the name), with per-backend options."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = ['log_level = "debug"', 'drain_timeout = "5s"', routing]
    for name, url in urls.items():
        text.append(
            f'[backends.{name}]\nurl = "{url}"\nkind = "{name}"\n'
            f'unit = "ollama-{name}@test.service"\n{backend_options}\n'
        )
    daemon = Harbord(workdir, "\n".join(text))
    daemon.launch()
    return daemon


class Pair:
    """The two fake backends, restartable on the same port."""

    def __init__(self) -> None:
        self.gpu = FakeOllama.start("gpu", models=MODEL_SPECS)
        self.cpu = FakeOllama.start("cpu", models=MODEL_SPECS, cpu=True)

    def urls(self) -> dict[str, str]:
        return {"gpu": self.gpu.url, "cpu": self.cpu.url}

    def fresh(self) -> None:
        """Both running, no faults, empty request logs."""
        for name in ("gpu", "cpu"):
            fake: FakeOllama = getattr(self, name)
            if not fake.running:
                fake.stop()
                setattr(
                    self,
                    name,
                    FakeOllama.start(name, port=fake.port, models=MODEL_SPECS, cpu=name == "cpu"),
                )
                fake = getattr(self, name)
            fake.sigcont()
            fake.clear_faults()
            fake.clear_requests()

    def stop(self) -> None:
        self.gpu.stop()
        self.cpu.stop()


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    backends = Pair()
    try:
        yield backends
    finally:
        backends.stop()


def assert_clean_log(daemon: Harbord) -> None:
    log = daemon.log()
    assert "internal error" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def wait_healthy(daemon: Harbord, names: tuple[str, ...] = ("gpu", "cpu")) -> None:
    def healthy() -> bool:
        status = {b["name"]: b for b in daemon.status()["backends"]}
        return all(status[n]["health"] == "up" and not status[n]["cooldown"] for n in names)

    daemon.wait_for(healthy, timeout=10, what="both backends up")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, pair: Pair) -> Iterator[Harbord]:
    """Long first-byte and idle timeouts (a cold load may take seconds); a fast prober."""
    daemon = start_daemon(
        tmp_path_factory.mktemp("faults"),
        pair.urls(),
        'first_byte_timeout = "30s"\nidle_timeout = "30s"\n',
    )
    try:
        yield daemon
        assert_clean_log(daemon)
    finally:
        assert daemon.stop() == 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, pair: Pair) -> Iterator[Harbord]:
    """Short connect, first-byte and idle timeouts; a prober that does not race requests."""
    daemon = start_daemon(
        tmp_path_factory.mktemp("quick"),
        pair.urls(),
        'connect_timeout = "1s"\nfirst_byte_timeout = "1s"\nanswer_timeout = "1s"\n'
        'idle_timeout = "1s"\n',
        routing=SLOW_ROUTING,
    )
    try:
        yield daemon
        assert_clean_log(daemon)
    finally:
        assert daemon.stop() == 0


@pytest.fixture
def backends(pair: Pair) -> Pair:
    pair.fresh()
    return pair


def body(model: str, stream: bool = True, marker: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": marker}], "stream": stream}


def records(fake: FakeOllama, model: str) -> list[dict[str, Any]]:
    """The model's requests, without the /api/show harbord sends for its shape."""
    names = (model, f"{model}:latest")
    return [r for r in fake.requests() if r["model"] in names and r["path"] != "/api/show"]


class Streamed:
    """A streamed answer as the client saw it."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.lines: list[str] = []
        self.elapsed = 0.0
        self.error: BaseException | None = None

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.lines if line]

    def text(self) -> str:
        return "".join(c.get("message", {}).get("content", "") for c in self.json_lines())


def stream(
    daemon: Harbord,
    path: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
    on_line: Callable[[int], None] | None = None,
    timeout: float = 30.0,
) -> Streamed:
    result = Streamed()
    started = time.monotonic()
    try:
        with (
            daemon.client(timeout=timeout) as client,
            client.stream("POST", path, json=payload, headers=headers or {}) as response,
        ):
            result.status = response.status_code
            result.headers = dict(response.headers)
            for line in response.iter_lines():
                result.lines.append(line)
                if on_line is not None:
                    on_line(len(result.lines))
    except httpx.HTTPError as err:
        result.error = err
    result.elapsed = time.monotonic() - started
    return result


def in_thread(fn: Callable[[], Streamed]) -> tuple[threading.Thread, list[Streamed]]:
    out: list[Streamed] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def decision(daemon: Harbord, response_headers: dict[str, str]) -> dict[str, Any]:
    with daemon.client() as client:
        found: dict[str, Any] = client.get(
            f"/harbor/decisions/{response_headers['x-harbor-request-id']}"
        ).json()
        return found


# --- a backend killed ---------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
def test_killed_before_first_byte_completes_on_the_other_backend(
    daemon: Harbord, backends: Pair, streaming: bool
) -> None:
    model = "killed-early" if streaming else "killed-early-whole"
    wait_healthy(daemon)
    backends.gpu.set_faults({"load_delay": 10})  # it takes the request and loads ... and dies
    thread, out = in_thread(lambda: stream(daemon, "/api/chat", body(model, streaming)))
    backends.gpu.wait_for_request(lambda r: r["model"] == model)
    backends.gpu.kill()
    thread.join(15)
    result = out[0]
    assert result.error is None and result.status == 200
    assert result.elapsed < 5
    assert result.headers["x-harbor-backend"] == "cpu"
    assert result.headers["x-harbor-fallbacks"] == "gpu=network"
    chunks = result.json_lines()
    assert chunks[-1]["done"] is True and not any("error" in c for c in chunks)
    assert result.text().startswith("[cpu]")  # one whole answer, from one backend
    assert [r["state"] for r in records(backends.cpu, model)] == ["completed"]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_killed_mid_stream_ends_with_an_error_line(
    daemon: Harbord, backends: Pair, path: str
) -> None:
    model = "killed-mid" if path == "/api/chat" else "killed-mid-sse"
    wait_healthy(daemon)
    backends.gpu.set_faults({"token_delay": 0.3})
    killed = threading.Event()

    def kill_after_two(lines: int) -> None:
        if lines == 2 and not killed.is_set():
            killed.set()
            backends.gpu.kill()

    result = stream(daemon, path, body(model), on_line=kill_after_two, timeout=20)
    assert killed.is_set()
    # The stream ended cleanly (httpx raises on a chunked body cut short) and soon.
    assert result.error is None, result.error
    assert result.status == 200 and result.elapsed < 5
    if path == "/api/chat":
        chunks = result.json_lines()
        assert "error" in chunks[-1] and "gpu" in chunks[-1]["error"]
        assert not any(c.get("done") for c in chunks)
    else:
        events = [line for line in result.lines if line]
        assert events[-2] == "event: error"
        assert "gpu" in json.loads(events[-1].removeprefix("data: "))["error"]["message"]
        assert "data: [DONE]" not in events
    assert records(backends.cpu, model) == [], "no retry once bytes reached the client"
    attempts = decision(daemon, result.headers)["attempts"]
    assert attempts[-1]["after_first_byte"] is True


# --- a backend that accepts and never answers ------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
def test_first_byte_timeout_falls_back(quick: Harbord, backends: Pair, streaming: bool) -> None:
    model = "hang-fb" if streaming else "hang-fb-whole"
    wait_healthy(quick)
    backends.gpu.set_faults({"hang_generation": True})  # probes still answer
    result = stream(quick, "/api/chat", body(model, streaming))
    assert result.status == 200 and result.error is None
    assert 0.9 < result.elapsed < 4
    assert result.headers["x-harbor-backend"] == "cpu"
    assert result.headers["x-harbor-fallbacks"] == "gpu=network"
    assert result.text().startswith("[cpu]")
    # harbord hung up on the gpu, so it stops working on the request.
    backends.gpu.wait_for_request(lambda r: r["model"] == model and r["state"] == "cancelled")
    error = decision(quick, result.headers)["attempts"][0]["error"]
    assert "within 1s" in error


def test_idle_timeout_after_first_byte_ends_the_stream(quick: Harbord, backends: Pair) -> None:
    wait_healthy(quick)
    backends.gpu.set_faults({"token_delay": 4})
    result = stream(quick, "/api/chat", body("hang-idle"))
    assert result.error is None and result.status == 200
    assert result.elapsed < 3
    chunks = result.json_lines()
    assert chunks[0]["message"]["content"].startswith("[gpu]")
    assert chunks[-1] == {"error": "gpu sent nothing for 1s"}
    assert records(backends.cpu, "hang-idle") == []
    backends.gpu.wait_for_request(lambda r: r["model"] == "hang-idle" and r["state"] == "cancelled")


def test_both_hanging_is_a_504_not_a_long_wait(quick: Harbord, backends: Pair) -> None:
    wait_healthy(quick)
    for fake in (backends.gpu, backends.cpu):
        fake.set_faults({"hang_generation": True})
    started = time.monotonic()
    with quick.client() as client:
        response = client.post("/api/chat", json=body("hang-both", False))
    assert response.status_code == 504
    assert "timeout" in response.json()["error"]
    assert time.monotonic() - started < 4


def test_connect_timeout_falls_back(tmp_path: Path, backends: Pair) -> None:
    # A listener whose accept queue is full: the kernel drops new SYNs, connect() hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    routing = FAST_ROUTING.replace("hung_after_probes = 2", "hung_after_probes = 1000")
    daemon = start_daemon(
        tmp_path,
        {"gpu": f"http://127.0.0.1:{port}", "cpu": backends.cpu.url},
        'connect_timeout = "1s"\nfirst_byte_timeout = "30s"\n',
        routing=routing,
    )
    try:
        result = stream(daemon, "/api/chat", body("connect", False))
        assert result.status == 200 and result.headers["x-harbor-backend"] == "cpu"
        assert 0.9 < result.elapsed < 4
        error = decision(daemon, result.headers)["attempts"][0]["error"]
        assert "connect" in error and "1s" in error, error
        assert_clean_log(daemon)
    finally:
        daemon.stop()
        for sock in [*fillers, blackhole]:
            sock.close()


# --- garbage ---------------------------------------------------------------------------------

# kind -> (who serves, the gpu failure's class); wrong_ctype is a whole, valid answer.
GARBAGE = {
    "nonjson": ("cpu", "other"),
    "truncated": ("cpu", "other"),
    "html": ("cpu", "network"),
    "error200": ("cpu", "other"),
    "wrong_ctype": ("gpu", None),
}


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_is_classified_and_handled(
    daemon: Harbord, backends: Pair, kind: str, streaming: bool
) -> None:
    wait_healthy(daemon)
    served_by, error_class = GARBAGE[kind]
    model = f"garbage-{kind}-{'stream' if streaming else 'whole'}"
    backends.gpu.set_faults({"garbage": kind})
    result = stream(daemon, "/api/chat", body(model, streaming))
    assert result.error is None and result.status == 200, (result.status, result.lines)
    assert result.headers["x-harbor-backend"] == served_by
    if error_class is None:
        assert "x-harbor-fallbacks" not in result.headers
    else:
        assert result.headers["x-harbor-fallbacks"] == f"gpu={error_class}"
    chunks = result.json_lines()  # every line the client got is whole JSON
    assert chunks[-1]["done"] is True
    assert result.text().startswith(f"[{served_by}]")
    assert len(records(backends.cpu, model)) == (served_by == "cpu")


@pytest.mark.parametrize("kind", sorted(set(GARBAGE) - {"wrong_ctype"}))
def test_garbage_from_both_is_a_clean_5xx(daemon: Harbord, backends: Pair, kind: str) -> None:
    wait_healthy(daemon)
    for fake in (backends.gpu, backends.cpu):
        fake.set_faults({"garbage": kind})
    for path in ("/api/chat", "/v1/chat/completions"):
        with daemon.client() as client:
            response = client.post(path, json=body("garbage-both"))
        assert response.status_code in (502, 503), response.text
        assert response.headers["Content-Type"].startswith("application/json")
        error = response.json()["error"]
        message = error["message"] if path.startswith("/v1") else error
        assert "gpu" in message and "cpu" in message
        wait_healthy(daemon)  # an HTML 502 counts as a network failure until the next probe


def test_truncated_sse_falls_back(daemon: Harbord, backends: Pair) -> None:
    wait_healthy(daemon)
    backends.gpu.set_faults({"garbage": "truncated"})
    result = stream(daemon, "/v1/chat/completions", body("garbage-sse"))
    assert result.status == 200 and result.headers["x-harbor-backend"] == "cpu"
    events = [line for line in result.lines if line]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        json.loads(event.removeprefix("data: "))


class CannedBackend:
    """A raw HTTP/1.1 server with canned answers, for bytes the fake Ollama never sends.

    `answers` maps a path to (status, content type, body); /api/version, /api/tags
    and /api/ps answer like an empty Ollama unless given. Any other path gets a
    200 NDJSON stream (close-delimited) of `pieces`, 50 ms apart, then EOF.
    """

    def __init__(
        self,
        pieces: list[bytes] = (),  # type: ignore[assignment]
        answers: dict[bytes, tuple[int, bytes, bytes]] | None = None,
    ) -> None:
        self.pieces = list(pieces)
        self.answers = {
            b"/api/version": (200, b"application/json", b'{"version":"0.14.3"}'),
            b"/api/tags": (200, b"application/json", b'{"models":[]}'),
            b"/api/ps": (200, b"application/json", b'{"models":[]}'),
            **(answers or {}),
        }
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1]
            if path in self.answers:
                status, ctype, payload = self.answers[path]
                conn.sendall(
                    b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (status, ctype, len(payload), payload)
                )
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Connection: close\r\n\r\n"
            )
            for piece in self.pieces:
                conn.sendall(piece)
                time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()


def test_stream_cut_inside_a_line_ends_with_an_error_line(tmp_path: Path, backends: Pair) -> None:
    line = b'{"model":"m","message":{"role":"assistant","content":"[gpu] "},"done":false}\n'
    # Two lines, the second split across packets, then half a third line and EOF.
    canned = CannedBackend([line, line[:20], line[20:], line[:30]])
    daemon = start_daemon(tmp_path, {"gpu": canned.url, "cpu": backends.cpu.url})
    try:
        result = stream(daemon, "/api/chat", body("llama3.2"), headers={"X-Harbor-Backend": "gpu"})
        assert result.error is None and result.status == 200
        chunks = result.json_lines()  # every line whole: the half line was held back
        assert len(chunks) == 3 and chunks[:2] == [json.loads(line)] * 2
        assert chunks[2] == {"error": "gpu ended its stream inside a line"}
        assert_clean_log(daemon)
    finally:
        daemon.stop()
        canned.close()


def test_bytes_that_are_not_utf8_or_nest_too_deep(tmp_path: Path, backends: Pair) -> None:
    """Error bodies and inventories no JSON library should choke on, from a broken backend."""
    deep = b"[" * 5000 + b"]" * 5000
    canned = CannedBackend(
        answers={
            b"/api/chat": (500, b"application/json", b'{"error": "caf\xe9 \xff out of memory"}'),
            b"/api/generate": (500, b"application/json", b'{"error": ' + deep + b"}"),
            b"/api/embed": (200, b"application/json", deep),
            b"/api/tags": (200, b"application/json", b'{"models": [{"name": "\xff"}]}'),
            b"/api/ps": (200, b"application/json", b'{"models": ' + deep + b"}"),
        }
    )
    daemon = start_daemon(tmp_path, {"gpu": canned.url, "cpu": backends.cpu.url})
    try:
        with daemon.client() as client:
            for path in ("/api/chat", "/api/generate", "/api/embed"):
                response = client.post(
                    path,
                    json={"model": "llama3.2", "prompt": "x", "input": "x", "stream": False},
                    headers={"X-Harbor-Backend": "gpu"},
                )
                assert response.status_code in (200, 500, 502), response.text
                assert "internal error" not in response.text
            chat = client.post("/api/chat", json=body("llama3.2", False))
            assert chat.headers["X-Harbor-Backend"] == "cpu"
            daemon.wait_for(lambda: daemon.backend("gpu")["health"] == "up", what="gpu up")
            time.sleep(1.5)  # a few inventory rounds
        assert_clean_log(daemon)
    finally:
        daemon.stop()
        canned.close()


def test_aggregated_endpoints_survive_an_inventory_that_is_not_utf8(
    tmp_path: Path, backends: Pair
) -> None:
    canned = CannedBackend(
        answers={b"/api/tags": (200, b"application/json", b'{"models": [{"name": "\xff"}]}')}
    )
    daemon = start_daemon(tmp_path, {"gpu": canned.url, "cpu": backends.cpu.url})
    try:
        with daemon.client() as client:
            assert client.get("/api/tags").status_code == 200
    finally:
        daemon.stop()
        canned.close()


# --- busy and out of memory in the middle of a burst -----------------------------------------


def test_busy_and_oom_mid_burst(daemon: Harbord, backends: Pair) -> None:
    """Three waves of 8 concurrent streams; the gpu turns busy, then runs out of memory.

    Every request is tagged, so each backend's request log shows where it ran:
    a request that produced output anywhere ran exactly once.
    """
    wait_healthy(daemon)
    gpu, cpu = backends.gpu, backends.cpu
    gpu.set_faults({"token_delay": 0.1})
    pool = concurrent.futures.ThreadPoolExecutor(16)

    def fire(model: str, tag: str) -> concurrent.futures.Future[Streamed]:
        return pool.submit(stream, daemon, "/api/chat", body(model, marker=tag))

    wave_a = {f"a{i}": fire("burst-a", f"a{i}") for i in range(8)}
    daemon.wait_for(
        lambda: sum(r["chunks_sent"] > 0 for r in records(gpu, "burst-a")) == 8,
        what="wave A streaming on the gpu",
    )
    gpu.set_faults({"busy": True})  # wave A keeps streaming: faults apply to new requests
    wave_b = {f"b{i}": fire("burst-b", f"b{i}") for i in range(8)}
    for future in wave_b.values():
        future.result(20)
    gpu.set_faults({"oom_models": ["burst-oom"], "error_after_chunks": 2, "token_delay": 0.05})
    wave_c = {f"c{i}": fire("burst-oom" if i % 2 else "burst-midstream", f"c{i}") for i in range(8)}
    results = {tag: f.result(30) for tag, f in {**wave_a, **wave_b, **wave_c}.items()}
    pool.shutdown()

    ran: dict[str, list[tuple[str, str, int]]] = {tag: [] for tag in results}
    for fake in (gpu, cpu):
        for record in fake.requests(path="/api/chat"):
            tag = (record["body"] or {}).get("messages", [{}])[0].get("content")
            if tag in ran:
                ran[tag].append((fake.name, record["state"], record["chunks_sent"]))
    midstream_on_gpu = 0
    for tag, result in results.items():
        assert result.error is None and result.status == 200, (tag, result.status, result.error)
        with_output = [r for r in ran[tag] if r[2] > 0]
        assert len(with_output) == 1, (tag, ran[tag])  # no duplicate execution
        served = result.headers["x-harbor-backend"]
        assert with_output[0][0] == served
        chunks = result.json_lines()
        if tag.startswith("a"):  # started before the faults: whole answers from the gpu
            assert served == "gpu" and chunks[-1]["done"] is True
        elif tag.startswith("b"):  # gpu busy (503): fell back before the first byte, or
            # went to the cpu first once an earlier fallback taught harbord that affinity
            assert (
                served == "cpu"
                and result.headers.get("x-harbor-fallbacks", "gpu=busy") == "gpu=busy"
            )
            assert chunks[-1]["done"] is True
        elif result.json_lines()[0]["model"] == "burst-oom":
            # OOM at load: fell back, or (once pinned) went straight to the cpu.
            assert served == "cpu" and chunks[-1]["done"] is True
            assert result.headers.get("x-harbor-fallbacks", "gpu=oom") == "gpu=oom"
        elif served == "gpu":  # OOM mid-stream on the gpu: the error line ends it, no retry
            assert "out of memory" in chunks[-1]["error"]
            assert [r[0] for r in ran[tag]] == ["gpu"]
            midstream_on_gpu += 1
        else:  # sent after a mid-stream OOM had pinned the model: straight to the cpu
            assert served == "cpu" and chunks[-1]["done"] is True
            assert [r[0] for r in ran[tag]] == ["cpu"]
    fell_back = {
        tag[0] + "=" + results[tag].headers["x-harbor-fallbacks"]
        for tag in results
        if "x-harbor-fallbacks" in results[tag].headers
    }
    assert fell_back == {"b=gpu=busy", "c=gpu=oom"}
    pin = daemon.status()["pins"]["burst-oom:latest"]
    assert pin["backend"] == "cpu" and pin["source"] == "oom"
    # An OOM after the first byte cannot move that request, but pins the model for the next.
    assert midstream_on_gpu >= 1
    pin = daemon.status()["pins"]["burst-midstream:latest"]
    assert pin["backend"] == "cpu" and pin["source"] == "oom"


# --- backends down, refused, cold, hung -----------------------------------------------------


def test_both_down_is_503_with_retry_after_at_once(quick: Harbord, backends: Pair) -> None:
    wait_healthy(quick)
    backends.gpu.kill()
    backends.cpu.kill()
    for round_ in ("refused now", "cooling down"):
        if round_ == "cooling down":
            quick.wait_for(
                lambda: all(b["cooldown"] for b in quick.status()["backends"]),
                what="both cooling down",
            )
        for path in ("/api/chat", "/v1/chat/completions", "/api/generate"):
            started = time.monotonic()
            with quick.client() as client:
                response = client.post(path, json=body("down", False) | {"prompt": "x"})
            assert time.monotonic() - started < 1.0, round_
            assert response.status_code == 503, (round_, response.text)
            assert int(response.headers["Retry-After"]) > 0
            error = response.json()["error"]
            assert "no backend available" in (error["message"] if path.startswith("/v1") else error)
        with quick.client() as client:
            tags = client.get("/api/tags")
        assert tags.status_code == 503 and tags.headers["Retry-After"]


def test_refused_connection_cools_down_until_the_prober_sees_it_back(
    quick: Harbord, backends: Pair
) -> None:
    wait_healthy(quick)
    backends.gpu.kill()
    first = stream(quick, "/api/chat", body("refused", False))
    assert first.headers["x-harbor-backend"] == "cpu"
    assert first.headers["x-harbor-fallbacks"] == "gpu=network"  # this request found out
    gpu_status = quick.backend("gpu")
    assert gpu_status["cooldown"] is True and gpu_status["health"] == "down"
    with quick.client() as client:
        plan = client.get("/harbor/route", params={"model": "refused"}).json()
        assert [s["backend"] for s in plan["steps"]] == ["cpu"]
        assert plan["excluded"][0]["backend"] == "gpu"
        for _ in range(5):  # later requests do not pay for the dead backend
            response = client.post("/api/chat", json=body("refused", False))
            assert response.headers["X-Harbor-Backend"] == "cpu"
            assert "X-Harbor-Fallbacks" not in response.headers
    backends.fresh()  # the gpu comes back on its port
    quick.wait_for(
        lambda: not quick.backend("gpu")["cooldown"] and quick.backend("gpu")["health"] == "up",
        timeout=5,
        what="the prober to end the cooldown",
    )
    again = stream(quick, "/api/chat", body("refused-after", False))
    assert again.headers["x-harbor-backend"] == "gpu"


def test_a_cold_model_is_not_a_failed_backend(daemon: Harbord, backends: Pair) -> None:
    wait_healthy(daemon)
    backends.gpu.set_faults({"load_delay": 3})
    seen: list[tuple[str, bool]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            gpu = daemon.backend("gpu")
            seen.append((gpu["health"], gpu["cooldown"]))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = stream(daemon, "/api/chat", body("cold"))
    done.set()
    watcher.join()
    assert result.status == 200 and result.elapsed >= 3
    assert (
        result.headers["x-harbor-backend"] == "gpu" and "x-harbor-fallbacks" not in result.headers
    )
    assert result.json_lines()[-1]["done"] is True
    assert len(seen) >= 10 and set(seen) == {("up", False)}
    assert records(backends.cpu, "cold") == []


def test_requests_waiting_on_a_hung_backend_move_on(daemon: Harbord, backends: Pair) -> None:
    wait_healthy(daemon)
    backends.gpu.set_faults({"hang": True})  # accepts, reads, never answers; probes time out too
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(stream, daemon, "/api/chat", body("hung", marker=f"h{i}")) for i in range(3)
        ]
        results = [f.result(20) for f in futures]
    for result in results:
        assert result.status == 200 and result.headers["x-harbor-backend"] == "cpu"
        assert result.headers["x-harbor-fallbacks"] == "gpu=network"
        assert result.elapsed < 5, "released by the prober, long before the 30s first-byte timeout"
        assert "hung" in decision(daemon, result.headers)["attempts"][0]["error"]
        assert result.json_lines()[-1]["done"] is True
    hung = [r for r in records(backends.gpu, "hung")]
    assert len(hung) == 3 and all(r["chunks_sent"] == 0 for r in hung)
    backends.gpu.clear_faults()
    wait_healthy(daemon)


# --- harbord's own state --------------------------------------------------------------------


def test_sigkill_while_saving_state_never_tears_the_file(tmp_path: Path, backends: Pair) -> None:
    models = [f"m{i}" for i in range(12)]
    daemon = start_daemon(tmp_path, backends.urls())
    state_file = daemon.state_dir / "state.json"
    decoder = msgspec.json.Decoder(StateFile)
    rng = random.Random(6)
    kills = changes = mid_save = 0
    try:
        for _ in range(6):
            stop = threading.Event()

            def hammer(seed: float, stop: threading.Event = stop) -> None:
                nonlocal changes
                local = random.Random(seed)
                with daemon.client(timeout=5) as client:
                    while not stop.is_set():
                        model = local.choice(models)
                        try:
                            if local.random() < 0.6:
                                client.put(
                                    f"/harbor/pins/{model}",
                                    json={"backend": local.choice(["gpu", "cpu"])},
                                )
                            else:
                                client.delete(f"/harbor/pins/{model}")
                            changes += 1
                        except httpx.HTTPError:
                            return  # harbord was killed under us

            threads = [threading.Thread(target=hammer, args=(rng.random(),)) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.2, 0.8))
            daemon.kill()  # SIGKILL, mid-save or not
            kills += 1
            stop.set()
            for thread in threads:
                thread.join(10)
            mid_save += any(p.name.endswith(".tmp") for p in daemon.state_dir.iterdir())
            if state_file.exists():
                state = decoder.decode(state_file.read_bytes())  # whole JSON, right schema
                assert set(state.pins) <= {f"{m}:latest" for m in models}
                assert {p.backend for p in state.pins.values()} <= {"gpu", "cpu"}
            daemon.launch()
            status = daemon.status()
            assert status["state_note"] is None, status["state_note"]
            if state_file.exists():
                assert set(status["pins"]) == set(decoder.decode(state_file.read_bytes()).pins)
            leftovers = [p.name for p in daemon.state_dir.iterdir() if p.name != "state.json"]
            assert leftovers == [], "temporary files from killed saves are cleaned up at start"
        assert kills == 6 and changes > 100
        print(
            f"state: {kills} SIGKILLs, {changes} pin changes, {mid_save} kills left a "
            "temporary file (killed mid-save); every state.json decoded whole"
        )
    finally:
        daemon.stop()


BAD_STATE = {
    "corrupt": b"{torn",
    "wrong-schema": b'{"pins": {"x": 5}}',
    "binary": bytes(range(256)) * 4,
    "not-utf8": b'{"pins": {"m:latest": {"backend": "cpu", "reason": "\xff", "since": 1}}}',
    "too-deep": b'{"pins": {}, "affinity": {}, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


# A read-only directory stops only a non-root user (root writes anyway); under root,
# "dir-is-a-file" is the unwritable case, so the list depends on who runs it.
UNWRITABLE = ["dir-is-a-file"] if os.geteuid() == 0 else ["dir-is-a-file", "read-only-dir"]


@pytest.mark.parametrize("case", [*BAD_STATE, "unreadable", *UNWRITABLE])
def test_bad_state_is_reported_and_the_daemon_serves(
    tmp_path: Path, backends: Pair, case: str
) -> None:
    state_dir = tmp_path / "state"
    if case == "read-only-dir":
        state_dir.mkdir(mode=0o500)
    elif case == "dir-is-a-file":
        (tmp_path / "notadir").write_text("x")
        state_dir = tmp_path / "notadir" / "state"
    else:
        state_dir.mkdir()
        contents = BAD_STATE.get(case)
        if contents is None:
            (state_dir / "state.json").mkdir()  # reading it fails, even as root
        else:
            (state_dir / "state.json").write_bytes(contents)
    workdir = tmp_path / "d"
    workdir.mkdir()
    daemon = Harbord(
        workdir,
        "\n".join(
            [
                'log_level = "debug"',
                FAST_ROUTING,
                f'[backends.gpu]\nurl = "{backends.gpu.url}"\nkind = "gpu"\n',
                f'[backends.cpu]\nurl = "{backends.cpu.url}"\nkind = "cpu"\n',
            ]
        ),
    )
    daemon.state_dir = state_dir
    (workdir / "run").mkdir(mode=0o700)
    try:
        daemon.launch()
        note = daemon.status()["state_note"]
        expected = {
            "unreadable": "cannot read",
            "dir-is-a-file": "cannot save",
            "read-only-dir": "cannot save",
        }.get(case, "corrupt")
        assert note is not None and expected in note, note
        with daemon.client() as client:
            assert client.post("/api/chat", json=body("llama3.2", False)).status_code == 200
            assert client.put("/harbor/pins/llama3.2", json={"backend": "cpu"}).status_code == 200
        if case in BAD_STATE:
            assert list(state_dir.glob("state.json.corrupt-*")), "the bad file is set aside"
            daemon.wait_for(lambda: (state_dir / "state.json").is_file(), what="state saved")
        assert_clean_log(daemon)
    finally:
        daemon.stop()
