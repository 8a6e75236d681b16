"""The fake Ollama's scheduler behaves like Ollama's (issue 16), seen through the real SDK.

At most ``max_loaded`` models (default 3), loads that do not fit evict the least
recently used idle model, loading and embedding take time per model, keep_alive
expires, and ``/_fake/stats`` counts loads and evictions.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import ollama

from tests.fakeproc import FakeOllama

GIB = 1 << 30
MSGS = [{"role": "user", "content": "why is the sky blue"}]
CHAT = "llama3.2:latest"
CODER = "qwen2.5-coder:7b"
BIG = "codellama:13b"
EMBED = "nomic-embed-text:latest"
OOM_PREFIX = "model requires more system memory"


def resident(c: ollama.Client) -> list[str]:
    return sorted(m.model or "" for m in c.ps().models)


def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_least_recently_used_idle_model_is_evicted() -> None:
    with FakeOllama.start("gpu", extra_args=["--max-loaded-models", "2"]) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.chat(model=CODER, messages=MSGS, keep_alive="1h")
        c.chat(model=CHAT, messages=MSGS)
        c.chat(model=CODER, messages=MSGS, keep_alive="1h")  # now the more recently used
        c.chat(model=CHAT, messages=MSGS)  # and now CHAT: CODER is the least recent
        c.chat(model=BIG, messages=MSGS)
        # CODER goes although it would expire last: recency, not expiry, decides
        assert resident(c) == sorted([CHAT, BIG])
        stats = fake.stats()
        assert stats["max_loaded"] == 2
        assert stats["loads"] == 3 and stats["evictions"] == 1
        assert stats["evictions_by_model"] == {CODER: 1}
        assert stats["loads_by_model"] == {CHAT: 1, CODER: 1, BIG: 1}


def test_default_capacity_is_three_and_zero_means_no_limit() -> None:
    models = [CHAT, CODER, BIG, EMBED]
    with FakeOllama.start("gpu") as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        for m in models[:3]:
            c.generate(model=m, prompt="hi")
        c.embed(model=EMBED, input="hello")  # embeddings load their model too
        assert resident(c) == sorted([CODER, BIG, EMBED])
        assert fake.stats()["evictions_by_model"] == {CHAT: 1}
    with FakeOllama.start("gpu", extra_args=["--max-loaded-models", "0"]) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        for m in models[:3]:
            c.generate(model=m, prompt="hi")
        c.embed(model=EMBED, input="hello")
        assert resident(c) == sorted(models)
        assert fake.stats()["max_loaded"] is None and fake.stats()["evictions"] == 0


def test_load_time_per_model_shows_in_load_duration() -> None:
    args = ["--load-time", "0.05", "--load-time", f"{EMBED}=0.3", "--embed-time", "0.1"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        first = c.embed(model="nomic-embed-text", input="hello")
        assert (first.load_duration or 0) >= 300_000_000  # its own load time
        assert (first.total_duration or 0) >= 400_000_000  # plus the embedding's service time
        again = c.embed(model="nomic-embed-text", input="hello")
        assert (again.load_duration or 0) < 300_000_000  # loaded already
        assert (again.total_duration or 0) >= 100_000_000  # the embedding still takes its time
        chat = c.chat(model=CHAT, messages=MSGS)
        assert (chat.load_duration or 0) >= 50_000_000  # the default load time
        assert fake.stats()["loads_by_model"] == {EMBED: 1, CHAT: 1}
        # /api/embeddings and /v1/embeddings load and count the same way
        c.embed(model=EMBED, input="bye", keep_alive=0)  # answers, then unloads
        assert resident(c) == [CHAT]
        assert c.embeddings(model=EMBED, prompt="hello").embedding
        httpx.post(
            fake.url + "/v1/embeddings", json={"model": CODER, "input": "x"}
        ).raise_for_status()
        assert fake.stats()["loads_by_model"] == {EMBED: 2, CHAT: 1, CODER: 1}
        assert fake.stats()["unloads"] == 1


def test_prompt_delay_per_model() -> None:
    args = ["--prompt-delay", "0.02", "--prompt-delay", f"{CODER}=0.3"]
    with FakeOllama.start("cpu", cpu=True, extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        slow = c.generate(model=CODER, prompt="hi")
        assert (slow.prompt_eval_duration or 0) >= 300_000_000
        fast = c.generate(model=CHAT, prompt="hi")
        assert 20_000_000 <= (fast.prompt_eval_duration or 0) < 300_000_000


def test_one_load_for_concurrent_requests() -> None:
    with FakeOllama.start("gpu", extra_args=["--load-time", "0.3"]) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        out: list[Any] = []
        threads = [
            threading.Thread(target=lambda: out.append(c.generate(model=CHAT, prompt="hi")))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(out) == 3
        assert fake.stats()["loads"] == 1
        # each waited for the one load
        assert all((r.load_duration or 0) >= 100_000_000 for r in out)


def test_ps_lists_a_model_from_the_moment_its_load_begins() -> None:
    """Ollama's /api/ps ranges over every runner its scheduler holds, and a runner is
    held from the start of its load; a loading one expires a keep-alive from now."""
    args = ["--max-loaded-models", "1", "--load-time", "0.6"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.chat(model=CHAT, messages=MSGS)
        loading = threading.Thread(target=lambda: c.chat(model=CODER, messages=MSGS))
        loading.start()
        wait_until(lambda: resident(c) == [CODER])  # the chat model evicted at once
        assert fake.stats()["loads"] == 1  # still loading: not counted yet
        [ps] = c.ps().models
        assert ps.expires_at is not None and ps.expires_at.timestamp() > time.time() + 60
        loading.join(10)
        assert resident(c) == [CODER] and fake.stats()["loads"] == 2


def test_keep_alive_expires_and_zero_unloads() -> None:
    with FakeOllama.start("gpu") as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.chat(model=CHAT, messages=MSGS, keep_alive=0.3)
        [ps] = c.ps().models
        assert ps.expires_at is not None
        wait_until(lambda: resident(c) == [])
        assert fake.stats()["expirations"] == 1
        c.chat(model=CHAT, messages=MSGS, keep_alive=0)  # answers, then unloads
        assert resident(c) == []
        assert fake.stats()["unloads"] == 1 and fake.stats()["loads"] == 2


def test_memory_budget_evicts_on_gpu_and_cpu() -> None:
    models = {CHAT: 5 * GIB, CODER: 5 * GIB}
    with FakeOllama.start("gpu", models=models, vram=8 * GIB) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.generate(model=CHAT, prompt="hi")
        c.generate(model=CODER, prompt="hi")  # 5 + 5 GiB does not fit in 8: CHAT goes
        [ps] = c.ps().models
        assert ps.model == CODER and ps.size_vram == ps.size
        assert fake.stats()["evictions_by_model"] == {CHAT: 1}
    models = {CHAT: 5 * GIB, CODER: 5 * GIB, BIG: 20 * GIB}
    with FakeOllama.start(
        "cpu", models=models, cpu=True, extra_args=["--ram", str(10 * GIB)]
    ) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.generate(model=CHAT, prompt="hi")
        c.generate(model=CODER, prompt="hi")
        assert resident(c) == [CODER]
        [ps] = c.ps().models
        assert ps.size_vram == 0
        r = httpx.post(fake.url + "/api/generate", json={"model": BIG, "prompt": "hi"})
        assert r.status_code == 500 and r.json()["error"].startswith(OOM_PREFIX)
        assert resident(c) == [CODER]  # a load that cannot fit at all evicts nothing


def test_busy_model_is_not_evicted_until_it_finishes() -> None:
    models = {CHAT: 5 * GIB, CODER: 5 * GIB}
    args = ["--token-delay", "0.05"]
    with FakeOllama.start("gpu", models=models, vram=8 * GIB, extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        slow = threading.Thread(target=lambda: c.generate(model=CHAT, prompt="hi"))
        slow.start()
        wait_until(lambda: fake.stats()["active"].get(CHAT))
        c.generate(model=CODER, prompt="hi")  # waits for CHAT to finish, then evicts it
        slow.join(10)
        first, second = sorted(fake.requests(path="/api/generate"), key=lambda r: r["id"])
        assert second["admitted_seq"] > first["finished_seq"]
        assert resident(c) == [CODER]


def test_load_duration_counts_the_wait_for_a_busy_model_to_be_evicted() -> None:
    """As Ollama's: from the request's arrival until its runner is ready (the scheduler's
    wait included), so the answer's own time is total_duration less load_duration."""
    args = ["--max-loaded-models", "1", "--load-time", "0.05", "--prompt-delay", "0.4"]
    with FakeOllama.start("gpu", extra_args=args) as fake:
        c = ollama.Client(host=fake.url, timeout=10)
        c.generate(model=CHAT, prompt="warm")
        slow = threading.Thread(target=lambda: c.generate(model=CHAT, prompt="hi"))
        slow.start()
        wait_until(lambda: fake.stats()["active"].get(CHAT))
        waited = c.embed(model=EMBED, input="hello")  # waits ~0.4 s for CHAT, then loads
        slow.join(10)
        assert (waited.load_duration or 0) >= 300_000_000
        busy_again = threading.Thread(target=lambda: c.embed(model=EMBED, input="x"))
        busy_again.start()
        again = c.embed(model=EMBED, input="hello")  # loaded: no load, whatever the wait
        busy_again.join(10)
        assert (again.load_duration or 0) < 50_000_000
