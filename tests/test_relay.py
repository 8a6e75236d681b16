"""The relay in-process: fallbacks before the first byte, failures after it, timeouts,
busy backends and harbord's own limiter, disconnects, and the prober moving a backend.

Everything runs on the test's loop (tests/inproc.py); answers, the fakes' request
logs, /harbor/* and the harbor's pins and decisions are what the tests look at.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.inproc import MODEL, Stack, StackFactory, read_lines, read_ndjson

CODER = "qwen2.5-coder:7b"
# Small first-byte and whole-answer deadlines, so a hung backend costs a fraction of a second.
QUICK_DEADLINES = 'first_byte_timeout = "0.1s"\nanswer_timeout = "0.1s"\n'


# --- before the first byte: the next backend serves ------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_oom_on_the_gpu_falls_back_to_the_cpu_and_pins_the_model(
    stack: Stack, stream: bool
) -> None:
    stack.gpu.set_faults({"oom_models": [CODER]})
    response = await stack.chat(CODER, stream=stream)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=oom"
    if stream:
        lines = await read_ndjson(response)
        assert lines[0]["message"]["content"].startswith("[cpu]")
        assert lines[-1]["done"] is True
    else:
        assert (await response.json())["message"]["content"].startswith("[cpu]")

    pin = stack.harbor.state.pins[CODER]
    assert (pin.backend, pin.source) == ("cpu", "oom")
    assert "out of memory on gpu" in pin.reason
    assert [r.status for r in stack.gpu.requests("/api/chat")] == [500]

    # Pinned: the next request goes straight to the cpu.
    again = await stack.chat(CODER, stream=False)
    assert again.headers["X-Harbor-Backend"] == "cpu"
    assert "X-Harbor-Fallbacks" not in again.headers
    assert len(stack.gpu.requests("/api/chat")) == 1
    status = await stack.get_json("/harbor/status")
    assert status["pins"][CODER]["backend"] == "cpu"


async def test_a_model_missing_on_the_gpu_is_served_by_the_cpu_without_a_pin(
    stack: Stack,
) -> None:
    stack.gpu.set_faults({"missing_models": [MODEL]})  # after the inventory: still planned
    response = await stack.chat(stream=False)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=model"
    assert [r.status for r in stack.gpu.requests("/api/chat")] == [404]
    assert stack.harbor.state.pins == {}


async def test_a_model_the_inventory_lacks_is_planned_on_the_backend_that_has_it(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(faults={"gpu": {"missing_models": [MODEL]}})
    route = await stack.get_json(f"/harbor/route?model={MODEL}")
    assert [step["backend"] for step in route["steps"]] == ["cpu", "gpu"]
    response = await stack.chat(stream=False)
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert "X-Harbor-Fallbacks" not in response.headers
    assert stack.gpu.requests("/api/chat") == []


async def test_a_busy_backend_spills_to_the_next(stack: Stack) -> None:
    stack.gpu.set_faults({"busy": True})
    response = await stack.chat(stream=False)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=busy"
    assert [r.status for r in stack.gpu.requests("/api/chat")] == [503]


async def test_a_backend_that_refuses_connections_is_skipped_and_cools_down(
    stack: Stack,
) -> None:
    await stack.gpu.test_server.close()  # the port now refuses connections
    response = await stack.chat(stream=False)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=network"
    gpu = await stack.backend("gpu")
    assert (gpu["health"], gpu["cooldown"]) == ("down", True)
    route = await stack.get_json(f"/harbor/route?model={MODEL}")
    assert [step["backend"] for step in route["steps"]] == ["cpu"]
    assert [step["backend"] for step in route["excluded"]] == ["gpu"]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_hung_backend_loses_the_request_at_its_first_byte_deadline(
    make_stack: StackFactory, stream: bool
) -> None:
    stack = await make_stack({"gpu": QUICK_DEADLINES, "cpu": ""})
    stack.gpu.set_faults({"hang_generation": True})  # probes still answer: not marked hung
    response = await stack.chat(stream=stream)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=network"
    await read_lines(response)

    async def gpu_request_cancelled() -> bool:
        return stack.gpu.states() == ["cancelled"]

    await stack.wait_for(gpu_request_cancelled, "the gpu to see its request cut off")
    decision = stack.harbor.ledger.decisions[response.headers["X-Harbor-Request-Id"]]
    failed = decision.attempts[0]
    assert (failed.backend, failed.outcome, failed.error_class) == ("gpu", "failed", "network")
    assert "within 0.1s" in (failed.error or "")


# --- after the first byte: the stream ends with an error, no retry -----------------------


async def test_an_error_line_after_the_first_byte_ends_the_ollama_stream(stack: Stack) -> None:
    stack.gpu.set_faults({"error_after_chunks": 2})
    response = await stack.chat(stream=True)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "gpu"
    lines = await read_ndjson(response)
    assert lines[0]["message"]["content"].startswith("[gpu]")
    assert "out of memory" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)
    assert stack.cpu.requests("/api/chat") == [], "no retry once bytes reached the client"


@pytest.mark.parametrize("openai", [False, True])
async def test_an_oom_after_the_first_byte_pins_the_model_for_the_next_request(
    stack: Stack, openai: bool
) -> None:
    stack.gpu.set_faults({"error_after_chunks": 2})
    response = await stack.chat(stream=True, openai=openai)
    assert response.headers["X-Harbor-Backend"] == "gpu"
    assert any(b"out of memory" in line for line in await read_lines(response))

    async def pinned() -> bool:  # the relay learns once the stream is over: just after EOF
        return "llama3.2:latest" in stack.harbor.state.pins

    await stack.wait_for(pinned, "the model pinned after the mid-stream OOM")
    pin = stack.harbor.state.pins["llama3.2:latest"]
    assert (pin.backend, pin.source) == ("cpu", "oom")
    decision = stack.harbor.ledger.decisions[response.headers["X-Harbor-Request-Id"]]
    assert [(a.outcome, a.error_class, a.after_first_byte) for a in decision.attempts] == [
        ("served", None, False),
        ("failed", "oom", True),
    ]
    stack.gpu.set_faults({})
    again = await stack.chat(stream=False, openai=openai)
    assert again.headers["X-Harbor-Backend"] == "cpu"


async def test_an_error_event_after_the_first_byte_ends_the_sse_stream(stack: Stack) -> None:
    stack.gpu.set_faults({"error_after_chunks": 2})
    response = await stack.chat(stream=True, openai=True)
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = [line for line in await read_lines(response) if line.startswith(b"data:")]
    assert b"[gpu]" in events[0]
    last = json.loads(events[-1].removeprefix(b"data:"))
    assert "out of memory" in last["error"]["message"]
    assert b"data: [DONE]" not in events
    assert stack.cpu.requests("/v1/chat/completions") == []


@pytest.mark.parametrize("openai", [False, True])
async def test_a_backend_dying_mid_stream_gets_harbords_own_error_ending(
    stack: Stack, openai: bool
) -> None:
    stack.gpu.set_faults({"die_after_chunks": 3})
    response = await stack.chat(stream=True, openai=openai)
    assert response.status == 200
    lines = await read_lines(response)
    if openai:
        assert lines[-2:][0] == b"event: error"
        error = json.loads(lines[-1].removeprefix(b"data:"))["error"]["message"]
    else:
        error = json.loads(lines[-1])["error"]
        assert len(lines) == 4  # three chunks, then the error line
    assert "gpu broke off the stream" in error
    decision = stack.harbor.ledger.decisions[response.headers["X-Harbor-Request-Id"]]
    assert [(a.backend, a.after_first_byte) for a in decision.attempts] == [
        ("gpu", False),
        ("gpu", True),
    ]
    path = "/v1/chat/completions" if openai else "/api/chat"
    assert stack.cpu.requests(path) == []


async def test_a_stream_that_goes_quiet_ends_with_an_error_line(make_stack: StackFactory) -> None:
    stack = await make_stack({"gpu": 'idle_timeout = "0.1s"', "cpu": ""})
    stack.gpu.set_faults({"token_delay": 1.0})
    response = await stack.chat(stream=True)
    lines = await read_ndjson(response)
    assert lines[0]["message"]["content"] == "[gpu] "
    assert lines[-1] == {"error": "gpu sent nothing for 0.1s"}
    assert len(lines) == 2
    assert stack.cpu.requests("/api/chat") == []


# --- the client goes away ----------------------------------------------------------------


@pytest.mark.parametrize("openai", [False, True])
async def test_a_client_leaving_mid_stream_cancels_the_backend_request(
    stack: Stack, openai: bool
) -> None:
    stack.gpu.set_faults({"token_delay": 0.05})
    response = await stack.chat(
        stream=True, openai=openai, options={"num_predict": 200}, max_tokens=200
    )
    assert response.status == 200
    assert await response.content.readline()  # the first chunk: now walk away
    response.close()
    path = "/v1/chat/completions" if openai else "/api/chat"

    async def cancelled_and_idle() -> bool:
        backend = await stack.backend("gpu")
        return stack.gpu.states(path) == ["cancelled"] and backend["in_flight"] == 0

    await stack.wait_for(cancelled_and_idle, "the gpu to see the cancellation")
    assert stack.gpu.requests(path)[0].chunks_sent < 200
    assert (await stack.get_json("/harbor/status"))["in_flight"] == 0


# --- harbord's own limiter -------------------------------------------------------------

ONE_SLOT = 'max_concurrency = 1\nmax_queue = 1\nqueue_timeout = "0.2s"\n'


async def test_a_full_queue_spills_and_a_queue_wait_times_out_to_the_next_backend(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack({"gpu": ONE_SLOT, "cpu": ""})
    stack.gpu.set_faults({"hang_generation": True})  # the first request holds the slot
    holder = asyncio.create_task(stack.chat(stream=False))

    async def gpu_has_a_request() -> bool:
        return stack.gpu.states() == ["running"]

    await stack.wait_for(gpu_has_a_request, "the gpu to take the first request")
    waiter = asyncio.create_task(stack.chat(stream=False))

    async def one_queued() -> bool:
        return bool((await stack.backend("gpu"))["queued"] == 1)

    await stack.wait_for(one_queued, "one request queued on the gpu")
    spilled = await stack.chat(stream=False)  # the queue is full: the cpu, at once
    assert spilled.status == 200
    assert spilled.headers["X-Harbor-Backend"] == "cpu"
    assert spilled.headers["X-Harbor-Fallbacks"] == "gpu=busy"
    timed_out = await waiter  # waited its queue_timeout, then the cpu
    assert timed_out.headers["X-Harbor-Backend"] == "cpu"
    assert timed_out.headers["X-Harbor-Fallbacks"] == "gpu=busy"

    stack.gpu.set_faults({})
    held = await holder
    assert held.status == 200
    assert held.headers["X-Harbor-Backend"] == "gpu"
    assert len(stack.gpu.requests("/api/chat")) == 1, "requests that spilled never reached it"
    assert len(stack.cpu.requests("/api/chat")) == 2


async def test_a_full_limiter_with_nowhere_to_go_is_a_503(make_stack: StackFactory) -> None:
    stack = await make_stack({"gpu": "max_concurrency = 1\nmax_queue = 0\n", "cpu": ""})
    stack.gpu.set_faults({"hang_generation": True})
    holder = asyncio.create_task(stack.chat(stream=False))

    async def gpu_has_a_request() -> bool:
        return stack.gpu.states() == ["running"]

    await stack.wait_for(gpu_has_a_request, "the gpu to take the first request")
    forced = await stack.chat(stream=False, headers={"X-Harbor-Backend": "gpu"})
    assert forced.status == 503
    assert forced.headers["Retry-After"]
    assert "queue full" in (await forced.json())["error"]
    stack.gpu.set_faults({})
    assert (await holder).status == 200
    assert len(stack.gpu.requests("/api/chat")) == 1


async def test_a_heavy_request_waits_for_a_busy_cpu_rather_than_spill_to_the_gpu(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack({"gpu": "", "cpu": "max_concurrency = 1\nmax_queue = 0\n"})
    stack.cpu.set_faults({"hang_generation": True})
    holder = asyncio.create_task(stack.chat(stream=False, headers={"X-Harbor-Intent": "heavy"}))

    async def cpu_has_a_request() -> bool:
        return stack.cpu.states() == ["running"]

    await stack.wait_for(cpu_has_a_request, "the cpu to take the first heavy request")
    busy = await stack.chat(stream=False, headers={"X-Harbor-Intent": "heavy"})
    assert busy.status == 503 and busy.headers["Retry-After"]
    assert busy.headers["X-Harbor-Fallbacks"] == "cpu=busy"
    assert stack.gpu.requests("/api/chat") == [], "heavy never spills to the gpu for load"
    # A fast request in the same spot still has the GPU.
    fast = await stack.chat(stream=False)
    assert fast.headers["X-Harbor-Backend"] == "gpu"
    stack.cpu.set_faults({})
    assert (await holder).headers["X-Harbor-Backend"] == "cpu"


# --- the prober ----------------------------------------------------------------------------

QUICK_PROBES = """
[routing]
probe_interval = "0.05s"
probe_interval_down = "0.05s"
probe_timeout = "0.1s"
inventory_interval = "1s"
hung_after_probes = 2
"""


async def test_a_hung_backend_goes_down_moves_back_in_the_plan_and_returns(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(routing=QUICK_PROBES)
    route = await stack.get_json(f"/harbor/route?model={MODEL}")
    assert [step["backend"] for step in route["steps"]] == ["gpu", "cpu"]

    stack.gpu.set_faults({"hang": True})  # probes time out too

    async def gpu_down() -> bool:
        return bool((await stack.backend("gpu"))["health"] == "down")

    await stack.wait_for(gpu_down, "the prober to find the gpu hung")
    route = await stack.get_json(f"/harbor/route?model={MODEL}")
    assert [step["backend"] for step in route["steps"]] == ["cpu", "gpu"]
    assert "backend is down: moved back" in route["steps"][1]["reasons"]
    # Another model, so that affinity (learned from who served it) leaves MODEL's plan alone.
    response = await stack.chat(CODER, stream=False)
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert "X-Harbor-Fallbacks" not in response.headers

    stack.gpu.set_faults({})

    async def gpu_up() -> bool:
        return bool((await stack.backend("gpu"))["health"] == "up")

    await stack.wait_for(gpu_up, "the prober to see the gpu back")
    route = await stack.get_json(f"/harbor/route?model={MODEL}")
    assert route["steps"][0]["backend"] == "gpu"


async def test_requests_waiting_on_a_backend_the_prober_finds_hung_move_on(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(routing=QUICK_PROBES)  # first-byte deadline: the default 600s
    stack.gpu.set_faults({"hang": True})
    response = await stack.chat(stream=True)
    assert response.status == 200
    assert response.headers["X-Harbor-Backend"] == "cpu"
    assert response.headers["X-Harbor-Fallbacks"] == "gpu=network"
    decision = stack.harbor.ledger.decisions[response.headers["X-Harbor-Request-Id"]]
    assert "gpu is hung" in (decision.attempts[0].error or "")

    async def gpu_request_cancelled() -> bool:
        return stack.gpu.states() == ["cancelled"]

    await stack.wait_for(gpu_request_cancelled, "the gpu to see its request cut off")
