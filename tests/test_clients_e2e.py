"""Issue 12 end to end: the official SDKs and curl against harbord's real Unix socket.

harbord runs as a process in front of two fake Ollama processes (gpu and cpu). The
clients are pointed at the socket as a user would: the anthropic SDK (Claude Code's
API) with `base_url` and an httpx transport over the socket, the openai SDK for the
Responses API and `models.retrieve`, the ollama client for `ps` and `ollama stop`
(generate with keep_alive=0), and `curl --unix-socket` for paths harbord does not know.
Newer anthropic and openai SDKs bring their own httpx fork and refuse a plain
`httpx.Client`: the transport is built from the module the SDK imports.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import anthropic._base_client
import httpx
import ollama
import openai
import openai._base_client
import pytest

from tests.fakeproc import FakeOllama, free_port
from tests.harness import Harbord, gpu_cpu

pytestmark = pytest.mark.e2e

ANTHROPIC_HTTPX: Any = getattr(anthropic._base_client, "httpx2", httpx)
OPENAI_HTTPX: Any = getattr(openai._base_client, "httpx2", httpx)
MSGS: Any = [{"role": "user", "content": "why is the sky blue"}]
TOOL: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
GPU_TEXT = "[gpu] " + "".join(f"tok{i} " for i in range(1, 8))


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    with FakeOllama.start("gpu") as gpu, FakeOllama.start("cpu", cpu=True) as cpu:
        yield gpu, cpu


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, fakes: tuple[FakeOllama, FakeOllama]
) -> Iterator[Harbord]:
    daemon = Harbord.start(tmp_path_factory.mktemp("clients"), gpu_cpu(*fakes))
    try:
        yield daemon
    finally:
        log = daemon.log()
        assert daemon.stop() == 0
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def harbord(daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]) -> Iterator[Harbord]:
    for fake in fakes:
        fake.clear_faults()
        fake.clear_requests()
    yield daemon
    for fake in fakes:
        fake.clear_faults()


@pytest.fixture
def gpu(fakes: tuple[FakeOllama, FakeOllama]) -> FakeOllama:
    return fakes[0]


@pytest.fixture
def cpu(fakes: tuple[FakeOllama, FakeOllama]) -> FakeOllama:
    return fakes[1]


@pytest.fixture
def claude(harbord: Harbord) -> Iterator[anthropic.Anthropic]:
    transport = ANTHROPIC_HTTPX.HTTPTransport(uds=str(harbord.socket))
    client = anthropic.Anthropic(
        base_url="http://harbor",
        api_key="ollama",
        max_retries=0,
        timeout=15,
        http_client=ANTHROPIC_HTTPX.Client(transport=transport),
    )
    yield client
    client.close()


@pytest.fixture
def oai(harbord: Harbord) -> Iterator[openai.OpenAI]:
    transport = OPENAI_HTTPX.HTTPTransport(uds=str(harbord.socket))
    client = openai.OpenAI(
        base_url="http://harbor/v1",
        api_key="ollama",
        max_retries=0,
        timeout=15,
        http_client=OPENAI_HTTPX.Client(transport=transport),
    )
    yield client
    client.close()


def ollama_client(daemon: Harbord, **headers: str) -> ollama.Client:
    return ollama.Client(
        host="http://harbor",
        transport=httpx.HTTPTransport(uds=str(daemon.socket)),
        headers=headers or None,
    )


def wait_until_missing(daemon: Harbord, backend: str, model: str) -> None:
    daemon.wait_for(
        lambda: model not in daemon.backend(backend)["models"],
        what=f"{backend}'s inventory without {model}",
    )


# --- Anthropic Messages -------------------------------------------------------------------


def test_anthropic_create_and_stream(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    message = claude.messages.create(model="llama3.2", max_tokens=64, messages=MSGS)
    assert message.content[0].type == "text" and message.content[0].text == GPU_TEXT
    assert message.stop_reason == "end_turn"
    with claude.messages.stream(model="llama3.2", max_tokens=64, messages=MSGS) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert deltas == ["[gpu] "] + [f"tok{i} " for i in range(1, 8)]
    assert final.usage.output_tokens == 8
    asked = [r for r in gpu.requests() if r["path"] != "/api/show"]  # harbord's own read
    assert [r["path"] for r in asked] == ["/v1/messages", "/v1/messages"]
    assert asked[0]["headers"]["anthropic-version"]  # the SDK's headers go through


def test_anthropic_tools(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="llama3.2", max_tokens=256, messages=MSGS, tools=[TOOL])
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "test"}


def test_anthropic_errors_raise_the_matching_class(
    claude: anthropic.Anthropic, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=10, messages=MSGS)
    body: Any = missing.value.body
    assert body["error"]["type"] == "not_found_error" and "not found" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="", max_tokens=10, messages=MSGS)
    bad_body: Any = bad.value.body
    assert bad_body["error"] == {"type": "invalid_request_error", "message": "model is required"}
    gpu.set_faults({"busy": True})
    cpu.set_faults({"busy": True})
    # 503: InternalServerError in every SDK (newer ones raise its ServiceUnavailableError).
    with pytest.raises(anthropic.InternalServerError) as busy:
        claude.messages.create(model="llama3.2", max_tokens=10, messages=MSGS)
    assert busy.value.status_code == 503
    busy_body: Any = busy.value.body
    assert busy_body["error"]["type"] == "overloaded_error"


def test_anthropic_stream_broken_after_the_first_byte_raises(
    claude: anthropic.Anthropic, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    gpu.set_faults({"die_after_chunks": 3})
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as broken,
        claude.messages.stream(model="llama3.2", max_tokens=64, messages=MSGS) as stream,
    ):
        got.extend(stream.text_stream)
    assert got[0] == "[gpu] " and len(got) < 8
    body: Any = broken.value.body
    assert body["error"]["type"] == "api_error"
    assert "gpu broke off the stream" in body["error"]["message"]
    assert cpu.requests() == []


def test_anthropic_count_tokens(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    # count_tokens left the beta namespace in SDKs newer than Debian 13's 0.40.
    messages = getattr(claude.messages, "count_tokens", None) and claude.messages
    counted = (messages or claude.beta.messages).count_tokens(model="llama3.2", messages=MSGS)
    assert counted.input_tokens == (4 + 19) // 4
    assert [r["path"] for r in gpu.requests()] == ["/v1/messages/count_tokens"]


# --- OpenAI Responses and models.retrieve ---------------------------------------------------


def test_openai_responses_create_and_stream(oai: openai.OpenAI, cpu: FakeOllama) -> None:
    response = oai.responses.create(model="llama3.2", input="why is the sky blue")
    assert response.status == "completed" and response.output_text == GPU_TEXT
    events = list(oai.responses.create(model="llama3.2", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == GPU_TEXT
    assert cpu.requests() == []


def test_openai_responses_stream_broken_after_the_first_byte_raises(
    oai: openai.OpenAI, gpu: FakeOllama
) -> None:
    gpu.set_faults({"die_after_chunks": 3})
    seen: list[str] = []
    with pytest.raises(openai.APIError) as broken:
        for event in oai.responses.create(model="llama3.2", input="hi", stream=True):
            seen.append(event.type)
    assert "gpu broke off the stream" in broken.value.message
    assert seen[0] == "response.created" and "response.completed" not in seen


def test_openai_models_retrieve(oai: openai.OpenAI) -> None:
    model = oai.models.retrieve("qwen2.5-coder:7b")
    assert (model.id, model.object, model.owned_by) == ("qwen2.5-coder:7b", "model", "library")
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("no-such-model")
    body: Any = missing.value.body
    assert body["message"] == "model 'no-such-model' not found"


# --- ollama: ps, stop (unload on every backend), preload --------------------------------------


def loaded_on(fake: FakeOllama) -> list[str]:
    return [m["name"] for m in httpx.get(fake.url + "/api/ps").json()["models"]]


def test_ollama_stop_unloads_on_both_backends(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    for name in ("gpu", "cpu"):
        ollama_client(harbord, **{"X-Harbor-Backend": name}).generate("codellama:13b", "hi")
    assert "codellama:13b" in loaded_on(gpu) and "codellama:13b" in loaded_on(cpu)
    client = ollama_client(harbord)
    assert [m.model for m in client.ps().models].count("codellama:13b") == 2
    stopped = client.generate(model="codellama:13b", keep_alive=0)
    assert stopped.done_reason == "unload"
    assert "codellama:13b" not in loaded_on(gpu) and "codellama:13b" not in loaded_on(cpu)
    assert "codellama:13b" not in [m.model for m in client.ps().models]
    with harbord.client() as raw:
        answer = raw.post(
            "/api/chat", json={"model": "codellama:13b", "messages": [], "keep_alive": "0s"}
        )
    assert answer.headers["X-Harbor-Backend"] == "gpu,cpu"
    assert answer.json()["done_reason"] == "unload"


def test_ollama_preload_is_routed_to_one_backend(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    client = ollama_client(harbord)
    client.generate(model="qwen2.5-coder:7b", keep_alive=0)  # loaded nowhere to start with
    assert "qwen2.5-coder:7b" not in loaded_on(gpu) + loaded_on(cpu)
    preloaded = client.generate(model="qwen2.5-coder:7b", keep_alive="5m")
    assert preloaded.done_reason == "load"
    assert "qwen2.5-coder:7b" in loaded_on(gpu) and "qwen2.5-coder:7b" not in loaded_on(cpu)


# --- curl: pass-through -------------------------------------------------------------------


def curl(daemon: Harbord, *args: str) -> tuple[dict[str, str], str]:
    """(response headers, body) of curl over the socket; the status is under ":status"."""
    done = subprocess.run(
        ["curl", "-sS", "-D", "-", "--unix-socket", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    headers[":status"] = status_line.split()[1]
    return headers, body


def test_curl_pass_through_routes_by_the_json_model(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    gpu.set_faults({"missing_models": ["codellama:13b"]})
    wait_until_missing(harbord, "gpu", "codellama:13b")
    headers, body = curl(
        harbord,
        "http://harbor/api/experimental/thing",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"model": "codellama:13b", "query": "x"}',
    )
    # The backend that has the model got it; its own 404 (Gin's text) comes back as it is.
    assert (headers[":status"], body) == ("404", "404 page not found")
    assert headers["x-harbor-backend"] == "cpu"
    assert headers["content-type"].startswith("text/plain")
    assert [(r["path"], r["model"]) for r in cpu.requests()] == [
        ("/api/experimental/thing", "codellama:13b")
    ]
    assert gpu.requests() == []


def test_curl_pass_through_of_an_unknown_path_without_a_model(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama, tmp_path: Path
) -> None:
    headers, body = curl(harbord, "http://harbor/api/status")
    assert (headers[":status"], body) == ("404", "404 page not found")
    assert headers["x-harbor-backend"] == "gpu"  # the first healthy one, in config order
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF" + b"\0" * 2048)
    headers, body = curl(
        harbord,
        "http://harbor/v1/audio/transcriptions",
        "-H",
        "X-Harbor-Intent: heavy",
        "-F",
        f"file=@{audio}",
        "-F",
        "model=llama3.2",
    )
    assert (headers[":status"], body) == ("404", "404 page not found")
    assert headers["x-harbor-backend"] == "cpu"  # routed by the form's model, heavy intent
    [upload] = cpu.requests()
    assert upload["body"]["content_type"] == "multipart/form-data"
    headers, body = curl(harbord, "http://harbor/harbor/nothing")
    assert headers[":status"] == "404" and "no such endpoint" in body  # harbord's own


# --- pass-through keeps who may reach harbord -------------------------------------------------


def test_pass_through_keeps_the_peer_check_and_the_token(
    fakes: tuple[FakeOllama, FakeOllama], other_user: str
) -> None:
    gpu, cpu = fakes
    workdir = Path(tempfile.mkdtemp(prefix="harbor-peer-"))  # the other user must reach it
    workdir.chmod(0o755)
    token = workdir / "token"
    token.write_text("t0ken-for-pass-through\n")
    token.chmod(0o600)
    port = free_port()
    daemon = Harbord.start(
        workdir,
        gpu_cpu(gpu, cpu),
        extra_config=(
            f'allow_root = false\n[tcp]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token}"\n'
        ),
    )
    body = '{"model": "llama3.2"}'
    try:
        (workdir / "run").chmod(0o755)
        daemon.socket.chmod(0o666)  # opened up by mistake: the peer check still refuses
        gpu.clear_requests()
        cpu.clear_requests()
        curl = ["curl", "-sS", "-i", "--unix-socket", str(daemon.socket), "-d", body]
        refused = subprocess.run(
            ["runuser", "-u", other_user, "--", *curl, "http://localhost/api/experimental/thing"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.stdout.startswith("HTTP/1.1 403"), refused.stdout + refused.stderr
        assert gpu.requests() == [] and cpu.requests() == []
        url = f"http://127.0.0.1:{port}/api/experimental/thing"
        assert httpx.post(url, content=body, timeout=10).status_code == 401
        assert gpu.requests() == [] and cpu.requests() == []
        bearer = {"Authorization": "Bearer t0ken-for-pass-through"}
        passed = httpx.post(url, content=body, timeout=10, headers=bearer)
        assert (passed.status_code, passed.text) == (404, "404 page not found")
        [forwarded] = [r for r in gpu.requests() if r["path"] != "/api/show"]
        assert "authorization" not in {k.lower() for k in forwarded["headers"]}
    finally:
        daemon.stop()
        shutil.rmtree(workdir)
