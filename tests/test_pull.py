"""harborctl pull against harbord and two fake backends, checked against the fake's own
progress stream; and the progress bar a terminal gets.

The fakes do not share a model store: a pull adds the model to the backend that got it
only. The tests assert that, and what harborctl says about it.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harbord.ctl.commands import pull
from tests.fakeproc import FakeOllama
from tests.harness import ROOT, Harbord, gpu_cpu

pytestmark = pytest.mark.e2e

MODELS = ["llama3.2:latest=2000000000"]
# Slow enough that the rate shows (it needs 0.2 s of a layer), fast enough for a test.
PULL_FAULTS = {"pull_total": 3_000_000, "token_delay": 0.1}
RATE = re.compile(r"  \d+(\.\d)? (B|KiB|MiB|GiB)/s$")


@pytest.fixture
def gpu() -> Iterator[FakeOllama]:
    with FakeOllama.start("gpu", models=MODELS, faults=PULL_FAULTS) as server:
        yield server


@pytest.fixture
def cpu() -> Iterator[FakeOllama]:
    with FakeOllama.start("cpu", models=MODELS, cpu=True, faults=PULL_FAULTS) as server:
        yield server


@pytest.fixture
def harbord(tmp_path: Path, gpu: FakeOllama, cpu: FakeOllama) -> Iterator[Harbord]:
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        yield daemon
    finally:
        daemon.stop()


def harborctl(daemon: Harbord, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARBOR_")}
    env.update(HARBOR_SOCKET=str(daemon.socket), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "harbord.ctl.main", *args],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip


def reference_stream(model: str) -> list[dict[str, Any]]:
    """The progress lines a fake server with the same faults sends for `model`."""
    with (
        FakeOllama.start("reference", faults=PULL_FAULTS) as ref,
        httpx.stream("POST", ref.url + "/api/pull", json={"model": model}, timeout=30) as resp,
    ):
        return [json.loads(line) for line in resp.iter_lines() if line]


def expected_lines(stream: list[dict[str, Any]]) -> list[str]:
    """What `harborctl pull` prints for each line when stdout is not a terminal (rates aside)."""
    lines = []
    for p in stream:
        if "total" in p:
            done = p.get("completed", 0)
            lines.append(f"{p['status']}  {done}/{p['total']} bytes  {done * 100 // p['total']}%")
        else:
            lines.append(p["status"])
    return lines


def inventory(daemon: Harbord) -> dict[str, list[str]]:
    with daemon.client() as client:
        result: dict[str, list[str]] = client.get("/harbor/models").json()["backends"]
        return result


def test_pull_progress_matches_the_fake_stream_then_says_who_has_it(
    harbord: Harbord, gpu: FakeOllama, cpu: FakeOllama
) -> None:
    stream = reference_stream("tinyllama")
    assert stream[-1] == {"status": "success"}
    assert any(p.get("total") == 3_000_000 for p in stream)

    done = harborctl(harbord, "pull", "tinyllama")
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    *progress, where = done.stdout.splitlines()
    assert [RATE.sub("", line) for line in progress] == expected_lines(stream)
    big_done = next(line for line in progress if "3000000/3000000 bytes" in line)
    assert RATE.search(big_done), "the big layer's last line has its rate"
    assert "pulling tinyllama through gpu" in done.stderr
    assert [r["path"] for r in gpu.requests()].count("/api/pull") == 1
    assert not [r for r in cpu.requests() if r["path"] == "/api/pull"]

    # In the fakes only the backend that pulled has the model; harborctl says so.
    have = inventory(harbord)
    assert "tinyllama:latest" in have["gpu"] and "tinyllama:latest" not in have["cpu"]
    assert where == "tinyllama:latest is on gpu; not (yet) listed by cpu"

    # Through the other backend too: now both list it.
    again = harborctl(harbord, "pull", "tinyllama", "--backend", "cpu")
    assert again.returncode == 0, again.stderr
    assert "pulling tinyllama through cpu" in again.stderr
    assert [r["path"] for r in cpu.requests()].count("/api/pull") == 1
    assert again.stdout.splitlines()[-2:] == ["success", "tinyllama:latest is on gpu, cpu"]


def test_pull_error_line_and_error_status_exit_1(harbord: Harbord, gpu: FakeOllama) -> None:
    gpu.set_faults({"pull_error": "pull model manifest: file does not exist"})
    failed = harborctl(harbord, "pull", "no-such-model")
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == ["pulling manifest"]
    assert failed.stderr.endswith(
        "harborctl: pulling no-such-model failed: pull model manifest: file does not exist\n"
    )
    unknown = harborctl(harbord, "pull", "tinyllama", "--backend", "tpu")
    assert unknown.returncode == 1
    assert "unknown backend 'tpu'" in unknown.stderr


def test_pull_json_prints_the_stream(harbord: Harbord) -> None:
    done = harborctl(harbord, "--json", "pull", "tinyllama")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == reference_stream("tinyllama")


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    progress = pull.Progress(out, tty=True, columns=120)
    digest = "sha256:" + "ab12" * 16
    status = "pulling ab12ab12ab12"
    progress.update({"status": "pulling manifest"}, 0.0)
    for i, now in enumerate((1.0, 1.02, 1.5, 2.0)):  # the second comes too soon to be drawn
        chunk = {"status": status, "digest": digest, "total": 4 << 20, "completed": i << 20}
        progress.update(chunk, now)
    progress.update(
        {"status": status, "digest": digest, "total": 4 << 20, "completed": 4 << 20}, 2.5
    )
    progress.update({"status": "success"}, 2.6)
    text = out.getvalue()
    print(text)
    first, bar, end = text.split("\n")[:3]
    assert first == "pulling manifest"
    draws = bar.split("\r")[1:]
    assert len(draws) == 4  # 0, (skipped), 2, 3 MiB, 4 MiB
    assert draws[0] == f"{status}  {'░' * 30}  0 B / 4.0 MiB    0%\033[K"
    assert (
        draws[1]
        == f"{status}  {'█' * 15}{'░' * 15}  2.0 MiB / 4.0 MiB   50%  4.0 MiB/s, 500ms left\033[K"
    )
    assert draws[3] == f"{status}  {'█' * 30}  4.0 MiB / 4.0 MiB  100%  2.7 MiB/s\033[K"
    assert end == "success"


def test_progress_bar_shrinks_to_fit_the_terminal() -> None:
    out = io.StringIO()
    progress = pull.Progress(out, tty=True, columns=80)
    chunk = {"status": "pulling ab12ab12ab12", "digest": "sha256:ab12", "total": 4 << 20}
    progress.update({**chunk, "completed": 0}, 1.0)
    progress.update({**chunk, "completed": 2 << 20}, 1.5)
    last = out.getvalue().split("\r")[-1].removesuffix("\033[K")
    assert last.endswith("50%  4.0 MiB/s, 500ms left")
    assert len(last) == 79
