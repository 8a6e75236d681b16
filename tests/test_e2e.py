"""End to end: two fake Ollama servers and harbord as real processes.

Clients are the real ones a user would point at the socket: the official
`ollama` client, the `openai` client, `curl --unix-socket` and `harborctl`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.fakeproc import FakeOllama
from tests.harness import ROOT, Harbord, gpu_cpu

pytestmark = pytest.mark.e2e

GB = 1_000_000_000
MODELS = [
    "llama3.2:latest=2000000000",
    "qwen2.5-coder:7b=4700000000",
    "codellama:13b=7400000000",
    "nomic-embed-text:latest=270000000",
]


@pytest.fixture
def gpu() -> Iterator[FakeOllama]:
    with FakeOllama.start("gpu", models=MODELS, vram=6 * GB) as server:
        yield server


@pytest.fixture
def cpu() -> Iterator[FakeOllama]:
    with FakeOllama.start("cpu", models=MODELS, cpu=True) as server:
        yield server


@pytest.fixture
def harbord(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> Iterator[Harbord]:
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0


def ollama_client(daemon: Harbord, **headers: str) -> ollama.Client:
    return ollama.Client(
        host="http://harbor",
        transport=httpx.HTTPTransport(uds=str(daemon.socket)),
        headers=headers or None,
    )


def served_by(chunks: list[Any]) -> str:
    """The fake servers start every reply with "[name] "."""
    text = "".join(c["message"]["content"] for c in chunks)
    return text.split("]", 1)[0].lstrip("[")


def chat(daemon: Harbord, model: str = "llama3.2", **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        **extra,
    }
    with daemon.client() as client:
        return client.post("/api/chat", json=body, headers=headers)


# --- routing ---------------------------------------------------------------


def test_ollama_client_fast_goes_to_gpu(harbord: Harbord) -> None:
    client = ollama_client(harbord)
    reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content.startswith("[gpu]")
    chunks = list(
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert len(chunks) > 2 and chunks[-1].done
    assert "".join(c.message.content for c in chunks).startswith("[gpu]")


def test_heavy_intent_goes_to_cpu_by_header_and_by_body(harbord: Harbord, cpu: FakeOllama) -> None:
    client = ollama_client(harbord, **{"X-Harbor-Intent": "heavy"})
    reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content.startswith("[cpu]")

    response = chat(harbord, intent="heavy")
    assert response.headers["X-Harbor-Backend"] == "cpu"
    forwarded = [r for r in cpu.requests() if r["path"] == "/api/chat"][-1]
    assert "intent" not in forwarded["body"], "harbord's intent field must not reach Ollama"


def test_model_rule_and_default(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> None:
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        extra_config='[models."qwen2.5-coder:7b"]\nintent = "heavy"\n',
    )
    try:
        assert chat(daemon, "qwen2.5-coder:7b").headers["X-Harbor-Backend"] == "cpu"
        assert chat(daemon, "llama3.2").headers["X-Harbor-Backend"] == "gpu"
    finally:
        daemon.stop()


def test_affinity_is_learned_on_fast(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.set_faults({"missing_models": ["llama3.2:latest"]})
    response = chat(harbord)
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=model"
    # Issue 11: an answer served by a fallback teaches no affinity.
    assert "llama3.2:latest" not in harbord.status()["affinity"]
    gpu.set_faults({})
    gpu.clear_requests()
    # Issue 11: affinity only breaks ties within a kind, so a fallback to the cpu
    # does not strand the model there: the next fast request goes to the gpu.
    assert chat(harbord).headers["X-Harbor-Backend"] == "gpu"
    assert [r for r in gpu.requests() if r["path"] == "/api/chat"]
    # An answer from the plan's own first choice is learned.
    assert harbord.status()["affinity"]["llama3.2:latest"]["backend"] == "gpu"


def test_memory_aware_big_model_goes_cpu_first(harbord: Harbord) -> None:
    # codellama:13b (7.4 GB) does not fit the 6 GB GPU of the fake; the config has no
    # limit, so this comes from the GPU's /api/ps spill after a first load.
    with harbord.client() as client:
        plan = client.get("/harbor/route", params={"model": "llama3.2"}).json()
        assert [s["backend"] for s in plan["steps"]] == ["gpu", "cpu"]
    chat(harbord, "codellama:13b", headers={"X-Harbor-Backend": "gpu"})  # loads it, spilled

    def spilled() -> bool:
        gpu_status = harbord.backend("gpu")
        return "codellama:13b" in gpu_status["memory_pressure"]

    harbord.wait_for(spilled, what="memory pressure from /api/ps")
    with harbord.client() as client:
        plan = client.get("/harbor/route", params={"model": "codellama:13b"}).json()
    assert [s["backend"] for s in plan["steps"]] == ["cpu", "gpu"]
    assert any("memory pressure" in r for r in plan["steps"][1]["reasons"])
    assert chat(harbord, "codellama:13b").headers["X-Harbor-Backend"] == "cpu"


def test_model_size_limit_from_config(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> None:
    daemon = Harbord.start(
        tmp_path,
        {},
        extra_config=(
            f'[backends.gpu]\nurl = "{gpu.url}"\nkind = "gpu"\nmax_model_size = "4GB"\n'
            f'[backends.cpu]\nurl = "{cpu.url}"\nkind = "cpu"\n'
        ),
    )
    try:
        daemon.wait_for(lambda: daemon.backend("gpu")["models"], what="inventory")
        assert chat(daemon, "qwen2.5-coder:7b").headers["X-Harbor-Backend"] == "cpu"
        assert chat(daemon, "llama3.2").headers["X-Harbor-Backend"] == "gpu"
    finally:
        daemon.stop()


# --- failures and fallbacks --------------------------------------------------


def test_oom_pins_to_cpu_and_survives_restart(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.set_faults({"oom_models": ["qwen2.5-coder:7b"]})
    client = ollama_client(harbord)
    reply = client.chat(model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content.startswith("[cpu]")
    pin = harbord.status()["pins"]["qwen2.5-coder:7b"]
    assert pin["backend"] == "cpu" and pin["source"] == "oom"
    assert "out of memory on gpu" in pin["reason"]
    assert pin["until"] - pin["since"] == pytest.approx(24 * 3600, abs=5)

    gpu.set_faults({})
    gpu.clear_requests()
    harbord.restart()
    assert harbord.status()["pins"]["qwen2.5-coder:7b"]["backend"] == "cpu"
    assert chat(harbord, "qwen2.5-coder:7b").headers["X-Harbor-Backend"] == "cpu"
    assert not [r for r in gpu.requests() if r["path"] == "/api/chat"]


def test_model_not_found_never_pins(harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama) -> None:
    gpu.set_faults({"missing_models": ["llama3.2:latest"]})
    assert chat(harbord).headers["X-Harbor-Backend"] == "cpu"
    assert harbord.status()["pins"] == {}
    cpu.set_faults({"missing_models": ["llama3.2:latest"]})
    with pytest.raises(ollama.ResponseError) as err:
        ollama_client(harbord).chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    assert "not found" in err.value.error


def test_backend_down_falls_back(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.stop()
    response = chat(harbord)
    assert response.status_code == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    harbord.wait_for(lambda: harbord.backend("gpu")["health"] == "down", what="gpu down")


def test_both_down_is_503_at_once(harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama) -> None:
    gpu.stop()
    cpu.stop()
    started = time.monotonic()
    response = chat(harbord)
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "error" in response.json()
    assert time.monotonic() - started < 2.0


def test_no_retry_after_first_byte(harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama) -> None:
    gpu.set_faults({"error_after_chunks": 2})
    client = ollama_client(harbord)
    received: list[Any] = []
    with pytest.raises(ollama.ResponseError) as err:
        for chunk in client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(chunk)
    assert "out of memory" in err.value.error
    assert "".join(c.message.content for c in received).startswith("[gpu]")
    assert not [r for r in cpu.requests() if r["path"] == "/api/chat"], "no retry after bytes"


def test_backend_dies_mid_stream_ends_with_error_line(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.set_faults({"die_after_chunks": 3})
    with (
        harbord.client() as client,
        client.stream(
            "POST",
            "/api/chat",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        ) as response,
    ):
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert "error" in lines[-1]
    assert not any(line.get("done") for line in lines)


def test_tool_calls_pass_through(harbord: Harbord, gpu: FakeOllama) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    client = ollama_client(harbord)
    reply = client.chat(
        model="llama3.2",
        messages=[{"role": "user", "content": "weather?"}],
        tools=tools,
        options={"temperature": 0},
        keep_alive="1m",
        think=True,
    )
    assert reply.message.tool_calls[0].function.name == "get_weather"
    assert reply.message.tool_calls[0].function.arguments == {"city": "test"}
    body = [r for r in gpu.requests() if r["path"] == "/api/chat"][-1]["body"]
    assert body["tools"] == tools
    assert (body["options"], body["keep_alive"], body["think"]) == ({"temperature": 0}, "1m", True)


def test_client_disconnect_cancels_upstream(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.set_faults({"token_delay": 0.2})
    with (
        harbord.client() as client,
        client.stream(
            "POST",
            "/api/chat",
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "x"}],
                "options": {"num_predict": 200},
            },
        ) as response,
    ):
        for _ in response.iter_lines():
            break  # got the first chunk: now walk away

    def cancelled() -> bool:
        states = [r["state"] for r in gpu.requests() if r["path"] == "/api/chat"]
        return states == ["cancelled"]

    harbord.wait_for(cancelled, timeout=5, what="the backend to see the cancellation")


# --- other clients -------------------------------------------------------------


def test_openai_client(harbord: Harbord) -> None:
    client = openai.OpenAI(
        base_url="http://harbor/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(harbord.socket))),
    )
    reply = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content.startswith("[gpu]")
    stream = client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"X-Harbor-Intent": "heavy"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("[cpu]")
    models = client.models.list()
    assert "llama3.2:latest" in {m.id for m in models.data}
    embedding = client.embeddings.create(model="nomic-embed-text", input="hello")
    assert len(embedding.data[0].embedding) > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


def test_curl_unix_socket(harbord: Harbord) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--unix-socket",
            str(harbord.socket),
            "http://localhost/api/generate",
            "-d",
            '{"model": "llama3.2", "prompt": "hi", "stream": false}',
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.startswith("HTTP/1.1 200")
    assert "X-Harbor-Backend: gpu" in out
    assert json.loads(out.split("\n\n", 1)[1])["response"].startswith("[gpu]")


def test_aggregated_endpoints(harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama) -> None:
    gpu.set_faults({"missing_models": ["codellama:13b"]})
    client = ollama_client(harbord)
    names = [m.model for m in client.list().models]
    assert len(names) == len(set(names)) == 4  # each model once
    with harbord.client() as http:
        assert http.get("/").text == "Ollama is running"
        assert http.head("/").status_code == 200
        assert http.get("/api/version").json()["version"]
    client.generate(model="llama3.2", prompt="hi")
    client.generate(model="llama3.2", prompt="hi", options={}, keep_alive="5m", **{})  # still gpu
    assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    assert client.show("llama3.2").modelfile is not None
    assert len(client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
    assert len(client.embeddings(model="nomic-embed-text", prompt="a").embedding) > 0


def test_pull_goes_to_one_backend_with_progress(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    client = ollama_client(harbord)
    statuses = [p.status for p in client.pull("tinyllama", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert [r["path"] for r in gpu.requests()].count("/api/pull") == 1
    assert [r["path"] for r in cpu.requests()].count("/api/pull") == 0


def test_clear_errors_for_bad_input(harbord: Harbord) -> None:
    with harbord.client() as client:
        cases = [
            (client.post("/api/chat", content=b"{nope"), 400, "invalid JSON"),
            (client.post("/api/chat", content=b""), 400, "missing request body"),
            (client.post("/api/chat", json={"messages": []}), 400, "model is required"),
            (client.post("/api/chat", json={"model": ""}), 400, "model is required"),
            (client.post("/api/chat", json={"model": 7}), 400, "invalid request"),
            (
                client.post("/api/chat", json={"model": "x", "intent": "turbo"}),
                400,
                "unknown intent",
            ),
            (
                client.post("/api/chat", json={"model": "x"}, headers={"X-Harbor-Backend": "tpu"}),
                400,
                "unknown backend",
            ),
            (client.post("/api/chat", json={"model": "../../etc"}), 400, "invalid model name"),
            # Unknown paths outside /harbor pass through to Ollama (test_clients_e2e.py).
            (client.get("/harbor/nothing"), 404, "no such endpoint"),
            (client.post("/harbor/status"), 405, "not allowed"),
            (client.get("/harbor/route"), 400, "model"),
            (client.put("/harbor/pins/x", json={"backend": "tpu"}), 400, "unknown backend"),
        ]
        for response, status, text in cases:
            assert response.status_code == status, response.text
            assert response.headers["Content-Type"].startswith("application/json")
            assert text in response.json()["error"]
        openai_error = client.post("/v1/chat/completions", content=b"{")
        assert openai_error.status_code == 400
        assert "invalid JSON" in openai_error.json()["error"]["message"]


def test_body_over_limit_is_413(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> None:
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        extra_config='max_body_size = "1KiB"\n',
    )
    try:
        response = chat(daemon, messages=[{"role": "user", "content": "x" * 4096}])
        assert response.status_code == 413
        assert "limit" in response.json()["error"]
    finally:
        daemon.stop()


def test_backend_4xx_is_passed_back(harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama) -> None:
    gpu.set_faults({"status": {"code": 400, "error": '"llama3.2" does not support thinking'}})
    response = chat(harbord)
    assert response.status_code == 400
    assert response.json() == {"error": '"llama3.2" does not support thinking'}
    assert not [r for r in cpu.requests() if r["path"] == "/api/chat"]


# --- operator surface ---------------------------------------------------------------


def harborctl(
    daemon: Harbord, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HARBOR_SOCKET": str(daemon.socket),
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "harbord.ctl.main", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=30,
    )


def test_harborctl_against_the_daemon(harbord: Harbord) -> None:
    status = harborctl(harbord, "status")
    assert status.returncode == 0, status.stderr
    assert "gpu" in status.stdout and "cpu" in status.stdout
    check = json.loads(harborctl(harbord, "check").stdout)
    assert check["gpu"]["status"] == "healthy" and check["gpu"]["is_gpu"] is True
    assert check["cpu"]["is_gpu"] is False

    chat_run = harborctl(harbord, "chat", "llama3.2", "hello")
    assert chat_run.returncode == 0, chat_run.stderr
    assert chat_run.stdout.startswith("[gpu]")
    assert "gpu" in chat_run.stderr
    heavy = harborctl(harbord, "chat", "llama3.2", "hello", "--intent", "heavy", "--no-stream")
    assert heavy.stdout.startswith("[cpu]")
    piped = harborctl(harbord, "chat", "llama3.2", stdin="from stdin")
    assert piped.returncode == 0 and piped.stdout.startswith("[gpu]")

    assert harborctl(harbord, "pin", "llama3.2", "cpu", "--for", "1h").returncode == 0
    assert "llama3.2:latest" in harborctl(harbord, "pins").stdout
    route = json.loads(harborctl(harbord, "--json", "route", "llama3.2").stdout)
    assert route["steps"][0]["backend"] == "cpu"
    assert harborctl(harbord, "unpin", "llama3.2").returncode == 0
    assert harborctl(harbord, "pin", "llama3.2", "tpu").returncode == 1
    models = harborctl(harbord, "models")
    assert "codellama:13b" in models.stdout


def test_harborctl_unreachable(tmp_path: Path) -> None:
    env = {**os.environ, "HARBOR_SOCKET": str(tmp_path / "none.sock"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "harbord.ctl.main", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    assert "harbord" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_socket_mode_and_liveness(harbord: Harbord, tmp_path: Path) -> None:
    assert oct(harbord.socket.stat().st_mode & 0o777) == "0o600"
    # A second daemon on the same socket refuses to start instead of stealing it.
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "harbord",
            "--config",
            str(harbord.config_path),
            "--socket",
            str(harbord.socket),
            "--state-dir",
            str(tmp_path / "s2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert second.returncode != 0
    assert "already running" in second.stderr
    assert harbord.status()["pid"]


def test_corrupt_state_file_starts_clean(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> None:
    (tmp_path / "state").mkdir(parents=True)
    (tmp_path / "state" / "state.json").write_text("{torn")
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        status = daemon.status()
        assert "corrupt" in status["state_note"]
        assert chat(daemon).status_code == 200
    finally:
        daemon.stop()


def test_check_config_and_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[backends.gpu]\nconnect_timeout = "soon"\n')
    result = subprocess.run(
        [sys.executable, "-m", "harbord", "--config", str(bad), "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "backends.gpu.connect_timeout" in result.stderr
    good = subprocess.run(
        [sys.executable, "-m", "harbord", "--check-config", "--gpu-url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert good.returncode == 0
    assert "flag --gpu-url" in good.stdout and "http://127.0.0.1:9" in good.stdout


def test_whole_answers_wait_longer_than_streams(
    tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    # A non-streaming answer starts only when it is complete (a long CPU answer takes
    # minutes): it waits for answer_timeout, not first_byte_timeout. A stream that does
    # not start in time moves on.
    daemon = Harbord.start(
        tmp_path,
        {},
        extra_config=(
            f'[backends.gpu]\nurl = "{gpu.url}"\nkind = "gpu"\nfirst_byte_timeout = "1s"\n'
            f'[backends.cpu]\nurl = "{cpu.url}"\nkind = "cpu"\n'
        ),
    )
    try:
        gpu.set_faults({"load_delay": 2.5})
        whole = chat(daemon)  # stream: false
        assert whole.status_code == 200
        assert whole.headers["X-Harbor-Backend"] == "gpu"
        streamed = chat(daemon, stream=True)
        assert streamed.status_code == 200
        assert streamed.headers["X-Harbor-Backend"] == "cpu"
        assert streamed.headers["X-Harbor-Fallbacks"] == "gpu=network"
    finally:
        daemon.stop()
