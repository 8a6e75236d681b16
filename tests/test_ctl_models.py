"""harborctl load, unload and ps, and what `harborctl chat` says when no backend runs.

The output and the requests sent are checked against respx-mocked answers; then the
commands run against a real harbord over fake Ollama servers (tests/harness.py,
tests/fakeproc.py): a preload lands where asked, `ps` shows where each model is loaded
and `unload` without --backend unloads it everywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import respx

from harbord.ctl.commands import ps
from harbord.failures import START_HINT
from harbord.schemas import LoadedModel
from tests.fakeproc import FakeOllama, free_port
from tests.harness import Harbord, gpu_cpu
from tests.test_ctl import backend, encode, run, status

GIB = 1024**3
MODELS = ["llama3.2:latest=2000000000", "qwen3:32b=20000000000"]


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("HARBOR_SOCKET", str(tmp_path / "harbor.sock"))
    monkeypatch.setenv("NO_COLOR", "1")
    with respx.mock(base_url="http://harbor", assert_all_called=False) as router:
        yield router


def iso(when: float) -> str:
    """An expiry as Ollama writes it: local offset, nanoseconds."""
    text = datetime.fromtimestamp(when, UTC).astimezone().isoformat(timespec="microseconds")
    return text[:26] + "123" + text[26:]


# --- load ------------------------------------------------------------------------------------


def test_load_preloads_with_an_empty_prompt_and_says_where(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {"model": "llama3.2", "response": "", "done": True, "done_reason": "load"}
    route = daemon.post("/api/generate").respond(
        200, json=answer, headers={"X-Harbor-Backend": "cpu", "X-Harbor-Fallbacks": "gpu=oom"}
    )
    code, out, err = run(capsys, "load", "llama3.2", "--keep-alive", "10m")
    assert (code, err) == (0, "")
    assert out == "loaded llama3.2 on cpu (after gpu=oom), kept 10m after its last use\n"
    request = route.calls.last.request
    assert "X-Harbor-Backend" not in request.headers
    assert json.loads(request.content) == {
        "model": "llama3.2", "prompt": "", "stream": False, "keep_alive": 600,
    }  # fmt: skip


def test_load_on_a_backend_with_the_default_keep_alive(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.post("/api/generate").respond(
        200, json={"done": True}, headers={"X-Harbor-Backend": "gpu"}
    )
    code, out, _ = run(capsys, "load", "qwen3:32b", "--backend", "gpu")
    assert (code, out) == (0, "loaded qwen3:32b on gpu\n")
    request = route.calls.last.request
    assert request.headers["X-Harbor-Backend"] == "gpu"
    assert "keep_alive" not in json.loads(request.content)  # the backend's own default


def test_load_forever_and_json(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = b'{"model":"m","done":true,"done_reason":"load"}'
    route = daemon.post("/api/generate").respond(200, content=raw)
    code, out, _ = run(capsys, "load", "m", "--keep-alive", "forever", "--json")
    assert (code, out) == (0, raw.decode() + "\n")
    assert json.loads(route.calls.last.request.content)["keep_alive"] == -1


@pytest.mark.parametrize("keep", ["0", "soon", "5x"])
def test_load_refuses_a_keep_alive_it_cannot_send(
    keep: str, daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.post("/api/generate")
    code, _, err = run(capsys, "load", "m", "--keep-alive", keep)
    assert code == 64
    assert "--keep-alive" in err
    assert not route.called


def test_load_error_from_harbord_exits_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.post("/api/generate").respond(404, json={"error": "model 'nope' not found"})
    code, out, err = run(capsys, "load", "nope")
    assert (code, out) == (1, "")
    assert err == "harborctl: model 'nope' not found\n"


# --- unload ----------------------------------------------------------------------------------


def test_unload_names_every_backend_that_unloaded(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {"model": "llama3.2", "response": "", "done": True, "done_reason": "unload"}
    route = daemon.post("/api/generate").respond(
        200, json=answer, headers={"X-Harbor-Backend": "gpu,cpu"}
    )
    code, out, err = run(capsys, "unload", "llama3.2")
    assert (code, out, err) == (0, "unloaded llama3.2 from gpu, cpu\n", "")
    request = route.calls.last.request
    assert "X-Harbor-Backend" not in request.headers
    assert json.loads(request.content) == {
        "model": "llama3.2", "prompt": "", "keep_alive": 0, "stream": False,
    }  # fmt: skip


def test_unload_from_one_backend(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.post("/api/generate").respond(
        200, json={"done": True, "done_reason": "unload"}, headers={"X-Harbor-Backend": "cpu"}
    )
    code, out, _ = run(capsys, "unload", "m", "--backend", "cpu")
    assert (code, out) == (0, "unloaded m from cpu\n")
    assert route.calls.last.request.headers["X-Harbor-Backend"] == "cpu"


# --- ps --------------------------------------------------------------------------------------


def test_ps_shows_each_model_where_it_is_loaded(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    gpu = backend("gpu", loaded=[
        LoadedModel("llama3.2:latest", 3 * GIB, 3 * GIB, iso(now + 290), 4096),
        LoadedModel("qwen3:32b", 20 * GIB, 7 * GIB, iso(now + 3700), 8192),
    ])  # fmt: skip
    cpu = backend("cpu", loaded=[LoadedModel("llama3.2:latest", 3 * GIB, 0, iso(now - 5))])
    daemon.get("/harbor/status").respond(200, content=encode(status(gpu, cpu)))
    code, out, _ = run(capsys, "ps")
    assert code == 0
    rows = [line.split("  ") for line in out.splitlines()]
    cells = [[c.strip() for c in row if c.strip()] for row in rows]
    assert cells == [
        ["MODEL", "BACKEND", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"],
        ["llama3.2:latest", "gpu", "3.0 GiB", "100% GPU", "4096", cells[1][5]],
        ["qwen3:32b", "gpu", "20.0 GiB", "35% GPU", "8192", cells[2][5]],
        ["llama3.2:latest", "cpu", "3.0 GiB", "CPU", "-", "expired"],
    ]
    assert cells[1][5].startswith("in 4m") and cells[2][5].startswith("in 1h")


def test_ps_with_nothing_loaded(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(200, content=encode(status()))
    code, out, _ = run(capsys, "ps")
    assert (code, out) == (0, "no model is loaded on any backend\n")


def test_ps_json_keeps_the_models_per_backend(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = LoadedModel("m", 10, 5, "2030-01-01T00:00:00Z", 2048)
    daemon.get("/harbor/status").respond(
        200, content=encode(status(backend("gpu", loaded=[loaded]), backend("cpu")))
    )
    code, out, _ = run(capsys, "ps", "--json")
    assert code == 0
    assert json.loads(out) == {
        "backends": {"gpu": [msgspec.to_builtins(loaded)], "cpu": []},
        "capacity": {
            "gpu": {"loaded": 1, "of": None, "source": None},
            "cpu": {"loaded": 0, "of": None, "source": None},
        },
        "kept_hot": {"gpu": [], "cpu": []},
    }


def test_ps_shows_each_backends_capacity_and_the_models_kept_hot(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = LoadedModel("llama3.1:latest", 5 * GIB, 5 * GIB, "2030-01-01T00:00:00Z", 4096)
    gpu = backend("gpu", loaded=[loaded])
    gpu.capacity, gpu.capacity_source, gpu.kept_hot = 1, "learned", ["llama3.1:latest"]
    cpu = backend("cpu")
    cpu.capacity, cpu.capacity_source = 3, "default"
    daemon.get("/harbor/status").respond(200, content=encode(status(gpu, cpu)))
    code, out, _ = run(capsys, "ps")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[-2:] == ["kept", "hot"]
    assert lines[2:] == [
        "gpu: 1 of 1 model (learned from an eviction)",
        "cpu: 0 of 3 models (Ollama's default)",
    ]
    code, out, _ = run(capsys, "ps", "--json")
    answer = json.loads(out)
    assert answer["capacity"]["gpu"] == {"loaded": 1, "of": 1, "source": "learned"}
    assert answer["kept_hot"] == {"gpu": ["llama3.1:latest"], "cpu": []}


@pytest.mark.parametrize(
    ("size", "vram", "shown"),
    [
        (100, 100, "100% GPU"),
        (100, 35, "35% GPU"),
        (100, 0, "CPU"),
        (0, 0, "CPU"),
        (100, 120, "100% GPU"),
    ],
)
def test_processor_column(size: int, vram: int, shown: str) -> None:
    assert ps.processor(LoadedModel("m", size, vram)) == shown


def test_until_column() -> None:
    now = 1_800_000_000.0
    assert ps.until(None, now) == "-"
    assert ps.until("2318-07-02T10:00:00.123456789+02:00", now) == "forever"  # keep_alive < 0
    assert ps.until(datetime.fromtimestamp(now + 30, UTC).isoformat(), now) == "in 30s"
    assert ps.until("not a time", now) == "not a time"


# --- against a real harbord --------------------------------------------------------------------


@pytest.fixture
def harbord(tmp_path: Path) -> Iterator[Harbord]:
    with (
        FakeOllama.start("gpu", models=MODELS, vram=8 * GIB) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
        try:
            yield daemon
        finally:
            assert daemon.stop() == 0


def ctl(capsys: pytest.CaptureFixture[str], daemon: Harbord, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "--socket", str(daemon.socket), *argv)


def loaded_on(daemon: Harbord) -> dict[str, list[str]]:
    return {b["name"]: [m["name"] for m in b["loaded"]] for b in daemon.status()["backends"]}


def test_load_ps_unload_against_harbord(
    harbord: Harbord, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`unload` without --backend needs harbord's unload-everywhere (issue 12, item 4)."""
    monkeypatch.setenv("NO_COLOR", "1")
    assert ctl(capsys, harbord, "load", "llama3.2", "--backend", "gpu")[:2] == (
        0, "loaded llama3.2 on gpu\n",
    )  # fmt: skip
    code, out, _ = ctl(
        capsys, harbord, "load", "llama3.2", "--backend", "cpu", "--keep-alive", "1h"
    )
    assert (code, out) == (0, "loaded llama3.2 on cpu, kept 1h after its last use\n")
    both = {"gpu": ["llama3.2:latest"], "cpu": ["llama3.2:latest"]}
    harbord.wait_for(lambda: loaded_on(harbord) == both, what="status to show both loaded")

    code, out, _ = ctl(capsys, harbord, "ps")
    assert code == 0
    lines = out.splitlines()
    rows = sorted([*line.split()[:2], line.split()[4]] for line in lines[1:3])
    assert rows == [["llama3.2:latest", "cpu", "CPU"], ["llama3.2:latest", "gpu", "100%"]]
    assert lines[3:] == [
        "gpu: 1 of 3 models (Ollama's default)",
        "cpu: 1 of 3 models (Ollama's default)",
    ]

    code, out, err = ctl(capsys, harbord, "unload", "llama3.2")
    assert (code, out) == (0, "unloaded llama3.2 from gpu, cpu\n"), err
    with harbord.client() as client:
        assert client.get("/api/ps").json() == {"models": []}


def test_chat_with_no_backend_running_says_what_was_tried_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_url, cpu_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    daemon = Harbord.start(tmp_path, {"gpu": (gpu_url, "gpu"), "cpu": (cpu_url, "cpu")})
    try:
        code, out, err = ctl(capsys, daemon, "chat", "llama3.2", "hi")
    finally:
        assert daemon.stop() == 0
    assert (code, out) == (1, "")
    message = err.splitlines()[0]
    assert message.startswith("harborctl: no backend available: ")
    assert f"gpu at {gpu_url}" in message and f"cpu at {cpu_url}" in message
    assert message.endswith(START_HINT)
    assert "harborctl setup" in message and "OLLAMA_GPU_URL" in message
