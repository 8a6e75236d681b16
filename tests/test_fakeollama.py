"""The fake Ollama server, run as a real process and driven by the official clients."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import anthropic._base_client
import httpx
import ollama
import openai
import pytest

from tests.fakeproc import FakeOllama, FakeOllamaError, free_port

OOM = "model requires more system memory (10.9 GiB) than is available (7.6 GiB)"
MIDSTREAM = "an error was encountered while running the model: CUDA error: out of memory"
# newer SDKs use their own httpx fork; a broken stream surfaces as its TransportError
SDK_HTTPX: Any = getattr(anthropic._base_client, "httpx2", httpx)
BUSY = "server busy, please try again.  maximum pending requests exceeded"
MSGS = [{"role": "user", "content": "why is the sky blue"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def gpu_server() -> Iterator[FakeOllama]:
    with FakeOllama.start("gpu") as fake:
        yield fake


@pytest.fixture
def gpu(gpu_server: FakeOllama) -> Iterator[FakeOllama]:
    gpu_server.clear_faults()
    gpu_server.clear_requests()
    yield gpu_server
    gpu_server.clear_faults()


@pytest.fixture
def client(gpu: FakeOllama) -> Iterator[ollama.Client]:
    c = ollama.Client(host=gpu.url, timeout=10)
    yield c
    c._client.close()  # Client.close() is newer than the oldest ollama we support (0.5.1)


@pytest.fixture
def oai(gpu: FakeOllama) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gpu.url + "/v1", api_key="x", max_retries=0, timeout=10)
    yield c
    c.close()


@pytest.fixture
def claude(gpu: FakeOllama) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=gpu.url, api_key="ollama", max_retries=0, timeout=10)
    yield c
    c.close()


def expected_text(name: str, n: int = 8) -> str:
    return f"[{name}] " + "".join(f"tok{i} " for i in range(1, n))


# ---- probes and listings -------------------------------------------------------------------


def test_root_version_and_header(gpu: FakeOllama) -> None:
    r = httpx.get(gpu.url + "/")
    assert r.status_code == 200
    assert r.text == "Ollama is running"
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["x-fake-backend"] == "gpu"
    assert httpx.head(gpu.url + "/").status_code == 200
    assert httpx.get(gpu.url + "/api/version").json() == {"version": "0.14.3"}
    assert httpx.get(gpu.url + "/nope").status_code == 404


def test_tags_show(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert set(names) == {
        "llama3.2:latest",
        "qwen2.5-coder:7b",
        "codellama:13b",
        "nomic-embed-text:latest",
    }
    llama = next(m for m in client.list().models if m.model == "llama3.2:latest")
    assert llama.size == 2_000_000_000
    assert llama.details is not None and llama.details.family == "llama"
    assert len(llama.digest or "") == 64
    shown = client.show("llama3.2")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert "FROM" in (shown.modelfile or "")
    assert client.show("nomic-embed-text").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as ei:
        client.show("nope")
    assert ei.value.status_code == 404
    assert ei.value.error == "model 'nope:latest' not found"


def test_ps_loading_and_keep_alive(client: ollama.Client) -> None:
    client.chat(model="llama3.2", messages=MSGS, keep_alive=0)
    assert "llama3.2:latest" not in [m.model for m in client.ps().models]
    client.chat(model="llama3.2", messages=MSGS, options={"num_ctx": 8192})
    ps = {m.model: m for m in client.ps().models}
    m = ps["llama3.2:latest"]
    # weights plus the f16 KV cache: 2 * 28 blocks * 8192 * (3072 / 24 heads) * 8 KV heads * 2 B
    assert m.size_vram == m.size == 2_000_000_000 + 939_524_096
    # ollama 0.5 (Debian 13) has no context_length field yet: read the wire there.
    raw = client._client.get("/api/ps").json()["models"][0]
    assert raw["context_length"] == 8192
    assert getattr(m, "context_length", 8192) == 8192
    assert m.expires_at is not None
    left = m.expires_at - datetime.now(UTC)
    assert timedelta(minutes=4) < left <= timedelta(minutes=5)
    # empty messages: load only; keep_alive 0 with empty messages: unload
    r = client.chat(model="codellama:13b", messages=[])
    assert r.done_reason == "load"
    assert "codellama:13b" in [m.model for m in client.ps().models]
    r = client.chat(model="codellama:13b", messages=[], keep_alive=0)
    assert r.done_reason == "unload"
    assert "codellama:13b" not in [m.model for m in client.ps().models]


def test_ps_cpu_and_partial_offload() -> None:
    with FakeOllama.start("cpu", cpu=True) as cpu, FakeOllama.start("small", vram=3e9) as small:
        for fake, model, vram in (
            (cpu, "llama3.2", 0),
            (small, "llama3.2", 2_000_000_000 + 469_762_048),  # weights + KV at 4096
            (small, "qwen2.5-coder:7b", 3_000_000_000),
        ):
            c = ollama.Client(host=fake.url)
            c.generate(model=model, prompt="hi")
            ps = {m.model: m.size_vram for m in c.ps().models}
            assert ps[ollama_name(model)] == vram
        assert (ollama.Client(host=cpu.url).generate("llama3.2", "hi").response or "").startswith(
            "[cpu] "
        )


def ollama_name(model: str) -> str:
    return model if ":" in model else model + ":latest"


# ---- generation ----------------------------------------------------------------------------


def test_chat_stream(client: ollama.Client) -> None:
    chunks = list(client.chat(model="llama3.2", messages=MSGS, stream=True))
    assert len(chunks) == 9
    assert chunks[0].message.content == "[gpu] "
    assert chunks[0].model == "llama3.2"
    assert "".join(c.message.content or "" for c in chunks) == expected_text("gpu")
    last = chunks[-1]
    assert last.done and last.done_reason == "stop"
    assert last.eval_count == 8
    assert isinstance(last.total_duration, int) and last.total_duration > 0
    assert not any(c.done for c in chunks[:-1])


def test_chat_non_stream_and_options(client: ollama.Client) -> None:
    r = client.chat(model="llama3.2:latest", messages=MSGS)
    assert r.message.content == expected_text("gpu")
    assert r.done_reason == "stop" and r.eval_count == 8
    assert r.prompt_eval_count == 5
    r = client.chat(model="llama3.2", messages=MSGS, options={"num_predict": 3})
    assert r.message.content == "[gpu] tok1 tok2 "
    assert r.done_reason == "length"
    r = client.chat(model="llama3.2", messages=MSGS, think=True)
    assert r.message.thinking
    r = client.chat(model="llama3.2", messages=MSGS, format="json")
    assert json.loads(r.message.content or "")["backend"] == "gpu"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    r = client.chat(model="llama3.2", messages=MSGS, format=schema)
    assert json.loads(r.message.content or "") == {"n": 1, "s": "test"}
    r = client.chat(
        model="llama3.2",
        messages=[{"role": "user", "content": "what is this", "images": [b"\x89PNG fake"]}],
    )
    assert r.message.content == expected_text("gpu")


def test_generate(client: ollama.Client) -> None:
    chunks = list(client.generate(model="qwen2.5-coder:7b", prompt="hello", stream=True))
    assert chunks[0].response == "[gpu] "
    assert chunks[-1].done and chunks[-1].done_reason == "stop"
    assert "".join(c.response or "" for c in chunks) == expected_text("gpu")
    r = client.generate(model="qwen2.5-coder:7b", prompt="hello", options={"num_predict": 2})
    assert r.response == "[gpu] tok1 "
    assert r.done_reason == "length"
    assert client.generate(model="qwen2.5-coder:7b", prompt="").done_reason == "load"


def test_long_stream_is_fast(client: ollama.Client) -> None:
    t = time.monotonic()
    chunks = list(
        client.generate(model="llama3.2", prompt="x", stream=True, options={"num_predict": 1000})
    )
    assert len(chunks) == 1001
    assert chunks[-2].response == "tok999 "
    assert time.monotonic() - t < 2.0


def test_embed(client: ollama.Client) -> None:
    r = client.embed(model="nomic-embed-text", input=["a", "b", "a"])
    assert len(r.embeddings) == 3
    assert all(len(v) == 8 for v in r.embeddings)
    assert r.embeddings[0] == r.embeddings[2] != r.embeddings[1]
    assert abs(sum(x * x for x in r.embeddings[0]) - 1.0) < 1e-5
    single = client.embed(model="nomic-embed-text", input="a").embeddings
    assert single == [r.embeddings[0]]
    legacy = client.embeddings(model="nomic-embed-text", prompt="a")
    assert list(legacy.embedding) == r.embeddings[0]
    with pytest.raises(ollama.ResponseError) as ei:
        client.embeddings(model="nope", prompt="a")
    assert ei.value.status_code == 404
    assert ei.value.error == 'model "nope" not found, try pulling it first'


def test_tool_calls_native(client: ollama.Client, gpu: FakeOllama) -> None:
    r = client.chat(model="llama3.2", messages=MSGS, tools=[WEATHER_TOOL])
    calls = r.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "test"}
    assert r.message.content == ""
    assert r.done_reason == "stop"
    chunks = list(client.chat(model="llama3.2", messages=MSGS, tools=[WEATHER_TOOL], stream=True))
    assert [c.message.tool_calls is not None for c in chunks] == [True, False]
    raw = httpx.post(
        gpu.url + "/api/chat",
        json={"model": "llama3.2", "messages": MSGS, "tools": [WEATHER_TOOL], "stream": False},
    ).json()
    call = raw["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"]["index"] == 0
    # a tool result turns into a normal answer
    follow = [
        *MSGS,
        {"role": "assistant", "content": "", "tool_calls": raw["message"]["tool_calls"]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    r = client.chat(model="llama3.2", messages=follow, tools=[WEATHER_TOOL])
    assert r.message.content == expected_text("gpu") and not r.message.tool_calls


# ---- model management ----------------------------------------------------------------------


def test_pull_progress(client: ollama.Client, gpu: FakeOllama) -> None:
    gpu.set_faults({"pull_total": 4000, "missing_models": ["phi3:mini"]})
    assert "phi3:mini" not in [m.model for m in client.list().models]
    parts = list(client.pull("phi3:mini", stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer = [p for p in parts if p.total == 4000]
    assert [p.completed for p in layer] == [0, 1000, 2000, 3000, 4000]
    assert all((p.digest or "").startswith("sha256:") for p in layer)
    assert "phi3:mini" in [m.model for m in client.list().models]
    assert client.chat(model="phi3:mini", messages=MSGS).message.content
    assert client.pull("tinyllama", stream=False).status == "success"
    client.copy("tinyllama", "tiny2")
    client.delete("tiny2")
    with pytest.raises(ollama.ResponseError) as ei:
        client.delete("tiny2")
    assert ei.value.status_code == 404


def test_create_push_blobs(client: ollama.Client, gpu: FakeOllama, tmp_path: Path) -> None:
    statuses = [
        p.status for p in client.create(model="mine", from_="llama3.2", system="hi", stream=True)
    ]
    assert statuses[-1] == "success"
    assert "mine:latest" in [m.model for m in client.list().models]
    assert [p.status for p in client.push("mine", stream=True)][-1] == "success"
    blob = tmp_path / "blob"
    blob.write_bytes(b"blob data")
    digest = client.create_blob(blob)
    assert digest.startswith("sha256:")
    assert httpx.head(f"{gpu.url}/api/blobs/{digest}").status_code == 200
    assert httpx.head(f"{gpu.url}/api/blobs/sha256:{'0' * 64}").status_code == 404


# ---- errors --------------------------------------------------------------------------------


def test_missing_model(client: ollama.Client, gpu: FakeOllama) -> None:
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="nope", messages=MSGS)
    assert ei.value.status_code == 404
    assert ei.value.error == "model 'nope' not found"
    gpu.set_faults({"missing_models": ["llama3.2"]})
    assert "llama3.2:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as ei:
        client.generate(model="llama3.2:latest", prompt="x")
    assert ei.value.status_code == 404


def test_bad_requests(gpu: FakeOllama) -> None:
    url = gpu.url + "/api/chat"
    r = httpx.post(url, content=b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
    r = httpx.post(url, content=b"xyz")
    assert r.status_code == 400
    assert r.json()["error"] == "invalid character 'x' looking for beginning of value"
    r = httpx.post(url, json={"messages": MSGS})
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})
    r = httpx.post(url, json={"model": "nomic-embed-text", "messages": MSGS})
    assert r.status_code == 400 and "does not support chat" in r.json()["error"]
    r = httpx.post(gpu.url + "/v1/chat/completions", content=b"{")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_oom_fault(client: ollama.Client, gpu: FakeOllama) -> None:
    gpu.set_faults({"oom_models": ["llama3.2"]})
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="llama3.2:latest", messages=MSGS, stream=True).__next__()
    assert ei.value.status_code == 500
    assert ei.value.error == OOM
    # other models still work, and show does not load anything
    assert client.chat(model="codellama:13b", messages=MSGS).message.content
    assert client.show("llama3.2").details is not None
    gpu.set_faults({"oom_models": ["codellama:13b"], "oom_text": "cudaMalloc failed"})
    with pytest.raises(ollama.ResponseError) as ei:
        client.generate(model="codellama:13b", prompt="x")
    assert ei.value.error == "cudaMalloc failed"
    assert gpu.requests()[-1]["state"] == "failed"


def test_driver_busy_status_faults(client: ollama.Client, gpu: FakeOllama) -> None:
    gpu.set_faults({"driver_error": True})
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="llama3.2", messages=MSGS)
    assert ei.value.status_code == 500
    assert ei.value.error.startswith("llama runner process has terminated: error:failed to create")
    gpu.set_faults({"busy": True})
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="llama3.2", messages=MSGS)
    assert ei.value.status_code == 503
    assert ei.value.error == "server busy, please try again.  maximum pending requests exceeded"
    gpu.set_faults(
        {"status": {"code": 429, "error": "slow down"}, "only_models": ["codellama:13b"]}
    )
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model="codellama:13b", messages=MSGS)
    assert (ei.value.status_code, ei.value.error) == (429, "slow down")
    assert client.chat(model="llama3.2", messages=MSGS).message.content  # not in only_models


def test_mid_stream_error(client: ollama.Client, gpu: FakeOllama) -> None:
    gpu.set_faults({"error_after_chunks": 2})
    got = []
    with pytest.raises(ollama.ResponseError) as ei:
        for chunk in client.chat(model="llama3.2", messages=MSGS, stream=True):
            got.append(chunk.message.content)
    assert got == ["[gpu] ", "tok1 "]
    assert ei.value.error == MIDSTREAM
    assert ei.value.status_code == -1
    with pytest.raises(ollama.ResponseError) as ei:  # non-streaming: a plain 500
        client.chat(model="llama3.2", messages=MSGS)
    assert ei.value.status_code == 500


def test_die_after_chunks(client: ollama.Client, gpu: FakeOllama) -> None:
    gpu.set_faults({"die_after_chunks": 3})
    got = []
    with pytest.raises(httpx.TransportError):
        for chunk in client.generate(model="llama3.2", prompt="x", stream=True):
            got.append(chunk.response)
    assert got == ["[gpu] ", "tok1 ", "tok2 "]
    rec = gpu.requests()[-1]
    assert (rec["state"], rec["chunks_sent"]) == ("failed", 3)
    with pytest.raises(httpx.RemoteProtocolError):  # non-streaming: no response at all
        client.generate(model="llama3.2", prompt="x")


@pytest.mark.parametrize(
    ("kind", "status", "ctype", "body"),
    [
        ("nonjson", 200, "application/json", b"not json at all"),
        ("html", 502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
        ("error200", 200, "application/json", b'{"error":"something went wrong"}'),
        ("wrong_ctype", 200, "text/plain", None),
        ("truncated", 200, "application/x-ndjson", None),
    ],
)
def test_garbage(gpu: FakeOllama, kind: str, status: int, ctype: str, body: bytes | None) -> None:
    gpu.set_faults({"garbage": kind})
    r = httpx.post(gpu.url + "/api/chat", json={"model": "llama3.2", "messages": MSGS})
    assert r.status_code == status
    assert r.headers["content-type"].startswith(ctype)
    if body is not None:
        assert r.content == body
    elif kind == "wrong_ctype":
        assert r.json()["done"] is True
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.content.splitlines()[0])


def test_hang_generation_keeps_probes(gpu: FakeOllama) -> None:
    gpu.set_faults({"hang_generation": True})
    c = ollama.Client(host=gpu.url, timeout=0.3)
    assert c.list().models and c.ps() is not None
    assert httpx.get(gpu.url + "/api/version", timeout=1).status_code == 200
    with pytest.raises(httpx.TimeoutException):
        c.chat(model="llama3.2", messages=MSGS)
    rec = gpu.wait_for_request(lambda r: r["state"] == "cancelled", timeout=3)
    assert rec["path"] == "/api/chat" and rec["chunks_sent"] == 0


def test_hang_then_release(gpu: FakeOllama) -> None:
    gpu.set_faults({"hang": True})
    with pytest.raises(httpx.TimeoutException):
        httpx.get(gpu.url + "/api/version", timeout=0.3)
    with pytest.raises(httpx.TimeoutException):  # not even a 400 for a bad body
        httpx.post(gpu.url + "/api/chat", content=b"{", timeout=0.3)
    result: dict[str, Any] = {}

    def call() -> None:
        r = httpx.post(
            gpu.url + "/api/chat",
            json={"model": "llama3.2", "messages": MSGS, "stream": False},
            timeout=5,
        )
        result["content"] = r.json()["message"]["content"]

    t = threading.Thread(target=call)
    t.start()
    gpu.wait_for_request(lambda r: r["path"] == "/api/chat" and r["state"] == "running")
    gpu.clear_faults()  # a hung request resumes when the hang is lifted
    t.join(5)
    assert result["content"] == expected_text("gpu")


def test_cancelled_request_is_logged(gpu: FakeOllama) -> None:
    gpu.set_faults({"token_delay": 0.2})
    body = {"model": "llama3.2", "messages": MSGS}
    with httpx.stream("POST", gpu.url + "/api/chat", json=body, headers={"X-Test": "1"}) as r:
        for _line in r.iter_lines():
            break
    rec = gpu.wait_for_request(lambda r: r["state"] != "running", timeout=3)
    assert rec["state"] == "cancelled"
    assert 1 <= rec["chunks_sent"] < 9
    assert rec["body"] == body
    assert rec["headers"]["X-Test"] == "1"
    assert rec["method"] == "POST" and rec["path"] == "/api/chat"


def test_request_log(client: ollama.Client, gpu: FakeOllama) -> None:
    client.chat(model="llama3.2", messages=MSGS, stream=False)
    client.list()
    recs = gpu.requests()
    assert len(recs) == 1  # listings are counted, not logged
    rec = recs[0]
    assert rec["state"] == "completed" and rec["status"] == 200
    assert rec["body"]["stream"] is False and rec["body"]["tools"] == []
    assert rec["headers"]["User-Agent"].startswith("ollama-python/")
    assert gpu.stats()["counts"]["/api/tags"] >= 1
    gpu.clear_requests()
    assert gpu.requests() == []


# ---- OpenAI compatibility ------------------------------------------------------------------


def test_openai_chat(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == expected_text("gpu")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 8
    stream = oai.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=3,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[gpu] tok1 tok2 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_openai_tool_calls(oai: openai.OpenAI) -> None:
    msgs: Any = [{"role": "user", "content": "weather?"}]
    r = oai.chat.completions.create(model="llama3.2", messages=msgs, tools=[WEATHER_TOOL])
    call = (r.choices[0].message.tool_calls or [])[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"test"}'
    assert r.choices[0].finish_reason == "tool_calls"
    chunks = list(
        oai.chat.completions.create(
            model="llama3.2",
            messages=msgs,
            tools=[WEATHER_TOOL],
            stream=True,
        )
    )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function is not None and deltas[0].function.arguments == '{"city":"test"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_completions_embeddings_models(oai: openai.OpenAI, client: ollama.Client) -> None:
    r = oai.completions.create(model="llama3.2", prompt="once upon")
    assert r.choices[0].text == expected_text("gpu")
    text = "".join(
        c.choices[0].text
        for c in oai.completions.create(model="llama3.2", prompt="x", stream=True)
        if c.choices
    )
    assert text == expected_text("gpu")
    emb = oai.embeddings.create(model="nomic-embed-text", input=["a", "b"])  # base64 on the wire
    native = client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings
    for got, want in zip(emb.data, native, strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
    floats = oai.embeddings.create(model="nomic-embed-text", input="a", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(native[0], abs=1e-6)
    ids = [m.id for m in oai.models.list()]
    assert "llama3.2:latest" in ids
    assert oai.models.retrieve("llama3.2").id == "llama3.2"


def test_openai_errors(oai: openai.OpenAI, gpu: FakeOllama) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 404
    body: Any = ei.value.body
    assert body["message"] == "model 'nope' not found"
    gpu.set_faults({"oom_models": ["llama3.2"]})
    with pytest.raises(openai.InternalServerError) as ei2:
        oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert OOM in str(ei2.value)
    gpu.set_faults({"error_after_chunks": 1})
    r = httpx.post(
        gpu.url + "/v1/chat/completions",
        json={"model": "codellama:13b", "messages": MSGS, "stream": True},
    )
    events = [line for line in r.text.split("\n\n") if line]
    assert len(events) == 2
    assert json.loads(events[1].removeprefix("data: "))["error"]["message"] == MIDSTREAM
    every = [m["name"] for m in httpx.get(gpu.url + "/api/tags").json()["models"]]
    gpu.set_faults({"missing_models": every})
    assert httpx.get(gpu.url + "/api/tags").json() == {"models": []}
    assert httpx.get(gpu.url + "/v1/models").json() == {"object": "list", "data": None}


# ---- the process helpers -------------------------------------------------------------------


def test_process_lifecycle() -> None:
    port = free_port()
    fake = FakeOllama.start(
        "edge",
        port=port,
        models={"tiny:1b": 1e9, "other": None},
        tokens=2,
        faults={"load_delay": 0.05},
        env={"FAKE_UNUSED": "1"},
    )
    try:
        assert fake.port == port and fake.url == f"http://127.0.0.1:{port}"
        assert fake.pid > 0 and fake.name == "edge" and fake.running
        c = ollama.Client(host=fake.url)
        assert {m.model for m in c.list().models} == {"tiny:1b", "other:latest"}
        r = c.generate(model="tiny:1b", prompt="x")
        assert r.response == "[edge] tok1 "
        assert (r.load_duration or 0) >= 50_000_000
        assert fake.faults() == {"load_delay": 0.05}
        fake.sigstop()
        with pytest.raises(httpx.TimeoutException):
            httpx.get(fake.url + "/api/version", timeout=0.2)
        fake.sigcont()
        assert httpx.get(fake.url + "/api/version", timeout=2).status_code == 200
        fake.sigstop()  # stop() must cope with a frozen process
    finally:
        rc = fake.stop()
    assert rc == 0 and not fake.running
    assert fake.stop() == 0  # idempotent


def test_kill_and_bad_start() -> None:
    fake = FakeOllama.start("victim", faults={"hang": True})
    fake.kill()
    assert fake.returncode == -9
    fake.stop()
    with pytest.raises(FakeOllamaError):
        FakeOllama.start("bad", faults={"no_such_fault": 1})


# ---- Anthropic Messages (/v1/messages) -----------------------------------------------------

CLAUDE_MSGS: Any = [{"role": "user", "content": "why is the sky blue"}]
CLAUDE_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event in ``text``."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", ""), json.loads(fields["data"])))
    return out


def test_anthropic_create(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    m = claude.messages.create(model="llama3.2", max_tokens=1024, messages=CLAUDE_MSGS)
    assert m.type == "message" and m.role == "assistant" and m.model == "llama3.2"
    assert m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].type == "text" and m.content[0].text == expected_text("gpu")
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (5, 8)
    short = claude.messages.create(model="llama3.2", max_tokens=3, messages=CLAUDE_MSGS)
    assert short.content[0].type == "text" and short.content[0].text == "[gpu] tok1 tok2 "
    assert short.stop_reason == "max_tokens"
    rec = gpu.requests(path="/v1/messages")[-1]
    assert rec["state"] == "completed" and rec["model"] == "llama3.2"
    assert rec["headers"]["anthropic-version"]  # the SDK's header reaches the log


def test_anthropic_stream(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    with claude.messages.stream(model="llama3.2", max_tokens=64, messages=CLAUDE_MSGS) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert deltas == ["[gpu] "] + [f"tok{i} " for i in range(1, 8)]
    assert final.content[0].type == "text" and final.content[0].text == expected_text("gpu")
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 8
    body = {"model": "llama3.2", "max_tokens": 64, "messages": CLAUDE_MSGS, "stream": True}
    r = httpx.post(gpu.url + "/v1/messages", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [name for name, _ in events]
    # Ollama's converter: no ping; one text block; the named event matches data.type
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "[gpu] "}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_anthropic_tools(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(
        model="llama3.2", max_tokens=256, messages=CLAUDE_MSGS, tools=[CLAUDE_TOOL]
    )
    assert m.stop_reason == "tool_use"
    [block] = m.content
    assert block.type == "tool_use"
    assert block.name == "get_weather" and block.input == {"city": "test"}
    assert block.id.startswith("call_")
    with claude.messages.stream(
        model="llama3.2", max_tokens=256, messages=CLAUDE_MSGS, tools=[CLAUDE_TOOL]
    ) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "test"}
    # the tool's result turns into a text answer
    follow: Any = [
        *CLAUDE_MSGS,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}],
        },
    ]
    answer = claude.messages.create(
        model="llama3.2", max_tokens=256, messages=follow, tools=[CLAUDE_TOOL]
    )
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"


def test_anthropic_errors(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(model="nope", max_tokens=10, messages=CLAUDE_MSGS)
    body: Any = nf.value.body
    assert body["type"] == "error"
    assert body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="llama3.2", max_tokens=0, messages=CLAUDE_MSGS)
    bad_body: Any = bad.value.body
    assert bad_body["error"]["type"] == "invalid_request_error"
    assert bad_body["error"]["message"] == "max_tokens is required and must be positive"
    gpu.set_faults({"busy": True})
    with pytest.raises(anthropic.APIStatusError) as busy:
        claude.messages.create(model="llama3.2", max_tokens=10, messages=CLAUDE_MSGS)
    assert busy.value.status_code == 503
    busy_body: Any = busy.value.body
    assert busy_body["error"]["type"] == "overloaded_error"
    gpu.set_faults({"oom_models": ["llama3.2"]})
    with pytest.raises(anthropic.InternalServerError) as oom:
        claude.messages.create(model="llama3.2", max_tokens=10, messages=CLAUDE_MSGS)
    oom_body: Any = oom.value.body
    assert oom_body["error"] == {"type": "api_error", "message": OOM}
    # after the first byte: an `event: error` in Anthropic's shape, which the SDK raises
    gpu.set_faults({"error_after_chunks": 2})
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as mid,
        claude.messages.stream(model="llama3.2", max_tokens=64, messages=CLAUDE_MSGS) as stream,
    ):
        got.extend(stream.text_stream)
    assert got == ["[gpu] ", "tok1 "]
    mid_body: Any = mid.value.body
    assert mid_body == {"type": "error", "error": {"type": "api_error", "message": MIDSTREAM}}
    gpu.set_faults({"die_after_chunks": 1})
    with (
        pytest.raises((anthropic.APIConnectionError, SDK_HTTPX.TransportError)),
        claude.messages.stream(model="llama3.2", max_tokens=64, messages=CLAUDE_MSGS) as stream,
    ):
        list(stream.text_stream)


def test_anthropic_silent_stream_errors() -> None:
    """Ollama's converters drop the error line: the stream just ends, no message_stop."""
    with FakeOllama.start(
        "gpu", faults={"error_after_chunks": 2}, extra_args=["--silent-sse-errors"]
    ) as fake:
        body = {"model": "llama3.2", "max_tokens": 64, "messages": CLAUDE_MSGS, "stream": True}
        names = [n for n, _ in sse_events(httpx.post(fake.url + "/v1/messages", json=body).text)]
        assert names[-1] == "content_block_delta" and "error" not in names
        body = {"model": "llama3.2", "input": "hi", "stream": True}
        names = [n for n, _ in sse_events(httpx.post(fake.url + "/v1/responses", json=body).text)]
        assert names[-1] == "response.output_text.delta"


def test_anthropic_count_tokens(claude: anthropic.Anthropic, gpu: FakeOllama) -> None:
    # count_tokens left the beta namespace in later SDKs than Debian-era ones.
    messages = getattr(claude.messages, "count_tokens", None) and claude.messages
    counted = (messages or claude.beta.messages).count_tokens(
        model="llama3.2", messages=CLAUDE_MSGS
    )
    # Ollama estimates a quarter of the characters: "user" + "why is the sky blue"
    assert counted.input_tokens == (4 + 19) // 4
    r = httpx.post(gpu.url + "/v1/messages/count_tokens", json={"messages": CLAUDE_MSGS})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---- OpenAI Responses (/v1/responses) ------------------------------------------------------

RESPONSES_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": WEATHER_TOOL["function"]["parameters"],
    "strict": None,
}


def test_openai_responses_create(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="llama3.2", input="why is the sky blue")
    assert r.object == "response" and r.status == "completed"
    assert r.id.startswith("resp_") and r.model == "llama3.2"
    assert r.output_text == expected_text("gpu")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant"
    assert item.content[0].type == "output_text"
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (5, 8)
    short = oai.responses.create(model="llama3.2", input="x", max_output_tokens=2)
    assert short.output_text == "[gpu] tok1 "
    call = oai.responses.create(model="llama3.2", input="weather?", tools=[RESPONSES_TOOL])
    [fc] = call.output
    assert fc.type == "function_call" and fc.name == "get_weather"
    assert json.loads(fc.arguments) == {"city": "test"}
    followed = oai.responses.create(
        model="llama3.2",
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": "{}"},
            {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"},
        ],
        tools=[RESPONSES_TOOL],
    )
    assert followed.output_text == expected_text("gpu")


def test_openai_responses_stream(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="llama3.2", input="hi", stream=True))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 8,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == expected_text("gpu")
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.status == "completed" and done.response.output_text == expected_text("gpu")
    with oai.responses.stream(model="llama3.2", input="weather?", tools=[RESPONSES_TOOL]) as stream:
        names = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in names
    assert final.output[0].type == "function_call"


def test_openai_responses_errors(oai: openai.OpenAI, gpu: FakeOllama) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.responses.create(model="nope", input="hi")
    body: Any = nf.value.body
    assert body["message"] == "model 'nope' not found" and body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        bad: Any = {"effort": "extreme"}
        oai.responses.create(model="llama3.2", input="hi", reasoning=bad)
    gpu.set_faults({"error_after_chunks": 2})
    events = list(oai.responses.create(model="llama3.2", input="hi", stream=True))
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error is not None and last.response.error.message == MIDSTREAM
    assert [e.type for e in events].count("response.output_text.delta") == 2
    gpu.set_faults({"oom_models": ["llama3.2"]})
    with pytest.raises(openai.InternalServerError):
        oai.responses.create(model="llama3.2", input="hi")
    gpu.set_faults({"die_after_chunks": 1})
    # openai before 1.7x lets httpx's own error out of a broken stream unwrapped.
    with pytest.raises((openai.APIConnectionError, httpx.TransportError)):
        list(oai.responses.create(model="llama3.2", input="hi", stream=True))


def test_openai_models_retrieve(oai: openai.OpenAI) -> None:
    got = oai.models.retrieve("qwen2.5-coder:7b")
    assert got.id == "qwen2.5-coder:7b" and got.object == "model" and got.owned_by == "library"
    with pytest.raises(openai.NotFoundError) as nf:
        oai.models.retrieve("nope")
    body: Any = nf.value.body
    assert body["message"] == "model 'nope' not found"


def test_unknown_path_is_logged_404(gpu: FakeOllama) -> None:
    files = {"file": ("a.wav", b"RIFF....", "audio/wav")}
    r = httpx.post(gpu.url + "/v1/audio/transcriptions", data={"model": "whisper"}, files=files)
    assert (r.status_code, r.text) == (404, "404 page not found")
    r = httpx.post(gpu.url + "/api/experimental/thing", json={"model": "llama3.2"})
    assert r.status_code == 404
    recs = gpu.requests()
    assert [(x["path"], x["state"], x["status"]) for x in recs] == [
        ("/v1/audio/transcriptions", "failed", 404),
        ("/api/experimental/thing", "failed", 404),
    ]
    assert recs[0]["body"]["content_type"] == "multipart/form-data"
    assert recs[1]["model"] == "llama3.2"


# ---- placement: memory, loading, parallel slots --------------------------------------------

GIB = 1024**3
LLAMA_8B = "llama3.1:8b=32,4096,32,8,131072"  # 128 KiB of f16 KV cache per token


def raw_ps(fake: FakeOllama) -> dict[str, Any]:
    """The only model in /api/ps, as the wire has it."""
    [model] = httpx.get(fake.url + "/api/ps").json()["models"]
    found: dict[str, Any] = model
    return found


def test_show_model_info_and_ps_sizes() -> None:
    args = ["--model-info", LLAMA_8B, "--load-time", "0.2"]
    models = {"llama3.1:8b": 4_900_000_000, "llama3.2": 2e9}
    with FakeOllama.start("gpu", models=models, vram=8 * GIB, extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        info = c.show("llama3.1:8b").modelinfo or {}
        assert info["general.architecture"] == "llama"
        assert info["llama.block_count"] == 32 and info["llama.embedding_length"] == 4096
        assert info["llama.attention.head_count"] == 32
        assert info["llama.attention.head_count_kv"] == 8
        assert info["llama.context_length"] == 131072
        first = c.generate(model="llama3.1:8b", prompt="hi")
        assert (first.load_duration or 0) >= 200_000_000  # this request loaded it
        again = c.generate(model="llama3.1:8b", prompt="hi")
        assert (again.load_duration or 0) < 200_000_000  # already loaded: no load
        [ps] = c.ps().models
        assert raw_ps(fake)["context_length"] == 4096  # (older ollama clients lack the field)
        assert ps.size == ps.size_vram == 4_900_000_000 + GIB // 2  # fits at 4k
        # 64k context: 8 GiB of KV cache on top of the weights spills past 8 GiB of VRAM
        c.generate(model="llama3.1:8b", prompt="hi", options={"num_ctx": 65536})
        [ps] = c.ps().models
        assert raw_ps(fake)["context_length"] == 65536
        assert ps.size == 4_900_000_000 + 8 * GIB
        assert ps.size_vram == 8 * GIB < ps.size
        # unload (what `ollama stop` sends) and preload
        assert c.generate(model="llama3.1:8b", prompt="", keep_alive=0).done_reason == "unload"
        assert c.ps().models == []
        assert c.chat(model="llama3.2", messages=[], keep_alive="10m").done_reason == "load"
        assert [m.model for m in c.ps().models] == ["llama3.2:latest"]
        assert c.chat(model="llama3.2", messages=[], keep_alive=0).done_reason == "unload"
        assert c.ps().models == []


def test_one_model_at_a_time_evicts() -> None:
    args = ["--max-loaded-models", "1", "--load-time", "0.1"]
    with FakeOllama.start("gpu", vram=12 * GIB, extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.chat(model="llama3.2", messages=MSGS)
        assert [m.model for m in c.ps().models] == ["llama3.2:latest"]
        r = c.chat(model="qwen2.5-coder:7b", messages=MSGS)
        assert (r.load_duration or 0) >= 100_000_000
        assert [m.model for m in c.ps().models] == ["qwen2.5-coder:7b"]
        back = c.chat(model="llama3.2", messages=MSGS)  # loads again: it was evicted
        assert (back.load_duration or 0) >= 100_000_000


def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def in_scheduler(fake: FakeOllama, n: int) -> bool:
    """Whether ``n`` chats have reached the scheduler (admitted or waiting)."""
    recs = fake.requests(path="/api/chat")
    admitted = sum(1 for r in recs if r["admitted_seq"] is not None)
    return admitted + int(fake.stats()["waiting"]) >= n


def run_concurrently(fake: FakeOllama, models: list[str]) -> list[Any]:
    """Start one chat per model, each once the previous one is in the scheduler; join all."""
    results: list[Any] = [None] * len(models)

    def call(i: int, model: str) -> None:
        r = httpx.post(
            fake.url + "/api/chat",
            json={"model": model, "messages": MSGS, "stream": False},
            timeout=10,
        )
        results[i] = r

    threads = []
    for i, model in enumerate(models):
        t = threading.Thread(target=call, args=(i, model))
        t.start()
        threads.append(t)
        if i + 1 < len(models):
            wait_until(lambda n=i + 1: in_scheduler(fake, n))
    for t in threads:
        t.join(10)
    return results


def by_admission(fake: FakeOllama) -> list[dict[str, Any]]:
    return sorted(fake.requests(path="/api/chat"), key=lambda r: r["admitted_seq"])


def test_parallel_limit_queues_in_order() -> None:
    args = ["--parallel", "1", "--tokens-per-second", "40"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        results = run_concurrently(fake, ["llama3.2", "llama3.2"])
        assert [r.status_code for r in results] == [200, 200]
        first, second = by_admission(fake)
        # served one after the other: the second got its slot after the first ended
        assert second["admitted_seq"] > first["finished_seq"]
    with FakeOllama.start("gpu", extra_args=["--parallel", "2", "--token-delay", "0.05"]) as fake:
        run_concurrently(fake, ["llama3.2", "llama3.2"])
        first, second = by_admission(fake)
        assert second["admitted_seq"] < first["finished_seq"]  # both ran at once


def test_another_model_waits_for_the_gpu() -> None:
    args = ["--parallel", "1", "--max-loaded-models", "1", "--token-delay", "0.05"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        run_concurrently(fake, ["llama3.2", "qwen2.5-coder:7b"])
        first, second = by_admission(fake)
        assert {first["model"], second["model"]} == {"llama3.2", "qwen2.5-coder:7b"}
        assert second["admitted_seq"] > first["finished_seq"]


def test_full_queue_is_busy() -> None:
    args = ["--parallel", "1", "--max-queue", "1", "--token-delay", "0.1"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        results = run_concurrently(fake, ["llama3.2"] * 3)
        assert [r.status_code for r in results] == [200, 200, 503]
        assert results[2].json() == {"error": BUSY}


def test_prompt_delay_and_speed_show_in_stats() -> None:
    args = ["--prompt-delay", "0.1", "--tokens-per-second", "50"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        r = ollama.Client(host=fake.url, timeout=10).generate(model="llama3.2", prompt="hi")
        assert (r.prompt_eval_duration or 0) >= 100_000_000
        assert (r.eval_duration or 0) >= 7 * 20_000_000  # 8 tokens, 20 ms apart
