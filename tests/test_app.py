"""The app in-process: answers as clients see them, and every error in its API's shape.

Errors are `{"error": "..."}` on /api and OpenAI's error object on /v1, with the
statuses the README's API section gives: 400 bad JSON or fields, 404 a model no
backend has, 413 a body over the limit, 503 with Retry-After when no backend is
available, 504 on a backend timeout; a backend's own 4xx comes back as it is.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.inproc import MODEL, Stack, StackFactory, read_ndjson

QUICK_DEADLINES = 'first_byte_timeout = "0.1s"\nanswer_timeout = "0.1s"\n'
API = pytest.mark.parametrize("openai", [False, True], ids=["ollama", "openai"])


def chat_path(openai: bool) -> str:
    return "/v1/chat/completions" if openai else "/api/chat"


async def error_message(response: aiohttp.ClientResponse, openai: bool) -> str:
    """The error's text, after checking the body has the shape of the API it came from."""
    assert response.content_type == "application/json"
    body: Any = await response.json()
    assert list(body) == ["error"]
    if not openai:
        assert isinstance(body["error"], str)
        return body["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    expected_type = "invalid_request_error" if response.status < 500 else "api_error"
    assert error["type"] == expected_type
    assert isinstance(error["message"], str)
    return error["message"]


# --- answers -----------------------------------------------------------------------------


async def test_a_whole_answer_on_api_chat(stack: Stack) -> None:
    response = await stack.chat(stream=False)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.headers["X-Harbor-Backend"] == "gpu"
    body = await response.json()
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["message"]["content"].startswith("[gpu] ")
    assert stack.gpu.requests("/api/chat")[0].body["stream"] is False


async def test_a_whole_answer_on_v1_chat_completions(stack: Stack) -> None:
    response = await stack.chat(openai=True)  # /v1 answers whole unless asked to stream
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("[gpu] ")


async def test_embeddings_come_back_whole(stack: Stack) -> None:
    response = await stack.client.post(
        "/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]}
    )
    assert response.status == 200
    assert len((await response.json())["embeddings"]) == 2


async def test_a_stream_is_relayed_line_by_line(stack: Stack) -> None:
    response = await stack.chat()  # /api/chat streams by default
    assert response.status == 200
    assert response.content_type == "application/x-ndjson"
    lines = await read_ndjson(response)
    assert len(lines) == 9  # eight tokens and the final line
    assert lines[0]["message"]["content"] == "[gpu] "
    assert lines[-1]["done"] is True
    assert all(not line["done"] for line in lines[:-1])


async def test_heavy_intent_goes_to_the_cpu(stack: Stack) -> None:
    response = await stack.chat(stream=False, headers={"X-Harbor-Intent": "heavy"})
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert stack.gpu.requests() == []


async def test_each_answer_is_recorded_as_a_decision(stack: Stack) -> None:
    response = await stack.chat(stream=False)
    request_id = response.headers["X-Harbor-Request-Id"]
    decision = await stack.get_json(f"/harbor/decisions/{request_id}")
    assert (decision["served_by"], decision["status"], decision["model"]) == (
        "gpu",
        200,
        "llama3.2:latest",
    )
    assert [a["outcome"] for a in decision["attempts"]] == ["served"]
    status = await stack.get_json("/harbor/status")
    assert status["counters"]["served"] == 1
    assert status["affinity"]["llama3.2:latest"]["backend"] == "gpu"


# --- a backend's own 4xx -----------------------------------------------------------------


@API
async def test_a_backends_own_4xx_comes_back_and_is_not_retried(stack: Stack, openai: bool) -> None:
    text = '"llama3.2" does not support thinking'
    stack.gpu.set_faults({"status": {"code": 400, "error": text}})
    response = await stack.chat(stream=False, openai=openai)
    assert response.status == 400
    assert response.headers["X-Harbor-Backend"] == "gpu"
    assert await error_message(response, openai) == text
    assert stack.cpu.requests(chat_path(openai)) == []


def tiny_ollama(chat_status: int, chat_body: bytes, content_type: str) -> web.Application:
    """Enough of Ollama for the prober, and a chat endpoint with a fixed answer."""

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.14.3"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": f"{MODEL}:latest", "size": 1}]})

    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=chat_status, body=chat_body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/chat", chat)
    return app


async def test_a_backends_4xx_body_is_passed_byte_for_byte(make_stack: StackFactory) -> None:
    body = b'{"error" : "caf\xc3\xa9: template error", "extra": [1, 2]}'
    stack = await make_stack(apps={"gpu": tiny_ollama(422, body, "application/json")})
    response = await stack.chat(stream=False)
    assert response.status == 422
    assert response.headers["X-Harbor-Backend"] == "gpu"
    assert await response.read() == body
    assert stack.cpu.requests() == []


# --- harbord's own errors ------------------------------------------------------------------


@API
async def test_bad_json_is_a_400(stack: Stack, openai: bool) -> None:
    response = await stack.client.post(
        chat_path(openai), data=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert "invalid JSON" in await error_message(response, openai)


@API
async def test_a_missing_model_field_is_a_400(stack: Stack, openai: bool) -> None:
    response = await stack.client.post(chat_path(openai), json={"messages": []})
    assert response.status == 400
    assert await error_message(response, openai) == "model is required"
    assert stack.gpu.requests() == [] and stack.cpu.requests() == []


@API
async def test_an_unknown_intent_is_a_400(stack: Stack, openai: bool) -> None:
    response = await stack.chat(openai=openai, headers={"X-Harbor-Intent": "warp"})
    assert response.status == 400
    assert "unknown intent 'warp'" in await error_message(response, openai)


@API
async def test_a_model_no_backend_has_is_a_404(make_stack: StackFactory, openai: bool) -> None:
    missing = {"missing_models": [MODEL]}
    stack = await make_stack(faults={"gpu": missing, "cpu": missing})
    response = await stack.chat(stream=False, openai=openai)
    assert response.status == 404
    assert "not found" in await error_message(response, openai)
    assert stack.harbor.state.pins == {}


@API
async def test_an_unknown_endpoint_is_a_404(stack: Stack, openai: bool) -> None:
    # Other unknown paths pass through to a backend (tests/test_clients_inproc.py); under
    # /harbor an unknown path is harbord's own 404, and so is a model no backend lists.
    response = await stack.client.get("/v1/models/no-such-model" if openai else "/harbor/nothing")
    assert response.status == 404
    expected = "model 'no-such-model' not found" if openai else "no such endpoint"
    assert expected in await error_message(response, openai)


@API
async def test_a_body_over_the_limit_is_a_413(make_stack: StackFactory, openai: bool) -> None:
    stack = await make_stack(config='max_body_size = "1KiB"')
    response = await stack.chat(openai=openai, padding="x" * 4096)
    assert response.status == 413
    assert "1024 byte limit" in await error_message(response, openai)
    assert stack.gpu.requests() == [] and stack.cpu.requests() == []


@API
async def test_every_backend_busy_is_a_503_with_retry_after(stack: Stack, openai: bool) -> None:
    for fake in (stack.gpu, stack.cpu):
        fake.set_faults({"busy": True})
    response = await stack.chat(stream=False, openai=openai)
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=busy, cpu=busy"
    assert (await error_message(response, openai)).startswith("no backend available")


@API
async def test_every_backend_timing_out_is_a_504(make_stack: StackFactory, openai: bool) -> None:
    stack = await make_stack({"gpu": QUICK_DEADLINES, "cpu": QUICK_DEADLINES})
    for fake in (stack.gpu, stack.cpu):
        fake.set_faults({"hang_generation": True})
    response = await stack.chat(stream=True, openai=openai)
    assert response.status == 504
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=network, cpu=network"
    assert (await error_message(response, openai)).startswith("backend timeout")
