"""/metrics: parses as Prometheus text and moves when requests are served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakeproc import FakeOllama
from tests.harness import Harbord, gpu_cpu


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Harbord, FakeOllama, FakeOllama]]:
    with FakeOllama.start("gpu") as gpu, FakeOllama.start("cpu", cpu=True) as cpu:
        harbord = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
        try:
            yield harbord, gpu, cpu
        finally:
            harbord.stop()


def scrape(harbord: Harbord) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with harbord.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_requests(daemon: tuple[Harbord, FakeOllama, FakeOllama]) -> None:
    harbord, gpu, _ = daemon
    before = scrape(harbord)
    assert value(before, "harbor_backend_up", backend="gpu") == 1
    assert value(before, "harbor_backend_health", backend="cpu", state="up") == 1
    assert (
        value(before, "harbor_requests_total", backend="gpu", intent="fast", outcome="served") == 0
    )
    assert ("process_resident_memory_bytes", ()) in before

    with harbord.client() as client:
        for _ in range(3):
            client.post("/api/chat", json={"model": "llama3.2", "messages": []})
        gpu.set_faults({"oom_models": ["codellama:13b"]})
        assert (
            client.post(
                "/api/generate", json={"model": "codellama:13b", "prompt": "x", "stream": False}
            ).status_code
            == 200
        )
        client.post("/api/chat", json={"model": "llama3.2"}, headers={"X-Harbor-Intent": "bogus"})

    after = scrape(harbord)
    assert (
        value(after, "harbor_requests_total", backend="gpu", intent="fast", outcome="served") == 3
    )
    assert (
        value(after, "harbor_requests_total", backend="cpu", intent="fast", outcome="served") == 1
    )
    assert value(after, "harbor_fallbacks_total", backend="gpu", error_class="oom") == 1
    assert value(after, "harbor_pins", backend="cpu") == 1
    assert value(after, "harbor_pins_set_total", source="oom") == 1
    assert value(after, "harbor_time_to_first_byte_seconds_count", backend="gpu") == 3
    assert value(after, "harbor_request_duration_seconds_count", backend="cpu") == 1
    assert value(after, "harbor_time_to_first_byte_seconds_bucket", backend="gpu", le="+Inf") == 3
    assert value(after, "harbor_in_flight", backend="gpu") == 0
