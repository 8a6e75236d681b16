"""Memory end to end (issue 17): harbord and fake Ollama servers as real processes.

A gemma3 at 32k fits a 24 GiB GPU once harbord sizes it as Ollama does (its
sliding-window layers at their window); a model that fits no backend is refused
before any backend is asked; what /api/ps measured replaces the estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakeproc import FakeOllama
from tests.harness import Harbord
from tests.test_placement_e2e import config_text, daemons, launch, route, wait_until

pytestmark = pytest.mark.e2e
__all__ = ["daemons"]  # the fixture, used by name

GIB = 1024**3
GEMMA = "gemma3:27b"
LLAMA70 = "llama3.1:70b"
LLAMA8 = "llama3.1:8b"
MODELS = [f"{GEMMA}=17400000000", f"{LLAMA70}=42500000000", f"{LLAMA8}=4900000000"]
# gemma3:27b's model_info as Ollama's /api/show gives it (google/gemma-3-27b-it).
GEMMA_INFO = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 62,
    "gemma3.embedding_length": 5376,
    "gemma3.attention.head_count": 32,
    "gemma3.attention.head_count_kv": 16,
    "gemma3.attention.key_length": 128,
    "gemma3.attention.value_length": 128,
    "gemma3.attention.sliding_window": 1024,
    "gemma3.context_length": 131072,
}
GPU_ARGS = ["--show-info", f"{GEMMA}={json.dumps(GEMMA_INFO)}"]
CONFIG = {"gpu_extra": 'vram = "24GiB"', "cpu_extra": 'ram = "28GiB"'}


def ask(daemon: Harbord, model: str, num_ctx: int | None = None) -> Any:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    body["stream"] = False
    if num_ctx:
        body["options"] = {"num_ctx": num_ctx}
    with daemon.client() as client:
        return client.post("/api/chat", json=body)


def estimate(plan: dict[str, Any], backend: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in plan["estimates"] if e["backend"] == backend)
    return found


def test_gemma3_27b_at_32k_goes_to_a_24_gib_gpu(tmp_path: Path, daemons: list[Harbord]) -> None:
    with (
        FakeOllama.start("gpu", models=MODELS, vram=24 * GIB, extra_args=GPU_ARGS) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu, **CONFIG))
        daemons.append(daemon)
        # The first look asks /api/show for the model's shape, in the background.
        wait_until(
            lambda: estimate(route(daemon, GEMMA, num_ctx=32768), "gpu").get("kv"),
            bound=10,
            what="the model's shape fetched",
        )
        plan = route(daemon, GEMMA, num_ctx=32768)
        gpu_estimate = estimate(plan, "gpu")
        assert gpu_estimate["kv"] < 4 * GIB, gpu_estimate  # not 15.5 GiB: windows of 1k
        assert gpu_estimate["needs"] < 24 * GIB < gpu_estimate["needs"] + 15 * GIB
        assert (plan["steps"][0]["backend"], plan["rule"]) == ("gpu", "intent"), plan
        answer = ask(daemon, GEMMA, num_ctx=32768)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Harbor-Backend"] == "gpu"


def test_a_model_that_fits_nowhere_is_refused_before_any_backend_is_asked(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    with (
        FakeOllama.start("gpu", models=MODELS, vram=24 * GIB) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu, **CONFIG))
        daemons.append(daemon)
        gpu.clear_requests()
        cpu.clear_requests()
        answer = ask(daemon, LLAMA70, num_ctx=8192)
        assert answer.status_code == 400, answer.text
        text = answer.json()["error"]
        assert text.startswith(f"{LLAMA70} at 8k needs "), text
        assert text.endswith("; gpu has 24 GiB, cpu has 28 GiB of RAM"), text
        with daemon.client() as client:  # the OpenAI family: its own error shape
            v1 = client.post("/v1/chat/completions", json={
                "model": LLAMA70, "messages": [{"role": "user", "content": "hi"}],
            })  # fmt: skip
        assert v1.status_code == 400
        assert v1.json()["error"]["message"].startswith(f"{LLAMA70} at ")
        for fake in (gpu, cpu):
            asked = [
                r for r in fake.requests() if r["path"] in ("/api/chat", "/v1/chat/completions")
            ]
            assert asked == [], asked
        decision = daemon.status()  # still healthy: a refusal is not a failure
        assert all(b["health"] == "up" for b in decision["backends"])


def test_a_measured_size_replaces_the_estimate(tmp_path: Path, daemons: list[Harbord]) -> None:
    with (
        FakeOllama.start("gpu", models=MODELS, vram=24 * GIB) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu, **CONFIG))
        daemons.append(daemon)
        before = estimate(route(daemon, LLAMA8, num_ctx=4096), "gpu")
        assert before["needs_source"] == "estimated"
        answer = ask(daemon, LLAMA8, num_ctx=4096)
        assert answer.status_code == 200 and answer.headers["X-Harbor-Backend"] == "gpu"
        # harbord reads /api/ps right after an answer that loaded the model
        wait_until(
            lambda: (
                estimate(route(daemon, LLAMA8, num_ctx=4096), "gpu")["needs_source"] == "measured"
            ),
            bound=10,
            what="the measured size",
        )
        after = estimate(route(daemon, LLAMA8, num_ctx=4096), "gpu")
        loaded = next(m for m in gpu.stats()["resident"] if m["model"] == f"{LLAMA8}")
        assert after["needs"] == loaded["size"] + after["reserve"] != before["needs"]
        assert after["measured_at"] == loaded["context_length"] == 4096
        # At another context, the measurement moved by the estimate's difference.
        larger = estimate(route(daemon, LLAMA8, num_ctx=8192), "gpu")
        assert larger["needs_source"] == "measured" and larger["needs"] > after["needs"]
