"""Run tests/fakeollama (the package) as a real process, for tests.

    with FakeOllama.start("gpu") as gpu:
        ollama.Client(host=gpu.url).chat(...)
        gpu.set_faults({"oom_models": ["llama3.2"]})
        assert gpu.requests()[-1]["state"] == "failed"

Every started server is stopped at interpreter exit at the latest, and the
server exits by itself when the process that started it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = ["FAKEOLLAMA", "FakeOllama", "FakeOllamaError", "free_port"]

FAKEOLLAMA = Path(__file__).resolve().with_name("fakeollama")  # a package, run as a directory

ModelSpec = Mapping[str, int | float | None] | Iterable[str | tuple[str, int | float]]

_live: set[FakeOllama] = set()
_live_lock = threading.Lock()

# harbord reads each listed model's /api/show in the background (model_facts.py).
HARBORD_OWN_READ = "/api/show"


class FakeOllamaError(RuntimeError):
    """The fake server did not start, or a control call failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _model_args(models: ModelSpec) -> list[str]:
    args: list[str] = []
    items: Iterable[Any] = models.items() if isinstance(models, Mapping) else models
    for item in items:
        if isinstance(item, str):
            spec = item
        else:
            name, size = item
            spec = name if size is None else f"{name}={int(size)}"
        args += ["--model", spec]
    return args


class FakeOllama:
    """A fakeollama.py process. Create it with :meth:`start`."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        name: str,
        host: str,
        port: int,
        tmpdir: str,
    ) -> None:
        self._proc = proc
        self._name = name
        self._host = host
        self._port = port
        self._tmpdir = tmpdir
        self._client: httpx.Client | None = None
        self._stopped = False
        with _live_lock:
            _live.add(self)

    # ---- lifecycle ----------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        name: str = "fake",
        port: int | None = None,
        models: ModelSpec | None = None,
        vram: float | None = None,
        cpu: bool = False,
        faults: Mapping[str, Any] | None = None,
        tokens: int | None = None,
        token_delay: float | None = None,
        env: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        version: str | None = None,
        timeout: float = 10.0,
        extra_args: Iterable[str] = (),
        python: str | None = None,
    ) -> FakeOllama:
        """Start a server and wait (up to ``timeout`` s) until it answers.

        ``port=None`` lets the server pick a free port itself (no race).
        ``models`` is a mapping name -> size in bytes (None: default size) or a list of
        names / ``"name=size"`` strings / ``(name, size)`` pairs.
        ``python`` (default: ``$FAKEOLLAMA_PYTHON`` or this interpreter) runs the server,
        e.g. to try it under the distribution's python3 and aiohttp.
        """
        tmpdir = tempfile.mkdtemp(prefix="fakeollama-")
        ready = os.path.join(tmpdir, "port")
        argv = [
            python or os.environ.get("FAKEOLLAMA_PYTHON") or sys.executable,
            str(FAKEOLLAMA),
            "--host",
            host,
            "--port",
            str(0 if port is None else port),
            "--name",
            name,
            "--ready-file",
            ready,
            "--exit-with-parent",
        ]
        if models is not None:
            argv += _model_args(models)
        if vram is not None:
            argv += ["--vram", str(int(vram))]
        if cpu:
            argv.append("--cpu")
        if faults:
            argv += ["--faults", json.dumps(dict(faults))]
        if tokens is not None:
            argv += ["--tokens", str(tokens)]
        if token_delay is not None:
            argv += ["--token-delay", str(token_delay)]
        if version is not None:
            argv += ["--version", version]
        argv += list(extra_args)
        proc_env = dict(os.environ)
        if env:
            proc_env.update(env)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=proc_env,
            start_new_session=True,  # a Ctrl-C in the terminal is the test runner's business
        )
        deadline = time.monotonic() + timeout
        actual: int | None = None
        while actual is None:
            if proc.poll() is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise FakeOllamaError(f"fakeollama {name!r} exited with status {proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                actual = int(Path(ready).read_text().strip())
            if actual is None:
                if time.monotonic() > deadline:
                    _terminate(proc)
                    shutil.rmtree(tmpdir, ignore_errors=True)
                    raise FakeOllamaError(f"fakeollama {name!r} did not start in {timeout} s")
                time.sleep(0.02)
        self = cls(proc, name, host, actual, tmpdir)
        # a server started hung does not answer /api/version; the control API always answers
        probe = "/_fake/faults" if faults and faults.get("hang") else "/api/version"
        while True:
            try:
                r = httpx.get(self.url + probe, timeout=1.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FakeOllamaError(f"fakeollama {name!r} did not answer {probe}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Safe to call more than once. Returns the exit status."""
        if not self._stopped:
            self._stopped = True
            with _live_lock:
                _live.discard(self)
            if self._client is not None:
                self._client.close()
                self._client = None
            _terminate(self._proc, timeout)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL the server (it stays dead; stop() afterwards only cleans up)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def sigstop(self) -> None:
        """Freeze the process: connections are accepted by the kernel, nothing answers."""
        self._signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(sig)

    def __enter__(self) -> FakeOllama:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self._proc.returncode}"
        return f"<FakeOllama {self._name!r} {self.url} pid={self.pid} {state}>"

    # ---- properties ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def name(self) -> str:
        return self._name

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    # ---- control API --------------------------------------------------------------------

    @property
    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=5.0)
        return self._client

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise FakeOllamaError(f"{method} {path} on {self!r}: {exc}") from exc
        if r.status_code != 200:
            raise FakeOllamaError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def set_faults(self, faults: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Replace the whole fault set (``{}`` or no argument clears it)."""
        data = dict(faults or {})
        data.update(more)
        result: dict[str, Any] = self._call("POST", "/_fake/faults", data)
        return result

    def clear_faults(self) -> None:
        self.set_faults({})

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_fake/faults")
        return result

    def requests(self, path: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """The request log, oldest first, optionally filtered by path and state.

        Without a path, harbord's own background reads of /api/show (the models'
        shapes, fetched when an inventory lists them) are left out: they are not
        requests a client made. Ask for path="/api/show" to see them."""
        query = "&".join(f"{k}={v}" for k, v in (("path", path), ("state", state)) if v is not None)
        result: list[dict[str, Any]] = self._call(
            "GET", "/_fake/requests" + (f"?{query}" if query else "")
        )
        if path is None:
            return [r for r in result if r.get("path") != HARBORD_OWN_READ]
        return result

    def clear_requests(self) -> None:
        self._call("DELETE", "/_fake/requests")

    def stats(self) -> dict[str, Any]:
        """Per-path request counts (all endpoints), running requests, loaded models."""
        result: dict[str, Any] = self._call("GET", "/_fake/stats")
        return result

    def wait_for_request(
        self,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 5.0,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        """Poll the log until a request satisfies ``predicate(record)``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in reversed(self.requests()):
                if predicate is None or predicate(rec):
                    found: dict[str, Any] = rec
                    return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching request on {self!r}")
            time.sleep(interval)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process only sees SIGTERM once resumed
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        live = list(_live)
    for fake in live:
        fake.stop(timeout=2.0)
