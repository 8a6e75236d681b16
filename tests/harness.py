"""Run harbord as a real process for end-to-end tests.

`Harbord.start(tmp_path, backends)` writes a config file for the given
backends, starts `python -m harbord`, waits until the socket answers
`/harbor/status`, and gives an httpx client bound to the socket. `stop()`
sends SIGTERM and waits; `kill()` sends SIGKILL. The daemon's log goes to a
file the test can read (`log()`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import httpx

ROOT = Path(__file__).resolve().parent.parent

FAST_ROUTING = """
[routing]
probe_interval = "0.5s"
probe_interval_down = "0.2s"
probe_timeout = "0.5s"
inventory_interval = "1s"
hung_after_probes = 2
"""


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


def gpu_cpu(gpu: _HasUrl, cpu: _HasUrl) -> dict[str, tuple[str, str]]:
    """The usual pair of backends for `Harbord.start`: name -> (url, kind)."""
    return {"gpu": (gpu.url, "gpu"), "cpu": (cpu.url, "cpu")}


def uds_client(socket: Path, timeout: float = 30.0, **kwargs: Any) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket)),
        base_url="http://harbor",
        timeout=timeout,
        **kwargs,
    )


class Harbord:
    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.socket = workdir / "run" / "harbor.sock"
        self.state_dir = workdir / "state"
        self.config_path = workdir / "harbord.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "harbord.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        backends: dict[str, tuple[str, str]] | None = None,
        extra_config: str = "",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Harbord:
        """backends: name -> (url, kind)."""
        workdir.mkdir(parents=True, exist_ok=True)
        text = ['log_level = "debug"', 'drain_timeout = "5s"', extra_config, FAST_ROUTING]
        for name, (url, kind) in (backends or {}).items():
            # A CPU backend's RAM as a workstation's, not this test machine's (on
            # loopback harbord would take /proc/meminfo, and tests would depend on it).
            ram = 'ram = "64GiB"\n' if kind == "cpu" else ""
            text.append(
                f'[backends.{name}]\nurl = "{url}"\nkind = "{kind}"\n'
                f'unit = "ollama-{name}@test.service"\n{ram}'
            )
        daemon = cls(workdir, "\n".join(text), env)
        daemon.launch(wait)
        return daemon

    def launch(self, wait: bool = True) -> None:
        (self.workdir / "run").mkdir(mode=0o700, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "OLLAMA_", "HARBOR_"))
        }
        env.update(
            XDG_RUNTIME_DIR=str(self.workdir / "run"),
            XDG_CONFIG_HOME=str(self.workdir / "config"),
            XDG_STATE_HOME=str(self.workdir / "xdgstate"),
            PYTHONPATH=str(ROOT),
        )
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "harbord",
                    "--config",
                    str(self.config_path),
                    "--state-dir",
                    str(self.state_dir),
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"harbord exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with uds_client(self.socket, timeout=1.0) as client:
                    if client.get("/harbor/status").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"harbord did not answer within {timeout}s:\n{self.log()}")

    def client(self, **kwargs: Any) -> httpx.Client:
        return uds_client(self.socket, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            result: dict[str, Any] = client.get("/harbor/status").json()
            return result

    def backend(self, name: str) -> dict[str, Any]:
        return next(b for b in self.status()["backends"] if b["name"] == name)

    def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.launch()
