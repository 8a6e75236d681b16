"""Issue 12 in-process: the Anthropic and Responses APIs routed, /v1/models/{model},
pass-through for paths harbord does not know, and unload on every backend.

tests/test_clients_e2e.py drives the same paths with the official SDKs over the socket.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from harbord import ollama_api, passthrough
from harbord.server import ROUTED_PATHS
from harbord.unload import is_unload, keep_alive_is_zero
from tests.fakeollama import SERVER_KEY, build_app
from tests.inproc import MODEL, Stack, StackFactory

CLAUDE_MSGS = [{"role": "user", "content": "why is the sky blue"}]
GIN_404 = "404 page not found"
# {"busy": True}: the test endpoint /api/status answers 503 busy
SWITCHES = web.AppKey("switches", dict[str, bool])

# harbord reads /api/show itself, in the background, the first time it plans a model.
SHOW = "/api/show"


def routed_paths(fake: Any) -> list[str]:
    """The paths a fake backend was asked, harbord's own model-facts read left out."""
    return [r.path for r in fake.requests() if r.path != SHOW]


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        events.append((fields.get("event", ""), json.loads(fields["data"])))
    return events


async def decision_of(stack: Stack, response: aiohttp.ClientResponse) -> dict[str, Any]:
    found: dict[str, Any] = await stack.get_json(
        f"/harbor/decisions/{response.headers['X-Harbor-Request-Id']}"
    )
    return found


def messages_body(stream: bool | None = None, model: str = MODEL) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": CLAUDE_MSGS}
    if stream is not None:
        body["stream"] = stream
    return body


# --- Anthropic Messages ----------------------------------------------------------------


async def test_messages_are_routed_whole_by_default(stack: Stack) -> None:
    response = await stack.client.post("/v1/messages", json=messages_body())
    assert response.status == 200, await response.text()
    assert response.headers["X-Harbor-Backend"] == "gpu"
    message = await response.json()
    assert message["type"] == "message" and message["content"][0]["text"].startswith("[gpu] ")
    decision = await decision_of(stack, response)
    # Not a stream unless asked: the answer's wait is answer_timeout.
    assert (decision["stream"], decision["served_by"], decision["model"]) == (
        False,
        "gpu",
        "llama3.2:latest",
    )
    assert routed_paths(stack.gpu) == ["/v1/messages"]


async def test_a_messages_stream_is_relayed_untouched_and_honours_intent(stack: Stack) -> None:
    response = await stack.client.post(
        "/v1/messages", json=messages_body(stream=True), headers={"X-Harbor-Intent": "heavy"}
    )
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.content_type == "text/event-stream"
    events = sse_events(await response.text())
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "[cpu] "}
    assert (await decision_of(stack, response))["stream"] is True
    assert stack.gpu.requests() == []


async def test_count_tokens_is_routed(stack: Stack) -> None:
    response = await stack.client.post(
        "/v1/messages/count_tokens", json={"model": MODEL, "messages": CLAUDE_MSGS}
    )
    assert response.status == 200
    assert await response.json() == {"input_tokens": (4 + 19) // 4}
    assert routed_paths(stack.gpu) == ["/v1/messages/count_tokens"]


async def test_messages_fall_back_before_the_first_byte(stack: Stack) -> None:
    stack.gpu.set_faults({"busy": True})
    response = await stack.client.post("/v1/messages", json=messages_body(stream=True))
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=busy"
    assert sse_events(await response.text())[-1][0] == "message_stop"


def anthropic_error(body: Any) -> tuple[str, str]:
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    return body["error"]["type"], body["error"]["message"]


async def test_harbords_own_errors_on_messages_are_anthropics(make_stack: StackFactory) -> None:
    missing = {"missing_models": [MODEL]}
    stack = await make_stack(faults={"gpu": missing, "cpu": missing})
    no_model = await stack.client.post("/v1/messages", json={"messages": CLAUDE_MSGS})
    assert no_model.status == 400
    assert anthropic_error(await no_model.json()) == ("invalid_request_error", "model is required")
    not_found = await stack.client.post("/v1/messages", json=messages_body())
    assert not_found.status == 404
    kind, text = anthropic_error(await not_found.json())
    assert kind == "not_found_error" and "not found" in text
    stack.gpu.set_faults({"busy": True})
    stack.cpu.set_faults({"busy": True})
    busy = await stack.client.post("/v1/messages", json=messages_body())
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    kind, text = anthropic_error(await busy.json())
    assert kind == "overloaded_error" and text.startswith("no backend available")


async def test_a_messages_stream_broken_after_the_first_byte_ends_in_anthropics_error(
    stack: Stack,
) -> None:
    stack.gpu.set_faults({"die_after_chunks": 3})
    response = await stack.client.post("/v1/messages", json=messages_body(stream=True))
    assert response.status == 200
    events = sse_events(await response.text())
    name, data = events[-1]
    assert name == "error"
    kind, text = anthropic_error(data)
    assert kind == "api_error" and "gpu broke off the stream" in text
    assert "message_stop" not in [n for n, _ in events]
    assert stack.cpu.requests() == []  # no retry after the first byte


# --- OpenAI Responses --------------------------------------------------------------------


async def test_responses_are_routed_whole_and_streamed(stack: Stack) -> None:
    whole = await stack.client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
    assert whole.status == 200 and whole.headers["X-Harbor-Backend"] == "gpu"
    answer = await whole.json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert (await decision_of(stack, whole))["stream"] is False
    streamed = await stack.client.post(
        "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}
    )
    assert streamed.content_type == "text/event-stream"
    events = sse_events(await streamed.text())
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))


async def test_a_responses_stream_broken_after_the_first_byte_ends_in_an_error_event(
    stack: Stack,
) -> None:
    stack.gpu.set_faults({"die_after_chunks": 3})
    response = await stack.client.post(
        "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}
    )
    events = sse_events(await response.text())
    name, data = events[-1]
    assert name == "error"
    # OpenAI's documented fields, and the nested error the openai SDK raises.
    assert data["type"] == "error" and data["code"] == "server_error" and data["param"] is None
    assert "gpu broke off the stream" in data["message"]
    assert data["error"]["message"] == data["message"]
    assert data["sequence_number"] == events[-2][1]["sequence_number"] + 1
    assert "response.completed" not in [n for n, _ in events]


async def test_responses_errors_are_openais(make_stack: StackFactory) -> None:
    missing = {"missing_models": [MODEL]}
    stack = await make_stack(faults={"gpu": missing, "cpu": missing})
    response = await stack.client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
    assert response.status == 404
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and "not found" in error["message"]


# --- GET /v1/models/{model} -------------------------------------------------------------


async def test_a_model_is_retrieved_from_the_backends_lists(stack: Stack) -> None:
    got = await stack.get_json("/v1/models/qwen2.5-coder:7b")
    assert got["id"] == "qwen2.5-coder:7b" and got["object"] == "model"
    assert got["owned_by"] == "library" and isinstance(got["created"], int)
    short = await stack.get_json("/v1/models/llama3.2")
    assert short["id"] == "llama3.2"  # named as asked, as Ollama does


async def test_a_model_only_one_backend_has_is_found(make_stack: StackFactory) -> None:
    stack = await make_stack(faults={"gpu": {"missing_models": ["codellama:13b"]}})
    assert (await stack.get_json("/v1/models/codellama:13b"))["id"] == "codellama:13b"


async def test_a_model_no_backend_has_is_a_404_in_openais_shape(stack: Stack) -> None:
    response = await stack.client.get("/v1/models/no-such-model:1b")
    assert response.status == 404
    body = await response.json()
    assert body["error"]["message"] == "model 'no-such-model:1b' not found"
    assert body["error"]["type"] == "invalid_request_error"
    bad = await stack.client.get("/v1/models/-rf")
    assert bad.status == 400 and "invalid model name" in (await bad.json())["error"]["message"]


# --- pass-through ------------------------------------------------------------------------


def fake_with_new_endpoints(name: str, **kwargs: Any) -> web.Application:
    """A fake Ollama that also serves two endpoints harbord does not know."""
    app = build_app(name=name, **kwargs)

    async def images(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"backend": name, "model": body.get("model")})

    async def transcribe(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        return web.json_response(
            {"backend": name, "model": form["model"], "bytes": len(upload.file.read())}
        )

    async def status(request: web.Request) -> web.Response:
        if app[SWITCHES]["busy"]:
            return web.json_response({"error": "server busy, please try again."}, status=503)
        return web.json_response({"backend": name, "method": request.method})

    app[SWITCHES] = {"busy": False}

    app.router.add_post("/v1/images/generations", images)
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_route("*", "/api/status", status)
    return app


async def new_endpoints_stack(
    make_stack: StackFactory, apps: dict[str, web.Application] | None = None, **faults: Any
) -> Stack:
    apps = apps if apps is not None else {}
    for name in ("gpu", "cpu"):
        apps[name] = fake_with_new_endpoints(name, faults=faults.get(name))
    stack = await make_stack(apps=apps)
    for name, app in apps.items():
        stack.fakes[name].server = app[SERVER_KEY]  # keep the request logs in reach
    return stack


async def test_a_json_body_with_a_model_is_routed_by_it(make_stack: StackFactory) -> None:
    stack = await new_endpoints_stack(make_stack, gpu={"missing_models": ["codellama:13b"]})
    body = {"model": "codellama:13b", "prompt": "a boat"}
    response = await stack.client.post("/v1/images/generations", json=body)
    assert response.status == 200
    assert await response.json() == {"backend": "cpu", "model": "codellama:13b"}
    assert response.headers["X-Harbor-Backend"] == "cpu"
    decision = await decision_of(stack, response)
    assert decision["model"] == "codellama:13b" and decision["path"] == "/v1/images/generations"
    # A model both have: the plan's usual order, and the intent header is honoured.
    fast = await stack.client.post("/v1/images/generations", json={"model": MODEL})
    assert (await fast.json())["backend"] == "gpu"
    heavy = await stack.client.post(
        "/v1/images/generations", json={"model": MODEL}, headers={"X-Harbor-Intent": "heavy"}
    )
    assert (await heavy.json())["backend"] == "cpu"


async def test_a_multipart_model_field_routes_the_upload(make_stack: StackFactory) -> None:
    stack = await new_endpoints_stack(make_stack, gpu={"missing_models": ["codellama:13b"]})
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF" + b"\0" * 5000, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "codellama:13b")
    response = await stack.client.post("/v1/audio/transcriptions", data=form)
    assert response.status == 200
    assert await response.json() == {"backend": "cpu", "model": "codellama:13b", "bytes": 5004}


async def test_no_model_goes_to_the_first_healthy_backend(make_stack: StackFactory) -> None:
    apps: dict[str, web.Application] = {}
    stack = await new_endpoints_stack(make_stack, apps)
    response = await stack.client.get("/api/status")
    assert await response.json() == {"backend": "gpu", "method": "GET"}
    forced = await stack.client.delete("/api/status", headers={"X-Harbor-Backend": "cpu"})
    assert await forced.json() == {"backend": "cpu", "method": "DELETE"}
    apps["gpu"][SWITCHES]["busy"] = True  # no answer from it: fall back before the first byte
    response = await stack.client.get("/api/status")
    assert await response.json() == {"backend": "cpu", "method": "GET"}
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=busy"


async def test_an_unknown_paths_404_is_the_backends_own(stack: Stack) -> None:
    response = await stack.client.post("/api/experimental/thing", json={"model": MODEL})
    assert response.status == 404
    assert response.content_type == "text/plain"
    assert await response.text() == GIN_404
    assert response.headers["X-Harbor-Backend"] == "gpu"
    # The backend's 404 is its answer, not a failure to move on from.
    assert [(r.path, r.model, r.status) for r in stack.gpu.requests() if r.path != SHOW] == [
        ("/api/experimental/thing", MODEL, 404)
    ]
    assert stack.cpu.requests() == []
    # A known path with a method harbord does not route goes on too: Ollama answers it.
    for method, path in (("GET", "/api/chat"), ("OPTIONS", "/api/generate")):
        other = await stack.client.request(method, path)
        assert (other.status, await other.text()) == (404, GIN_404)


async def test_harbords_own_paths_keep_harbords_404_and_405(stack: Stack) -> None:
    for path in ("/harbor/nothing", "/harbor", "/harbor/status/x"):
        response = await stack.client.get(path)
        assert response.status == 404
        assert "no such endpoint" in (await response.json())["error"]
    for method, path in (("POST", "/harbor/status"), ("POST", "/metrics")):
        response = await stack.client.request(method, path)
        assert response.status == 405
        assert "not allowed" in (await response.json())["error"]
        assert "GET" in response.headers["Allow"]
    assert stack.gpu.requests() == [] and stack.cpu.requests() == []
    # Only /metrics itself is harbord's: a path below it is not.
    below = await stack.client.get("/metrics/x")
    assert (below.status, await below.text()) == (404, GIN_404)


async def test_pass_through_keeps_the_body_limit(make_stack: StackFactory) -> None:
    stack = await make_stack(config='max_body_size = "1KiB"')
    response = await stack.client.post("/v1/images/generations", data=b"x" * 4096)
    assert response.status == 413
    assert "1024 byte limit" in (await response.json())["error"]["message"]
    assert stack.gpu.requests() == [] and stack.cpu.requests() == []


async def test_pass_through_refuses_a_bad_model_name(stack: Stack) -> None:
    response = await stack.client.post("/api/experimental/thing", json={"model": "../../etc"})
    assert response.status == 400
    assert "invalid model name" in (await response.json())["error"]
    assert stack.gpu.requests() == [] and stack.cpu.requests() == []


# --- unload and preload ----------------------------------------------------------------------


async def load_everywhere(stack: Stack, model: str = MODEL) -> None:
    for name in ("gpu", "cpu"):
        response = await stack.client.post(
            "/api/generate",
            json={"model": model, "prompt": "hi", "stream": False},
            headers={"X-Harbor-Backend": name},
        )
        assert response.status == 200
    assert loaded(stack) == {"gpu": [f"{model}:latest"], "cpu": [f"{model}:latest"]}


def loaded(stack: Stack) -> dict[str, list[str]]:
    return {name: sorted(fake.fake.loaded) for name, fake in stack.fakes.items()}


@pytest.mark.parametrize(
    ("path", "keep_alive"),
    [
        ("/api/generate", 0),
        ("/api/generate", "0"),
        ("/api/generate", "0s"),
        ("/api/chat", "0m"),
        ("/api/chat", 0.0),
    ],
)
async def test_unload_goes_to_every_backend(stack: Stack, path: str, keep_alive: Any) -> None:
    await load_everywhere(stack)
    body: dict[str, Any] = {"model": MODEL, "keep_alive": keep_alive}
    if path == "/api/chat":
        body["messages"] = []
    response = await stack.client.post(path, json=body)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "gpu,cpu"
    answer = await response.json()
    assert answer["done"] is True and answer["done_reason"] == "unload"
    assert ("message" in answer) == (path == "/api/chat")
    assert loaded(stack) == {"gpu": [], "cpu": []}
    decision = await decision_of(stack, response)
    assert [(a["backend"], a["outcome"]) for a in decision["attempts"]] == [
        ("gpu", "served"),
        ("cpu", "served"),
    ]


async def test_unload_on_one_named_backend(stack: Stack) -> None:
    await load_everywhere(stack)
    response = await stack.client.post(
        "/api/generate", json={"model": MODEL, "keep_alive": 0}, headers={"X-Harbor-Backend": "cpu"}
    )
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert loaded(stack) == {"gpu": ["llama3.2:latest"], "cpu": []}


async def test_unload_skips_a_backend_without_the_model(make_stack: StackFactory) -> None:
    stack = await make_stack(faults={"gpu": {"missing_models": ["codellama:13b"]}})
    response = await stack.client.post(
        "/api/generate", json={"model": "codellama:13b", "keep_alive": 0}
    )
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert stack.gpu.requests("/api/generate") == []


async def test_unload_succeeds_where_it_can(stack: Stack) -> None:
    await load_everywhere(stack)
    stack.gpu.set_faults({"status": {"code": 500, "error": "boom"}})
    response = await stack.client.post("/api/generate", json={"model": MODEL, "keep_alive": 0})
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=other"
    assert (await response.json())["done_reason"] == "unload"
    assert loaded(stack) == {"gpu": ["llama3.2:latest"], "cpu": []}


async def test_unload_fails_only_when_every_backend_fails(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await load_everywhere(stack)
    for fake in (stack.gpu, stack.cpu):
        fake.set_faults({"missing_models": [MODEL]})
    failed = await stack.client.post("/api/generate", json={"model": MODEL, "keep_alive": 0})
    assert failed.status == 404
    assert "not found" in (await failed.json())["error"]
    assert len(stack.gpu.requests("/api/generate")) == len(stack.cpu.requests("/api/generate")) == 2


async def test_preload_is_routed_like_a_request(stack: Stack) -> None:
    response = await stack.client.post("/api/generate", json={"model": MODEL, "keep_alive": "5m"})
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "gpu"
    assert (await response.json())["done_reason"] == "load"
    assert loaded(stack) == {"gpu": ["llama3.2:latest"], "cpu": []}
    chat = await stack.client.post("/api/chat", json={"model": MODEL, "messages": []})
    assert (await chat.json())["done_reason"] == "load"
    assert stack.cpu.requests() == []


def test_what_counts_as_an_unload() -> None:
    for zero in (0, 0.0, "0", "+0", "-0", "0s", "0m", "0h0m0s", "0.0s", " 0 "):
        assert keep_alive_is_zero(float(zero) if isinstance(zero, int) else zero), zero
    for other in (None, 1.0, -1.0, "5m", "0.5s", "1h0m", "", "zero", "0x"):
        assert not keep_alive_is_zero(other), other
    assert is_unload("/api/generate", b'{"model": "m", "keep_alive": 0}')
    assert is_unload("/api/generate", b'{"model": "m", "prompt": "", "keep_alive": "0s"}')
    assert is_unload("/api/chat", b'{"model": "m", "messages": [], "keep_alive": 0}')
    assert not is_unload("/api/generate", b'{"model": "m", "prompt": "hi", "keep_alive": 0}')
    assert not is_unload("/api/chat", b'{"model": "m", "messages": [{}], "keep_alive": 0}')
    assert not is_unload("/api/generate", b'{"model": "m"}')
    assert not is_unload("/api/generate", b'{"model": "m", "keep_alive": true}')
    assert not is_unload("/api/embed", b'{"model": "m", "keep_alive": 0}')


# --- the docs list every path ----------------------------------------------------------------


def test_the_readme_and_harbord_8_list_every_ollama_path() -> None:
    """Every route harbord serves for Ollama's clients, in the README's API table and in
    harbord(8) (a templated path by its fixed part: `/v1/models/`, `/api/blobs/`)."""
    root = Path(__file__).resolve().parent.parent
    readme = root.joinpath("README.md").read_text()
    table = readme[readme.index("## API") : readme.index("## harborctl")]
    page = root.joinpath("man", "harbord.8.scd").read_text()
    api = page[page.index("# API") :]
    router = web.UrlDispatcher()
    for path in ROUTED_PATHS:
        router.add_post(path, passthrough.catch_all)
    ollama_api.add_routes(router)
    paths = {r.canonical for r in router.resources()}
    assert {"/v1/messages", "/v1/responses", "/v1/models/{model}"} <= paths
    for path in paths:
        assert re.search(rf"[` ]{re.escape(path)}`", table), path
        fixed = path.split("{", 1)[0]
        assert re.search(rf"[* ]{re.escape(fixed)}[*_]", api), path
    for text in (table, api):
        prose = " ".join(text.lower().split())
        assert "passed through" in prose and "unload" in prose


def form(*parts: tuple[str, bytes], boundary: str = "xYz") -> bytes:
    out = b""
    for name, value in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if name == "file":
            out += b'; filename="a.wav"\r\nContent-Type: audio/wav'
        out += b"\r\n\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_the_model_of_a_multipart_form() -> None:
    audio = b"RIFF\r\n--xY\r\n" + bytes(range(256)) * 4  # a file that almost holds a delimiter
    find = passthrough.multipart_model
    content_type = "multipart/form-data; boundary=xYz"
    assert find(form(("file", audio), ("model", b"whisper:1")), content_type) == "whisper:1"
    assert find(form(("model", b"whisper"), ("file", audio)), content_type) == "whisper"
    quoted = 'multipart/form-data; boundary="a b"'
    assert find(form(("model", b"m"), boundary="a b"), quoted) == "m"
    assert find(form(("file", audio), ("language", b"en")), content_type) is None
    assert find(form(("model", b"\xff\xfe")), content_type) is None
    assert find(form(("model", b"m")), "multipart/form-data") is None  # no boundary
    assert find(form(("model", b"m"))[:40], content_type) is None  # cut short
    assert find(b"", content_type) is None


def test_the_model_of_a_json_body() -> None:
    find = passthrough.json_model
    assert find(b' \n{"model": "m", "stream": true}') == ("m", True)
    assert find(b'{"model": 7, "stream": "yes"}') == (None, None)
    assert find(b'{"model": ""}') == (None, None)
    assert find(b'["model"]') == (None, None)
    assert find(b'{"model": "m"') == (None, None)  # not JSON: the backend's to judge
    assert find(b"model=m") == (None, None)
