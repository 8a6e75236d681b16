"""Residency end to end (issue 16): harbord and fakes that schedule like Ollama, as processes.

The GPU fake holds one model at a time (OLLAMA_MAX_LOADED_MODELS=1, as the shipped
GPU unit), loads take time, and a new model evicts the least recently used idle one;
the CPU fake holds three. harbord is told none of this: it learns the GPU's capacity
from the first eviction it sees in /api/ps. The retrieval-augmented chat of the
issue (embed the question with nomic-embed-text, then answer with llama3.1, no
intent given) must stop swapping the GPU within two turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakeproc import FakeOllama
from tests.harness import Harbord
from tests.test_placement_e2e import config_text, daemons, get_json, launch, wait_until

pytestmark = pytest.mark.e2e
__all__ = ["daemons"]  # the fixture, used by name

CHAT = "llama3.1:latest"
EMBED = "nomic-embed-text:latest"
MODELS = [f"{CHAT}=4900000000", f"{EMBED}=274000000"]
# A 12 GiB GPU that holds one model: loads take 0.6 s, a chat's first token 50 ms, an
# embedding 5 ms. A CPU: a chat's first token 0.5 s, an embedding 30 ms, loads 0.2 s.
GPU_ARGS = [
    "--max-loaded", "1", "--load-time", "0.6",
    "--prompt-delay", "0.05", "--embed-time", "0.005",
]  # fmt: skip
CPU_ARGS = [
    "--max-loaded", "3", "--load-time", "0.2",
    "--prompt-delay", "0.5", "--embed-time", "0.03",
]  # fmt: skip
GIB = 1024**3


@contextmanager
def fakes() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    with (
        FakeOllama.start("gpu", models=MODELS, vram=12 * GIB, extra_args=GPU_ARGS) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True, extra_args=CPU_ARGS) as cpu,
    ):
        yield gpu, cpu


def embed(daemon: Harbord) -> httpx.Response:
    with daemon.client() as client:
        response = client.post("/api/embed", json={"model": "nomic-embed-text", "input": "q?"})
    assert response.status_code == 200, response.text
    return response


def chat(daemon: Harbord) -> httpx.Response:
    body = {"model": "llama3.1", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    with daemon.client() as client:
        response = client.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    return response


def backend(daemon: Harbord, name: str) -> dict[str, Any]:
    found: dict[str, Any] = daemon.backend(name)
    return found


def loaded_on(fake: FakeOllama) -> list[str]:
    return [m["model"] for m in fake.stats()["resident"]]


def test_a_rag_turn_stops_swapping_the_gpu_within_two_turns(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    with fakes() as (gpu, cpu):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)
        served: list[tuple[str, str]] = []
        for _ in range(5):
            served.append((embed(daemon).headers["X-Harbor-Backend"], "embed"))
            served.append((chat(daemon).headers["X-Harbor-Backend"], "chat"))
            # harbord reads /api/ps right after an answer that loaded a model
            wait_until(lambda: not daemon.backend("gpu")["in_flight"], 5, "the gpu idle")
        # From the second turn on at the latest, the embedding runs on the CPU and the
        # chat model stays on the GPU.
        assert served[4:] == [("cpu", "embed"), ("gpu", "chat")] * 3, served
        assert all(where == "gpu" for where, what in served if what == "chat"), served
        stats = gpu.stats()
        # The first turn loads the embedding model, then the chat model (evicting it);
        # the second at most once more; then never again.
        assert stats["loads_by_model"].get(CHAT, 0) <= 2, stats
        assert stats["loads"] <= 4, stats
        # Capacity learned from the eviction, with no configuration.
        status = backend(daemon, "gpu")
        assert (status["capacity"], status["capacity_source"]) == (1, "learned"), status
        assert status["evictions"].get(EMBED, 0) >= 1, status

        plan = get_json(daemon, f"/harbor/route?model={EMBED}")
        assert plan["steps"][0]["backend"] == "cpu", plan
        gpu_step = next(s for s in plan["steps"] if s["backend"] == "gpu")
        reasons = "; ".join(gpu_step["reasons"])
        assert f"evicts {CHAT} (fast, " in reasons, reasons
        with daemon.client() as client:
            metrics = client.get("/metrics").text
        assert f'harbor_model_loads_total{{backend="gpu",model="{CHAT}"}}' in metrics
        assert f'harbor_model_evictions_total{{backend="gpu",model="{EMBED}"}}' in metrics


def test_the_interactive_model_is_loaded_again_after_an_eviction(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    with fakes() as (gpu, cpu):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)
        for _ in range(3):
            assert chat(daemon).headers["X-Harbor-Backend"] == "gpu"
        wait_until(lambda: CHAT in loaded_on(gpu), 5, "the chat model loaded on the gpu")
        wait_until(lambda: backend(daemon, "gpu")["loaded"], 5, "harbord to see it loaded")
        # Someone sends the embedding model to the GPU on purpose: it evicts the chat model.
        with daemon.client() as client:
            forced = client.post(
                "/api/embed",
                json={"model": "nomic-embed-text", "input": "x"},
                headers={"X-Harbor-Backend": "gpu"},
            )
        assert forced.status_code == 200, forced.text
        assert loaded_on(gpu) == [EMBED]
        # Once the GPU is idle, harbord loads the chat model back by itself.
        wait_until(lambda: loaded_on(gpu) == [CHAT], 10, "the chat model loaded back")
        wait_until(
            lambda: backend(daemon, "gpu")["kept_hot"] == [CHAT], 5, "status to say kept hot"
        )
        preloads = [r for r in gpu.requests("/api/generate") if r["model"] == CHAT]
        assert preloads, "the reload is an empty generate from harbord"
        # ...and the next chat pays no load.
        took = chat(daemon).json()["load_duration"]
        assert took < 0.3e9, took


def test_a_users_unload_is_not_undone(tmp_path: Path, daemons: list[Harbord]) -> None:
    with fakes() as (gpu, cpu):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)
        for _ in range(3):
            chat(daemon)
        wait_until(lambda: CHAT in loaded_on(gpu), 5, "the chat model loaded on the gpu")
        # What `ollama stop llama3.1` sends.
        with daemon.client() as client:
            stop = client.post("/api/generate", json={"model": "llama3.1", "keep_alive": 0})
        assert stop.status_code == 200, stop.text
        wait_until(lambda: not loaded_on(gpu), 5, "the gpu to unload it")
        # Several keep-hot looks later (one a second), it is still not loaded.
        wait_until(lambda: not backend(daemon, "gpu")["loaded"], 5, "harbord to see it gone")
        with pytest.raises(AssertionError):
            wait_until(lambda: CHAT in loaded_on(gpu), 3, "a reload that must not come")
        assert backend(daemon, "gpu")["kept_hot"] == []
