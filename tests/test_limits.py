"""Per-backend concurrency limits: a bounded queue with a timeout, then the next backend
in the plan, or a 503 when there is none. Never an unbounded wait.

The daemon here: gpu max_concurrency=1, max_queue=1, queue_timeout=1s; cpu
max_concurrency=1, max_queue=0 (a full cpu refuses at once). The fake backends'
token_delay makes a request hold its slot for as long as a test needs.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakeproc import FakeOllama
from tests.harness import Harbord

pytestmark = pytest.mark.e2e

MODELS = ["spill", "forced", "queued", "full", "burst", "gone", "after"]
SPECS = [f"{m}:latest=2000000000" for m in MODELS]
QUEUE_TIMEOUT = 1.0
SLOW = 0.25  # seconds between tokens: 8 tokens hold a slot for ~2 s


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    with (
        FakeOllama.start("gpu", models=SPECS) as gpu,
        FakeOllama.start("cpu", models=SPECS, cpu=True) as cpu,
    ):
        yield gpu, cpu


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, backends: tuple[FakeOllama, FakeOllama]
) -> Iterator[Harbord]:
    gpu, cpu = backends
    limits = (
        f'[backends.gpu]\nurl = "{gpu.url}"\nkind = "gpu"\nmax_concurrency = 1\n'
        f'max_queue = 1\nqueue_timeout = "{QUEUE_TIMEOUT}s"\n'
        f'[backends.cpu]\nurl = "{cpu.url}"\nkind = "cpu"\nmax_concurrency = 1\n'
        f'max_queue = 0\nqueue_timeout = "{QUEUE_TIMEOUT}s"\n'
    )
    daemon = Harbord.start(tmp_path_factory.mktemp("limits"), {}, extra_config=limits)
    try:
        yield daemon
        log = daemon.log()
        assert "internal error" not in log and "Traceback" not in log
    finally:
        assert daemon.stop() == 0


@pytest.fixture
def fakes(
    backends: tuple[FakeOllama, FakeOllama], daemon: Harbord
) -> tuple[FakeOllama, FakeOllama]:
    for fake in backends:
        fake.clear_faults()
        fake.clear_requests()
    daemon.wait_for(
        lambda: all(
            b["in_flight"] == 0 and b["queued"] == 0 and b["health"] == "up"
            for b in daemon.status()["backends"]
        ),
        what="idle backends",
    )
    return backends


class Answer:
    def __init__(self, response: httpx.Response, elapsed: float) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self.json: Any = response.json()
        self.elapsed = elapsed

    @property
    def backend(self) -> str | None:
        return self.headers.get("X-Harbor-Backend")


def ask(daemon: Harbord, model: str, forced: str | None = None) -> Answer:
    headers = {"X-Harbor-Backend": forced} if forced else {}
    started = time.monotonic()
    with daemon.client(timeout=30) as client:
        response = client.post(
            "/api/chat",
            headers=headers,
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False},
        )
    return Answer(response, time.monotonic() - started)


def backend_status(daemon: Harbord, name: str) -> dict[str, Any]:
    return daemon.backend(name)


def chat_count(fake: FakeOllama, model: str) -> int:
    return len([r for r in fake.requests(path="/api/chat") if r["model"] == model])


def test_full_queue_spills_to_the_next_backend(
    daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = fakes
    gpu.set_faults({"token_delay": SLOW})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        holder = pool.submit(ask, daemon, "spill")  # takes the gpu's one slot
        gpu.wait_for_request(lambda r: r["model"] == "spill")
        waiter = pool.submit(ask, daemon, "spill")  # the one queue place
        daemon.wait_for(lambda: backend_status(daemon, "gpu")["queued"] == 1, what="one queued")
        spilled = ask(daemon, "spill")  # queue full: the cpu, at once
        assert spilled.status == 200 and spilled.backend == "cpu"
        assert spilled.headers["X-Harbor-Fallbacks"] == "gpu=busy"
        assert spilled.elapsed < 0.5
        timed_out = waiter.result(10)  # waited its queue_timeout, then the cpu
        assert timed_out.status == 200 and timed_out.backend == "cpu"
        assert timed_out.headers["X-Harbor-Fallbacks"] == "gpu=busy"
        assert QUEUE_TIMEOUT * 0.9 < timed_out.elapsed < QUEUE_TIMEOUT + 1.0
        assert holder.result(10).backend == "gpu"
    assert chat_count(gpu, "spill") == 1, "requests that spilled never reached the gpu"
    assert chat_count(cpu, "spill") == 2


def test_full_queue_without_another_backend_is_503(
    daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, _ = fakes
    gpu.set_faults({"token_delay": SLOW})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        holder = pool.submit(ask, daemon, "forced", "gpu")
        gpu.wait_for_request(lambda r: r["model"] == "forced")
        waiter = pool.submit(ask, daemon, "forced", "gpu")
        daemon.wait_for(lambda: backend_status(daemon, "gpu")["queued"] == 1, what="one queued")
        refused = ask(daemon, "forced", "gpu")
        assert refused.status == 503 and refused.elapsed < 0.5
        assert int(refused.headers["Retry-After"]) > 0
        assert "queue full" in refused.json["error"]
        timed_out = waiter.result(10)
        assert (
            timed_out.status == 503
            and QUEUE_TIMEOUT * 0.9 < timed_out.elapsed < QUEUE_TIMEOUT + 1.0
        )
        assert holder.result(10).status == 200
    assert chat_count(gpu, "forced") == 1


def test_a_queued_request_gets_the_slot_when_it_frees_in_time(
    daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = fakes
    gpu.set_faults({"token_delay": 0.05})  # the holder is done in ~0.4 s, within the queue timeout
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        holder = pool.submit(ask, daemon, "queued")
        gpu.wait_for_request(lambda r: r["model"] == "queued")
        waiter = pool.submit(ask, daemon, "queued")
        answers = [holder.result(10), waiter.result(10)]
    assert [a.backend for a in answers] == ["gpu", "gpu"]
    assert all("X-Harbor-Fallbacks" not in a.headers for a in answers)
    assert chat_count(cpu, "queued") == 0


def test_everything_full_is_503_at_once(
    daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = fakes
    for fake in fakes:
        fake.set_faults({"token_delay": SLOW})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        on_gpu = pool.submit(ask, daemon, "full")
        gpu.wait_for_request(lambda r: r["model"] == "full")
        queued = pool.submit(ask, daemon, "full")
        daemon.wait_for(lambda: backend_status(daemon, "gpu")["queued"] == 1, what="one queued")
        on_cpu = pool.submit(ask, daemon, "full")  # gpu queue full: the cpu's slot
        cpu.wait_for_request(lambda r: r["model"] == "full")
        refused = ask(daemon, "full")
        assert refused.status == 503 and refused.elapsed < 0.5
        assert refused.headers["X-Harbor-Fallbacks"] == "gpu=busy, cpu=busy"
        assert int(refused.headers["Retry-After"]) > 0
        for future in (on_gpu, queued, on_cpu):
            assert future.result(15).status in (200, 503)


def test_a_burst_is_bounded(daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    """20 at once on 2 slots + 1 queue place: each is served or refused, none waits long."""
    for fake in fakes:
        fake.set_faults({"token_delay": 0.1})  # ~0.7 s per answer
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: ask(daemon, "burst"), range(20)))
    served = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    assert len(served) + len(refused) == 20
    assert 2 <= len(served) <= 4 and all(a.headers["Retry-After"] for a in refused)
    bound = 0.7 + QUEUE_TIMEOUT + 0.7 + 1.5  # one answer, the queue wait, another answer, slack
    assert max(a.elapsed for a in answers) < bound
    for name in ("gpu", "cpu"):
        status = backend_status(daemon, name)
        assert status["in_flight"] == 0 and status["queued"] == 0


def test_a_client_leaving_the_queue_frees_its_place(
    daemon: Harbord, fakes: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, _ = fakes
    gpu.set_faults({"token_delay": 0.15})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        holder = pool.submit(ask, daemon, "gone", "gpu")
        gpu.wait_for_request(lambda r: r["model"] == "gone")
        body = json.dumps({"model": "gone", "stream": False, "messages": []}).encode()
        leaver = socket.socket(socket.AF_UNIX)
        leaver.connect(str(daemon.socket))
        leaver.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Harbor-Backend: gpu\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        daemon.wait_for(lambda: backend_status(daemon, "gpu")["queued"] == 1, what="one queued")
        leaver.close()
        daemon.wait_for(lambda: backend_status(daemon, "gpu")["queued"] == 0, what="queue empty")
        assert holder.result(10).status == 200
    # The slot and the queue place are both free again: the next request is served at once.
    gpu.clear_faults()
    answer = ask(daemon, "after", "gpu")
    assert answer.status == 200 and answer.elapsed < 0.5
    assert [r["model"] for r in gpu.requests(path="/api/chat")] == ["gone", "after"]
    status = backend_status(daemon, "gpu")
    assert status["in_flight"] == 0 and status["queued"] == 0
