"""What the daemon feeds the placement policy from its edges (issue 11): each backend's
view (load, service times, spills, memory budget), the limiter's wait order, model
facts from /api/show, /api/ps read right after a load, and affinity kept by Harbor."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from harbord import harbor_endpoints as api
from harbord.admission import Limiter
from harbord.backends import Backend
from harbord.config import BackendConfig, ByteSize
from harbord.gpu_memory import GpuFigures
from harbord.memory import GIB
from harbord.metrics import Metrics
from harbord.policy import RouteRequest
from harbord.schemas import Affinity, Decision, GpuMemory, MemoryBudget, Plan, PlanStep, PsModel
from harbord.state import StateStore
from tests.inproc import StackFactory

MODEL = "llama3.1:8b"
SIZE = 4_900_000_000
# An 8B Llama: 128 KiB of f16 KV cache per token.
MODEL_INFO: dict[str, object] = {
    "general.architecture": "llama",
    "llama.block_count": 32,
    "llama.embedding_length": 4096,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.context_length": 131072,
}


def gpu(**changes: Any) -> Backend:
    return Backend("gpu", BackendConfig(url="http://127.0.0.1:1", kind="gpu", **changes))


def cpu(**changes: Any) -> Backend:
    return Backend("cpu", BackendConfig(url="http://127.0.0.1:2", kind="cpu", **changes))


# --- the limiter's wait order ------------------------------------------------------------


async def queue_up(
    limiter: Limiter, intents: list[str]
) -> tuple[list[str], list[asyncio.Task[bool]]]:
    """Waiters for `intents`, in that arrival order, behind one running request."""
    assert await limiter.acquire()
    served: list[str] = []

    async def wait(tag: str, intent: Any) -> bool:
        ok = await limiter.acquire(intent)
        served.append(tag)
        return ok

    tasks = []
    for i, intent in enumerate(intents):
        tasks.append(asyncio.create_task(wait(f"{intent}{i}", intent)))
        await asyncio.sleep(0)  # arrives, and waits
    assert limiter.queued == len(intents)
    return served, tasks


async def drain(limiter: Limiter, tasks: list[asyncio.Task[bool]]) -> None:
    """Each release hands the one slot to the next waiter; the last one gives it back."""
    for _ in tasks:
        limiter.release()
        await asyncio.sleep(0)
    assert all(await asyncio.gather(*tasks))
    assert (limiter.active, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.active == 0


async def test_waiting_fast_requests_go_before_heavy_ones() -> None:
    limiter = Limiter(1, 10, 30, fast_head_start=10)
    served, tasks = await queue_up(limiter, ["heavy", "heavy", "fast", "fast"])
    await drain(limiter, tasks)
    assert served == ["fast2", "fast3", "heavy0", "heavy1"]


async def test_heavy_that_waited_past_the_head_start_goes_first() -> None:
    limiter = Limiter(1, 10, 30, fast_head_start=0)  # no head start: arrival order
    served, tasks = await queue_up(limiter, ["heavy", "fast", "heavy"])
    await drain(limiter, tasks)
    assert served == ["heavy0", "fast1", "heavy2"]


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_queue() -> None:
    limiter = Limiter(1, 10, 0.05)
    assert await limiter.acquire()
    assert await limiter.acquire("heavy") is False  # timed out
    cancelled = asyncio.create_task(limiter.acquire("fast"))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert limiter.queued == 0
    limiter.release()
    assert limiter.active == 0


# --- the backend's view -------------------------------------------------------------------


def test_the_view_follows_the_load_without_a_rebuild_per_request() -> None:
    backend = gpu()
    first = backend.view
    assert backend.view is first  # nothing moved: the same snapshot
    assert (first.parallel, first.in_flight, first.queued) == (1, 0, 0)
    backend.limiter.active = 2  # two generations hold slots
    assert (backend.view.in_flight, backend.view.queued) == (2, 0)
    assert backend.view is backend.view
    assert cpu().view.parallel == 2  # the shipped cpu unit's OLLAMA_NUM_PARALLEL


def test_service_times_are_a_moving_average_the_view_sees_live() -> None:
    backend = gpu()
    view = backend.view
    backend.record_service("llama3.2", 1000.0)
    backend.record_service("llama3.2:latest", 2000.0)
    assert view.service_ms == {"llama3.2:latest": pytest.approx(1300.0)}  # ewma, weight 0.3
    assert backend.status().service_ms == {"llama3.2:latest": 1300.0}


def test_an_answer_is_a_load_worth_a_ps_read_once_per_model_and_interval() -> None:
    backend = gpu()
    assert backend.answer_loaded(MODEL, now=100.0)  # not in the last /api/ps: read it
    assert not backend.answer_loaded(MODEL, now=101.0)  # asked a second ago
    assert backend.answer_loaded("other:latest", now=101.0)  # another model: its own bound
    assert backend.answer_loaded(MODEL, now=111.0)  # still not listed, 11 s later
    backend.set_inventory({MODEL: SIZE}, [PsModel(MODEL, size=SIZE, size_vram=SIZE)])
    assert not backend.answer_loaded(MODEL, now=200.0)  # loaded: nothing to learn


def test_a_spill_in_api_ps_is_learned_with_its_context_and_shows_the_budget() -> None:
    backend = gpu()
    spilled = PsModel(MODEL, size=12 * GIB, size_vram=7 * GIB, context_length=65536)
    backend.set_inventory({MODEL: SIZE}, [spilled])
    assert backend.spilled_contexts == {MODEL: 65536}
    assert backend.is_loaded(MODEL) and not backend.is_loaded("llama3.2:latest")
    view = backend.view
    assert view.spilled_contexts == {MODEL: 65536}
    assert view.spilled == {MODEL: (12 * GIB, 7 * GIB)}
    assert view.budget == MemoryBudget(7 * GIB, "/api/ps", f"{MODEL} spilled past it")
    # Loaded whole at that context later (after another model left): forgotten.
    backend.set_loaded([PsModel(MODEL, size=12 * GIB, size_vram=12 * GIB, context_length=65536)])
    assert backend.spilled_contexts == {}
    # A cpu backend's size_vram is always 0: nothing to learn there.
    other = cpu()
    other.set_loaded([PsModel(MODEL, size=SIZE, size_vram=0, context_length=4096)])
    assert other.spilled_contexts == {}


def test_the_budget_comes_from_config_else_what_was_discovered() -> None:
    journal = (GpuMemory(12 * GIB, 11 * GIB, "RTX 4070"),)
    backend = gpu()
    assert backend.view.budget is None
    assert backend.status().memory_note == "not looked for yet"
    backend.set_gpu_figures(GpuFigures(missing=("journal: journalctl not found",)))
    assert backend.status().memory_note == "journal: journalctl not found"
    backend.set_gpu_figures(GpuFigures(journal=journal, sysfs=(GpuMemory(16 * GIB),)))
    assert backend.view.budget == MemoryBudget(11 * GIB, "journal", "RTX 4070")
    assert backend.status().memory_budget == backend.view.budget
    configured = gpu(vram=ByteSize(8 * GIB))
    configured.set_gpu_figures(GpuFigures(journal=journal))
    assert configured.view.budget == MemoryBudget(8 * GIB, "config", "backend key vram")
    assert cpu().view.budget is None


def test_the_default_context_follows_config_else_ollamas_rule_for_the_gpu() -> None:
    assert gpu().view.default_context == 4096
    big = gpu()
    big.set_gpu_figures(GpuFigures(journal=(GpuMemory(32 * GIB, 30 * GIB),)))
    assert big.view.default_context == 32768  # Ollama's default on a 24-48 GiB GPU
    assert gpu(default_context=65536).view.default_context == 65536
    assert gpu(kv_cache_type="q8_0").view.kv_cache_type == "q8_0"


def test_coming_up_from_down_or_unknown_is_noted_once_degraded_is_not() -> None:
    backend = gpu()
    backend.mark_up("0.14.3")
    assert backend.came_up and backend.rediscover.is_set()
    backend.came_up = False
    backend.rediscover.clear()
    backend.record_failure("driver", "CUDA error")
    backend.record_success()  # degraded -> up: it never went away
    assert not backend.came_up
    backend.mark_down("refused")
    backend.record_success()
    assert backend.came_up


# --- metrics ------------------------------------------------------------------------------


def test_decisions_are_counted_by_rule_and_a_missing_plan_is_tolerated() -> None:
    metrics = Metrics()
    plan = Plan(MODEL, "fast", "default", [PlanStep("cpu", [])], rule="memory")
    decision = Decision("1", 0.0, "POST", "/api/chat", MODEL, "fast", plan, served_by="cpu")
    metrics.observe(decision)
    metrics.observe(decision)
    refused = Decision("2", 0.0, "POST", "/api/chat", MODEL, "fast", plan, status=400)
    refused.plan = None  # type: ignore[assignment]  # refused before planning
    metrics.observe(refused)
    assert metrics.rules == {"memory": 2}


# --- in process: a small Ollama stand-in ---------------------------------------------------


@dataclass
class TinyOllama:
    """Just what the prober and the facts cache read; `ps` and `info` can change."""

    models: dict[str, int]
    info: dict[str, object] = field(default_factory=lambda: dict(MODEL_INFO))
    ps: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    show_gate: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def version(_: web.Request) -> web.Response:
            return web.json_response({"version": "0.14.3"})

        async def tags(_: web.Request) -> web.Response:
            models = [{"name": n, "model": n, "size": s} for n, s in self.models.items()]
            return web.json_response({"models": models})

        async def ps(request: web.Request) -> web.Response:
            self.paths.append(request.path)
            return web.json_response({"models": self.ps})

        async def show(request: web.Request) -> web.Response:
            self.paths.append(request.path)
            await self.show_gate.wait()
            return web.json_response({"model_info": self.info, "details": {}})

        app = web.Application()
        app.router.add_get("/api/version", version)
        app.router.add_get("/api/tags", tags)
        app.router.add_get("/api/ps", ps)
        app.router.add_post("/api/show", show)
        return app


async def test_a_plan_never_waits_for_model_facts_and_later_plans_use_them(
    make_stack: StackFactory,
) -> None:
    tiny = TinyOllama({MODEL: SIZE})
    stack = await make_stack(
        {"gpu": 'vram = "8GiB"', "cpu": 'ram = "64GiB"'},  # not this host's 24 GiB
        apps={"gpu": tiny.app(), "cpu": TinyOllama({MODEL: SIZE}).app()},
    )
    harbor = stack.harbor
    facts = harbor.prober.model_facts
    # /api/show does not answer yet: the first plan goes without the model's shape.
    first = harbor.plan(RouteRequest(MODEL, num_ctx=65536))
    assert first.backends == ["gpu", "cpu"]
    # No KV cache or graph without facts: the weights and the GPU's reserve only.
    first_gpu = first.estimates[0]
    assert (first_gpu.needs, first_gpu.kv) == (SIZE + (first_gpu.reserve or 0), 0)
    await stack.wait_for(lambda: _true(tiny.paths.count("/api/show") == 1), "the /api/show")
    harbor.plan(RouteRequest(MODEL))  # still on its way: not asked twice
    tiny.show_gate.set()
    await stack.wait_for(lambda: _true(MODEL in facts.facts), "the facts cached")
    later = harbor.plan(RouteRequest(MODEL, num_ctx=65536))
    assert (later.backends, later.rule) == (["cpu", "gpu"], "memory")
    later_gpu = later.estimates[1]
    assert (later_gpu.weights, later_gpu.kv) == (SIZE, 8 * GIB)
    assert "at 64k context, gpu has 8 GiB (config)" in later.steps[1].reasons[0]
    assert harbor.plan(RouteRequest(MODEL)).backends == ["gpu", "cpu"]  # 4k fits
    assert tiny.paths.count("/api/show") == 1
    # A new pull of the model (another size) forgets the facts.
    tiny.models[MODEL] = SIZE + 1
    await harbor.prober.refresh_inventory(harbor.backends["gpu"])
    assert MODEL not in facts.facts


async def _true(value: bool) -> bool:
    return value


async def test_after_load_reads_api_ps_at_once_and_the_spill_moves_the_model(
    make_stack: StackFactory,
) -> None:
    tiny = TinyOllama({MODEL: SIZE})
    stack = await make_stack(apps={"gpu": tiny.app(), "cpu": TinyOllama({MODEL: SIZE}).app()})
    harbor, backend = stack.harbor, stack.harbor.backends["gpu"]
    assert harbor.plan(RouteRequest(MODEL, num_ctx=32768)).backends == ["gpu", "cpu"]
    tiny.ps = [
        {"name": MODEL, "model": MODEL, "size": 9 * GIB, "size_vram": 7 * GIB,
         "context_length": 32768, "expires_at": "2026-12-02T13:00:00Z"},
    ]  # fmt: skip
    reads = tiny.paths.count("/api/ps")
    await harbor.prober.after_load(backend)
    assert tiny.paths.count("/api/ps") == reads + 1
    assert backend.spilled_contexts == {MODEL: 32768}
    # Gone from VRAM (unloaded): what was learned still places 32k and more on the cpu.
    tiny.ps = []
    await harbor.prober.after_load(backend)
    plan = harbor.plan(RouteRequest(MODEL, num_ctx=65536))
    assert (plan.backends, plan.rule) == (["cpu", "gpu"], "spill")
    assert "spilled to system RAM here at 32k context" in plan.steps[1].reasons[0]
    assert harbor.plan(RouteRequest(MODEL, num_ctx=8192)).backends == ["gpu", "cpu"]
    gpu_status = await stack.backend("gpu")
    assert gpu_status["spilled_contexts"] == {MODEL: 32768}


def _plan(first: str, *rest: str, **changes: Any) -> Plan:
    steps = [PlanStep(name, []) for name in (first, *rest)]
    return Plan(MODEL, "fast", "default", steps, **changes)


async def test_affinity_is_learned_only_from_the_plans_own_choice_and_persisted(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = await make_stack()
    harbor = stack.harbor
    assert not harbor.state.learn_affinity(_plan("gpu", "cpu"), "cpu")  # a fallback
    assert not harbor.state.learn_affinity(_plan("cpu", "gpu", pinned="cpu", rule="pin"), "cpu")
    assert not harbor.state.learn_affinity(_plan("cpu", "gpu", rule="busy-spill"), "cpu")
    assert not harbor.state.learn_affinity(_plan("cpu", forced=True, rule="forced"), "cpu")
    assert harbor.state.affinity == {}
    assert harbor.state.learn_affinity(_plan("gpu", "cpu"), "gpu")
    learned = harbor.state.affinity[MODEL]
    assert learned.backend == "gpu" and learned.last_served is not None
    await stack.wait_for(lambda: _true(harbor.state.path.exists()), "the state saved")
    await asyncio.sleep(0.05)
    saved = StateStore(harbor.state.directory)
    saved.load()
    assert saved.affinity[MODEL].backend == "gpu"
    assert await stack.get_json("/harbor/affinity") == {
        MODEL: {"backend": "gpu", "since": learned.since, "last_served": learned.last_served}
    }


async def test_affinity_expires_and_is_reset_through_the_api(make_stack: StackFactory) -> None:
    stack = await make_stack()
    harbor = stack.harbor
    now = time.time()
    harbor.state.affinity.update(
        {
            "old:1": Affinity("cpu", now - 3600, now - 3000),  # past the 5m affinity_ttl
            "new:1": Affinity("cpu", now - 60, now - 10),
            "other:1": Affinity("gpu", now - 60, now - 10),
        }
    )
    assert set(harbor.status().affinity) == {"new:1", "other:1"}  # expired: not shown
    harbor.state.expire()  # housekeeping
    assert set(harbor.state.affinity) == {"new:1", "other:1"}
    reset = await stack.client.delete("/harbor/affinity/new:1")
    assert (reset.status, await reset.json()) == (200, {"reset": ["new:1"]})
    missing = await stack.client.delete("/harbor/affinity/new:1")
    assert missing.status == 404
    everything = await stack.client.delete("/harbor/affinity")
    assert await everything.json() == {"reset": ["other:1"]}
    assert harbor.state.affinity == {}
    assert api.AFFINITY.path == "/harbor/affinity"


async def test_a_backend_back_up_drops_the_affinity_that_kept_models_off_it(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack({"gpu": "", "gpu2": "", "cpu": ""})
    harbor = stack.harbor
    now = time.time()
    harbor.state.affinity.update(
        {
            "a:1": Affinity("gpu2", now, now),  # kept a:1 off gpu: goes
            "b:1": Affinity("cpu", now, now),  # another kind: stays
            "c:1": Affinity("gpu", now, now),
            "d:1": Affinity("gone", now, now),  # no such backend any more: goes
        }
    )
    backend = harbor.backends["gpu"]
    backend.mark_down("connection refused")
    backend.mark_up("0.14.3")
    assert set(harbor.state.affinity) == {"b:1", "c:1"}
    assert not backend.came_up  # handled once


async def test_a_served_request_is_counted_by_its_rule(make_stack: StackFactory) -> None:
    stack = await make_stack()
    response = await stack.chat(stream=False, headers={"X-Harbor-Intent": "heavy"})
    assert response.status == 200
    metrics = await stack.client.get("/metrics")
    assert 'harbor_decisions_total{rule="intent"} 1.0' in await metrics.text()
