"""Placement end to end (issue 11): harbord and two fake Ollama servers as real processes.

Every test here runs harbord as a real process (tests/harness.py) against
tests/fakeollama processes that behave like Ollama for memory, spills and
parallel slots (--vram, --model-info, --parallel, --prompt-delay). Real processes
because what is shown depends on the daemon's own background work (the prober's
intervals, the /api/show facts cache, the /api/ps read after a load) and on
requests that really run at the same time; `harborctl` is run as a command.

Each test ends by reading /metrics: the rule that decided its requests is counted
in harbor_decisions_total{rule=...}.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakeproc import FakeOllama
from tests.harness import FAST_ROUTING, ROOT, Harbord

pytestmark = pytest.mark.e2e

GIB = 1024**3
SMALL = "llama3.2:latest"
SMALL_SPEC = f"{SMALL}=2000000000"
# An 8B llama: 4.9 GB of weights; 32 blocks, 4096 embedding, 32 heads, 8 KV heads and a
# 128k trained context, so its f16 KV cache is 128 KiB a token: 8 GiB at 64k.
BIG = "llama3.1:8b"
BIG_SPEC = f"{BIG}=4900000000"
BIG_INFO = f"{BIG}=32,4096,32,8,131072"


def config_text(
    gpu: FakeOllama,
    cpu: FakeOllama,
    gpu_extra: str = "",
    cpu_extra: str = 'ram = "64GiB"',  # a workstation's, not this test machine's
    routing: str = FAST_ROUTING,
) -> str:
    """A harbord.toml for the pair, with extra keys in each backend's table."""
    return "\n".join(
        [
            'log_level = "debug"',
            'drain_timeout = "5s"',
            routing,
            f'[backends.gpu]\nurl = "{gpu.url}"\nkind = "gpu"\n'
            f'unit = "ollama-gpu@test.service"\n{gpu_extra}\n',
            f'[backends.cpu]\nurl = "{cpu.url}"\nkind = "cpu"\n'
            f'unit = "ollama-cpu@test.service"\n{cpu_extra}\n',
        ]
    )


def launch(tmp_path: Path, text: str) -> Harbord:
    tmp_path.mkdir(parents=True, exist_ok=True)
    daemon = Harbord(tmp_path, text)
    daemon.launch()
    return daemon


@pytest.fixture
def daemons() -> Iterator[list[Harbord]]:
    """Daemons a test started; each must stop cleanly (exit 0) afterwards."""
    started: list[Harbord] = []
    yield started
    codes = [daemon.stop() for daemon in started]
    assert codes == [0] * len(started), codes


def chat(
    daemon: Harbord,
    model: str = SMALL,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    with daemon.client() as client:
        response = client.post(
            "/api/chat", json=body | extra, headers={"X-Harbor-Intent": "fast", **(headers or {})}
        )
    assert response.status_code == 200, response.text
    return response


def route(daemon: Harbord, model: str, **params: Any) -> dict[str, Any]:
    with daemon.client() as client:
        response = client.get("/harbor/route", params={"model": model, **params})
    assert response.status_code == 200, response.text
    plan: dict[str, Any] = response.json()
    return plan


def get_json(daemon: Harbord, path: str) -> Any:
    with daemon.client() as client:
        response = client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def decisions_by_rule(daemon: Harbord) -> dict[str, float]:
    with daemon.client() as client:
        text = client.get("/metrics").text
    found = re.findall(r'^harbor_decisions_total\{rule="([^"]+)"\} (\S+)$', text, re.M)
    return {rule: float(count) for rule, count in found}


def harborctl(daemon: Harbord, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HARBOR_SOCKET": str(daemon.socket), "PYTHONPATH": str(ROOT)}
    env["NO_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "harbord.ctl.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def chats(fake: FakeOllama, model: str) -> list[dict[str, Any]]:
    """The chat requests for `model` in a fake's own request log."""
    return [r for r in fake.requests("/api/chat") if r["model"] in (model, model.split(":")[0])]


def wait_until(predicate: Any, bound: float, what: str) -> float:
    """Poll until `predicate()` holds; the seconds it took. `bound` only ends a failing test."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > bound:
            raise AssertionError(f"timed out after {bound} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


# -- 1. fallback, then recovery ------------------------------------------------------


def test_after_an_outage_the_next_fast_request_goes_back_to_the_gpu(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    """GPU down -> the CPU serves (and is remembered); GPU back -> within one probe
    interval the next fast request is on the GPU: affinity never outranks intent, and
    the affinity that pointed away is replaced by the GPU's own."""
    with (
        FakeOllama.start("gpu", models=[SMALL_SPEC]) as gpu,
        FakeOllama.start("cpu", models=[SMALL_SPEC], cpu=True) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)
        assert chat(daemon).headers["X-Harbor-Backend"] == "gpu"
        assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "gpu"

        port = gpu.port
        gpu.stop()
        first = chat(daemon)  # finds the refused connection, unless the prober did first
        assert first.headers["X-Harbor-Backend"] == "cpu"
        assert first.headers.get("X-Harbor-Fallbacks") in (None, "gpu=network")
        # While the GPU cools down it is left out: the CPU is the plan's own first
        # choice, decided by health, and that is remembered.
        during = chat(daemon)
        assert during.headers["X-Harbor-Backend"] == "cpu"
        assert "X-Harbor-Fallbacks" not in during.headers
        assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "cpu"
        assert route(daemon, SMALL)["rule"] == "health"

        with FakeOllama.start("gpu", port=port, models=[SMALL_SPEC]) as back:
            # One probe interval while down is 0.2 s (FAST_ROUTING); the bound adds
            # slack for a loaded machine, it is not a speed target.
            wait_until(
                lambda: (
                    daemon.backend("gpu")["health"] == "up"
                    and not daemon.backend("gpu")["cooldown"]
                ),
                bound=2.0,
                what="the prober to see the gpu back",
            )
            plan = route(daemon, SMALL, intent="fast")
            assert plan["steps"][0]["backend"] == "gpu", plan
            assert plan["rule"] == "intent", plan
            after = chat(daemon)
            assert after.headers["X-Harbor-Backend"] == "gpu"
            assert "X-Harbor-Fallbacks" not in after.headers
            assert len(chats(back, SMALL)) == 1
            assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "gpu"

            # A GPU that fails without going down: the CPU answers as a fallback,
            # which teaches no affinity; the GPU is tried first again next time.
            back.set_faults({"status": {"code": 500, "error": "something broke"}})
            failing = chat(daemon)
            assert failing.headers["X-Harbor-Backend"] == "cpu"
            assert failing.headers["X-Harbor-Fallbacks"].startswith("gpu=")
            assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "gpu"
            back.clear_faults()
            assert chat(daemon).headers["X-Harbor-Backend"] == "gpu"

            rules = decisions_by_rule(daemon)
            assert rules.get("health", 0) >= 1 and rules.get("intent", 0) >= 3, rules


# -- 2. an expired pin ----------------------------------------------------------------


def test_an_expired_pin_goes_back_to_the_gpu(tmp_path: Path, daemons: list[Harbord]) -> None:
    models = [SMALL_SPEC, "qwen2.5-coder:7b=4700000000"]
    with (
        FakeOllama.start("gpu", models=models) as gpu,
        FakeOllama.start("cpu", models=models, cpu=True) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)
        assert chat(daemon).headers["X-Harbor-Backend"] == "gpu"

        # 2 s rather than 1: the pinned requests below must all come before the end,
        # on a loaded machine too.
        pinned = harborctl(daemon, "pin", "llama3.2", "cpu", "--for", "2s")
        assert pinned.returncode == 0, pinned.stderr
        # The same through the API, for a model with no history yet.
        with daemon.client() as client:
            put = client.put(
                "/harbor/pins/qwen2.5-coder:7b", json={"backend": "cpu", "for_seconds": 2}
            )
        assert put.status_code == 200, put.text
        pins = get_json(daemon, "/harbor/pins")
        assert pins[SMALL]["backend"] == "cpu" and pins[SMALL]["until"] is not None
        pinned_until = max(pin["until"] for pin in pins.values())

        for model in (SMALL, "qwen2.5-coder:7b"):
            served = chat(daemon, model)
            assert served.headers["X-Harbor-Backend"] == "cpu"
            assert "X-Harbor-Fallbacks" not in served.headers
            assert route(daemon, model)["rule"] == "pin"
        # A pinned answer is the pin's choice, not where the model lives: no affinity.
        affinity = get_json(daemon, "/harbor/affinity")
        assert affinity[SMALL]["backend"] == "gpu"
        assert "qwen2.5-coder:7b" not in affinity

        wait_until(lambda: time.time() > pinned_until, bound=5.0, what="the pins' end")
        assert get_json(daemon, "/harbor/pins") == {}
        for model in (SMALL, "qwen2.5-coder:7b"):
            assert chat(daemon, model).headers["X-Harbor-Backend"] == "gpu", model
            assert route(daemon, model)["rule"] == "intent"
        assert len(chats(gpu, SMALL)) == 2 and len(chats(cpu, SMALL)) == 1

        rules = decisions_by_rule(daemon)
        assert rules.get("pin", 0) >= 2 and rules.get("intent", 0) >= 3, rules


# -- 3. 64k context on an 8 GiB GPU ----------------------------------------------------


def test_64k_context_for_an_8b_model_goes_to_the_cpu_without_trying_the_gpu(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    """4.9 GB of weights + 8 GiB of f16 KV cache + the allowance does not fit 8 GiB.

    The model's shape comes from /api/show, fetched in the background the first time a
    plan needs it (a plan never waits for it): a plan made before the facts are cached
    leaves the KV cache out (a low estimate never keeps a model off a GPU it fits). So
    the test asks `route` until the reason speaks of memory, as designed, and only then
    sends the request.
    """
    models = [BIG_SPEC, SMALL_SPEC]
    info = ["--model-info", BIG_INFO]
    with (
        FakeOllama.start("gpu", models=models, vram=8 * GIB, extra_args=info) as gpu,
        FakeOllama.start("cpu", models=models, cpu=True, extra_args=info) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu, gpu_extra='vram = "8GiB"'))
        daemons.append(daemon)

        def memory_decides() -> bool:
            return route(daemon, BIG, num_ctx=65536)["rule"] == "memory"

        wait_until(memory_decides, bound=10.0, what="the model's facts from /api/show")
        plan = route(daemon, BIG, num_ctx=65536, intent="fast")
        assert [step["backend"] for step in plan["steps"]] == ["cpu", "gpu"]
        gpu_reasons = "; ".join(plan["steps"][1]["reasons"])
        # 4.9 GB + 8 GiB of KV + 4.4 GiB of graph + 0.84 GiB of GPU reserve = 19.1 GB
        assert "needs 19.1 GB at 64k context, gpu has 8 GiB (config)" in gpu_reasons
        estimate = {e["backend"]: e for e in plan["estimates"]}["gpu"]
        assert estimate["num_ctx"] == 65536 and estimate["budget"] == 8 * GIB
        assert estimate["needs"] == 19_114_531_208  # as Ollama sizes it (model_size.py)

        shown = harborctl(daemon, "route", BIG, "--num-ctx", "65536")
        assert shown.returncode == 0, shown.stderr
        assert "decided by memory" in shown.stdout
        assert "needs 19.1 GB at 64k context, gpu has 8 GiB" in shown.stdout
        assert shown.stdout.index("1. cpu") < shown.stdout.index("2. gpu")

        served = chat(daemon, BIG, options={"num_ctx": 65536})
        assert served.headers["X-Harbor-Backend"] == "cpu"
        assert "X-Harbor-Fallbacks" not in served.headers
        assert chats(gpu, BIG) == []  # never tried, nothing loaded there
        assert len(chats(cpu, BIG)) == 1
        # The same model at the default context (4k: 4.9 GB + 0.5 GiB + 0.5 GiB) fits.
        assert chat(daemon, BIG).headers["X-Harbor-Backend"] == "gpu"

        rules = decisions_by_rule(daemon)
        assert rules.get("memory", 0) >= 1 and rules.get("intent", 0) >= 1, rules


# -- 4. a spill seen within 2 s of the load ----------------------------------------------

# The default inventory interval (30 s): only the read right after the load can see the
# spill within 2 s.
SLOW_INVENTORY = FAST_ROUTING.replace('inventory_interval = "1s"', 'inventory_interval = "30s"')


def test_a_spill_is_seen_within_two_seconds_and_the_next_request_goes_to_the_cpu(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    """The GPU has 1.5 GB free for Ollama while the configured `vram` says 8 GiB (say
    another program holds the rest): the estimate lets the 2 GB model go to the GPU, the
    load spills, and harbord learns it from /api/ps read right after that answer."""
    assert SLOW_INVENTORY != FAST_ROUTING
    with (
        FakeOllama.start("gpu", models=[SMALL_SPEC], vram=1_500_000_000) as gpu,
        FakeOllama.start("cpu", models=[SMALL_SPEC], cpu=True) as cpu,
    ):
        text = config_text(gpu, cpu, gpu_extra='vram = "8GiB"', routing=SLOW_INVENTORY)
        daemon = launch(tmp_path, text)
        daemons.append(daemon)
        assert daemon.backend("gpu")["spilled_contexts"] == {}

        first = chat(daemon)
        loaded_at = time.monotonic()
        assert first.headers["X-Harbor-Backend"] == "gpu"
        with httpx.Client() as client:  # the fake did spill it
            spilled = client.get(f"{gpu.url}/api/ps").json()["models"][0]
        assert 0 < spilled["size_vram"] < spilled["size"]
        context = spilled["context_length"]

        def spill_shown() -> bool:
            return bool(daemon.backend("gpu")["spilled_contexts"] == {SMALL: context})

        wait_until(spill_shown, bound=2.0 - (time.monotonic() - loaded_at), what="the spill")
        status = daemon.backend("gpu")
        assert SMALL in status["memory_pressure"]

        plan = route(daemon, SMALL, intent="fast", num_ctx=context)
        assert plan["rule"] == "spill", plan
        assert [step["backend"] for step in plan["steps"]] == ["cpu", "gpu"]
        assert "in VRAM: after CPU backends" in "; ".join(plan["steps"][1]["reasons"])
        shown = harborctl(daemon, "route", "llama3.2", "--num-ctx", str(context))
        assert shown.returncode == 0 and "decided by spill" in shown.stdout, shown

        gpu_chats = len(chats(gpu, SMALL))
        after = chat(daemon, options={"num_ctx": context})
        assert after.headers["X-Harbor-Backend"] == "cpu"
        assert "X-Harbor-Fallbacks" not in after.headers
        assert len(chats(gpu, SMALL)) == gpu_chats

        rules = decisions_by_rule(daemon)
        assert rules.get("spill", 0) >= 1, rules


# -- 5. a busy GPU spills to an idle CPU -------------------------------------------------

GPU_PROMPT_S = 0.8  # a request on the one-at-a-time GPU
CPU_PROMPT_S = 1.2  # slower on the CPU, but two at a time


def test_four_concurrent_fast_requests_finish_sooner_with_some_on_the_cpu(
    tmp_path: Path, daemons: list[Harbord]
) -> None:
    """Four `fast` requests at once against a GPU that serves one at a time: queued
    there they would take four GPU requests' time; harbord sends the ones the CPU is
    expected to finish first to the CPU. A behavioural outcome, not a speed target:
    the margin is wide (about 2 GPU requests' time is expected, 3.2 allowed)."""
    gpu_args = ["--parallel", "1", "--prompt-delay", str(GPU_PROMPT_S)]
    cpu_args = ["--parallel", "2", "--prompt-delay", str(CPU_PROMPT_S)]
    with (
        FakeOllama.start("gpu", models=[SMALL_SPEC], extra_args=gpu_args) as gpu,
        FakeOllama.start("cpu", models=[SMALL_SPEC], cpu=True, extra_args=cpu_args) as cpu,
    ):
        daemon = launch(tmp_path, config_text(gpu, cpu))
        daemons.append(daemon)

        # Warm-up: service-time history on both (the CPU's through a forced request,
        # which teaches the service time but no affinity).
        singles = []
        for _ in range(2):
            started = time.monotonic()
            assert chat(daemon).headers["X-Harbor-Backend"] == "gpu"
            singles.append(time.monotonic() - started)
        gpu_single = min(singles)
        forced = chat(daemon, headers={"X-Harbor-Backend": "cpu"})
        assert forced.headers["X-Harbor-Backend"] == "cpu"
        service = daemon.backend("cpu")["service_ms"]
        assert SMALL in service and SMALL in daemon.backend("gpu")["service_ms"]

        results: list[tuple[str, float]] = []
        errors: list[BaseException] = []
        gate = threading.Barrier(4)

        def one() -> None:
            try:
                gate.wait()
                response = chat(daemon)
                results.append((response.headers["X-Harbor-Backend"], time.monotonic()))
            except BaseException as err:  # reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=one) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wall = time.monotonic() - started
        assert not errors, errors
        served = sorted(backend for backend, _ in results)
        assert len(served) == 4
        assert "cpu" in served and "gpu" in served, served
        gpu_alone = 4 * gpu_single
        assert wall < 0.8 * gpu_alone, (wall, gpu_single, served)

        rules = decisions_by_rule(daemon)
        assert rules.get("busy-spill", 0) >= 1, rules
        # A busy spill is a moment's load, not where the model lives: affinity stays.
        assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "gpu"
        assert len(chats(cpu, SMALL)) == served.count("cpu") + 1
