"""harbord.client against respx-mocked daemon answers (no harbord process)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import respx

from harbord import client as client_module
from harbord.client import (
    AsyncHarborClient,
    HarborClient,
    HarborError,
    HarborUnavailable,
    get_router,
    smart_chat,
)
from harbord.schemas import CheckEntry, Inventory, Pin, Plan, PlanStep

MESSAGES = [{"role": "user", "content": "hi"}]
OLLAMA_HEADERS = {
    "Content-Type": "application/x-ndjson",
    "X-Harbor-Backend": "cpu",
    "X-Harbor-Fallbacks": "gpu=oom",
    "X-Harbor-Request-Id": "ab12-7",
}


def chunk(content: str, done: bool = False) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"model": "llama3:8b", "message": message, "done": done}).encode() + b"\n"


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("HARBOR_SOCKET", str(tmp_path / "harbor.sock"))
    with respx.mock(base_url="http://harbor", assert_all_called=False) as router:
        yield router


PLAN = Plan(
    model="llama3:8b",
    intent="heavy",
    intent_source="header",
    steps=[PlanStep("cpu", ["heavy intent prefers cpu"]), PlanStep("gpu", ["gpu fallback"])],
)


# --- construction ----------------------------------------------------------------------


def test_socket_defaults_to_harbor_socket_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARBOR_SOCKET", "/run/test/h.sock")
    assert HarborClient().socket == Path("/run/test/h.sock")
    assert AsyncHarborClient("/elsewhere.sock").socket == Path("/elsewhere.sock")


def test_socket_falls_back_to_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARBOR_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert HarborClient().socket == Path("/run/user/4242/harbor.sock")


def test_no_read_timeout_by_default_but_a_connect_timeout() -> None:
    timeout = HarborClient("/x.sock").timeout
    assert timeout.read is None
    assert timeout.connect == client_module.CONNECT_TIMEOUT
    short = HarborClient("/x.sock", timeout=2).timeout
    assert (short.read, short.connect) == (2, 2)


# --- typed /harbor answers ---------------------------------------------------------------


def test_route_sends_model_and_intent_and_decodes_plan(daemon: respx.MockRouter) -> None:
    route = daemon.get("/harbor/route").respond(200, content=encode(PLAN))
    with HarborClient() as harbor:
        plan = harbor.route("llama3:8b", "heavy")
        assert harbor.which_backend("llama3:8b", "heavy") == "cpu"
    assert plan.backends == ["cpu", "gpu"]
    assert plan.steps[0].reasons == ["heavy intent prefers cpu"]
    assert dict(route.calls.last.request.url.params) == {"model": "llama3:8b", "intent": "heavy"}


def test_route_without_intent_sends_no_intent(daemon: respx.MockRouter) -> None:
    empty = Plan(model="m", intent="fast", intent_source="default", steps=[])
    route = daemon.get("/harbor/route").respond(200, content=encode(empty))
    with HarborClient() as harbor:
        assert harbor.which_backend("m") is None
    assert dict(route.calls.last.request.url.params) == {"model": "m"}


def test_check_and_models_decode(daemon: respx.MockRouter) -> None:
    check = {"gpu": {"status": "healthy", "version": "0.14.3", "url": "u", "is_gpu": True}}
    daemon.get("/harbor/check").respond(200, json=check)
    inventory = {"backends": {"gpu": ["a:1"], "cpu": []}, "models": {"a:1": ["gpu"]}}
    daemon.get("/harbor/models").respond(200, json=inventory)
    with HarborClient() as harbor:
        assert harbor.check() == {"gpu": CheckEntry("healthy", "0.14.3", "u", True)}
        assert harbor.models() == Inventory({"gpu": ["a:1"], "cpu": []}, {"a:1": ["gpu"]})


def test_pin_quotes_model_and_sends_pin_request(daemon: respx.MockRouter) -> None:
    pin = Pin(backend="cpu", reason="r", since=1.0, until=1801.0)
    route = daemon.put(url__regex=r"/harbor/pins/.+").respond(
        200, content=encode({"hf.co/org/m:Q4": pin})
    )
    with HarborClient() as harbor:
        answer = harbor.pin("hf.co/org/m:Q4", "cpu", for_seconds=1800, reason="r")
    assert answer == {"hf.co/org/m:Q4": pin}
    request = route.calls.last.request
    assert request.url.raw_path == b"/harbor/pins/hf.co%2Forg%2Fm%3AQ4"
    assert json.loads(request.content) == {"backend": "cpu", "for_seconds": 1800, "reason": "r"}


def test_unpin_returns_normalised_name_and_404_raises(daemon: respx.MockRouter) -> None:
    route = daemon.delete(url__regex=r"/harbor/pins/.+").mock(
        side_effect=[
            httpx.Response(200, json={"unpinned": "llama3:latest"}),
            httpx.Response(404, json={"error": "llama3 is not pinned"}),
        ]
    )
    with HarborClient() as harbor:
        assert harbor.unpin("llama3") == "llama3:latest"
        with pytest.raises(HarborError) as caught:
            harbor.unpin("llama3")
    assert (caught.value.status, caught.value.message) == (404, "llama3 is not pinned")
    assert route.calls.last.request.url.raw_path == b"/harbor/pins/llama3"


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (409, {"backend": "gpu", "restarted": False, "message": "budget spent"}, "budget spent"),
        (501, {"error": "restarts need systemd supervision"}, "restarts need systemd supervision"),
    ],
)
def test_restart_failures_raise_with_the_daemons_text(
    daemon: respx.MockRouter, status: int, body: dict[str, object], message: str
) -> None:
    daemon.post("/harbor/backends/gpu/restart").respond(status, json=body)
    with HarborClient() as harbor, pytest.raises(HarborError) as caught:
        harbor.restart("gpu")
    assert (caught.value.status, caught.value.message) == (status, message)


def test_restart_success_returns_message(daemon: respx.MockRouter) -> None:
    answer = {"backend": "gpu", "restarted": True, "message": "restarted ollama-gpu"}
    daemon.post("/harbor/backends/gpu/restart").respond(200, json=answer)
    with HarborClient() as harbor:
        assert harbor.restart("gpu") == "restarted ollama-gpu"


@pytest.mark.parametrize(
    ("status", "kwargs", "message"),
    [
        (400, {"json": {"error": "query parameter 'model' is required"}}, "query parameter"),
        (404, {"json": {"error": "no such endpoint: GET /harbor/x"}}, "no such endpoint"),
        (
            503,
            {"json": {"error": {"message": "no backend available", "type": "api_error"}}},
            "no backend available",
        ),
        (502, {"text": "Bad Gateway from a proxy"}, "Bad Gateway from a proxy"),
        (500, {"content": b""}, "HTTP 500 Internal Server Error"),
    ],
)
def test_error_answers_become_harbor_error(
    daemon: respx.MockRouter, status: int, kwargs: dict[str, object], message: str
) -> None:
    daemon.get("/harbor/status").respond(status, **kwargs)  # type: ignore[arg-type]
    with HarborClient() as harbor, pytest.raises(HarborError) as caught:
        harbor.status()
    assert caught.value.status == status
    assert message in caught.value.message
    assert not isinstance(caught.value, HarborUnavailable)


def test_an_answer_of_the_wrong_shape_is_a_harbor_error(daemon: respx.MockRouter) -> None:
    daemon.get("/harbor/status").respond(200, json={"version": 3})
    with HarborClient() as harbor, pytest.raises(HarborError, match="versions differ"):
        harbor.status()


def test_read_timeout_is_a_harbor_error(daemon: respx.MockRouter) -> None:
    daemon.get("/harbor/pins").mock(side_effect=httpx.ReadTimeout("slow"))
    with HarborClient(timeout=1) as harbor, pytest.raises(HarborError, match="in time"):
        harbor.pins()


# --- unreachable socket (no respx: real connects) -----------------------------------------


def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "missing.sock"
    with HarborClient(path) as harbor, pytest.raises(HarborUnavailable) as caught:
        harbor.status()
    assert caught.value.socket == path
    assert str(path) in caught.value.message
    assert caught.value.status is None


@pytest.fixture
def refusing_socket(tmp_path: Path) -> Iterator[Path]:
    """A socket file nobody listens on: connect() gets ECONNREFUSED."""
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    yield path


def test_refusing_socket_is_unavailable(refusing_socket: Path) -> None:
    with HarborClient(refusing_socket) as harbor, pytest.raises(HarborUnavailable):
        harbor.chat("m", MESSAGES)


async def test_async_refusing_socket_is_unavailable(refusing_socket: Path) -> None:
    async with AsyncHarborClient(refusing_socket) as harbor:
        with pytest.raises(HarborUnavailable, match="cannot reach harbord"):
            await harbor.status()
        with pytest.raises(HarborUnavailable):
            await harbor.chat("m", MESSAGES, stream=True)


# --- chat ------------------------------------------------------------------------------


def test_chat_sends_body_and_headers_and_records_backend(daemon: respx.MockRouter) -> None:
    reply = {"model": "llama3:8b", "message": {"role": "assistant", "content": "hey"}, "done": True}
    route = daemon.post("/api/chat").respond(200, json=reply, headers=OLLAMA_HEADERS)
    tools = [{"type": "function", "function": {"name": "f"}}]
    with HarborClient() as harbor:
        assert harbor.last_backend is None
        answer = harbor.chat(
            "llama3:8b", MESSAGES, tools=tools, intent="heavy", backend="cpu", keep_alive="5m"
        )
        assert answer == reply  # Ollama's shape, nothing added
        assert harbor.last_backend == "cpu"
        assert harbor.last is not None
        assert harbor.last.fallbacks == ("gpu=oom",)
        assert harbor.last.request_id == "ab12-7"
    request = route.calls.last.request
    assert json.loads(request.content) == {
        "model": "llama3:8b",
        "messages": MESSAGES,
        "stream": False,
        "keep_alive": "5m",
        "tools": tools,
    }
    assert request.headers["X-Harbor-Intent"] == "heavy"
    assert request.headers["X-Harbor-Backend"] == "cpu"


def test_chat_without_intent_sends_no_harbor_headers(daemon: respx.MockRouter) -> None:
    route = daemon.post("/api/chat").respond(200, json={"done": True})
    with HarborClient() as harbor:
        harbor.chat("m", MESSAGES)
    assert "X-Harbor-Intent" not in route.calls.last.request.headers
    assert "X-Harbor-Backend" not in route.calls.last.request.headers
    assert "tools" not in json.loads(route.calls.last.request.content)


def test_stream_yields_each_chunk_as_it_arrives(daemon: respx.MockRouter) -> None:
    produced: list[str] = []

    def body() -> Iterator[bytes]:
        for word in ("hel", "lo"):
            produced.append(word)
            yield chunk(word)
        produced.append("done")
        yield chunk("", done=True)

    daemon.post("/api/chat").respond(200, headers=OLLAMA_HEADERS, content=body())
    with HarborClient() as harbor:
        chunks = harbor.chat("llama3:8b", MESSAGES, stream=True)
        assert harbor.last_backend == "cpu"  # known before the first chunk
        first = next(chunks)
        assert first["message"]["content"] == "hel"
        assert produced == ["hel"]  # the rest is not read yet
        rest = list(chunks)
    assert [c["message"]["content"] for c in rest] == ["lo", ""]
    assert rest[-1]["done"] is True


def test_stream_error_line_raises_after_the_chunks_before_it(daemon: respx.MockRouter) -> None:
    content = chunk("partial") + b'{"error":"CUDA error: out of memory"}\n'
    daemon.post("/api/chat").respond(200, headers=OLLAMA_HEADERS, content=content)
    seen: list[str] = []
    with HarborClient() as harbor, pytest.raises(HarborError) as caught:
        for c in harbor.chat("llama3:8b", MESSAGES, stream=True):
            seen.append(c["message"]["content"])
    assert seen == ["partial"]
    assert caught.value.message == "CUDA error: out of memory"
    assert caught.value.status is None


def test_stream_error_status_raises_before_iterating(daemon: respx.MockRouter) -> None:
    daemon.post("/api/chat").respond(
        404,
        json={"error": "model 'nope' not found"},
        headers={"X-Harbor-Request-Id": "ab12-9", "X-Harbor-Fallbacks": "gpu=model"},
    )
    with HarborClient() as harbor:
        with pytest.raises(HarborError) as caught:
            harbor.chat("nope", MESSAGES, stream=True)
        assert harbor.last is not None
        assert harbor.last.request_id == "ab12-9"
        assert harbor.last_backend is None
    assert (caught.value.status, caught.value.message) == (404, "model 'nope' not found")


async def test_async_client_typed_calls(daemon: respx.MockRouter) -> None:
    daemon.get("/harbor/route").respond(200, content=encode(PLAN))
    daemon.get("/harbor/pins").respond(200, json={})
    pin_route = daemon.put("/harbor/pins/llama3%3A8b").respond(
        200, content=encode({"llama3:8b": Pin("gpu", "r", 1.0)})
    )
    async with AsyncHarborClient() as harbor:
        assert await harbor.which_backend("llama3:8b", "heavy") == "cpu"
        assert await harbor.pins() == {}
        assert (await harbor.pin("llama3:8b", "gpu"))["llama3:8b"].backend == "gpu"
    sent = json.loads(pin_route.calls.last.request.content)
    assert sent == {"backend": "gpu", "for_seconds": None, "reason": "pinned by operator"}


async def test_async_stream_and_errors(daemon: respx.MockRouter) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield chunk("a")
        yield b"\n"  # blank lines are skipped
        yield chunk("b", done=True)

    route = daemon.post("/api/chat")
    route.side_effect = [
        httpx.Response(200, headers=OLLAMA_HEADERS, content=body()),
        httpx.Response(503, json={"error": "no backend available"}),
    ]
    async with AsyncHarborClient() as harbor:
        chunks = await harbor.chat("llama3:8b", MESSAGES, intent="fast", stream=True)
        contents = [c["message"]["content"] async for c in chunks]
        assert contents == ["a", "b"]
        assert harbor.last_backend == "cpu"
        with pytest.raises(HarborError) as caught:
            await harbor.chat("llama3:8b", MESSAGES, stream=True)
    assert caught.value.status == 503
    assert json.loads(route.calls[0].request.content)["stream"] is True


# --- the seed's API ----------------------------------------------------------------------


async def test_smart_chat_non_stream_and_stream(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[bool] = []
    real_aclose = AsyncHarborClient.aclose

    async def aclose(self: AsyncHarborClient) -> None:
        closed.append(True)
        await real_aclose(self)

    monkeypatch.setattr(AsyncHarborClient, "aclose", aclose)
    route = daemon.post("/api/chat")
    route.side_effect = [
        httpx.Response(200, json={"message": {"content": "one"}, "done": True}),
        httpx.Response(200, content=chunk("x") + chunk("y", done=True)),
    ]
    answer = await smart_chat("llama3:8b", MESSAGES, options={"temperature": 0})
    assert answer["message"]["content"] == "one"
    assert route.calls[0].request.headers["X-Harbor-Intent"] == "fast"
    assert json.loads(route.calls[0].request.content)["options"] == {"temperature": 0}
    assert closed == [True]

    chunks = await smart_chat("llama3:8b", MESSAGES, intent="heavy", stream=True)
    assert closed == [True]  # still open while the chunks are read
    assert [c["message"]["content"] async for c in chunks] == ["x", "y"]
    assert closed == [True, True]
    assert route.calls[1].request.headers["X-Harbor-Intent"] == "heavy"


async def test_smart_chat_closes_its_client_on_error(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[bool] = []
    real_aclose = AsyncHarborClient.aclose

    async def aclose(self: AsyncHarborClient) -> None:
        closed.append(True)
        await real_aclose(self)

    monkeypatch.setattr(AsyncHarborClient, "aclose", aclose)
    daemon.post("/api/chat").respond(404, json={"error": "model 'x' not found"})
    with pytest.raises(HarborError, match="not found"):
        await smart_chat("x", MESSAGES, stream=True)
    assert closed == [True]


async def test_router_has_the_seed_methods(daemon: respx.MockRouter) -> None:
    check = {"gpu": {"status": "healthy", "version": "0.14.3", "url": "u", "is_gpu": True}}
    daemon.get("/harbor/check").respond(200, json=check)
    daemon.get("/harbor/models").respond(
        200, json={"backends": {"gpu": ["a:1"]}, "models": {"a:1": ["gpu"]}}
    )
    route = daemon.get("/harbor/route").respond(200, content=encode(PLAN))
    router = await get_router()
    try:
        assert await router.health_check() == check
        assert await router.list_models() == {"a:1": ["gpu"]}
        assert await router.which_backend("llama3:8b") == "cpu"
        assert route.calls.last.request.url.params["intent"] == "fast"
    finally:
        await router.aclose()
