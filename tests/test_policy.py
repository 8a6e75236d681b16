"""The routing policy, table-driven: intent x pins x affinity x health x inventory x size."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harbord.config import ModelRule
from harbord.policy import BackendView, PolicyError, RouteRequest, normalize_model, plan
from harbord.schemas import Affinity, Pin

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
