"""harborctl: every subcommand's output and exit code, against respx-mocked answers."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import respx

from harbord.ctl import main as ctl_main
from harbord.ctl import output
from harbord.ctl.http import Daemon
from harbord.ctl.main import main
from harbord.schemas import (
    Affinity,
    Attempt,
    BackendEstimate,
    BackendStatus,
    Counters,
    Decision,
    MemoryBudget,
    Pin,
    Plan,
    PlanStep,
    Status,
    UnitStatus,
)

HINT = "is it running? start it with 'systemctl --user start harbord.socket' or run 'harbord'"
ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("HARBOR_SOCKET", str(tmp_path / "harbor.sock"))
    for name in ("NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    with respx.mock(base_url="http://harbor", assert_all_called=False) as router:
        yield router


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def backend(name: str, **changes: object) -> BackendStatus:
    values: dict[str, object] = {
        "name": name,
        "url": f"http://127.0.0.1:{11434 if name == 'gpu' else 11435}",
        "kind": "gpu" if name == "gpu" else "cpu",
        "unit": f"ollama-{name}@me.service",
        "health": "up",
        "version": "0.14.3",
        "latency_ms": 12.4,
        "in_flight": 1,
        "queued": 0,
        "last_error": None,
        "last_error_class": None,
        "last_change": 0.0,
        "cooldown": False,
        "models": ["llama3:8b", "qwen3:32b"],
        "loaded": [],
        "memory_pressure": [],
        "served": 7,
        "ttfb_p50_ms": 340.0,
        **changes,
    }
    return msgspec.convert(values, BackendStatus)


def status(*backends: BackendStatus, **changes: object) -> Status:
    now = time.time()
    values: dict[str, object] = {
        "version": "0.1.0",
        "pid": 4242,
        "started_at": now - 7500,
        "uptime_s": 7500.0,
        "socket": "/run/user/1000/harbor.sock",
        "backends": list(backends) or [backend("gpu"), backend("cpu")],
        "pins": {},
        "affinity": {},
        "counters": Counters(requests=12, served=10, failed=1, fallbacks=3, client_errors=1),
        "in_flight": 1,
        **changes,
    }
    return msgspec.convert(values, Status, from_attributes=True)


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)


# --- status ------------------------------------------------------------------------------


def test_status_all_up_exits_0(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(200, content=encode(status()))
    code, out, err = run(capsys, "status")
    assert code == 0
    assert "harbord 0.1.0, up 2h 5m" in out
    assert "12: 10 served, 3 fallbacks, 1 failed" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:3] in ("gpu", "cpu")
    }
    assert rows["gpu"] == [
        "gpu",
        "gpu",
        "up",
        "0.14.3",
        "12",
        "ms",
        "1",
        "0",
        "7",
        "340",
        "ms",
        "2",
    ]
    assert not ANSI.search(out)  # capsys is not a terminal
    assert err == ""


def test_status_details_and_degraded_exit_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    unit = UnitStatus(
        name="ollama-cpu@me.service",
        active_state="failed",
        sub_state="failed",
        n_restarts=5,
        since="Fri 2026-11-27 03:00:00 UTC",
        harbor_restarts=5,
        budget_exhausted=True,
        note="restart budget spent",
    )
    value = status(
        backend("gpu"),
        backend(
            "cpu",
            health="down",
            cooldown=True,
            version=None,
            latency_ms=None,
            unit_status=unit,
            last_error="cannot connect to 127.0.0.1:11435",
            last_error_class="network",
        ),
        pins={"qwen3:32b": Pin("cpu", "out of memory on gpu", now, now + 23 * 3600 + 30, "oom")},
        affinity={"llama3:8b": Affinity("gpu", now - 60)},
        state_note="state file was unreadable; started empty",
    )
    daemon.get("/harbor/status").respond(200, content=encode(value))
    code, out, _ = run(capsys, "status")
    assert code == 1
    assert "down, cooling down" in out
    assert "cpu unit ollama-cpu@me.service: failed/failed since Fri 2026-11-27" in out
    assert "5 restarts (5 by harbord), restart budget spent" in out
    assert "cpu last error (network): cannot connect" in out
    assert "qwen3:32b → cpu  out of memory on gpu (oom, in 23h)" in out
    assert "llama3:8b → gpu (since 1m ago)" in out
    assert "note: state file was unreadable" in out


def test_status_cooldown_alone_is_degraded(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(
        200, content=encode(status(backend("gpu", cooldown=True), backend("cpu")))
    )
    assert run(capsys, "status")[0] == 1


def test_status_json_prints_the_daemons_bytes(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = encode(status(backend("gpu", health="degraded")))
    daemon.get("/harbor/status").respond(200, content=raw)
    for argv in (["--json", "status"], ["status", "--json"]):
        code, out, _ = run(capsys, *argv)
        assert (code, out) == (1, raw.decode() + "\n")


def test_no_command_means_status(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.get("/harbor/status").respond(200, content=encode(status()))
    assert run(capsys)[0] == 0
    assert route.called


# --- unreachable, usage --------------------------------------------------------------------


def test_unreachable_socket_exits_2_with_the_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nobody.sock"
    code, out, err = run(capsys, "--socket", str(path), "status")
    assert code == 2
    assert out == ""
    assert err == f"harborctl: cannot reach harbord at {path}: {HINT}\n"


def test_refusing_socket_from_env_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    monkeypatch.setenv("HARBOR_SOCKET", str(path))
    code, _, err = run(capsys, "check")
    assert code == 2
    assert err.startswith(f"harborctl: cannot reach harbord at {path}: is it running?")


@pytest.mark.parametrize(
    "argv",
    [
        ["bogus"],
        ["route"],
        ["pin", "m"],
        ["pin", "m", "cpu", "--for", "soon"],
        ["pin", "m", "cpu", "--for", "0"],
        ["chat", "m", "hi", "--intent", "slow"],
        ["--timeout", "-1", "status"],
        ["explain", "--last", "0"],
    ],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 64
    assert "usage: harborctl" in err
    assert out == ""


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ctl_main.COMMANDS:
        assert name in out


def test_timeout_defaults_per_command(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[float | None] = []
    real_init = Daemon.__init__

    def init(self: Daemon, socket: Path, timeout: float | None) -> None:
        seen.append(timeout)
        real_init(self, socket, timeout)

    monkeypatch.setattr(Daemon, "__init__", init)
    daemon.get("/harbor/status").respond(200, content=encode(status()))
    daemon.post("/api/chat").respond(200, json={"message": {"content": "x"}, "done": True})
    run(capsys, "status")
    run(capsys, "chat", "m", "hi", "--no-stream")
    run(capsys, "status", "--timeout", "2.5")
    assert seen == [30.0, None, 2.5]


# --- check, models, route --------------------------------------------------------------------


def test_check_prints_json_and_exit_code(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = {"status": "healthy", "version": "0.14.3", "url": "http://g", "is_gpu": True}
    sick = {"status": "unhealthy", "version": None, "url": "http://c", "is_gpu": False}
    daemon.get("/harbor/check").mock(
        side_effect=[
            httpx.Response(200, json={"gpu": healthy}),
            httpx.Response(200, json={"gpu": healthy, "cpu": sick}),
        ]
    )
    code, out, _ = run(capsys, "check")
    assert (code, json.loads(out)) == (0, {"gpu": healthy})
    assert '\n  "gpu": {' in out  # indented for people
    code, out, _ = run(capsys, "check", "--json")
    assert (code, json.loads(out)["cpu"]) == (1, sick)


def test_models(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = {
        "backends": {"gpu": ["llama3:8b"], "cpu": ["llama3:8b", "qwen3:32b"], "spare": []},
        "models": {"llama3:8b": ["gpu", "cpu"], "qwen3:32b": ["cpu"]},
    }
    daemon.get("/harbor/models").respond(200, json=inventory)
    code, out, _ = run(capsys, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "BACKENDS"]
    assert lines[1] == "llama3:8b  gpu, cpu"
    assert lines[2] == "qwen3:32b  cpu"
    assert "no models from spare" in out
    code, out, _ = run(capsys, "models", "--json")
    assert json.loads(out) == inventory


def test_route_prints_steps_reasons_and_excluded(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = Plan(
        model="hf.co/org/m:Q4",
        intent="heavy",
        intent_source="header",
        steps=[PlanStep("cpu", ["pinned: out of memory on gpu", "heavy intent prefers cpu"])],
        excluded=[PlanStep("gpu", ["cooling down after a refused connection"])],
        notes=["model rule applies"],
    )
    route = daemon.get("/harbor/route").respond(200, content=encode(plan))
    code, out, _ = run(capsys, "route", "hf.co/org/m:Q4", "--intent", "heavy")
    assert code == 0
    assert "hf.co/org/m:Q4: intent heavy (from header)" in out
    assert "1. cpu: pinned: out of memory on gpu; heavy intent prefers cpu" in out
    assert "left out gpu: cooling down after a refused connection" in out
    assert "note: model rule applies" in out
    params = route.calls.last.request.url.params
    assert (params["model"], params["intent"]) == ("hf.co/org/m:Q4", "heavy")


def test_route_without_steps_exits_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = Plan(model="m", intent="fast", intent_source="default", steps=[])
    daemon.get("/harbor/route").respond(200, content=encode(plan))
    code, out, _ = run(capsys, "route", "m")
    assert code == 1
    assert "no backend can serve it" in out


def test_route_error_from_daemon(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/route").respond(400, json={"error": "unknown intent 'x'"})
    assert run(capsys, "route", "m") == (1, "", "harborctl: unknown intent 'x'\n")


# --- pins ----------------------------------------------------------------------------------


def test_pins_table_and_empty(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    pins = {
        "qwen3:32b": Pin("cpu", "out of memory on gpu", now - 3600, now + 23 * 3600 + 30, "oom"),
        "llama3:8b": Pin("gpu", "pinned by operator", now - 5),
    }
    daemon.get("/harbor/pins").mock(
        side_effect=[httpx.Response(200, content=encode(pins)), httpx.Response(200, json={})]
    )
    code, out, _ = run(capsys, "pins")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "BACKEND", "SOURCE", "SINCE", "EXPIRES", "REASON"]
    assert re.search(r"qwen3:32b\s+cpu\s+oom\s+1h ago\s+in 23h\s+out of memory on gpu", out)
    assert re.search(r"llama3:8b\s+gpu\s+operator\s+.*until unpinned\s+pinned by operator", out)
    assert run(capsys, "pins") == (0, "no pins\n", "")


def test_pin_for_duration_quotes_the_model(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    answer = {"hf.co/org/m:Q4": Pin("cpu", "testing", now, now + 1800)}
    route = daemon.put(url__regex=r"/harbor/pins/").respond(200, content=encode(answer))
    code, out, _ = run(
        capsys, "pin", "hf.co/org/m:Q4", "cpu", "--for", "30m", "--reason", "testing"
    )
    assert code == 0
    assert out == "pinned hf.co/org/m:Q4 to cpu for 30m\n"
    request = route.calls.last.request
    assert request.url.raw_path == b"/harbor/pins/hf.co%2Forg%2Fm%3AQ4"
    assert json.loads(request.content) == {
        "backend": "cpu",
        "for_seconds": 1800.0,
        "reason": "testing",
    }


def test_pin_until_unpinned(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    answer = {"llama3:latest": Pin("gpu", "pinned by operator", time.time())}
    route = daemon.put("/harbor/pins/llama3").respond(200, content=encode(answer))
    assert run(capsys, "pin", "llama3", "gpu")[1] == "pinned llama3:latest to gpu until unpinned\n"
    assert json.loads(route.calls.last.request.content)["for_seconds"] is None


def test_pin_unknown_backend_shows_daemon_error(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "unknown backend 'tpu'; expected one of: gpu, cpu"
    daemon.put("/harbor/pins/llama3%3A8b").respond(400, json={"error": message})
    assert run(capsys, "pin", "llama3:8b", "tpu") == (1, "", f"harborctl: {message}\n")


def test_unpin(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    route = daemon.delete("/harbor/pins/llama3%3A8b").mock(
        side_effect=[
            httpx.Response(200, json={"unpinned": "llama3:8b"}),
            httpx.Response(404, json={"error": "llama3:8b is not pinned"}),
        ]
    )
    assert run(capsys, "unpin", "llama3:8b") == (0, "unpinned llama3:8b\n", "")
    assert run(capsys, "unpin", "llama3:8b") == (1, "", "harborctl: llama3:8b is not pinned\n")
    assert route.call_count == 2


# --- restart -------------------------------------------------------------------------------


def test_restart(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    ok = {"backend": "gpu", "restarted": True, "message": "restarted ollama-gpu@me.service"}
    refused = {"backend": "gpu", "restarted": False, "message": "restart budget spent (5 in 10m)"}
    daemon.post("/harbor/backends/gpu/restart").mock(
        side_effect=[
            httpx.Response(200, json=ok),
            httpx.Response(409, json=refused),
            httpx.Response(501, json={"error": "backend restarts need systemd supervision"}),
        ]
    )
    assert run(capsys, "restart", "gpu") == (0, "restarted ollama-gpu@me.service\n", "")
    assert run(capsys, "restart", "gpu") == (1, "", "harborctl: restart budget spent (5 in 10m)\n")
    code, _, err = run(capsys, "restart", "gpu")
    assert (code, err) == (1, "harborctl: backend restarts need systemd supervision\n")


def test_restart_json(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    ok = {"backend": "cpu", "restarted": True, "message": "done"}
    daemon.post("/harbor/backends/cpu/restart").respond(200, json=ok)
    code, out, _ = run(capsys, "--json", "restart", "cpu")
    assert (code, json.loads(out)) == (0, ok)


# --- explain -------------------------------------------------------------------------------


def decision(request_id: str = "7fcb-2") -> Decision:
    plan = Plan(
        model="qwen3:32b",
        intent="fast",
        intent_source="default",
        steps=[PlanStep("gpu", ["fast intent prefers gpu"]), PlanStep("cpu", ["cpu fallback"])],
    )
    attempts = [
        Attempt("gpu", "failed", "oom", "CUDA error: out of memory", 500, ms=812.0),
        Attempt("cpu", "served", ms=4100.0),
    ]
    return Decision(
        id=request_id,
        time=time.time() - 30,
        method="POST",
        path="/api/chat",
        model="qwen3:32b",
        intent="fast",
        plan=plan,
        attempts=attempts,
        served_by="cpu",
        status=200,
        duration_ms=4900.0,
        first_byte_ms=1250.0,
    )


def test_explain_one_request(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    route = daemon.get(url__regex=r"/harbor/decisions/.+").respond(
        200, content=encode(decision("a/b 1"))
    )
    code, out, _ = run(capsys, "explain", "a/b 1")
    assert code == 0
    assert route.calls.last.request.url.raw_path == b"/harbor/decisions/a%2Fb%201"
    assert "request a/b 1" in out
    assert "(30s ago)" in out
    assert "POST /api/chat" in out
    assert "qwen3:32b: intent fast (from default)" in out
    assert "1. gpu: fast intent prefers gpu" in out
    assert re.search(r"gpu\s+failed\s+oom\s+500\s+812 ms\s+CUDA error: out of memory", out)
    assert "→ cpu tried next because gpu failed (oom)" in out
    assert re.search(r"cpu\s+served\s+-\s+-\s+4100 ms", out)
    assert "served by cpu, status 200, first byte after 1.2s, in 4.9s" in out


def test_explain_last_n_and_empty(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.get("/harbor/decisions").mock(
        side_effect=[
            httpx.Response(200, content=encode([decision("b"), decision("a")])),
            httpx.Response(200, json=[]),
        ]
    )
    code, out, _ = run(capsys, "explain", "--last", "2")
    assert code == 0
    assert route.calls.last.request.url.params["limit"] == "2"
    assert out.index("request b") < out.index("request a")
    assert run(capsys, "explain") == (0, "no recent requests\n", "")
    assert route.calls.last.request.url.params["limit"] == "1"


def test_explain_unknown_id(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.get("/harbor/decisions/zz").respond(
        404, json={"error": "no recent request with id 'zz'"}
    )
    assert run(capsys, "explain", "zz") == (1, "", "harborctl: no recent request with id 'zz'\n")


def test_explain_unserved(daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]) -> None:
    d = decision()
    d.attempts = [
        Attempt("gpu", "failed", "network", "cannot connect", ms=2.0),
        Attempt("cpu", "skipped", "busy", "queue full"),
    ]
    d.served_by, d.status, d.first_byte_ms = None, 503, None
    daemon.get("/harbor/decisions").respond(200, content=encode([d]))
    out = run(capsys, "explain")[1]
    assert "→ cpu tried next because gpu failed (network)" in out
    assert "not served, status 503" in out


# --- chat ----------------------------------------------------------------------------------


def ndjson(*parts: str, done: bool = True) -> bytes:
    lines = [{"message": {"role": "assistant", "content": p}, "done": False} for p in parts]
    if done:
        lines.append({"message": {"role": "assistant", "content": ""}, "done": True})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


SERVED = {"X-Harbor-Backend": "cpu", "X-Harbor-Fallbacks": "gpu=oom", "X-Harbor-Request-Id": "r-1"}


def test_chat_streams_content_and_says_who_served(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    route = daemon.post("/api/chat").respond(200, content=ndjson("Hel", "lo"), headers=SERVED)
    code, out, err = run(capsys, "chat", "qwen3:32b", "hi", "--intent", "heavy")
    assert (code, out) == (0, "Hello\n")
    assert err == "served by cpu after gpu=oom (request r-1: harborctl explain r-1)\n"
    request = route.calls.last.request
    assert request.headers["X-Harbor-Intent"] == "heavy"
    assert "X-Harbor-Backend" not in request.headers
    body = json.loads(request.content)
    assert body == {
        "model": "qwen3:32b",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }


def test_chat_flushes_each_chunk(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flushed: list[str] = []
    written = io.StringIO()

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            return written.write(text)

        def flush(self) -> None:
            flushed.append(written.getvalue())

    monkeypatch.setattr(sys, "stdout", Out())
    daemon.post("/api/chat").respond(200, content=ndjson("a", "b"), headers=SERVED)
    assert main(["chat", "m", "hi"]) == 0
    assert flushed[:2] == ["a", "ab"]
    assert written.getvalue() == "ab\n"


def test_chat_prompt_from_stdin_system_backend_no_stream(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("summarise this\n"))
    reply = {"message": {"role": "assistant", "content": "done."}, "done": True}
    route = daemon.post("/api/chat").respond(200, json=reply, headers={"X-Harbor-Backend": "gpu"})
    code, out, err = run(
        capsys, "chat", "m", "--no-stream", "--backend", "gpu", "--system", "terse"
    )
    assert (code, out, err) == (0, "done.\n", "served by gpu\n")
    request = route.calls.last.request
    assert request.headers["X-Harbor-Backend"] == "gpu"
    assert "X-Harbor-Intent" not in request.headers
    assert json.loads(request.content) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "terse"},
            {"role": "user", "content": "summarise this\n"},
        ],
        "stream": False,
    }


def test_chat_empty_prompt_is_a_usage_error(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    route = daemon.post("/api/chat")
    code, _, err = run(capsys, "chat", "m")
    assert code == 64
    assert "empty prompt" in err
    assert not route.called


def test_chat_error_line_mid_stream_exits_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    content = ndjson("partial", done=False) + b'{"error":"cpu broke off the stream"}\n'
    daemon.post("/api/chat").respond(200, content=content, headers=SERVED)
    code, out, err = run(capsys, "chat", "m", "hi")
    assert code == 1
    assert out == "partial\n"  # the line is ended before the error
    assert err.splitlines() == [
        "harborctl: cpu broke off the stream",
        "answered by cpu after gpu=oom (request r-1: harborctl explain r-1)",
    ]


def test_chat_error_status_exits_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.post("/api/chat").respond(
        503,
        json={"error": "no backend available: gpu: cannot connect"},
        headers={"X-Harbor-Request-Id": "r-9", "X-Harbor-Fallbacks": "gpu=network"},
    )
    code, out, err = run(capsys, "chat", "m", "hi")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "harborctl: no backend available: gpu: cannot connect",
        "not served after gpu=network (request r-9: harborctl explain r-9)",
    ]


def test_chat_json_prints_chunks(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.post("/api/chat").respond(200, content=ndjson("x"), headers=SERVED)
    code, out, _ = run(capsys, "chat", "m", "hi", "--json")
    assert code == 0
    chunks = [json.loads(line) for line in out.splitlines()]
    assert [c["done"] for c in chunks] == [False, True]
    assert chunks[0]["message"]["content"] == "x"


# --- colour ------------------------------------------------------------------------------


def test_colour_only_on_a_terminal_without_no_color(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(
        200, content=encode(status(backend("gpu"), backend("cpu", health="down")))
    )
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    out = run(capsys, "status")[1]
    assert "\033[31mdown\033[0m" in out
    assert "\033[32mup\033[0m" in out
    # Columns stay aligned: colour codes do not count as width.
    plain = ANSI.sub("", out).splitlines()
    header = next(line for line in plain if line.startswith("BACKEND"))
    gpu_row = next(line for line in plain if line.startswith("gpu "))
    assert gpu_row.index("0.14.3") == header.index("VERSION")

    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(run(capsys, "status")[1])
    monkeypatch.setenv("NO_COLOR", "")  # empty counts as unset (no-color.org)
    assert output.colour()


@pytest.mark.parametrize(
    ("env", "tty", "expected"),
    [
        ({}, True, True),
        ({}, False, False),
        ({"NO_COLOR": "1"}, True, False),
        ({"FORCE_COLOR": "1"}, False, True),
        ({"FORCE_COLOR": ""}, False, False),  # empty counts as unset (force-color.org)
        ({"CLICOLOR_FORCE": "1"}, False, True),
        ({"CLICOLOR_FORCE": "0"}, False, False),  # bixense.com/clicolors: != 0 forces
        ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, True, False),  # the opt-out wins
        ({"NO_COLOR": "1", "CLICOLOR_FORCE": "1"}, False, False),
        ({"TERM": "dumb"}, True, False),
        ({"TERM": "dumb", "FORCE_COLOR": "1"}, True, True),
        ({"NO_COLOR": "", "TERM": "xterm"}, True, True),
    ],
)
def test_colour_conventions(env: dict[str, str], tty: bool, expected: bool) -> None:
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    assert output.colour(stream, env) is expected


def test_force_color_colours_a_pipe(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(
        200, content=encode(status(backend("gpu"), backend("cpu", health="down")))
    )
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert "\033[31mdown\033[0m" in run(capsys, "status")[1]  # capsys: not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(run(capsys, "status")[1])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (4.21, "4.2s"), (45, "45s"), (303, "5m 3s"), (82800, "23h"),
     (83000, "23h 3m"), (187200, "2d 4h")],
)  # fmt: skip
def test_durations(seconds: float, text: str) -> None:
    assert output.duration(seconds) == text


# --- status at a glance, top and pull without a daemon ------------------------------------


def test_status_at_a_glance_in_colour_only_on_a_terminal(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pins = {"qwen3:32b": Pin("cpu", "pinned by operator", time.time())}
    value = status(backend("gpu"), backend("cpu", health="down"), pins=pins)
    daemon.get("/harbor/status").respond(200, content=encode(value))
    code, plain, _ = run(capsys, "status")  # capsys: a pipe
    assert code == 1
    assert not ANSI.search(plain)
    assert "requests 12: 10 served, 3 fallbacks, 1 failed, 1 client errors; 1 in flight" in plain
    assert "backends: 1 of 2 up; 1 pinned model" in plain

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    coloured = run(capsys, "status")[1]
    for text, code_ in [("10 served", 32), ("3 fallbacks", 33), ("1 failed", 31),
                        ("1 of 2 up", 33), ("1 pinned model", 36)]:  # fmt: skip
        assert f"\033[{code_}m{text}\033[0m" in coloured
    assert ANSI.sub("", coloured) == plain

    monkeypatch.setenv("NO_COLOR", "1")
    assert run(capsys, "status")[1] == plain


def test_status_zero_counters_stay_plain(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    value = status(counters=Counters(requests=2, served=2))
    daemon.get("/harbor/status").respond(200, content=encode(value))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    out = run(capsys, "status")[1]
    assert ", 0 fallbacks, 0 failed," in out
    assert "\033[32m2 of 2 up\033[0m; 0 pinned models" in out


@pytest.mark.parametrize(
    "argv",
    [["top", "--interval", "0"], ["top", "--interval", "soon"], ["top", "--last", "0"], ["pull"]],
)
def test_top_and_pull_usage_errors_exit_64(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 64
    assert "usage: harborctl" in err


def test_top_once_prints_one_plain_snapshot(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/status").respond(200, content=encode(status()))
    decisions = daemon.get("/harbor/decisions").respond(200, content=encode([decision("ab-1")]))
    code, out, _ = run(capsys, "top", "--last", "3")
    assert code == 0
    assert decisions.calls.last.request.url.params["limit"] == "3"
    assert re.search(r"^gpu\s+gpu\s+up\s+-\s+1\s+0\s+-\s+340 ms", out, re.M)
    assert re.search(r"ab-1\s+\S+\s+qwen3:32b\s+fast\s+cpu\s+gpu=oom\s+200", out)
    assert not ANSI.search(out)


def test_pull_progress_lines_and_where(
    daemon: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        {"status": "pulling manifest"},
        {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 200},
        {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 200, "completed": 1},
        {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 200, "completed": 2},
        {"status": "pulling 0123456789ab", "digest": "sha256:0123", "total": 200, "completed": 200},
        {"status": "success"},
    ]
    body = b"".join(encode(line) + b"\n" for line in lines)
    route = daemon.post("/api/pull").respond(200, content=body, headers={"X-Harbor-Backend": "cpu"})
    inventory = {"backends": {"gpu": ["phi3:latest"], "cpu": ["phi3:latest"]},
                 "models": {"phi3:latest": ["gpu", "cpu"]}}  # fmt: skip
    daemon.get("/harbor/models").respond(200, json=inventory)
    code, out, err = run(capsys, "pull", "phi3", "--backend", "cpu")
    assert code == 0
    assert route.calls.last.request.headers["X-Harbor-Backend"] == "cpu"
    assert json.loads(route.calls.last.request.content) == {"model": "phi3", "stream": True}
    assert out.splitlines() == [
        "pulling manifest",
        "pulling 0123456789ab  0/200 bytes  0%",
        "pulling 0123456789ab  2/200 bytes  1%",  # 1/200 is still 0%: not shown again
        "pulling 0123456789ab  200/200 bytes  100%",
        "success",
        "phi3:latest is on gpu, cpu",
    ]
    assert "pulling phi3 through cpu" in err


def test_pull_error_status_exits_1(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.post("/api/pull").respond(400, json={"error": "unknown backend 'tpu'"})
    code, out, err = run(capsys, "pull", "phi3", "--backend", "tpu")
    assert (code, out) == (1, "")
    assert err == "harborctl: pulling phi3 failed: unknown backend 'tpu'\n"


def test_setup_hands_its_options_to_setup_units(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harbord import setup_units

    seen: list[object] = []

    def run_setup(options: object) -> int:
        seen.append(options)
        return 3

    monkeypatch.setattr(setup_units, "run_setup", run_setup)
    assert run(capsys, "setup", "--dry-run", "--no-backends", "--harbord", "/opt/h")[0] == 3
    (options,) = seen
    assert isinstance(options, argparse.Namespace)
    assert (options.dry_run, options.no_backends, options.harbord) == (True, True, "/opt/h")
    assert "--dry-run" in run(capsys, "setup", "--help")[1]


def no_user_manager(tmp_path: Path) -> dict[str, str]:
    """An environment whose `systemctl --user` finds no manager (an empty runtime dir)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "USER": "someone",
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }


def test_setup_dry_run_lists_its_steps_without_a_user_manager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from harbord import setup_units

    env = no_user_manager(tmp_path)
    assert setup_units.run_setup(["--dry-run", "--no-backends"], env=env) == 0
    out = capsys.readouterr().out
    unit_dir = tmp_path / "config" / "systemd" / "user"
    assert f"would: install {unit_dir / 'harbord.service'}" in out
    assert "would: systemctl --user daemon-reload" in out
    assert "would: systemctl --user enable --now harbord.socket" in out
    assert "cannot reach your systemd user manager" in out
    assert not unit_dir.exists(), "a dry run changes nothing"
    # Without --dry-run, the missing manager is an error that says what to do.
    assert setup_units.run_setup(["--no-backends"], env=env) == 1
    assert "loginctl enable-linger" in capsys.readouterr().err


def test_setup_json_prints_one_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from harbord import setup_units

    monkeypatch.setattr(os, "environ", no_user_manager(tmp_path))
    code, out, _ = run(capsys, "setup", "--dry-run", "--no-backends", "--json")
    assert code == 0
    report = json.loads(out)  # the whole of stdout: no text around it
    assert report["ok"] is True and report["dry_run"] is True
    assert report["user_manager"] is False
    assert "systemctl --user enable --now harbord.socket" in report["steps"]
    assert any("cannot reach your systemd user manager" in a for a in report["advice"])
    assert report["unit_dir"] == str(tmp_path / "config" / "systemd" / "user")
    # harborctl --json setup (the global option before the subcommand) too; a failure
    # is a report with ok false and the error.
    code, out, err = run(capsys, "--json", "setup", "--no-backends")
    assert code == 1 and "user manager" in err
    failed = msgspec.json.decode(out, type=setup_units.SetupReport)
    assert failed.ok is False and failed.error and "user manager" in failed.error


def test_harbord_service_fits_the_systemd_version() -> None:
    from harbord import unit_files

    shipped = (Path(__file__).resolve().parent.parent / "units" / "harbord.service").read_text()
    assert "Type=notify-reload\n" in shipped and "\nExecReload=" not in shipped
    assert unit_files.parse_version("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT") == 252
    assert unit_files.parse_version("not systemd") is None
    assert unit_files.service_for(shipped, 257) == shipped
    assert unit_files.service_for(shipped, None) == shipped  # unknown: as shipped
    old = unit_files.service_for(shipped, 252)
    assert "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n" in old
    assert "Type=notify-reload" not in old
    assert old.replace("Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n", "") == shipped.replace(
        "Type=notify-reload\n", ""
    ), "nothing else changes"


def test_setup_adds_and_removes_the_reload_drop_in_for_a_packaged_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from harbord import setup_units, unit_files

    env = no_user_manager(tmp_path)
    monkeypatch.setattr(unit_files, "packaged_units", lambda exec_start: Path("/usr/lib/x"))
    monkeypatch.setattr(unit_files, "systemd_version", lambda: 252)
    drop_in = tmp_path / "config" / "systemd" / "user" / unit_files.FALLBACK_DROP_IN
    assert setup_units.run_setup(["--dry-run", "--no-backends"], env=env) == 0
    out = capsys.readouterr().out
    assert f"would: install {drop_in} (systemd 252 is older than 253)" in out
    assert "would: systemctl --user daemon-reload" in out
    assert "harbord.service (" not in out  # the packaged unit itself is left alone
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(unit_files.FALLBACK_DROP_IN_TEXT)
    assert setup_units.run_setup(["--dry-run", "--no-backends"], env=env) == 0
    assert "daemon-reload" not in capsys.readouterr().out  # already there
    monkeypatch.setattr(unit_files, "systemd_version", lambda: 256)
    assert setup_units.run_setup(["--dry-run", "--no-backends"], env=env) == 0
    assert f"would: remove {drop_in}" in capsys.readouterr().out


# --- placement (issue 11): route's numbers, affinity, memory budget in status ------------


GIB = 1024**3


def test_route_num_ctx_shows_the_rule_and_each_backends_numbers(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = Plan(
        model="llama3.1:8b",
        intent="fast",
        intent_source="default",
        steps=[
            PlanStep("cpu", ["fast intent prefers gpu"]),
            PlanStep("gpu", ["needs 13.9 GB at 64k context, gpu has 8 GiB (journal)"]),
        ],
        rule="memory",
        num_ctx=65536,
        estimates=[
            BackendEstimate("cpu", 65536, 13_900_000_000, parallel=2),
            BackendEstimate(
                "gpu",
                65536,
                13_900_000_000,
                8 * GIB,
                "journal",
                1,
                1,
                2,
                800.0,
                2400.0,
                resident=False,
                load_ms=1500.0,
                load_learned=True,
                evicts=["qwen3:8b"],
            ),
        ],
    )
    route = daemon.get("/harbor/route").respond(200, content=encode(plan))
    code, out, _ = run(capsys, "route", "llama3.1:8b", "--num-ctx", "65536")
    assert code == 0
    assert "llama3.1:8b: intent fast (from default), context 64k; decided by memory" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[2:5] in ("cpu", "gpu")
    }
    assert rows["cpu"] == ["cpu", "64k", "13.9", "GB", "-", "0", "of", "2", "0", "-", "-", "-", "-"]
    assert rows["gpu"] == [
        "gpu", "64k", "13.9", "GB", "8", "GiB", "(journal)", "1", "of", "1", "2", "800", "ms",
        "2400", "ms", "1500", "ms", "(learned)", "qwen3:8b",
    ]  # fmt: skip
    assert route.calls.last.request.url.params["num_ctx"] == "65536"


@pytest.mark.parametrize(
    "argv", [["route", "m", "--num-ctx", "0"], ["route", "m", "--num-ctx", "x"]]
)
def test_route_num_ctx_must_be_a_positive_number(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 64
    assert "expected a number of tokens >= 1" in err


def test_affinity_lists_and_resets(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    listed = {"llama3:8b": Affinity("gpu", now - 600, now - 30)}
    daemon.get("/harbor/affinity").respond(200, content=encode(listed))
    code, out, _ = run(capsys, "affinity")
    assert code == 0
    assert out.split("\n")[1].split() == ["llama3:8b", "gpu", "10m", "ago", "30s", "ago"]

    daemon.delete("/harbor/affinity").respond(200, json={"reset": ["llama3:8b", "qwen3:32b"]})
    assert run(capsys, "affinity", "reset")[:2] == (0, "affinity reset: llama3:8b, qwen3:32b\n")
    one = daemon.delete("/harbor/affinity/hf.co%2Fo%2Fm%3A1").respond(
        200, json={"reset": ["hf.co/o/m:1"]}
    )
    assert run(capsys, "affinity", "reset", "hf.co/o/m:1")[:2] == (
        0,
        "affinity reset: hf.co/o/m:1\n",
    )
    assert one.called


def test_affinity_empty_unknown_model_and_misuse(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.get("/harbor/affinity").respond(200, json={})
    assert run(capsys, "affinity", "list")[:2] == (0, "no affinity\n")
    daemon.delete("/harbor/affinity/m%3A1").respond(404, json={"error": "m:1 has no affinity"})
    assert run(capsys, "affinity", "reset", "m:1") == (1, "", "harborctl: m:1 has no affinity\n")
    code, _, err = run(capsys, "affinity", "m:1")  # a model without reset
    assert code == 64
    assert "invalid choice" in err or "MODEL goes with reset" in err


def test_status_shows_each_gpus_memory_budget_and_its_source(
    daemon: respx.MockRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    value = status(
        backend(
            "gpu",
            memory_budget=MemoryBudget(11 * GIB + GIB // 5, "journal", "NVIDIA GeForce RTX 4070"),
            spilled_contexts={"qwen3:14b": 32768},
            default_context=4096,
        ),
        backend("gpu2", kind="gpu", memory_note="journal: journalctl not found; sysfs: none"),
        backend("cpu", parallel=2),
        affinity={"llama3:8b": Affinity("gpu", now - 60, now - 30)},
    )
    daemon.get("/harbor/status").respond(200, content=encode(value))
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert "gpu memory budget 11.2 GiB (from journal: NVIDIA GeForce RTX 4070)" in out
    assert "gpu2 memory budget unknown (journal: journalctl not found; sysfs: none)" in out
    assert "gpu spilled qwen3:14b at 32k context" in out
    assert "gpu serves 1 at once, default context 4k" in out
    assert "cpu serves 2 at once" in out
    assert "llama3:8b → gpu (since 1m ago, last served 30s ago)" in out
