"""The bench's harness: its venv, the processes it starts and stops, what it reads about them.

Paths and constants, the first-run installs (bench/.venv, nginx, LiteLLM), `Procs` (every
process started, stopped by pid at the end), /proc readings (CPU, RSS), a tiny HTTP GET
over Unix or TCP sockets, the load generator run in its own process (bench/loadgen.py),
the request bodies, and the machine's own load while the bench runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TOOLS_VENV = BENCH / ".venv"
LITELLM_VENV = BENCH / ".venv-litellm"
TOOLS = ["matplotlib", "py-spy"]


def _harbord_deps() -> list[str]:
    """harbord's own requirements, from pyproject.toml (one list, not a copy of it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["uvloop"]]


HARBORD_DEPS = _harbord_deps()
CLK = os.sysconf("SC_CLK_TCK")
MODEL = "llama3.2"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

# --------------------------------------------------------------------------- bootstrap


def _in_tools_venv() -> bool:
    return Path(sys.prefix).resolve() == TOOLS_VENV.resolve()


def bootstrap(script: Path) -> None:
    """Re-exec `script` inside bench/.venv (created on first use) so matplotlib and py-spy are there."""
    if _in_tools_venv():
        return
    py = TOOLS_VENV / "bin" / "python"
    if not py.exists():
        log("creating bench/.venv (system site packages + matplotlib, py-spy)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(TOOLS_VENV)], check=True)
    probe = "import matplotlib, aiohttp, msgspec, sdnotify, uvloop, prometheus_client, " \
            "multidict; import shutil, sys; " \
            "sys.exit(0 if shutil.which('py-spy', path=sys.prefix + '/bin') else 1)"
    if subprocess.run([str(py), "-c", probe], capture_output=True).returncode != 0:
        log("installing into bench/.venv: " + " ".join(TOOLS + HARBORD_DEPS))
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *TOOLS,
                        *HARBORD_DEPS], check=True)
    os.execv(str(py), [str(py), str(script.resolve()), *sys.argv[1:]])


def ensure_nginx() -> str | None:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None and os.geteuid() == 0:
        log("installing nginx (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], env=env, capture_output=True)
        path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    return path


def ensure_litellm() -> tuple[Path | None, str]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        log("installing litellm[proxy] into bench/.venv-litellm (first run only, a few minutes)")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
            subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                            "litellm[proxy]"], check=True, timeout=1200)
        except (subprocess.SubprocessError, OSError) as err:
            return None, f"pip install 'litellm[proxy]' failed: {err}"
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True)
    return exe, out.stdout.strip()


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process the bench starts, to stop them all at the end (by pid)."""

    def __init__(self, tmp: Path, pin: bool) -> None:
        self.tmp = tmp
        self.pin = pin
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cmd: list[str], cpu: int | None, env: dict[str, str] | None = None,
              stdout: Any = None) -> subprocess.Popen[bytes]:
        cpus = {cpu} if (cpu is not None and self.pin) else None
        err = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=stdout if stdout is not None else err, stderr=err,
            stdin=subprocess.DEVNULL, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, 5.0)


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    return out


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in children(pid):
        pids += tree(child)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK


def mem_kb(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def rss_mb(pids: list[int]) -> float:
    return sum(mem_kb(p).get("VmRSS", 0) for p in pids) / 1024


def http_get(target: str, path: str, timeout: float = 1.0, headers: str = "") -> tuple[int, bytes]:
    """One GET with Connection: close over a Unix socket ("unix:PATH") or TCP ("tcp:HOST:PORT")."""
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: Any = target[5:]
    else:
        host, port = target[4:].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        addr = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def wait_http(target: str, path: str, limit: float, proc: subprocess.Popen[bytes] | None = None,
              headers: str = "") -> float:
    """Seconds until `path` answers 200; raises if the process dies or time runs out."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            if http_get(target, path, 1.0, headers)[0] == 200:
                return time.perf_counter() - t0
        time.sleep(0.01)
    raise RuntimeError(f"{target}{path} not ready within {limit}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- load generator


def loadgen(mode: str, target: str, *, cpu: int, pin: bool, watch: list[int] | None = None,
            timeout: float = 300.0, sampler: bool = False, **kw: Any) -> dict[str, Any]:
    """Run bench/loadgen.py in its own process; add the watched processes' CPU (and RSS peaks)."""
    cmd = [sys.executable, str(BENCH / "loadgen.py"), mode, "--target", target]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif isinstance(value, list):
            for v in value:
                cmd += [flag, str(v)]
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    watch = watch or []
    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        last_t, last_c = time.perf_counter(), cpu_seconds(watch)
        while not stop.wait(0.25):
            now, c = time.perf_counter(), cpu_seconds(watch)
            samples.append((now, 100 * (c - last_c) / (now - last_t), rss_mb(watch)))
            last_t, last_c = now, c

    c0, t0 = cpu_seconds(watch), time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True) if sampler else None
    if thread:
        thread.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if pin else None)
    t1, c1 = time.perf_counter(), cpu_seconds(watch)
    stop.set()
    if thread:
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {mode} {target} failed: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if watch:
        out["proxy_cpu_s"] = c1 - c0
        out["proxy_cpu_pct"] = 100 * (c1 - c0) / (t1 - t0)
        if out.get("requests_all"):
            out["proxy_cpu_us_per_req"] = 1e6 * (c1 - c0) / out["requests_all"]
    if samples:
        out["proxy_cpu_pct_peak"] = max(s[1] for s in samples)
        out["proxy_rss_mb_peak_sampled"] = max(s[2] for s in samples)
    return out


def med(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def chat_body(tokens: int, stream: bool, text: str = "Say hi.") -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                       "stream": stream, "options": {"num_predict": tokens}}, separators=(",", ":"))


def v1_body(model: str, tokens: int, stream: bool, text: str = "Say hi.") -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "stream": stream, "max_tokens": tokens}, separators=(",", ":"))


# --------------------------------------------------------------------------- the machine's load


class SystemLoad:
    """The whole machine's CPU use and load average while the bench runs (others share it)."""

    def __init__(self) -> None:
        self.load_start = self._loadavg()
        self.t0 = self._stat()

    @staticmethod
    def _loadavg() -> str:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def stop(self) -> dict[str, Any]:
        total, idle = self._stat()
        dt, di = total - self.t0[0], idle - self.t0[1]
        return {"loadavg_start": self.load_start, "loadavg_end": self._loadavg(),
                "machine_busy_pct": round(100 * (dt - di) / dt, 1) if dt else None}
