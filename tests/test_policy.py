"""The routing policy, table-driven: intent x pins x affinity x health x inventory x size."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest

from harbord.affinity import (
    affinities_to_drop,
    affinity_after_serve,
    expired_affinities,
    should_learn_affinity,
)
from harbord.config import ModelRule
from harbord.policy import BackendView, PolicyError, RouteRequest, normalize_model, plan
from harbord.schemas import Affinity, MemoryBudget, ModelFacts, Pin, Plan

NOW = 1_000_000.0
GB = 1_000_000_000

GPU = BackendView(
    "gpu", "gpu", "up", models={"small:latest": 2 * GB, "big:13b": 8 * GB}, memory_limit=6 * GB
)
CPU = BackendView("cpu", "cpu", "up", models={"small:latest": 2 * GB, "big:13b": 8 * GB})


def route(
    model: str | None = "small",
    intent: str | None = None,
    backends: tuple[BackendView, ...] = (GPU, CPU),
    pins: dict[str, Pin] | None = None,
    affinity: dict[str, Affinity] | None = None,
    rules: dict[str, ModelRule] | None = None,
    forced: str | None = None,
    body_intent: str | None = None,
) -> list[str]:
    result = plan(
        RouteRequest(model, intent_header=intent, intent_body=body_intent, forced_backend=forced),
        backends,
        pins or {},
        affinity or {},
        rules or {},
        "fast",
        NOW,
    )
    return result.backends


def pin_to(backend: str, until: float | None = None) -> dict[str, Pin]:
    return {"small:latest": Pin(backend, "test", NOW - 10, until)}


def affine(backend: str) -> dict[str, Affinity]:
    return {"small:latest": Affinity(backend, NOW - 10)}


CASES = [
    # name, kwargs, expected order
    ("fast prefers gpu", {}, ["gpu", "cpu"]),
    ("heavy prefers cpu", {"intent": "heavy"}, ["cpu", "gpu"]),
    ("body intent", {"body_intent": "heavy"}, ["cpu", "gpu"]),
    ("header beats body", {"intent": "fast", "body_intent": "heavy"}, ["gpu", "cpu"]),
    ("model rule intent", {"rules": {"small": ModelRule(intent="heavy")}}, ["cpu", "gpu"]),
    ("model rule pin", {"rules": {"small:latest": ModelRule(pin="cpu")}}, ["cpu", "gpu"]),
    ("pin beats fast", {"pins": pin_to("cpu")}, ["cpu", "gpu"]),
    ("pin beats heavy", {"intent": "heavy", "pins": pin_to("gpu")}, ["gpu", "cpu"]),
    ("expired pin ignored", {"pins": pin_to("cpu", until=NOW - 1)}, ["gpu", "cpu"]),
    (
        "state pin beats rule pin",
        {"pins": pin_to("gpu"), "rules": {"small": ModelRule(pin="cpu")}},
        ["gpu", "cpu"],
    ),
    # Issue 11: affinity only breaks ties within a kind; it no longer outranks intent.
    ("affinity never outranks intent", {"affinity": affine("cpu")}, ["gpu", "cpu"]),
    ("no affinity on heavy", {"intent": "heavy", "affinity": affine("gpu")}, ["cpu", "gpu"]),
    ("pin beats affinity", {"pins": pin_to("gpu"), "affinity": affine("cpu")}, ["gpu", "cpu"]),
    ("gpu down goes last", {"backends": (replace(GPU, health="down"), CPU)}, ["cpu", "gpu"]),
    (
        "degraded after healthy",
        {"backends": (replace(GPU, health="degraded"), CPU)},
        ["cpu", "gpu"],
    ),
    (
        "unknown health counts as up",
        {"backends": (replace(GPU, health="unknown"), CPU)},
        ["gpu", "cpu"],
    ),
    (
        "down beats pin",
        {"pins": pin_to("cpu"), "backends": (GPU, replace(CPU, health="down"))},
        ["gpu", "cpu"],
    ),
    ("cooldown is out of the plan", {"backends": (replace(GPU, cooldown=True), CPU)}, ["cpu"]),
    (
        "all cooling down: empty plan",
        {"backends": (replace(GPU, cooldown=True), replace(CPU, cooldown=True))},
        [],
    ),
    (
        "missing on gpu goes last",
        {"model": "cpuonly", "backends": (GPU, replace(CPU, models={"cpuonly:latest": GB}))},
        ["cpu", "gpu"],
    ),
    (
        "unknown inventory is not missing",
        {"model": "other", "backends": (replace(GPU, models=None), CPU)},
        ["gpu", "cpu"],
    ),
    ("missing everywhere keeps intent order", {"model": "nowhere"}, ["gpu", "cpu"]),
    ("too big for gpu goes cpu first on fast", {"model": "big:13b"}, ["cpu", "gpu"]),
    (
        "too big and pinned to gpu stays",
        {"model": "big:13b", "pins": {"big:13b": Pin("gpu", "op", NOW)}},
        ["gpu", "cpu"],
    ),
    (
        "too big beats affinity",
        {"model": "big:13b", "affinity": {"big:13b": Affinity("gpu", NOW)}},
        ["cpu", "gpu"],
    ),
    (
        "spill is memory pressure",
        {"backends": (replace(GPU, spilled={"small:latest": (2 * GB, GB)}), CPU)},
        ["cpu", "gpu"],
    ),
    (
        "spill on the cpu backend is ignored",
        {"intent": "fast", "backends": (GPU, replace(CPU, spilled={"small:latest": (2 * GB, GB)}))},
        ["gpu", "cpu"],
    ),
    ("forced backend only", {"forced": "cpu"}, ["cpu"]),
    (
        "config order breaks ties",
        {"backends": (GPU, replace(GPU, name="gpu2"), CPU)},
        ["gpu", "gpu2", "cpu"],
    ),
    (
        "three backends heavy",
        {"intent": "heavy", "backends": (GPU, CPU, replace(CPU, name="cpu2"))},
        ["cpu", "cpu2", "gpu"],
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_order(kwargs: dict[str, object], expected: list[str]) -> None:
    assert route(**kwargs) == expected  # type: ignore[arg-type]


def test_plan_explains_memory_and_pins() -> None:
    result = plan(RouteRequest("big:13b"), (GPU, CPU), {}, {}, {}, "fast", NOW)
    gpu_step = next(s for s in result.steps if s.backend == "gpu")
    assert any("exceeds" in r for r in gpu_step.reasons)
    assert result.notes == ["big:13b is too large for gpu"]

    pinned = plan(RouteRequest("small"), (GPU, CPU), pin_to("cpu"), {}, {}, "fast", NOW)
    assert pinned.steps[0].reasons[0] == "pinned here: test"


def test_excluded_backends_say_why() -> None:
    result = plan(
        RouteRequest("small"), (replace(GPU, cooldown=True), CPU), {}, {}, {}, "fast", NOW
    )
    assert [s.backend for s in result.excluded] == ["gpu"]
    assert "refused" in result.excluded[0].reasons[0]


@pytest.mark.parametrize("bad", ["Fast", "slow", ""])
def test_unknown_intent_is_refused(bad: str) -> None:
    with pytest.raises(PolicyError, match="unknown intent"):
        route(intent=bad)


def test_unknown_forced_backend_is_refused() -> None:
    with pytest.raises(PolicyError, match="unknown backend 'tpu'"):
        route(forced="tpu")


def test_intent_sources() -> None:
    base = (RouteRequest("small"), (GPU, CPU), {}, {}, {}, "fast", NOW)
    assert plan(*base).intent_source == "default"
    assert plan(*base[:6], NOW).intent == "fast"
    header = plan(RouteRequest("small", intent_header="heavy"), *base[1:])
    assert (header.intent, header.intent_source) == ("heavy", "header")
    rule = plan(
        RouteRequest("small"), (GPU, CPU), {}, {}, {"small": ModelRule(intent="heavy")}, "fast", NOW
    )
    assert (rule.intent, rule.intent_source) == ("heavy", "model rule")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:8b", "llama3:8b"),
        ("hf.co/org/model", "hf.co/org/model:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
    ],
)
def test_normalize_model(name: str, canonical: str) -> None:
    assert normalize_model(name) == canonical


# --- placement (issue 11): memory fit, learned spills, busy spill, affinity ---------

GIB = 1024**3
LLAMA8B = "llama3.1:8b"
# An 8B Llama: 32 blocks, 4096 wide, 32 heads, 8 KV heads -> 128 KiB of f16 KV cache per
# token: 0.5 GiB at 4k context, 8 GiB at 64k, on top of 4.9 GB of weights.
FACTS = {LLAMA8B: ModelFacts("llama", 32, 4096, 32, 8, context_length=131072)}
MODELS = {LLAMA8B: 4_900_000_000, "small:latest": 2 * GB}
GPU8 = BackendView("gpu", "gpu", "up", models=MODELS, budget=MemoryBudget(8 * GIB, "config"))
CPU2 = BackendView("cpu", "cpu", "up", models=MODELS, parallel=2)
SATURATED = replace(GPU8, in_flight=1, service_ms={LLAMA8B: 1000.0})


def place(
    num_ctx: int | None = None,
    backends: tuple[BackendView, ...] = (GPU8, CPU2),
    intent: str | None = None,
    model: str = LLAMA8B,
    pins: dict[str, Pin] | None = None,
    affinity: dict[str, Affinity] | None = None,
    facts: dict[str, ModelFacts] | None = None,
    forced: str | None = None,
) -> Plan:
    return plan(
        RouteRequest(model, intent_header=intent, num_ctx=num_ctx, forced_backend=forced),
        backends,
        pins or {},
        affinity or {},
        {},
        "fast",
        NOW,
        model_facts=FACTS if facts is None else facts,
        affinity_ttl=300.0,
        cpu_slowdown=6.0,
    )


def gpus_and_cpu(**gpu2: object) -> tuple[BackendView, ...]:
    return (GPU8, replace(GPU8, name="gpu2", **gpu2), CPU2)  # type: ignore[arg-type]


def affine_to(backend: str, since: float = NOW - 10, last: float | None = None) -> dict:  # type: ignore[type-arg]
    return {LLAMA8B: Affinity(backend, since, last)}


PLACEMENT_CASES: list[tuple[str, dict[str, object], list[str], str]] = [
    # name, kwargs of place(), expected order, expected Plan.rule
    # -- memory: weights + KV cache + graph + reserve at the request's context (as Ollama
    # sizes it, model_size.py) against the GPU's budget
    ("default 4k context fits 8 GiB", {}, ["gpu", "cpu"], "intent"),
    ("8k fits", {"num_ctx": 8192}, ["gpu", "cpu"], "intent"),
    ("16k does not fit", {"num_ctx": 16384}, ["cpu", "gpu"], "memory"),
    ("32k does not fit", {"num_ctx": 32768}, ["cpu", "gpu"], "memory"),
    ("64k does not fit", {"num_ctx": 65536}, ["cpu", "gpu"], "memory"),
    (
        "q8_0 KV cache with flash attention halves it: 16k fits",
        {
            "num_ctx": 16384,
            "backends": (replace(GPU8, kv_cache_type="q8_0", flash_attention=True), CPU2),
        },
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "q8_0 without flash attention is f16 (as in Ollama): 16k does not fit",
        {"num_ctx": 16384, "backends": (replace(GPU8, kv_cache_type="q8_0"), CPU2)},
        ["cpu", "gpu"],
        "memory",
    ),
    (
        "q4_0 KV cache: 32k still does not fit (the graph grows with the context)",
        {
            "num_ctx": 32768,
            "backends": (replace(GPU8, kv_cache_type="q4_0", flash_attention=True), CPU2),
        },
        ["cpu", "gpu"],
        "memory",
    ),
    (
        "two parallel slots double the cache: 16k does not fit",
        {"num_ctx": 16384, "backends": (replace(GPU8, parallel=2), CPU2)},
        ["cpu", "gpu"],
        "memory",
    ),
    (
        "the backend's default context counts without num_ctx",
        {"backends": (replace(GPU8, default_context=65536), CPU2)},
        ["cpu", "gpu"],
        "memory",
    ),
    (
        "context capped at the model's trained length",
        {
            "num_ctx": 65536,
            "facts": {LLAMA8B: msgspec.structs.replace(FACTS[LLAMA8B], context_length=8192)},
        },
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "no model facts: weights only, fits",
        {"num_ctx": 65536, "facts": {}},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "no budget known: no memory rule",
        {"num_ctx": 65536, "backends": (replace(GPU8, budget=None), CPU2)},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "pinned to the gpu stays despite memory",
        {"num_ctx": 65536, "pins": {LLAMA8B: Pin("gpu", "op", NOW)}},
        ["gpu", "cpu"],
        "pin",
    ),
    (
        "heavy and too big: memory is the stronger reason",
        {"num_ctx": 65536, "intent": "heavy"},
        ["cpu", "gpu"],
        "memory",
    ),
    (
        "too big but the cpu is down: gpu first",
        {"num_ctx": 65536, "backends": (GPU8, replace(CPU2, health="down"))},
        ["gpu", "cpu"],
        "health",
    ),
    (
        "memory beats affinity",
        {"num_ctx": 65536, "affinity": affine_to("gpu")},
        ["cpu", "gpu"],
        "memory",
    ),
    # -- spill learned: (model, context) that spilled on the GPU before
    (
        "spilled at 32k: 32k goes cpu first",
        {
            "num_ctx": 32768,
            "backends": (replace(GPU8, budget=None, spilled_contexts={LLAMA8B: 32768}), CPU2),
        },
        ["cpu", "gpu"],
        "spill",
    ),
    (
        "spilled at 32k: 64k goes cpu first",
        {
            "num_ctx": 65536,
            "backends": (replace(GPU8, budget=None, spilled_contexts={LLAMA8B: 32768}), CPU2),
        },
        ["cpu", "gpu"],
        "spill",
    ),
    (
        "spilled at 32k: 16k stays on the gpu",
        {
            "num_ctx": 16384,
            "backends": (replace(GPU8, budget=None, spilled_contexts={LLAMA8B: 32768}), CPU2),
        },
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "spilled at 32k: the 4k default stays on the gpu",
        {"backends": (replace(GPU8, spilled_contexts={LLAMA8B: 32768}), CPU2)},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "spilled but pinned to the gpu",
        {
            "num_ctx": 32768,
            "pins": {LLAMA8B: Pin("gpu", "op", NOW)},
            "backends": (replace(GPU8, budget=None, spilled_contexts={LLAMA8B: 32768}), CPU2),
        },
        ["gpu", "cpu"],
        "pin",
    ),
    (
        "a spill learned on a cpu backend means nothing",
        {
            "num_ctx": 32768,
            "backends": (
                replace(GPU8, budget=None),
                replace(CPU2, spilled_contexts={LLAMA8B: 4096}),
            ),
        },
        ["gpu", "cpu"],
        "intent",
    ),
    # -- busy spill: a saturated GPU, a CPU expected to finish first
    (
        "gpu idle: stays",
        {"backends": (replace(SATURATED, in_flight=0), CPU2)},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "gpu busy, cpu 6x slower without history: gpu 2 s beats cpu 6 s",
        {"backends": (SATURATED, CPU2)},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "gpu busy with 5 queued: 7 s there, cpu 6 s",
        {"backends": (replace(SATURATED, queued=5), CPU2)},
        ["cpu", "gpu"],
        "busy-spill",
    ),
    (
        "gpu busy with 4 queued: 6 s there is not later than the cpu's 6 s",
        {"backends": (replace(SATURATED, queued=4), CPU2)},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "cpu's own history: 1.5 s beats the busy gpu's 2 s",
        {"backends": (SATURATED, replace(CPU2, service_ms={LLAMA8B: 1500.0}))},
        ["cpu", "gpu"],
        "busy-spill",
    ),
    (
        "cpu busy too: 3 s there, gpu 2 s",
        {"backends": (SATURATED, replace(CPU2, in_flight=2, service_ms={LLAMA8B: 1500.0}))},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "gpu with two slots and one running is not saturated",
        {"backends": (replace(SATURATED, parallel=2), replace(CPU2, service_ms={LLAMA8B: 10.0}))},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "no gpu history: no numbers, no spill",
        {
            "backends": (
                replace(SATURATED, service_ms={}),
                replace(CPU2, service_ms={LLAMA8B: 10.0}),
            )
        },
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "cpu lacks the model: no spill",
        {"backends": (replace(SATURATED, queued=9), replace(CPU2, models={"small:latest": GB}))},
        ["gpu", "cpu"],
        "inventory",
    ),
    (
        "cpu inventory unknown: no spill",
        {"backends": (replace(SATURATED, queued=9), replace(CPU2, models=None))},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "cpu degraded: no spill",
        {"backends": (replace(SATURATED, queued=9), replace(CPU2, health="degraded"))},
        ["gpu", "cpu"],
        "health",
    ),
    (
        "pinned to the gpu: no spill",
        {
            "backends": (replace(SATURATED, queued=9), CPU2),
            "pins": {LLAMA8B: Pin("gpu", "op", NOW)},
        },
        ["gpu", "cpu"],
        "pin",
    ),
    (
        "heavy never moves to a busy gpu... nor from a busy cpu",
        {
            "intent": "heavy",
            "backends": (
                replace(GPU8, service_ms={LLAMA8B: 10.0}),
                replace(CPU2, in_flight=2, queued=9, service_ms={LLAMA8B: 9000.0}),
            ),
        },
        ["cpu", "gpu"],
        "intent",
    ),
    (
        "two cpus: the one expected first goes first, the other after the gpu",
        {
            "backends": (
                replace(SATURATED, queued=9),
                CPU2,
                replace(CPU2, name="cpu2", service_ms={LLAMA8B: 3000.0}),
            )
        },
        ["cpu2", "gpu", "cpu"],
        "busy-spill",
    ),
    # -- affinity: a tie-breaker among equals, expiring
    (
        "affinity to the cpu never beats fast intent",
        {"affinity": affine_to("cpu")},
        ["gpu", "cpu"],
        "intent",
    ),
    (
        "affinity between two gpus",
        {"backends": gpus_and_cpu(), "affinity": affine_to("gpu2")},
        ["gpu2", "gpu", "cpu"],
        "affinity",
    ),
    (
        "affinity expires affinity_ttl after its last answer",
        {
            "backends": gpus_and_cpu(),
            "affinity": affine_to("gpu2", since=NOW - 1000, last=NOW - 301),
        },
        ["gpu", "gpu2", "cpu"],
        "order",
    ),
    (
        "an old affinity still served recently holds",
        {"backends": gpus_and_cpu(), "affinity": affine_to("gpu2", since=NOW - 1000, last=NOW - 5)},
        ["gpu2", "gpu", "cpu"],
        "affinity",
    ),
    (
        "affinity without last_served expires from since",
        {"backends": gpus_and_cpu(), "affinity": affine_to("gpu2", since=NOW - 301)},
        ["gpu", "gpu2", "cpu"],
        "order",
    ),
    (
        "affinity never beats health",
        {"backends": gpus_and_cpu(health="degraded"), "affinity": affine_to("gpu2")},
        ["gpu", "cpu", "gpu2"],
        "intent",
    ),
    (
        "affinity between two cpus on heavy",
        {
            "intent": "heavy",
            "backends": (GPU8, CPU2, replace(CPU2, name="cpu2")),
            "affinity": affine_to("cpu2"),
        },
        ["cpu2", "cpu", "gpu"],
        "affinity",
    ),
    # -- the rest of the rules, as Plan.rule names them
    ("forced", {"forced": "cpu"}, ["cpu"], "forced"),
    ("gpu down", {"backends": (replace(GPU8, health="down"), CPU2)}, ["cpu", "gpu"], "health"),
    (
        "gpu cooling down: one step left",
        {"backends": (replace(GPU8, cooldown=True), CPU2)},
        ["cpu"],
        "health",
    ),
    ("one backend only", {"backends": (CPU2,)}, ["cpu"], "order"),
    ("pinned to the cpu", {"pins": {LLAMA8B: Pin("cpu", "op", NOW)}}, ["cpu", "gpu"], "pin"),
]


@pytest.mark.parametrize(
    ("kwargs", "expected", "rule"),
    [c[1:] for c in PLACEMENT_CASES],
    ids=[c[0] for c in PLACEMENT_CASES],
)
def test_placement_order_and_rule(
    kwargs: dict[str, object], expected: list[str], rule: str
) -> None:
    result = place(**kwargs)  # type: ignore[arg-type]
    assert (result.backends, result.rule) == (expected, rule)


def step_reasons(result: Plan, backend: str) -> list[str]:
    return next(s.reasons for s in result.steps if s.backend == backend)


def test_memory_reason_carries_the_numbers() -> None:
    result = place(num_ctx=65536)
    # 4.9 GB + 8 GiB of KV cache + 4.4 GiB of graph + 0.84 GiB reserve = 19.1 GB
    assert step_reasons(result, "gpu")[0] == (
        "needs 19.1 GB at 64k context, gpu has 8 GiB (config): after CPU backends"
    )
    assert result.notes == ["llama3.1:8b at 64k context does not fit gpu"]
    gpu = next(e for e in result.estimates if e.backend == "gpu")
    assert (gpu.num_ctx, gpu.needs, gpu.budget, gpu.budget_source) == (
        65536,
        19_114_531_208,
        8 * GIB,
        "config",
    )
    cpu = next(e for e in result.estimates if e.backend == "cpu")
    # The cpu's parallel 2 doubles its cache; it has no budget to compare with.
    # No reserve on a CPU, but its KV cache and graph for both slots.
    assert (cpu.needs, cpu.budget, cpu.parallel) == (30_971_795_712, None, 2)
    assert (cpu.weights, cpu.kv, cpu.reserve, cpu.needs_source) == (
        4_900_000_000,
        16 * GIB,
        0,
        "estimated",
    )
    assert result.num_ctx == 65536


def test_estimates_follow_the_steps() -> None:
    result = place(num_ctx=65536)
    assert [e.backend for e in result.estimates] == result.backends


def test_spill_reason_names_both_contexts() -> None:
    gpu = replace(GPU8, budget=None, spilled_contexts={LLAMA8B: 32768})
    result = place(num_ctx=65536, backends=(gpu, CPU2))
    assert step_reasons(result, "gpu")[0] == (
        "spilled to system RAM here at 32k context, this request needs 64k: after CPU backends"
    )
    assert result.notes == ["llama3.1:8b spilled on gpu at 32k"]


def test_busy_spill_reasons_and_numbers() -> None:
    result = place(backends=(replace(SATURATED, queued=5), CPU2))
    assert step_reasons(result, "cpu")[0] == (
        "gpu is busy (1 running, 5 queued, 1 at once): done in ~7000 ms there, ~6000 ms here: first"
    )
    assert step_reasons(result, "gpu")[0].endswith("done in ~7000 ms there: after cpu")
    finish = {e.backend: (e.service_ms, e.expected_finish_ms) for e in result.estimates}
    assert finish == {"cpu": (6000.0, 6000.0), "gpu": (1000.0, 7000.0)}
    assert result.notes == ["gpu is busy: llama3.1:8b goes to cpu"]


def test_no_busy_numbers_when_the_gpu_is_free() -> None:
    result = place(backends=(replace(SATURATED, in_flight=0), CPU2))
    assert all(e.expected_finish_ms is None for e in result.estimates)


def test_forced_plan_records_the_pin() -> None:
    result = place(forced="gpu", pins={LLAMA8B: Pin("cpu", "op", NOW)}, num_ctx=8192)
    assert (result.forced, result.rule, result.pinned, result.num_ctx) == (
        True,
        "forced",
        "cpu",
        8192,
    )


# --- affinity helpers the daemon calls ----------------------------------------------


def first_plan(**kwargs: object) -> Plan:
    return place(**kwargs)  # type: ignore[arg-type]


LEARN_CASES: list[tuple[str, Plan, str, bool, bool]] = [
    # name, plan, served by, forced by the caller, learn?
    ("first step served", first_plan(), "gpu", False, True),
    ("fallback served", first_plan(), "cpu", False, False),
    ("forced plan", first_plan(forced="gpu"), "gpu", False, False),
    ("caller says forced", first_plan(), "gpu", True, False),
    ("pinned model", first_plan(pins={LLAMA8B: Pin("gpu", "op", NOW)}), "gpu", False, False),
    (
        "expired pin",
        first_plan(pins={LLAMA8B: Pin("cpu", "op", NOW - 1, NOW - 0.5)}),
        "gpu",
        False,
        True,
    ),
    ("busy spill", first_plan(backends=(replace(SATURATED, queued=5), CPU2)), "cpu", False, False),
    ("memory: cpu first", first_plan(num_ctx=65536), "cpu", False, True),
    ("empty plan", first_plan(backends=(replace(GPU8, cooldown=True),)), "gpu", False, False),
]


@pytest.mark.parametrize(
    ("result", "served", "forced", "learn"),
    [c[1:] for c in LEARN_CASES],
    ids=[c[0] for c in LEARN_CASES],
)
def test_should_learn_affinity(result: Plan, served: str, forced: bool, learn: bool) -> None:
    assert should_learn_affinity(result, served, forced) is learn


def test_affinity_after_serve_keeps_since_and_moves_last_served() -> None:
    first = affinity_after_serve(None, "gpu", 100.0)
    assert (first.backend, first.since, first.last_served) == ("gpu", 100.0, 100.0)
    again = affinity_after_serve(first, "gpu", 200.0)
    assert (again.since, again.last_served) == (100.0, 200.0)
    moved = affinity_after_serve(again, "gpu2", 300.0)
    assert (moved.backend, moved.since, moved.last_served) == ("gpu2", 300.0, 300.0)


def test_expired_affinities() -> None:
    affinity = {
        "a:latest": Affinity("gpu", NOW - 1000, NOW - 10),
        "b:latest": Affinity("gpu", NOW - 1000, NOW - 300),
        "c:latest": Affinity("gpu", NOW - 299),
        "d:latest": Affinity("gpu", NOW - 301),
    }
    assert expired_affinities(affinity, NOW, 300.0) == ["b:latest", "d:latest"]
    assert expired_affinities(affinity, NOW, 0.0) == list(affinity)  # ttl 0: affinity off


def test_affinities_to_drop_when_a_backend_comes_back() -> None:
    views = (*gpus_and_cpu(), replace(CPU2, name="cpu2"))
    affinity = {
        "on-gpu2:latest": Affinity("gpu2", NOW),  # kept away from gpu: dropped
        "on-gpu:latest": Affinity("gpu", NOW),  # points at the recovered one: kept
        "on-cpu2:latest": Affinity("cpu2", NOW),  # another kind: no tie with gpu, kept
        "gone:latest": Affinity("tpu", NOW),  # backend no longer configured: dropped
    }
    assert affinities_to_drop(affinity, views, came_up="gpu") == ["on-gpu2:latest", "gone:latest"]
    assert affinities_to_drop(affinity, views, came_up="cpu") == ["on-cpu2:latest", "gone:latest"]


def test_plan_with_placement_numbers_round_trips_as_json() -> None:
    """`harborctl route`/`explain` read the plan back from the daemon's JSON."""
    result = place(num_ctx=65536, backends=(replace(SATURATED, queued=5), CPU2))
    again = msgspec.json.decode(msgspec.json.encode(result), type=Plan)
    assert again == result
    assert again.rule == "memory"
    assert {e.backend: e.needs for e in again.estimates} == {
        e.backend: e.needs for e in result.estimates
    }
    old = msgspec.json.decode(
        b'{"model":"m","intent":"fast","intent_source":"default","steps":[]}', type=Plan
    )
    assert (old.rule, old.estimates, old.pinned) == (
        "order",
        [],
        None,
    )  # older decisions still decode
