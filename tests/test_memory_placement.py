"""Memory in placement (issue 17): Ollama's own sizing, the CPU's RAM, measured sizes.

Table-driven over the pure policy; the estimate itself is tested against what real
Ollama servers reported in test_memory_observed.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from harbord.policy import BackendView, RouteRequest, plan
from harbord.schemas import MeasuredSize, MemoryBudget, ModelFacts, Plan
from tests.test_memory_observed import GEMMA3_27B

NOW = 1_000_000.0
GB = 1_000_000_000
GIB = 1024**3
GEMMA = "gemma3:27b"
LLAMA70 = "llama3.1:70b"
LLAMA8 = "llama3.1:8b"
FACTS = {
    GEMMA: GEMMA3_27B,
    LLAMA70: ModelFacts("llama", 80, 8192, 64, 8, context_length=131072, vocab_size=128256),
    LLAMA8: ModelFacts("llama", 32, 4096, 32, 8, context_length=131072, vocab_size=128256),
}
MODELS = {GEMMA: 17_400_000_000, LLAMA70: 42_500_000_000, LLAMA8: 4_900_000_000}
GPU24 = BackendView("gpu", "gpu", "up", models=MODELS, budget=MemoryBudget(24 * GIB, "config"))
GPU12 = replace(GPU24, budget=MemoryBudget(12 * GIB, "journal"))
CPU = BackendView(
    "cpu", "cpu", "up", models=MODELS, parallel=2,
    budget=MemoryBudget(int(28.8 * GIB), "meminfo", "MemTotal 32 GiB less 3.2 GiB"),
)  # fmt: skip


def place(
    model: str,
    backends: tuple[BackendView, ...],
    num_ctx: int | None = None,
    intent: str | None = None,
) -> Plan:
    return plan(
        RouteRequest(model, intent_header=intent, num_ctx=num_ctx),
        backends,
        {},
        {},
        {},
        "fast",
        NOW,
        model_facts=FACTS,
    )


CASES = [
    # name, model, backends, num_ctx, intent, expected order, rule
    (
        "gemma3:27b at 32k fits a 24 GiB GPU (sliding-window layers at their window)",
        GEMMA, (GPU24, CPU), 32768, None, ["gpu", "cpu"], "intent",
    ),
    ("...but not a 12 GiB one", GEMMA, (GPU12, CPU), 32768, None, ["cpu", "gpu"], "memory"),
    (
        "a heavy model the CPU's RAM cannot hold goes to a GPU it fits",
        LLAMA8, (GPU24, replace(CPU, budget=MemoryBudget(4 * GIB, "config"))), 8192, "heavy",
        ["gpu", "cpu"], "memory",
    ),
    (
        "a CPU without a known budget (another host, no `ram`) takes it",
        LLAMA70, (GPU12, replace(CPU, budget=None)), 8192, None, ["cpu", "gpu"], "memory",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "model", "backends", "num_ctx", "intent", "expected", "rule"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_memory_order(
    name: str,
    model: str,
    backends: tuple[BackendView, ...],
    num_ctx: int | None,
    intent: str | None,
    expected: list[str],
    rule: str,
) -> None:
    result = place(model, backends, num_ctx, intent)
    assert (result.backends, result.rule, result.refused) == (expected, rule, None)


def test_a_model_that_fits_nowhere_is_refused_with_the_numbers() -> None:
    result = place(LLAMA70, (GPU12, CPU), 8192)
    assert result.refused is not None
    assert result.refused.startswith(f"{LLAMA70} at 8k needs ")
    assert result.refused.endswith("; gpu has 12 GiB, cpu has 28.8 GiB of RAM")
    cpu = next(s for s in result.steps if s.backend == "cpu")
    assert any(r.endswith("of RAM (meminfo): moved back") for r in cpu.reasons)


def test_the_estimate_is_shown_in_parts() -> None:
    result = place(GEMMA, (GPU24, CPU), 32768)
    gpu, cpu = (next(e for e in result.estimates if e.backend == n) for n in ("gpu", "cpu"))
    assert gpu.needs is not None and cpu.needs is not None
    assert gpu.weights == MODELS[GEMMA] and gpu.needs_source == "estimated"
    assert gpu.kv is not None and gpu.kv < 4 * GIB  # not 15.5 GiB: the windows hold 1k
    assert (gpu.reserve or 0) > 0 and cpu.reserve == 0  # a GPU's reserve only on a GPU
    parts = [gpu.weights, gpu.kv, gpu.graph, gpu.projector, gpu.reserve]
    assert sum(p or 0 for p in parts) == gpu.needs
    assert cpu.budget == int(28.8 * GIB) and cpu.budget_source == "meminfo"


def test_a_measured_size_replaces_the_estimate_and_moves_with_the_context() -> None:
    estimated = place(LLAMA8, (GPU24, CPU), 8192).estimates[0]
    measured_size = MeasuredSize(int(7.5 * GIB), 8192, 1)
    gpu = replace(GPU24, measured={LLAMA8: measured_size})
    same = place(LLAMA8, (gpu, CPU), 8192).estimates[0]
    assert (same.needs_source, same.measured_at) == ("measured", 8192)
    assert same.needs == int(7.5 * GIB) + (same.reserve or 0) != estimated.needs
    # At 16k: the measurement, plus what the estimate says 16k costs more than 8k.
    larger = place(LLAMA8, (gpu, CPU), 16384).estimates[0]
    at16 = place(LLAMA8, (GPU24, CPU), 16384).estimates[0]
    assert larger.needs_source == "measured"
    assert larger.needs is not None and at16.needs is not None and estimated.needs is not None
    moved = (larger.needs - (larger.reserve or 0)) - (same.needs - (same.reserve or 0))
    assert moved == pytest.approx(
        (at16.needs - (at16.reserve or 0)) - (estimated.needs - (estimated.reserve or 0)),
        abs=1,
    )


def test_an_embedding_model_is_sized_for_one_slot() -> None:
    nomic = ModelFacts(
        "nomic-bert", 12, 768, 12, 12, context_length=2048, embedding=True, vocab_size=30522
    )
    cpu4 = replace(CPU, parallel=4)
    result = plan(
        RouteRequest("nomic-embed-text", num_ctx=8192),
        (cpu4,),
        {},
        {},
        {},
        "fast",
        NOW,
        model_facts={"nomic-embed-text:latest": nomic},
    )
    del result  # no size in the inventory: nothing to estimate
    views = (replace(cpu4, models={"nomic-embed-text:latest": 274_000_000}),)
    result = plan(
        RouteRequest("nomic-embed-text", num_ctx=8192),
        views,
        {},
        {},
        {},
        "fast",
        NOW,
        model_facts={"nomic-embed-text:latest": nomic},
    )
    estimate = result.estimates[0]
    # the context capped at the trained 2048, one slot, no GPU reserve on a CPU
    assert (estimate.num_ctx, estimate.reserve) == (2048, 0)
    assert estimate.needs is not None and estimate.needs < 400 * 1024**2


def test_route_shows_the_parts_and_whether_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    from harbord.ctl.commands.route import render

    monkeypatch.setenv("NO_COLOR", "1")
    text = render(place(GEMMA, (GPU24, CPU), 32768))
    assert "gpu: 17.4 GB weights + " in text and " reserve = " in text
    assert text.count(", estimated") == 2
    gpu = replace(GPU24, measured={LLAMA8: MeasuredSize(int(7.5 * GIB), 8192, 1)})
    text = render(place(LLAMA8, (gpu, CPU), 16384))
    assert "measured by Ollama at 8k, moved to 16k by the estimate" in text
    text = render(place(LLAMA70, (GPU12, CPU), 8192))
    assert "refused: llama3.1:70b at 8k needs" in text
