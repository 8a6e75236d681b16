"""System tests: the shipped units under a real, private `systemd --user` manager.

The Ollama units run the project's fake Ollama server (their ExecStart= is
replaced by a drop-in); harbord.service runs this checkout (`python -m
harbord`) with short intervals, keeping every other line of the shipped units,
hardening included. Skipped when the host cannot run a user manager, except
with HARBOR_REQUIRE_SYSTEMD=1 (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harbord import setup_units, unit_files
from tests.fakeproc import free_port
from tests.harness import FAST_ROUTING
from tests.systemd_manager import (
    ManagerUnavailable,
    UserManager,
    escape_exec,
    required,
    unavailable,
)

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "units"
FAKE = ROOT / "tests" / "fakeollama"  # a package: python runs its __main__.py
CHECKOUT_IN_TMP = any(
    str(path).startswith(("/tmp/", "/var/tmp/")) for path in (ROOT, Path(sys.executable))
)
MODELS = [
    "llama3.2:latest=2000000000",
    "qwen2.5-coder:7b=4700000000",
    "codellama:13b=7400000000",
]
GPU = {"X-Harbor-Backend": "gpu"}
WATCHDOG_SEC = 3
DRAIN_SEC = 4
# systemd 252 (Debian 12) lacks Type=notify-reload: the units are fitted as setup does.
SYSTEMD = unit_files.systemd_version()


def shipped(name: str) -> str:
    """A shipped unit as `harborctl setup` would install it for this systemd."""
    text = (UNITS / name).read_text(encoding="utf-8")
    return unit_files.service_for(text, SYSTEMD) if name == "harbord.service" else text


CONFIG = (
    """\
log_level = "info"
drain_timeout = "{drain}s"
"""
    + FAST_ROUTING
    + """
[supervisor]
poll_interval = "1s"
backoff_initial = "0.5s"
backoff_max = "2s"
restart_budget = 3
budget_window = "120s"

[backends.gpu]
url = "http://127.0.0.1:{gpu_port}"
kind = "gpu"
unit = "{gpu_unit}"

[backends.cpu]
url = "http://127.0.0.1:{cpu_port}"
kind = "cpu"
unit = "{cpu_unit}"
"""
)


def skip_or_fail(reason: str) -> None:
    if required():
        pytest.fail(f"HARBOR_REQUIRE_SYSTEMD is set, but: {reason}", pytrace=False)
    pytest.skip(reason)


class Harbor:
    """The session's user manager with harbord and two fake backends installed."""

    def __init__(self, manager: UserManager) -> None:
        self.manager = manager
        self.user = getpass.getuser()
        self.gpu_unit = f"ollama-gpu@{self.user}.service"
        self.cpu_unit = f"ollama-cpu@{self.user}.service"
        self.ports = {"gpu": free_port(), "cpu": free_port()}
        self.socket = manager.runtime / "harbor.sock"
        self.config_path = manager.config_home / "harbor" / "harbord.toml"
        self.state_dir = manager.home / ".local" / "state" / "harbor"
        self.log_path = manager.logs / "harbord.log"

    def install(self) -> None:
        m = self.manager
        for path in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.socket")):
            m.install_unit(path.name, shipped(path.name))
        python = escape_exec(sys.executable)
        # A checkout (and its .venv) under /tmp would be hidden from units with
        # PrivateTmp=yes; the shipped sandboxing is tested on its own below, with
        # code outside /tmp (test_shipped_*).
        private_tmp = "PrivateTmp=no\n" if CHECKOUT_IN_TMP else ""
        for name, extra in (("gpu", "--vram 6000000000"), ("cpu", "--cpu")):
            models = " ".join(f"--model {m}" for m in MODELS)
            m.drop_in(
                f"ollama-{name}@.service",
                "test",
                "[Service]\nExecStart=\n"
                f"ExecStart={python} {escape_exec(str(FAKE))} --port {self.ports[name]} "
                f"--name {name} {models} {extra}\n"
                f"StandardOutput=append:{m.logs}/{name}.log\nStandardError=inherit\n" + private_tmp,
            )
        lines = [
            "[Service]",
            "ExecStart=",
            f"ExecStart={python} -m harbord",
            f"Environment=PYTHONPATH={escape_exec(str(ROOT))}",
            f"WatchdogSec={WATCHDOG_SEC}s",
            "TimeoutStopSec=15s",
            "RestartSec=0.5s",
            f"StandardOutput=append:{self.log_path}",
            "StandardError=inherit",
        ]
        if CHECKOUT_IN_TMP:
            lines.append("PrivateTmp=no")  # the checkout would be hidden from harbord
        m.drop_in("harbord.service", "test", "\n".join(lines) + "\n")
        self.write_config()
        m.daemon_reload()

    def write_config(self, extra: str = "", text: str | None = None) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            text = (
                CONFIG.format(
                    drain=DRAIN_SEC,
                    gpu_port=self.ports["gpu"],
                    cpu_port=self.ports["cpu"],
                    gpu_unit=self.gpu_unit,
                    cpu_unit=self.cpu_unit,
                )
                + extra
            )
        self.config_path.write_text(text, encoding="utf-8")

    # -- state ------------------------------------------------------------------------

    def ensure_running(self) -> None:
        m = self.manager
        for unit in (self.gpu_unit, self.cpu_unit):
            if m.prop(unit, "ActiveState") != "active":
                m.systemctl("reset-failed", unit, check=False)
                m.systemctl("start", unit)
        m.systemctl("start", "harbord.socket", "harbord.service")
        self.wait_backends_up()

    def wait_backends_up(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            try:
                backends = self.status()["backends"]
            except (httpx.HTTPError, ValueError):
                return False
            return all(b["health"] == "up" and not b["cooldown"] for b in backends)

        self.wait_for(up, timeout, "both backends up in harbord's status")

    def wait_for(self, predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
        try:
            return self.manager.wait_for(predicate, timeout, what)
        except AssertionError as err:
            raise AssertionError(
                f"{err}\n--- harbord log (tail) ---\n{self.log()[-12000:]}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- clients ------------------------------------------------------------------------

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://harbor",
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        with self.client(timeout=5.0) as client:
            result: dict[str, Any] = client.get("/harbor/status").raise_for_status().json()
            return result

    def backend(self, name: str) -> dict[str, Any]:
        return next(b for b in self.status()["backends"] if b["name"] == name)

    def chat(self, model: str = "llama3.2", **headers: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        with self.client() as client:
            return client.post("/api/chat", json=body, headers=headers)

    def fake(self, name: str, method: str, path: str, body: Any = None) -> Any:
        url = f"http://127.0.0.1:{self.ports[name]}{path}"
        response = httpx.request(method, url, json=body, timeout=5.0)
        response.raise_for_status()
        return response.json()

    def harborctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
        return subprocess.run(
            [sys.executable, "-m", "harbord.ctl.main", "--socket", str(self.socket), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    reason = unavailable()
    if reason is not None:
        skip_or_fail(reason)
    try:
        started = UserManager.start()
    except ManagerUnavailable as err:
        skip_or_fail(str(err))
        raise  # not reached
    try:
        yield started
    finally:
        started.close()
        assert not started.leftover_pids(), "processes left running after teardown"


@pytest.fixture(scope="module")
def installed(manager: UserManager) -> Harbor:
    harbor = Harbor(manager)
    harbor.install()
    return harbor


@pytest.fixture
def harbor(installed: Harbor) -> Iterator[Harbor]:
    installed.ensure_running()
    yield installed


# --- the units -------------------------------------------------------------------------


def verify_env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SYSTEMD_LOG_COLOR": "0",
    }


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if not Path("/usr/bin/systemd-analyze").exists() and not Path("/bin/systemd-analyze").exists():
        skip_or_fail("systemd-analyze is not installed")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for path in UNITS.iterdir():
        if path.suffix in (".service", ".socket"):
            (unit_dir / path.name).write_text(shipped(path.name), encoding="utf-8")
    # ExecStart= must name an existing executable: point it where `harborctl setup` would.
    service = unit_dir / "harbord.service"
    exec_start = setup_units.Setup(env=os.environ, dry_run=True, out=sys.stdout).executable()
    service.write_text(unit_files.rewrite_exec_start(service.read_text(), exec_start))
    # The man pages come with the distro package (tested there); from a checkout they
    # are not installed, so verify checks them only when `man` can find them.
    man_found = subprocess.run(["man", "-w", "harbord"], capture_output=True, check=False)
    man = "--man=yes" if man_found.returncode == 0 else "--man=no"
    names = ["harbord.service", "harbord.socket", "ollama-gpu@.service", "ollama-cpu@.service",
             "ollama-gpu@someone.service", "ollama-cpu@someone.service"]  # fmt: skip
    result = subprocess.run(
        ["systemd-analyze", "--user", "verify", man, *(str(unit_dir / n) for n in names)],
        env=(env := verify_env(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit_dir,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
    if not unit_files.knows_notify_reload(SYSTEMD):
        # The unit as shipped: its one complaint here is the type this systemd lacks.
        service.write_text(
            unit_files.rewrite_exec_start((UNITS / "harbord.service").read_text(), exec_start)
        )
        result = subprocess.run(
            ["systemd-analyze", "--user", "verify", man, str(service)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        complaints = result.stderr.strip().splitlines()
        assert len(complaints) == 1, result.stderr
        assert "Failed to parse service type, ignoring: notify-reload" in complaints[0]


def test_setup_installs_enables_and_is_idempotent(installed: Harbor, tmp_path: Path) -> None:
    m = installed.manager
    env = {**m.env, "PATH": "/usr/bin:/bin"}  # no ollama there: the backends are advice only
    first = tmp_path / "first.txt"
    with open(first, "w") as out:
        assert setup_units.run_setup(["--dry-run"], env=env, out=out) == 0
    text = first.read_text()
    assert "would: " in text and "systemctl --user enable --now harbord.socket" in text
    with open(first, "w") as out:
        assert setup_units.run_setup([], env=env, out=out) == 0
    text = first.read_text()
    installed_service = (m.unit_dir / "harbord.service").read_text()
    assert "ExecStart=/usr/bin/harbord" not in installed_service
    if unit_files.knows_notify_reload(SYSTEMD):
        assert "Type=notify-reload\n" in installed_service
        assert "\nExecReload=" not in installed_service
    else:  # fitted for this systemd: notify, with SIGHUP sent by ExecReload=
        assert "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n" in installed_service
        assert "notify-reload\n" not in installed_service
    assert m.prop("harbord.socket", "UnitFileState") == "enabled"
    assert "loginctl enable-linger" in text and "ollama was not found" in text
    again = tmp_path / "again.txt"
    with open(again, "w") as out:
        assert setup_units.run_setup([], env=env, out=out) == 0
    assert "nothing to do" in again.read_text()
    assert "daemon-reload" not in again.read_text()


# --- readiness, status, socket activation --------------------------------------------------


def test_start_returns_after_ready_with_status_text(harbor: Harbor) -> None:
    m = harbor.manager
    m.systemctl("stop", "harbord.service")
    m.systemctl("start", "harbord.service")
    # Type=notify: `start` returns once READY=1 arrived, i.e. after the first probe round.
    props = m.show("harbord.service", "ActiveState", "SubState", "StatusText", "MainPID")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["StatusText"].startswith("gpu up, cpu up, 0 in flight"), props
    status = harbor.status()
    assert status["pid"] == int(props["MainPID"])
    assert status["supervision"] == "on"
    units = {b["name"]: b["unit_status"] for b in status["backends"]}
    assert units["gpu"]["name"] == harbor.gpu_unit and units["gpu"]["active_state"] == "active"
    assert units["gpu"]["supervised"] is True
    result = harbor.harborctl("status")
    assert result.returncode == 0, result.stderr
    assert harbor.gpu_unit in result.stdout and "supervision on" in result.stdout


def test_socket_activation_starts_harbord(harbor: Harbor) -> None:
    m = harbor.manager
    m.systemctl("stop", "harbord.service")
    assert m.prop("harbord.service", "ActiveState") == "inactive"
    assert m.prop("harbord.socket", "ActiveState") == "active"
    with harbor.client() as client:
        response = client.get("/api/version")
    assert response.status_code == 200, response.text
    harbor.wait_for(lambda: m.prop("harbord.service", "ActiveState") == "active", 10, "READY")


# --- backend supervision -----------------------------------------------------------------


def test_hung_gpu_backend_is_restarted_and_warmed(harbor: Harbor) -> None:
    m = harbor.manager
    assert harbor.chat(**GPU).status_code == 200
    harbor.wait_for(lambda: harbor.backend("gpu")["loaded"], 10, "llama3.2 loaded on gpu")
    before = harbor.backend("gpu")["unit_status"]
    old_pid = m.main_pid(harbor.gpu_unit)
    os.kill(old_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = harbor.chat()  # waits for the hang to be noticed, then goes to the CPU
        assert response.status_code == 200, response.text
        assert response.headers["X-Harbor-Backend"] == "cpu"
        new_pid = harbor.wait_for(
            lambda: (pid := m.main_pid(harbor.gpu_unit)) not in (0, old_pid) and pid, 15,
            "a new gpu main PID",
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        with_suppressed_kill(old_pid, signal.SIGCONT)
    # hung_after_probes=2 at 0.5s intervals with a 0.5s timeout, polled at once.
    assert elapsed < 8, f"restart took {elapsed:.1f}s"
    assert new_pid != old_pid
    harbor.wait_backends_up()
    unit = harbor.backend("gpu")["unit_status"]
    assert unit.get("harbor_restarts", 0) == before.get("harbor_restarts", 0) + 1
    assert unit["last_restart"] and unit["last_restart"] > time.time() - 30
    assert unit["main_pid"] == new_pid and unit["since"]

    # Warmed: the model it had loaded is loaded again on the new process.
    def warmed() -> bool:
        loaded = harbor.fake("gpu", "GET", "/api/ps")["models"]
        return any(x["name"] == "llama3.2:latest" for x in loaded)

    harbor.wait_for(warmed, 10, "llama3.2 warmed on the restarted gpu backend")  # fmt: skip
    warm = [r for r in harbor.fake("gpu", "GET", "/_fake/requests") if r["path"] == "/api/generate"]
    assert (
        warm and warm[-1]["body"]["model"] == "llama3.2:latest" and "keep_alive" in warm[-1]["body"]
    )
    assert "restarting " + harbor.gpu_unit in harbor.log()
    text = harbor.harborctl("status").stdout
    assert "by harbord" in text, text
    # Routed to the GPU again (llama3.2 has an affinity to the CPU now: another model).
    assert harbor.chat("qwen2.5-coder:7b").headers["X-Harbor-Backend"] == "gpu"


def with_suppressed_kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def test_killed_backend_comes_back_through_systemd(harbor: Harbor) -> None:
    m = harbor.manager
    before = m.show(harbor.cpu_unit, "MainPID", "NRestarts")
    os.kill(int(before["MainPID"]), signal.SIGKILL)
    harbor.wait_for(
        lambda: (
            m.prop(harbor.cpu_unit, "NRestarts") == str(int(before["NRestarts"]) + 1)
            and m.prop(harbor.cpu_unit, "ActiveState") == "active"
        ),
        15,
        "systemd restarting the cpu backend",
    )
    harbor.wait_backends_up()
    response = harbor.chat(**{"X-Harbor-Intent": "heavy"})
    assert response.status_code == 200 and response.headers["X-Harbor-Backend"] == "cpu"

    def unit_caught_up() -> bool:
        unit = harbor.backend("cpu")["unit_status"]
        return bool(
            unit.get("n_restarts", 0) == int(before["NRestarts"]) + 1
            and unit["main_pid"] not in (0, int(before["MainPID"]))
            and unit["active_state"] == "active"
        )

    harbor.wait_for(unit_caught_up, 5, "harbord's status to show the new cpu process")


def test_failing_backend_exhausts_the_restart_budget(harbor: Harbor) -> None:
    m = harbor.manager
    m.systemctl("restart", "harbord.service")  # a fresh budget
    harbor.wait_backends_up()
    m.drop_in(
        harbor.gpu_unit, "zz-broken", "[Service]\nExecStart=\nExecStart=/bin/false\nRestart=no\n"
    )
    m.daemon_reload()
    try:
        m.systemctl("restart", harbor.gpu_unit, check=False)

        def spent() -> bool:
            unit = harbor.backend("gpu")["unit_status"]
            return bool(unit and unit.get("budget_exhausted"))

        harbor.wait_for(spent, 20, "the gpu restart budget to be spent")
        unit = harbor.backend("gpu")["unit_status"]
        assert unit["harbor_restarts"] == 3 and unit["note"] == "restart budget spent", unit
        assert "restart budget spent" in m.prop("harbord.service", "StatusText")
        # It stays spent: no more restarts, one log line, requests go to the CPU.
        time.sleep(2.5)
        assert harbor.backend("gpu")["unit_status"]["harbor_restarts"] == 3
        assert harbor.log().count("restart budget spent for gpu") == 1
        response = harbor.chat()
        assert response.status_code == 200 and response.headers["X-Harbor-Backend"] == "cpu"
        assert harbor.backend("gpu")["unit_status"]["active_state"] == "failed"
    finally:
        m.remove_drop_in(harbor.gpu_unit, "zz-broken")
        m.daemon_reload()
        m.systemctl("reset-failed", harbor.gpu_unit, check=False)
        m.systemctl("start", harbor.gpu_unit)
        m.systemctl("restart", "harbord.service")


def test_a_stopped_backend_is_left_alone_unless_keep_running(harbor: Harbor) -> None:
    m = harbor.manager
    m.systemctl("stop", harbor.cpu_unit)
    try:
        harbor.wait_for(
            lambda: (harbor.backend("cpu")["unit_status"] or {}).get("active_state") == "inactive",
            5,
            "harbord to see the cpu unit stopped",
        )
        time.sleep(2.5)  # two polls: harbord does not start it
        unit = harbor.backend("cpu")["unit_status"]
        assert m.prop(harbor.cpu_unit, "ActiveState") == "inactive"
        assert unit["note"] == "stopped; left alone" and not unit.get("harbor_restarts")
        text = harbor.config_path.read_text().replace(
            "[supervisor]\n", "[supervisor]\nkeep_running = true\n"
        )
        harbor.write_config(text=text)
        m.systemctl("reload", "harbord.service")
        harbor.wait_for(
            lambda: m.prop(harbor.cpu_unit, "ActiveState") == "active", 10, "harbord to start it"
        )
        harbor.wait_backends_up()
    finally:
        harbor.write_config()
        m.systemctl("reload", "harbord.service")
        m.systemctl("start", harbor.cpu_unit)


def test_on_demand_restart(harbor: Harbor) -> None:
    m = harbor.manager
    old_pid = m.main_pid(harbor.cpu_unit)
    result = harbor.harborctl("restart", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert m.main_pid(harbor.cpu_unit) not in (0, old_pid)
    harbor.wait_backends_up()
    assert harbor.backend("cpu")["unit_status"]["harbor_restarts"] >= 1


# --- harbord itself under systemd -----------------------------------------------------------


def test_kill_9_of_harbord_restarts_it_with_pins_and_affinity(harbor: Harbor) -> None:
    m = harbor.manager
    with harbor.client() as client:
        pin = client.put("/harbor/pins/codellama:13b", json={"backend": "cpu", "reason": "test"})
        assert pin.status_code == 200, pin.text
    assert harbor.chat("qwen2.5-coder:7b").headers["X-Harbor-Backend"] == "gpu"
    harbor.wait_for(
        lambda: "qwen2.5-coder:7b" in (harbor.state_dir / "state.json").read_text()
        if (harbor.state_dir / "state.json").exists() else False,
        5,
        "the state file with the new affinity",
    )  # fmt: skip
    before = m.show("harbord.service", "MainPID", "NRestarts")
    os.kill(int(before["MainPID"]), signal.SIGKILL)
    harbor.wait_for(
        lambda: (
            m.prop("harbord.service", "NRestarts") == str(int(before["NRestarts"]) + 1)
            and m.prop("harbord.service", "ActiveState") == "active"
        ),
        15,
        "systemd restarting harbord",
    )
    status = harbor.status()
    assert status["pid"] != int(before["MainPID"])
    assert status["pins"]["codellama:13b"]["backend"] == "cpu"
    assert status["affinity"]["qwen2.5-coder:7b"]["backend"] == "gpu"
    with harbor.client() as client:
        client.delete("/harbor/pins/codellama:13b")


def test_watchdog_restarts_a_stopped_harbord(harbor: Harbor) -> None:
    m = harbor.manager
    before = m.show("harbord.service", "MainPID", "NRestarts")
    pid = int(before["MainPID"])
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        harbor.wait_for(
            lambda: (
                m.main_pid("harbord.service") not in (0, pid)
                and m.prop("harbord.service", "ActiveState") == "active"
            ),
            WATCHDOG_SEC + 20,
            "the watchdog to restart harbord",
        )
    finally:
        with_suppressed_kill(pid, signal.SIGCONT)
    elapsed = time.monotonic() - started
    assert elapsed >= WATCHDOG_SEC * 0.5, f"restarted after {elapsed:.1f}s: not by the watchdog"
    assert int(m.prop("harbord.service", "NRestarts")) == int(before["NRestarts"]) + 1
    assert harbor.status()["pid"] == m.main_pid("harbord.service")


def test_reload_applies_a_new_config_and_refuses_a_bad_one(harbor: Harbor) -> None:
    m = harbor.manager
    pid = m.main_pid("harbord.service")

    def intent(model: str) -> str:
        with harbor.client() as client:
            answer = client.get("/harbor/route", params={"model": model}).raise_for_status().json()
            return str(answer["intent"])

    assert intent("qwen2.5-coder:7b") == "fast"
    expected_type = "notify-reload" if unit_files.knows_notify_reload(SYSTEMD) else "notify"
    assert m.prop("harbord.service", "Type") == expected_type
    try:
        harbor.write_config('\n[models."qwen2.5-coder:7b"]\nintent = "heavy"\n')
        m.systemctl("reload", "harbord.service")
        harbor.wait_for(lambda: intent("qwen2.5-coder:7b") == "heavy", 10, "the new config")
        good = harbor.config_path.read_text()
        harbor.write_config(text=good + "\n[routing]\nprobe_interval = \n")  # invalid TOML
        m.systemctl("reload", "harbord.service")
        harbor.wait_for(lambda: "reload refused" in harbor.log(), 10, "the refusal in the log")
        assert intent("qwen2.5-coder:7b") == "heavy"
        props = m.show("harbord.service", "ActiveState", "SubState", "MainPID")
        assert props == {"ActiveState": "active", "SubState": "running", "MainPID": str(pid)}
    finally:
        harbor.write_config()
        m.systemctl("reload", "harbord.service")
    harbor.wait_for(lambda: intent("qwen2.5-coder:7b") == "fast", 10, "the original config")


def test_stop_lets_a_slow_stream_finish_within_the_drain_time(harbor: Harbor) -> None:
    m = harbor.manager
    harbor.fake("gpu", "POST", "/_fake/faults", {"token_delay": 0.3})
    chunks: list[dict[str, Any]] = []
    first = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        try:
            with (
                harbor.client() as client,
                client.stream("POST", "/api/chat", json=body, headers=GPU) as response,
            ):
                for line in response.iter_lines():
                    if line:
                        chunks.append(json.loads(line))
                        first.set()
        except BaseException as err:  # reported below
            errors.append(err)
            first.set()

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(10), "no first chunk"
        started = time.monotonic()
        m.systemctl("stop", "harbord.service", timeout=30)
        stopped_after = time.monotonic() - started
        reader.join(10)
        assert not errors, errors
        assert chunks and chunks[-1].get("done") is True, chunks[-3:]
        assert stopped_after < DRAIN_SEC + 2, f"stop took {stopped_after:.1f}s"
        props = m.show("harbord.service", "ActiveState", "Result", "ExecMainStatus")
        assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
        assert "stopping: draining 1 request(s)" in harbor.log()
    finally:
        harbor.fake("gpu", "POST", "/_fake/faults", {})


def test_supervision_turns_itself_off_without_a_user_manager(tmp_path: Path) -> None:
    """No manager behind XDG_RUNTIME_DIR: one reason, and routing goes on (see test_e2e)."""
    import asyncio

    from harbord import supervisor

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    old = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
    try:
        problem = asyncio.run(supervisor.manager_problem())
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert problem is not None and problem.startswith("no systemd user manager"), problem


# --- the hardening, as a real (unprivileged) user gets it ------------------------------------

SANDBOX_PROBE = """\
import json, os, socket, subprocess, time
home = os.environ["HOME"]
state = os.path.join(home, ".local", "state", "harbor")

def writable(directory):
    try:
        with open(os.path.join(directory, ".probe"), "w"):
            pass
        os.unlink(os.path.join(directory, ".probe"))
        return True
    except OSError:
        return False

found = {
    "state": writable(state),
    "home": writable(home),
    "usr": writable("/usr"),
    "tmp": os.listdir("/tmp"),
    "systemctl": subprocess.run(
        ["systemctl", "--user", "is-system-running"], capture_output=True, text=True
    ).stdout.strip(),
    "status": open("/proc/self/status").read(),
}
with open(os.path.join(state, "probe.json"), "w") as f:
    json.dump(found, f)
address = os.environ["NOTIFY_SOCKET"]
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.sendto(b"READY=1\\nSTATUS=sandbox probe ready", address)
time.sleep(120)
"""


def test_harbord_sandbox_works_under_an_unprivileged_user_manager() -> None:
    """The tests above run the manager as root; a real user's manager is not, and several
    sandboxing directives fail there (226/NAMESPACE) or silently do nothing. harbord.service,
    as setup installs it but for ExecStart=, must start, get READY=1 through, write its state,
    see its home read-only and still reach the manager with systemctl (for supervision)."""
    if not Path("/usr/bin/python3").exists():
        skip_or_fail("/usr/bin/python3 (a Python any user can run) is needed for the probe")
    nobody = 65534
    try:
        manager = UserManager.start(uid=nobody)
    except ManagerUnavailable as err:
        skip_or_fail(str(err))
        raise
    try:
        probe = manager.base / "probe.py"
        probe.write_text(SANDBOX_PROBE)
        probe.chmod(0o644)
        for name in ("harbord.service", "harbord.socket"):
            manager.install_unit(name, shipped(name))
        manager.drop_in(
            "harbord.service",
            "probe",
            f"[Service]\nExecStart=\nExecStart=/usr/bin/python3 {escape_exec(str(probe))}\n"
            f"StandardOutput=append:{manager.logs}/probe.log\nStandardError=inherit\n",
        )
        manager.daemon_reload()
        result = manager.systemctl("start", "harbord.service", check=False, timeout=60)
        props = manager.show("harbord.service", "ActiveState", "StatusText", "ExecMainStatus")
        log = (
            (manager.logs / "probe.log").read_text()
            if (manager.logs / "probe.log").exists()
            else ""
        )
        assert result.returncode == 0, f"{result.stderr} {props} {log}"
        assert props["ActiveState"] == "active" and props["StatusText"] == "sandbox probe ready"
        found = json.loads((manager.home / ".local/state/harbor/probe.json").read_text())
        assert found["state"] is True, "the state directory must stay writable"
        assert found["home"] is False and found["usr"] is False
        assert found["tmp"] == [], "PrivateTmp= should give an empty /tmp"
        assert found["systemctl"] == "running", "supervision needs systemctl --user in the sandbox"
        assert "NoNewPrivs:\t1" in found["status"] and "Seccomp:\t2" in found["status"]
        assert "CapBnd:\t0000000000000000" in found["status"]
    finally:
        manager.close()
    assert not manager.leftover_pids()


OLLAMA_SHIM = """\
#!/bin/sh
# Stands in for ollama: records how the unit ran it, then idles like a server.
env > "$HOME/ollama-$(echo "$OLLAMA_HOST" | cut -d: -f2).env"
echo "$0 $*" > "$HOME/ollama-$(echo "$OLLAMA_HOST" | cut -d: -f2).argv"
ls /dev > "$HOME/ollama-$(echo "$OLLAMA_HOST" | cut -d: -f2).dev"
exec sleep 120
"""


def test_ollama_units_find_ollama_and_run_under_an_unprivileged_user_manager() -> None:
    """The shipped Ollama units, ExecStart= and all: `ollama` is found in ~/.local/bin, each
    unit gets its port, GPU settings and the shared model store, the per-user environment
    file overrides them, the CPU unit's sandbox starts for a real user, and a missing
    `ollama` fails once (exit 127) instead of restarting in a loop."""
    try:
        manager = UserManager.start(uid=65534)
    except ManagerUnavailable as err:
        skip_or_fail(str(err))
        raise
    try:
        user = manager.account.pw_name
        for name in ("ollama-gpu@.service", "ollama-cpu@.service"):
            manager.install_unit(name, (UNITS / name).read_text(encoding="utf-8"))
        shim = manager.home / ".local" / "bin" / "ollama"
        shim.parent.mkdir(parents=True)
        shim.write_text(OLLAMA_SHIM)
        shim.chmod(0o755)
        env_file = manager.config_home / "harbor" / "ollama-cpu.env"
        env_file.parent.mkdir(parents=True)
        env_file.write_text("OLLAMA_KEEP_ALIVE=1h\n")
        manager.chown(manager.home)
        manager.daemon_reload()
        units = [f"ollama-gpu@{user}.service", f"ollama-cpu@{user}.service"]
        manager.systemctl("start", *units)
        for unit in units:
            assert manager.prop(unit, "ActiveState") == "active", unit

        def recorded(port: int) -> dict[str, str]:
            path = manager.home / f"ollama-{port}.env"
            manager.wait_for(path.exists, 10, f"the shim's record for port {port}")
            return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

        gpu, cpu = recorded(11434), recorded(11435)
        models = f"{manager.home}/.ollama/models"
        assert (manager.home / "ollama-11434.argv").read_text().split() == [str(shim), "serve"]
        assert gpu["OLLAMA_HOST"] == "127.0.0.1:11434" and cpu["OLLAMA_HOST"] == "127.0.0.1:11435"
        assert gpu["OLLAMA_MODELS"] == cpu["OLLAMA_MODELS"] == models
        assert gpu["OLLAMA_VULKAN"] == "1" and gpu["GGML_VK_VISIBLE_DEVICES"] == "0"
        for key in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                    "GGML_VK_VISIBLE_DEVICES"):  # fmt: skip
            assert cpu[key] == "-1", key
        assert cpu["OLLAMA_KEEP_ALIVE"] == "1h" and gpu["OLLAMA_KEEP_ALIVE"] == "30m"
        # PrivateDevices= on the CPU unit: no GPU device nodes at all.
        cpu_dev = (manager.home / "ollama-11435.dev").read_text().split()
        assert "dri" not in cpu_dev and not any(d.startswith("nvidia") for d in cpu_dev)

        manager.systemctl("stop", *units)
        shim.unlink()
        manager.systemctl("start", units[0], check=False)
        manager.wait_for(
            lambda: manager.prop(units[0], "ActiveState") == "failed", 10, "the unit to fail"
        )
        props = manager.show(units[0], "ExecMainStatus", "NRestarts")
        assert props == {"ExecMainStatus": "127", "NRestarts": "0"}, props
    finally:
        manager.close()
    assert not manager.leftover_pids()
