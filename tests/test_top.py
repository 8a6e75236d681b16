"""harborctl top: driven in a real terminal (tmux) against harbord and two fake backends.

Each tmux test runs its own tmux server on a private socket (-L) and kills it at the
end. The pane runs `top` in a shell that, once top exits, prints its exit status and
`stty -a`, so the test sees whether the terminal was given back in canonical mode with
echo on.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harbord.ctl.commands import top
from harbord.schemas import Attempt, LoadedModel, Pin, UnitStatus
from tests.fakeproc import FakeOllama
from tests.harness import ROOT, Harbord, gpu_cpu
from tests.test_ctl import ANSI, backend, decision, status

pytestmark = pytest.mark.e2e

MODELS = ["llama3.2:latest=2000000000", "qwen2.5-coder:7b=4700000000"]
BACKEND_ROWS = (re.compile(r"^gpu\s+gpu\s+up\b", re.M), re.compile(r"^cpu\s+cpu\s+up\b", re.M))


@pytest.fixture
def harbord(tmp_path: Path) -> Iterator[Harbord]:
    with (
        # a 256-token default context keeps the KV cache (which the fake adds to a
        # loaded model's size, as Ollama does) out of the "1.9 GiB" top shows below
        FakeOllama.start(
            "gpu", models=MODELS, vram=6_000_000_000, extra_args=["--context-length", "256"]
        ) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
        try:
            yield daemon
        finally:
            daemon.stop()


def harborctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "harbord.ctl.main", *args]


def ctl_env(socket: Path) -> dict[str, str]:
    colour = ("NO_COLOR", "FORCE_COLOR", "CLICOLOR_FORCE")  # the tests decide colour
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HARBOR_", "TMUX")) and k not in colour
    }
    return {**env, "HARBOR_SOCKET": str(socket), "PYTHONPATH": str(ROOT)}


class Tmux:
    """A private tmux server with one 160x50 session."""

    def __init__(self) -> None:
        self.base = ["tmux", "-L", f"harbord-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"]
        self.base += ["-f", "/dev/null"]
        self.socket: Path | None = None

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=10, env=env, check=True
        )
        return done.stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        # After top: its exit status and the terminal's modes, then wait to be looked at.
        # The trap keeps the shell alive through a Ctrl-C meant for top (who gets the
        # default SIGINT: a caught signal is reset on exec, an ignored one is not).
        shell = f'trap : INT; {command}; echo "top exited $?"; stty -a; exec sleep 600'
        self("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", "sh", "-c", shell, env=env)
        self.socket = Path(self("display", "-p", "#{socket_path}").strip())

    def screen(self, escapes: bool = False) -> str:
        # -e: with the colour codes the pane shows
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def wait_for(self, ok: Callable[[str], bool], what: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if ok(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)
        if self.socket is not None:  # tmux leaves it behind
            self.socket.unlink(missing_ok=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/test installs it when run as root)")
    terminal = Tmux()
    try:
        yield terminal
    finally:
        terminal.kill()


def start_top(tmux: Tmux, daemon: Harbord, *args: str) -> str:
    tmux.start(
        shlex.join(harborctl_argv("top", "--interval", "0.3", *args)), ctl_env(daemon.socket)
    )
    return tmux.wait_for(
        lambda s: all(row.search(s) for row in BACKEND_ROWS), "both backends up on the screen"
    )


def assert_exited_restored(tmux: Tmux) -> None:
    screen = tmux.wait_for(lambda s: "top exited" in s, "top to exit")
    assert "top exited 0" in screen, screen
    modes = set(screen.split())
    assert {"icanon", "echo", "isig"} <= modes, screen  # not -icanon, -echo: restored
    alternate, cursor = tmux("display", "-p", "-t", "top", "#{alternate_on} #{cursor_flag}").split()
    assert (alternate, cursor) == ("0", "1")  # back on the main screen, cursor shown


def test_top_live_view_refreshes_and_q_quits(harbord: Harbord, tmux: Tmux) -> None:
    screen = start_top(tmux, harbord)
    assert "harbord" in screen and "requests 0" in screen
    assert re.search(
        r"BACKEND\s+KIND\s+HEALTH\s+UNIT\s+IN FLIGHT\s+QUEUED\s+REQ/S\s+TTFT P50", screen
    )
    assert "PINS" in screen and "none yet" in screen

    with harbord.client() as client:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        reply = client.post("/api/chat", json={**body, "stream": False})
        client.put("/harbor/pins/qwen2.5-coder:7b", json={"backend": "cpu", "for_seconds": 3600})
    request_id = reply.headers["X-Harbor-Request-Id"]
    row = re.compile(
        rf"^\s+{re.escape(request_id)}\s+\S+\s+llama3\.2:latest\s+fast\s+gpu\s+-\s+200", re.M
    )
    screen = tmux.wait_for(lambda s: bool(row.search(s)), "the chat's routing decision")
    print(screen)
    loaded = re.compile(r"^gpu\s.*\s1\.9 GiB\s+llama3\.2:latest$", re.M)  # from /api/ps, polled
    screen = tmux.wait_for(lambda s: bool(loaded.search(s)), "the loaded model and its VRAM")
    assert re.search(r"qwen2\.5-coder:7b → cpu\s+in (59m|1h)", screen)
    assert "requests 1: 1 served" in screen

    tmux("send-keys", "-t", "top", "q")
    assert_exited_restored(tmux)


def test_top_survives_harbord_going_away_and_quits_on_ctrl_c(harbord: Harbord, tmux: Tmux) -> None:
    start_top(tmux, harbord)
    harbord.stop()
    screen = tmux.wait_for(lambda s: "harbord is not answering" in s, "the daemon to be missed")
    print(screen)
    assert all(row.search(screen) for row in BACKEND_ROWS), "the last view stays up"
    harbord.launch()
    tmux.wait_for(lambda s: "not answering" not in s, "top to find harbord again")
    tmux("send-keys", "-t", "top", "C-c")
    assert_exited_restored(tmux)


def test_top_prints_one_snapshot_when_not_a_terminal(harbord: Harbord) -> None:
    started = time.monotonic()
    done = subprocess.run(
        harborctl_argv("top"), capture_output=True, text=True, env=ctl_env(harbord.socket),
        stdin=subprocess.DEVNULL, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert not ANSI.search(done.stdout)
    assert re.search(r"^gpu\s+gpu\s", done.stdout, re.M) and re.search(
        r"^cpu\s+cpu\s", done.stdout, re.M
    )
    assert "LATEST REQUESTS" in done.stdout
    as_json = subprocess.run(
        harborctl_argv("--json", "top"), capture_output=True, text=True,
        env=ctl_env(harbord.socket), timeout=30,
    )  # fmt: skip
    parsed = json.loads(as_json.stdout)
    assert {b["name"] for b in parsed["status"]["backends"]} == {"gpu", "cpu"}
    assert parsed["decisions"] == []


def test_top_on_a_dumb_terminal_prints_one_plain_snapshot(harbord: Harbord, tmux: Tmux) -> None:
    # A real terminal (the pane is a tty) that says it takes no escape codes.
    argv = harborctl_argv("top", "--interval", "0.3")
    tmux.start("TERM=dumb " + shlex.join(argv), ctl_env(harbord.socket))
    screen = tmux.wait_for(lambda s: "top exited" in s, "top to print once and exit")
    assert "top exited 0" in screen, screen
    assert all(row.search(screen) for row in BACKEND_ROWS), screen
    assert "q quits" not in screen  # not the live view
    assert not ANSI.search(tmux.screen(escapes=True)), "colour codes on a dumb terminal"
    alternate = tmux("display", "-p", "-t", "top", "#{alternate_on}").strip()
    assert alternate == "0"


def test_top_exits_2_when_harbord_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run(
        harborctl_argv("top", "--once"), capture_output=True, text=True,
        env=ctl_env(tmp_path / "nobody.sock"), timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot reach harbord" in done.stderr


# --- the view, without a daemon -------------------------------------------------------------


def snapshot(at: float, started_at: float = 1000.0, **served: int) -> top.Snapshot:
    backends = [backend(name, served=n) for name, n in served.items()]
    return top.Snapshot(status(*backends, started_at=started_at), [], at, b"{}")


def test_requests_per_second_from_served_counts() -> None:
    before = snapshot(10.0, gpu=7, cpu=3)
    assert top.rates(None, before) == {}
    assert top.rates(before, snapshot(12.0, gpu=11, cpu=3)) == {"gpu": 2.0, "cpu": 0.0}
    assert top.rates(before, snapshot(12.0, started_at=2000.0, gpu=1, cpu=0)) == {}, "restarted"


def test_render_backends_pins_and_decisions() -> None:
    now = time.time()
    unit = UnitStatus("ollama-gpu@me.service", "active", "running", n_restarts=2)
    loaded = [LoadedModel("llama3:8b", 5_000_000_000, 4_000_000_000)]
    gpu = backend("gpu", unit_status=unit, loaded=loaded, queued=2)
    cpu = backend("cpu", health="down", last_error="connection refused", last_error_class="network")
    unserved = decision("9-9")
    unserved.attempts = [Attempt("gpu", "failed", "busy"), Attempt("cpu", "skipped")]
    unserved.served_by, unserved.status = None, 503
    pins = {"qwen3:32b": Pin("cpu", "out of memory on gpu", now, now + 3600 + 30, "oom")}
    snap = top.Snapshot(status(gpu, cpu, pins=pins), [decision("7fcb-2"), unserved], 0.0, b"")
    text = "\n".join(top.render(snap, {"gpu": 1.5}, now, problem="harbord is not answering"))
    print(text)
    assert not ANSI.search(text)
    assert re.search(
        r"^gpu\s+gpu\s+up\s+active/running, 2 restarts\s+1\s+2\s+1\.5\s+340 ms"
        r"\s+3\.7 GiB\s+llama3:8b$",
        text,
        re.M,
    )
    assert re.search(r"^cpu\s+cpu\s+down\s+-\s+1\s+0\s+-\s+340 ms\s+-\s+-$", text, re.M)
    assert "cpu: network: connection refused" in text
    assert "qwen3:32b → cpu  in 1h  (oom: out of memory on gpu)" in text
    assert re.search(
        r"7fcb-2\s+\S+\s+qwen3:32b\s+fast\s+cpu\s+gpu=oom\s+200\s+1250 ms\s+4900", text
    )
    assert re.search(
        r"9-9\s+\S+\s+qwen3:32b\s+fast\s+not served\s+gpu=busy, cpu=skipped\s+503", text
    )
    assert text.splitlines()[1] == "harbord is not answering"
