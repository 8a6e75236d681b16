#!/usr/bin/env python3
"""harbord's benchmark suite, with side-by-side baselines, in one command:

    python3 bench/run.py            # full run, ~7 minutes
    python3 bench/run.py --quick    # ~1.5 minutes: one repetition, shorter runs, no profile

It starts its own lean fake Ollama backends (bench/backend.py), harbord, nginx
(Debian package, own instance, Unix socket) and LiteLLM's proxy (PyPI, own
venv, TCP loopback), drives each with bench/loadgen.py in a separate process,
prints one table and writes docs/bench-results.json, docs/bench-results.png
and docs/benchmarks.md.

First run only, it installs what it needs: a venv bench/.venv (system site
packages + matplotlib + py-spy), nginx with apt-get (as root), and LiteLLM
into bench/.venv-litellm. Those installs are not part of the timed run.

Placement (2 cores): the load generator and the backends on CPU 0, the proxy
under test (harbord, nginx or LiteLLM) alone on CPU 1 (`--no-pin` to let the
kernel place everything). Everything listens on loopback or Unix sockets only.

Options: --quick, --reps N, --no-litellm, --no-nginx, --no-profile, --no-pin,
--out DIR (default docs/), --keep (leave the temp dir with logs and profiles).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
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


def bootstrap() -> None:
    """Re-exec inside bench/.venv (created on first use) so matplotlib and py-spy are there."""
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
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


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


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.pin = args.pin
        self.tmp = Path(tempfile.mkdtemp(prefix="harbord-bench-"))
        self.procs = Procs(self.tmp, self.pin)
        self.notes: list[str] = []
        self.results: dict[str, Any] = {}
        self.targets: dict[str, dict[str, Any]] = {}
        self.LOAD_CPU, self.PROXY_CPU = 0, 1

    # -- setup ------------------------------------------------------------------

    def start_backend(self, name: str, extra: list[str] | None = None) -> tuple[int, subprocess.Popen[bytes]]:
        proc = self.procs.spawn(f"backend-{name}", [sys.executable, str(BENCH / "backend.py"), "--port", "0",
                                                    "--name", name, *(extra or [])],
                                self.LOAD_CPU, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        return port, proc

    def harbord_env(self, run_dir: Path, notify: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "OLLAMA_", "HARBOR_"))}
        env["XDG_RUNTIME_DIR"] = str(run_dir)
        env["XDG_CONFIG_HOME"] = str(run_dir / "config")
        env["XDG_STATE_HOME"] = str(run_dir / "state")
        if notify:
            env["NOTIFY_SOCKET"] = notify
        return env

    def harbord_config(self, name: str, level: str) -> Path:
        path = self.tmp / f"{name}.toml"
        path.write_text(
            f'log_level = "{level}"\n'
            f'[backends.gpu]\nurl = "http://127.0.0.1:{self.gpu_port}"\nkind = "gpu"\n'
            f'[backends.cpu]\nurl = "http://127.0.0.1:{self.cpu_port}"\nkind = "cpu"\n'
        )
        return path

    def start_harbord(self, name: str, level: str) -> tuple[str, subprocess.Popen[bytes]]:
        run_dir = self.tmp / name
        run_dir.mkdir(mode=0o700)
        cfg = self.harbord_config(name, level)
        proc = self.procs.spawn(name, [sys.executable, "-m", "harbord", "--config", str(cfg), "--state-dir",
                                       str(run_dir / "state")], self.PROXY_CPU, env=self.harbord_env(run_dir))
        target = f"unix:{run_dir / 'harbor.sock'}"
        wait_http(target, "/harbor/status", 15, proc)
        # wait until the first probe round saw both backends up
        t0 = time.time()
        while time.time() - t0 < 10:
            status = json.loads(http_get(target, "/harbor/status")[1])
            if all(b["health"] == "up" for b in status["backends"]):
                break
            time.sleep(0.05)
        return target, proc

    def start_nginx(self, nginx: str) -> tuple[str, subprocess.Popen[bytes], float]:
        d = self.tmp / "nginx"
        d.mkdir()
        sock = d / "nginx.sock"
        (d / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream ollama {{
    server 127.0.0.1:{self.gpu_port};
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen unix:{sock};
    location / {{
      proxy_pass http://ollama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
""")
        t0 = time.perf_counter()
        proc = self.procs.spawn("nginx", [nginx, "-c", str(d / "nginx.conf"), "-p", str(d), "-e",
                                          str(d / "error.log")], self.PROXY_CPU)
        target = f"unix:{sock}"
        wait_http(target, "/api/version", 10, proc)
        return target, proc, time.perf_counter() - t0

    def start_litellm(self, exe: Path) -> tuple[str, subprocess.Popen[bytes], float, str]:
        d = self.tmp / "litellm"
        d.mkdir()
        port = free_port()
        key = "sk-" + secrets.token_hex(32)
        (d / "config.yaml").write_text(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: ollama_chat/{MODEL}
      api_base: http://127.0.0.1:{self.gpu_port}
  - model_name: {MODEL}-oai
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{self.gpu_port}/v1
      api_key: none
litellm_settings:
  telemetry: false
""")
        env = dict(os.environ, LITELLM_MASTER_KEY=key, LITELLM_LOCAL_MODEL_COST_MAP="True",
                   DISABLE_ADMIN_UI="True", NO_DOCS="True", LITELLM_LOG="ERROR", HOME=str(d))
        t0 = time.perf_counter()
        proc = self.procs.spawn("litellm", [str(exe), "--config", str(d / "config.yaml"), "--host", "127.0.0.1",
                                            "--port", str(port), "--num_workers", "1"], self.PROXY_CPU, env=env)
        target = f"tcp:127.0.0.1:{port}"
        wait_http(target, "/health/liveliness", 180, proc)
        return target, proc, time.perf_counter() - t0, key

    # -- helpers ----------------------------------------------------------------

    def lg(self, mode: str, target: str, watch: list[int] | None = None, **kw: Any) -> dict[str, Any]:
        return loadgen(mode, target, cpu=self.LOAD_CPU, pin=self.pin, watch=watch, **kw)

    def watch(self, name: str) -> list[int]:
        """The processes whose CPU a run reports: the proxy's, or the backend's for direct runs."""
        t = self.targets[name]
        if t.get("proc") is None:
            return [self.gpu_proc.pid]
        return tree(t["proc"].pid)

    # -- scenarios ----------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        self.gpu_port, self.gpu_proc = self.start_backend("gpu")
        self.cpu_port, self.cpu_proc = self.start_backend("cpu")
        direct = f"tcp:127.0.0.1:{self.gpu_port}"
        self.targets["direct"] = {"target": direct, "proc": None, "kind": "ollama", "baseline": None}
        self.targets["direct-v1"] = {"target": direct, "proc": None, "kind": "v1", "model": MODEL,
                                     "baseline": None, "hidden": True}
        target, proc = self.start_harbord("harbord", "warning")
        self.targets["harbord"] = {"target": target, "proc": proc, "kind": "ollama", "baseline": "direct"}
        target, proc = self.start_harbord("harbord-info", "info")
        self.targets["harbord (INFO log)"] = {"target": target, "proc": proc, "kind": "ollama",
                                              "baseline": "direct"}
        for impl, label in (("aiohttp", "aiohttp relay"), ("raw", "raw relay")):
            sock = self.tmp / f"relay-{impl}.sock"
            proc = self.procs.spawn(f"relay-{impl}", [sys.executable, str(BENCH / "bare_relay.py"), "--impl", impl,
                                                      "--socket", str(sock), "--upstream",
                                                      f"127.0.0.1:{self.gpu_port}"], self.PROXY_CPU)
            wait_http(f"unix:{sock}", "/api/version", 10, proc)
            self.targets[label] = {"target": f"unix:{sock}", "proc": proc, "kind": "ollama", "baseline": "direct"}
        if a.nginx:
            nginx = ensure_nginx()
            if nginx is None:
                self.notes.append("nginx: not installed and could not be installed (apt-get needs root)")
            else:
                target, proc, started = self.start_nginx(nginx)
                self.targets["nginx"] = {"target": target, "proc": proc, "kind": "ollama", "baseline": "direct",
                                         "start_s": started}
                self.nginx_version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        if a.litellm:
            exe, version = ensure_litellm()
            if exe is None:
                self.notes.append(f"LiteLLM: {version}")
            else:
                self.litellm_version = version
                try:
                    target, proc, started, key = self.start_litellm(exe)
                except RuntimeError as err:
                    self.notes.append(f"LiteLLM proxy did not start: {err} (log: {self.tmp}/litellm.log)")
                else:
                    auth = f"Authorization: Bearer {key}"
                    self.targets["litellm (ollama_chat)"] = {
                        "target": target, "proc": proc, "kind": "v1", "model": MODEL, "auth": auth,
                        "baseline": "direct", "start_s": started}
                    self.targets["litellm (openai)"] = {
                        "target": target, "proc": proc, "kind": "v1", "model": f"{MODEL}-oai", "auth": auth,
                        "baseline": "direct-v1", "start_s": started, "shared_proc": True}
        time.sleep(0.5)
        self.results["idle"] = {}
        for name, t in self.targets.items():
            if t.get("proc") is not None and not t.get("shared_proc"):
                self.results["idle"][name] = {"rss_mb": rss_mb(tree(t["proc"].pid))}
            log(f"target {name}: {t['target']}")

    def request_args(self, name: str, tokens: int, stream: bool, text: str = "Say hi.") -> dict[str, Any]:
        t = self.targets[name]
        if t["kind"] == "ollama":
            return {"path": "/api/chat", "body": chat_body(tokens, stream, text)}
        kw: dict[str, Any] = {"path": "/v1/chat/completions", "body": v1_body(t["model"], tokens, stream, text)}
        if t.get("auth"):
            kw["header"] = [t["auth"]]
        if stream:
            kw["sse"] = True
        return kw

    def scenario_latency(self) -> None:
        reps, dur, warm = self.args.reps, (1.5 if self.quick else 3.0), (0.3 if self.quick else 0.5)
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {1: [], 32: []} for n in self.targets}
        for rep in range(reps):
            for conc in (1, 32):
                for name in self.targets:
                    slow = name.startswith("litellm")
                    res = self.lg("latency", self.targets[name]["target"], watch=self.watch(name),
                                  concurrency=conc, duration=dur, warmup=warm if not slow else 1.0,
                                  **self.request_args(name, 8, False))
                    runs[name][conc].append(res)
                    log(f"rep {rep + 1}/{reps} c={conc:<2} {name:<22} p50 {res['p50_ms']:.3f} ms  "
                        f"p99 {res['p99_ms']:.3f} ms  {res['rps']:.0f} req/s  errors {res['errors']}")
        out: dict[str, Any] = {}
        for name, by_c in runs.items():
            out[name] = {}
            base = self.targets[name]["baseline"]
            for conc, rs in by_c.items():
                m: dict[str, Any] = {k: med([r[k] for r in rs]) for k in
                                     ("p50_ms", "p90_ms", "p99_ms", "rps", "loadgen_cpu_pct")}
                m["errors"] = sum(r["errors"] for r in rs)
                if rs and "proxy_cpu_pct" in rs[0]:
                    m["proxy_cpu_pct"] = med([r["proxy_cpu_pct"] for r in rs])
                    m["proxy_cpu_us_per_req"] = med([r.get("proxy_cpu_us_per_req", float("nan")) for r in rs])
                if base:
                    brs = runs[base][conc]
                    m["added_p50_ms"] = med([r["p50_ms"] - b["p50_ms"] for r, b in zip(rs, brs, strict=True)])
                    m["added_p99_ms"] = med([r["p99_ms"] - b["p99_ms"] for r, b in zip(rs, brs, strict=True)])
                    m["rps_vs_baseline"] = med([r["rps"] / b["rps"] for r, b in zip(rs, brs, strict=True)])
                m["runs"] = rs
                out[name][f"c{conc}"] = m
        self.results["latency"] = out

    def scenario_stream(self) -> None:
        reps = self.args.reps
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in self.targets}
        ttft: dict[str, list[dict[str, Any]]] = {n: [] for n in self.targets}
        for rep in range(reps):
            for name, t in self.targets.items():
                slow = name.startswith("litellm")
                count = (3 if self.quick else 8) if slow else (10 if self.quick else 30)
                expect = 1001 if t["kind"] == "ollama" else None
                marker = '"done":true' if t["kind"] == "ollama" else "[DONE]"
                res = self.lg("stream", t["target"], watch=self.watch(name), count=count,
                              warmup_count=1 if slow else 3, expect_events=expect, done_marker=marker,
                              **self.request_args(name, 1000, True))
                runs[name].append(res)
                res2 = self.lg("stream", t["target"], watch=self.watch(name), count=count,
                               warmup_count=1 if slow else 3, done_marker=marker,
                               **self.request_args(name, 1000, True, "Say hi. bench:gap=0.003"))
                ttft[name].append(res2)
                log(f"rep {rep + 1}/{reps} stream {name:<22} {res['chunks_per_s_p50']:,.0f} chunks/s  "
                    f"TTFT {res2['ttft_p50_ms']:.3f} ms  errors {res['errors'] + res2['errors']}")
        out: dict[str, Any] = {}
        for name, rs in runs.items():
            base = self.targets[name]["baseline"]
            m: dict[str, Any] = {
                "chunks_per_s": med([r["chunks_per_s_p50"] for r in rs]),
                "events_per_stream": med([r["events_per_stream"] for r in rs]),
                "total_ms": med([r["total_p50_ms"] for r in rs]),
                "ttft_ms": med([r["ttft_p50_ms"] for r in ttft[name]]),
                "ttft_p99_ms": med([r["ttft_p99_ms"] for r in ttft[name]]),
                "ttft_in_burst_ms": med([r["ttft_p50_ms"] for r in rs]),
                "errors": sum(r["errors"] for r in rs) + sum(r["errors"] for r in ttft[name]),
                "error_kinds": dict(sum((Counter(r["error_kinds"]) for r in rs + ttft[name]), Counter())),
                "loadgen_cpu_pct": med([r["loadgen_cpu_pct"] for r in rs]),
            }
            if base:
                m["vs_baseline"] = med([r["chunks_per_s_p50"] / b["chunks_per_s_p50"]
                                        for r, b in zip(rs, runs[base], strict=True)])
                m["added_ttft_ms"] = med([r["ttft_p50_ms"] - b["ttft_p50_ms"]
                                          for r, b in zip(ttft[name], ttft[base], strict=True)])
            m["runs"], m["ttft_runs"] = rs, ttft[name]
            out[name] = m
        self.results["stream"] = out

    def scenario_many(self) -> None:
        """1,000 slow streams (20 tokens/s) held at once, through a fresh harbord (and nginx, LiteLLM)."""
        tokens = 100 if self.quick else 200
        count = 1000
        out: dict[str, Any] = {}
        fresh_target, fresh = self.start_harbord("harbord-many", "warning")
        time.sleep(1.0)
        idle = mem_kb(fresh.pid)
        idle_after_request = None
        entries: list[tuple[str, str, list[int], dict[str, Any]]] = [
            ("harbord", fresh_target, [fresh.pid], {"path": "/api/chat",
                                                    "body": chat_body(tokens, True, "Hi. bench:delay=0.05")}),
        ]
        others = ["nginx"] + ([] if self.quick else ["aiohttp relay", "raw relay"])
        for name in others:
            if name in self.targets:
                entries.append((name, self.targets[name]["target"], self.watch(name),
                                {"path": "/api/chat", "body": chat_body(tokens, True, "Hi. bench:delay=0.05")}))
        if "litellm (ollama_chat)" in self.targets and not self.quick:
            entries.append(("litellm (ollama_chat)", self.targets["litellm (ollama_chat)"]["target"],
                            self.watch("litellm (ollama_chat)"),
                            self.request_args("litellm (ollama_chat)", tokens, True, "Hi. bench:delay=0.05")))
        for name, target, watch, req in entries:
            if name == "harbord":
                # one request first, so "idle" also has the connection pool and code paths warmed
                self.lg("stream", target, count=1, warmup_count=0, **{**req, "body": chat_body(8, True)})
                time.sleep(0.5)
                idle_after_request = mem_kb(fresh.pid)
            before = [rss_mb(watch)]
            kind = "ollama" if req["path"] == "/api/chat" else "v1"
            res = self.lg("many", target, watch=watch, sampler=True, count=count, connect_tries=50,
                          expect_events=tokens + 1 if kind == "ollama" else None,
                          done_marker='"done":true' if kind == "ollama" else "[DONE]",
                          deadline=tokens / 20 * 3 + 10, timeout=tokens / 20 * 3 + 60, **req)
            res["rss_mb_before"] = before[0]
            res["ideal_s"] = tokens / 20
            if name == "harbord":
                mem = mem_kb(fresh.pid)
                res["idle_rss_mb"] = idle.get("VmRSS", 0) / 1024
                res["idle_after_one_request_rss_mb"] = (idle_after_request or {}).get("VmRSS", 0) / 1024
                res["peak_rss_mb"] = mem.get("VmHWM", 0) / 1024
                res["rss_after_mb"] = mem.get("VmRSS", 0) / 1024
            else:
                res["peak_rss_mb"] = res.get("proxy_rss_mb_peak_sampled", float("nan"))
            out[name] = res
            if name.startswith("litellm"):
                # it goes on generating for the streams the deadline abandoned: stop it, so it does
                # not take CPU 1 from what runs next
                self.procs.stop(self.targets[name]["proc"])
            time.sleep(1.0)
            log(f"many {name:<22} ok {res['ok']}/{count}  errors {res['errors']}  connect retries "
                f"{res.get('connect_retries', 0)}  peak RSS {res['peak_rss_mb']:.1f} MB  "
                f"CPU {res['proxy_cpu_s']:.2f} s (avg {res['proxy_cpu_pct']:.0f}%, peak "
                f"{res.get('proxy_cpu_pct_peak', float('nan')):.0f}%)  TTFT p99 {res['ttft_p99_ms']:.1f} ms  "
                f"slowest stream {res['total_max_s']:.2f} s (ideal {tokens / 20:.1f} s)")
        self.procs.stop(fresh)
        out["tokens_per_stream"] = tokens
        out["streams"] = count
        self.results["many"] = out

    def scenario_startup(self) -> None:
        n = 3 if self.quick else 5
        runs = []
        for i in range(n):
            run_dir = self.tmp / f"startup-{i}"
            run_dir.mkdir(mode=0o700)
            notify_path = str(run_dir / "notify.sock")
            nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            nsock.bind(notify_path)
            nsock.setblocking(False)
            cfg = self.harbord_config(f"startup-{i}", "warning")
            sock = run_dir / "harbor.sock"
            t0 = time.perf_counter()
            proc = self.procs.spawn(f"startup-{i}", [sys.executable, "-m", "harbord", "--config", str(cfg),
                                                     "--state-dir", str(run_dir / "state")],
                                    self.PROXY_CPU, env=self.harbord_env(run_dir, notify_path))
            t_accept = t_status = t_ready = None
            while time.perf_counter() - t0 < 10 and (t_status is None or t_ready is None):
                if t_ready is None:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            msg = nsock.recv(4096)
                            if b"READY=1" in msg.split(b"\n"):
                                t_ready = time.perf_counter() - t0
                                break
                if t_status is None and sock.exists():
                    try:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(str(sock))
                        s.close()
                        if t_accept is None:
                            t_accept = time.perf_counter() - t0
                        if http_get(f"unix:{sock}", "/harbor/status", 1.0)[0] == 200:
                            t_status = time.perf_counter() - t0
                    except OSError:
                        pass
                time.sleep(0.0005)
            self.procs.stop(proc)
            nsock.close()
            runs.append({"accept_ms": (t_accept or float("nan")) * 1000,
                         "status_ms": (t_status or float("nan")) * 1000,
                         "ready1_ms": (t_ready or float("nan")) * 1000})
        # floors: the interpreter alone, and importing harbord's daemon (what --version costs)
        floors = {}
        for label, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                           ("python -m harbord --version", [sys.executable, "-m", "harbord", "--version"])):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, capture_output=True,
                               preexec_fn=(lambda: os.sched_setaffinity(0, {self.PROXY_CPU})) if self.pin else None)
                ts.append((time.perf_counter() - t0) * 1000)
            floors[label] = med(ts)
        out = {k: med([r[k] for r in runs]) for k in ("accept_ms", "status_ms", "ready1_ms")}
        out["runs"] = runs
        out["floors_ms"] = floors
        for name in ("nginx", "litellm (ollama_chat)"):
            if name in self.targets:
                out[f"{name.split()[0]}_ready_ms"] = self.targets[name]["start_s"] * 1000
        self.results["startup"] = out
        log(f"startup: socket accepts {out['accept_ms']:.0f} ms, /harbor/status {out['status_ms']:.0f} ms, "
            f"READY=1 {out['ready1_ms']:.0f} ms (floors: {floors})")

    def scenario_policy(self) -> None:
        cmd = [sys.executable, str(BENCH / "policy_bench.py")] + (["--quick"] if self.quick else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {self.PROXY_CPU})) if self.pin else None)
        self.results["policy"] = json.loads(proc.stdout)
        log(f"policy.plan: {self.results['policy']['us_per_call']['plan/fast (typical)']:.2f} µs per decision")

    def scenario_backend_check(self) -> None:
        """The project's tests/fakeollama.py vs bench/backend.py, both direct: is the backend a bottleneck?"""
        ready = self.tmp / "fakeollama.port"
        proc = self.procs.spawn("fakeollama", [sys.executable, str(ROOT / "tests" / "fakeollama"), "--port", "0",
                                               "--name", "gpu", "--ready-file", str(ready)], self.LOAD_CPU)
        t0 = time.time()
        while not ready.exists() and time.time() - t0 < 15:
            time.sleep(0.05)
        fake = f"tcp:127.0.0.1:{int(ready.read_text())}"
        dur = 1.5 if self.quick else 3.0
        out: dict[str, Any] = {}
        for label, target, pid in (("tests/fakeollama.py", fake, proc.pid),
                                   ("bench/backend.py", self.targets["direct"]["target"], self.gpu_proc.pid)):
            r: dict[str, Any] = {}
            for conc in (1, 32):
                res = self.lg("latency", target, watch=[pid], concurrency=conc, duration=dur, warmup=0.3,
                              path="/api/chat", body=chat_body(8, False))
                r[f"c{conc}"] = {k: res[k] for k in ("p50_ms", "p99_ms", "rps", "loadgen_cpu_pct", "proxy_cpu_pct",
                                                     "errors")}
                r[f"c{conc}"]["backend_cpu_us_per_req"] = res.get("proxy_cpu_us_per_req")
            res = self.lg("stream", target, watch=[pid], count=10 if self.quick else 20, warmup_count=2,
                          expect_events=1001, done_marker='"done":true', path="/api/chat",
                          body=chat_body(1000, True))
            r["stream"] = {k: res[k] for k in ("chunks_per_s_p50", "ttft_p50_ms", "total_p50_ms", "errors")}
            out[label] = r
            log(f"backend check {label:<20} c=1 p50 {r['c1']['p50_ms']:.3f} ms, c=32 {r['c32']['rps']:.0f} req/s "
                f"({r['c32']['backend_cpu_us_per_req']:.0f} µs CPU/req), stream "
                f"{r['stream']['chunks_per_s_p50']:,.0f} chunks/s")
        self.procs.stop(proc)
        self.results["backend_check"] = out

    def scenario_profile(self) -> None:
        pyspy = shutil.which("py-spy", path=str(Path(sys.prefix) / "bin")) or shutil.which("py-spy")
        if pyspy is None:
            self.notes.append("profile: py-spy not found")
            return
        h = self.targets["harbord"]
        pid = h["proc"].pid
        out: dict[str, Any] = {}
        prof_dir = self.tmp / "profiles"
        prof_dir.mkdir()
        dur = 4
        plans = [
            ("c1", "latency", {"concurrency": 1, "duration": dur + 1.5, "warmup": 0.2,
                               **self.request_args("harbord", 8, False)}),
            ("stream", "stream", {"for_seconds": dur + 1.5, "warmup_count": 2, "count": 0,
                                  **self.request_args("harbord", 1000, True)}),
            ("many", "many", {"count": 1000, "connect_tries": 50,
                              "path": "/api/chat", "body": chat_body(100, True, "Hi. bench:delay=0.05")}),
        ]
        for label, mode, kw in plans:
            raw = prof_dir / f"{label}.txt"
            result: dict[str, Any] = {}

            def drive(mode: str = mode, kw: dict[str, Any] = kw, result: dict[str, Any] = result) -> None:
                result.update(self.lg(mode, h["target"], **kw))

            thread = threading.Thread(target=drive)
            thread.start()
            time.sleep(0.7 if mode != "many" else 1.5)
            c0 = cpu_seconds([pid])
            subprocess.run([pyspy, "record", "--pid", str(pid), "--duration", str(dur), "--rate", "500", "--gil",
                            "--function", "--format", "raw", "-o", str(raw)], capture_output=True, timeout=60)
            c1 = cpu_seconds([pid])
            thread.join()
            if not raw.exists():
                self.notes.append(f"profile {label}: py-spy wrote nothing (ptrace not permitted?)")
                continue
            summary = summarize_profile(raw)
            summary["cpu_s_during_profile"] = c1 - c0
            summary["cpu_pct_during_profile"] = 100 * (c1 - c0) / dur
            summary["load"] = {k: result.get(k) for k in ("rps", "p50_ms", "chunks_per_s_p50", "count",
                                                          "requests_all", "errors")}
            out[label] = summary
            shutil.copy(raw, BENCH / "out" / f"profile-{label}.folded")
            log(f"profile {label}: {summary['samples']} samples, harbord CPU {summary['cpu_pct_during_profile']:.0f}%")
        self.results["profile"] = out

    # -- main -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        self.setup()
        # start-up and policy first: they share CPU 1 with the proxies, which are idle then (LiteLLM
        # keeps working on abandoned streams after the many-streams run, so it is stopped after it)
        steps = [("backend", self.scenario_backend_check), ("startup", self.scenario_startup),
                 ("policy", self.scenario_policy), ("latency", self.scenario_latency),
                 ("stream", self.scenario_stream), ("many", self.scenario_many)]
        if self.args.profile:
            steps.append(("profile", self.scenario_profile))
        only = set(self.args.only.split(",")) if self.args.only else None
        load = SystemLoad()
        for label, fn in steps:
            if only is None or label in only:
                log(f"--- {label}")
                try:
                    fn()
                except Exception as err:  # one broken scenario must not lose the others' numbers
                    log(f"scenario {label} failed: {err!r}")
                    self.notes.append(f"scenario {label} failed: {type(err).__name__}: {str(err)[:300]}")
        self.results["system_load"] = load.stop()
        self.results["wall_s"] = time.time() - t0
        return self.results


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


# --------------------------------------------------------------------------- profile summary


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " (" + _short(f) + ")" for f in stack.split(";")]
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    skip = ("<module>", "_run_module_as_main", "_run_code", "run (uvloop", "Runner.run", "main (harbord/daemon",
            "_run (harbord/daemon")
    return {
        "samples": total,
        "self": [(f, round(100 * c / total, 1)) for f, c in self_c.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl.most_common(80)
                      if not f.startswith(skip)][:45],
    }


def _short(frame: str) -> str:
    inside = frame.split(" (", 1)[1].rstrip(")") if " (" in frame else ""
    path = inside.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import aiohttp
    import msgspec

    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem = f"{int(fh.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu_model, "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__, "uvloop": uv,
        "msgspec": msgspec.__version__,
        "harbord_commit": cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
        "harbord_tree_dirty": bool(cmd("git", "-C", str(ROOT), "status", "--porcelain", "--", "harbord")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "n/a"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def evaluate(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: what, measured value, limit, met (None: not measured in this run)."""
    nan = float("nan")
    lat, st, many, start = res.get("latency", {}), res.get("stream", {}), res.get("many", {}), res.get("startup", {})
    h1, h32 = lat.get("harbord", {}).get("c1", {}), lat.get("harbord", {}).get("c32", {})
    hs = st.get("harbord", {})
    hm = many.get("harbord", {})
    t: list[dict[str, Any]] = []

    def add(what: str, value: str, limit: str, met: bool | None, note: str = "") -> None:
        t.append({"target": what, "value": value, "limit": limit, "met": met, "note": note})

    def check(have: bool, ok: bool) -> bool | None:
        return ok if have else None

    add("added latency p50, c=1", f"{h1.get('added_p50_ms', nan):.3f} ms", "<= 0.5 ms",
        check(bool(h1), h1.get("added_p50_ms", 9) <= 0.5))
    add("added latency p99, c=1", f"{h1.get('added_p99_ms', nan):.3f} ms", "<= 2 ms",
        check(bool(h1), h1.get("added_p99_ms", 9) <= 2.0))
    add("throughput c=32 vs direct", f"{100 * h32.get('rps_vs_baseline', nan):.0f} %", ">= 80 %",
        check(bool(h32), h32.get("rps_vs_baseline", 0) >= 0.8))
    add("streaming chunks/s per stream", f"{hs.get('chunks_per_s', nan):,.0f}", ">= 50,000",
        check(bool(hs), hs.get("chunks_per_s", 0) >= 50_000))
    add("streaming vs direct", f"{100 * hs.get('vs_baseline', nan):.0f} %", ">= 90 %",
        check(bool(hs), hs.get("vs_baseline", 0) >= 0.9))
    add("added time to first token", f"{hs.get('added_ttft_ms', nan):.3f} ms", "<= 0.5 ms",
        check(bool(hs), hs.get("added_ttft_ms", 9) <= 0.5))
    add("1,000 streams: errors", f"{hm.get('errors', 'n/a')} (connect retries on EAGAIN: "
        f"{hm.get('connect_retries', 'n/a')})", "0", check(bool(hm), hm.get("errors", 1) == 0),
        "a client that does not retry EAGAIN sees that many failed connects" if hm.get("connect_retries") else "")
    add("idle RSS", f"{hm.get('idle_rss_mb', nan):.1f} MB", "<= 50 MB",
        check(bool(hm), hm.get("idle_rss_mb", 999) <= 50))
    add("RSS with 1,000 streams (VmHWM)", f"{hm.get('peak_rss_mb', nan):.1f} MB", "<= 150 MB",
        check(bool(hm), hm.get("peak_rss_mb", 999) <= 150))
    add("READY=1 after process start", f"{start.get('ready1_ms', nan):.0f} ms", "<= 300 ms",
        check(bool(start), start.get("ready1_ms", 9e9) <= 300))
    ng1 = lat.get("nginx", {}).get("c1", {})
    if ng1 and h1:
        ratio = h1["added_p50_ms"] / max(ng1["added_p50_ms"], 1e-3)
        ratio99 = h1["added_p99_ms"] / max(ng1["added_p99_ms"], 1e-3)
        add("added latency within 2x of nginx (c=1)", f"p50 {ratio:.1f}x ({h1['added_p50_ms']:.3f} vs "
            f"{ng1['added_p50_ms']:.3f} ms), p99 {ratio99:.1f}x", "<= 2x", ratio <= 2 and ratio99 <= 2)
    lits = [n for n in lat if n.startswith("litellm")]
    if lits and h1:
        worse = []
        for n in lits:
            l1, l32, ls = lat[n]["c1"], lat[n]["c32"], st.get(n, {})
            if h1["p50_ms"] >= l1["p50_ms"] or h1["p99_ms"] >= l1["p99_ms"]:
                worse.append(f"{n} c=1 latency")
            if h32["rps"] <= l32["rps"]:
                worse.append(f"{n} c=32 req/s")
            if hs and ls and hs["chunks_per_s"] <= ls["chunks_per_s"]:
                worse.append(f"{n} chunks/s")
            if hs and ls and hs["ttft_ms"] >= ls["ttft_ms"]:
                worse.append(f"{n} TTFT")
        lm = many.get("litellm (ollama_chat)")
        if lm and hm and (hm["errors"] > lm["errors"] or hm["total_max_s"] > lm["total_max_s"]):
            worse.append("many streams")
        ls_ready = start.get("litellm_ready_ms")
        if ls_ready and start.get("ready1_ms", 9e9) >= ls_ready:
            worse.append("start-up")
        add("faster than LiteLLM on every scenario", "slower on: " + ", ".join(worse) if worse else
            "yes, on every one measured", "all", not worse)
    return t


def table(res: dict[str, Any], names: list[str]) -> list[list[str]]:
    lat, st = res.get("latency", {}), res.get("stream", {})
    rows = [["scenario / metric", *names]]

    def row(label: str, fn: Any, spec: str = ".3f") -> None:
        cells = []
        for n in names:
            try:
                cells.append(fmt(fn(n), spec))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        rows.append([label, *cells])

    row("1. c=1   p50 ms", lambda n: lat[n]["c1"]["p50_ms"])
    row("   c=1   p99 ms", lambda n: lat[n]["c1"]["p99_ms"])
    row("   c=1   added p50 ms", lambda n: lat[n]["c1"]["added_p50_ms"])
    row("   c=1   added p99 ms", lambda n: lat[n]["c1"]["added_p99_ms"])
    row("   c=1   req/s", lambda n: lat[n]["c1"]["rps"], ",.0f")
    row("   c=1   CPU µs/req (proxy)", lambda n: lat[n]["c1"]["proxy_cpu_us_per_req"], ".0f")
    ng = lat.get("nginx", {}).get("c1", {}).get("added_p50_ms")
    row("   c=1   added p50 / nginx's", lambda n: lat[n]["c1"]["added_p50_ms"] / ng if ng else None, ".1f")
    row("   c=32  p50 ms", lambda n: lat[n]["c32"]["p50_ms"])
    row("   c=32  p99 ms", lambda n: lat[n]["c32"]["p99_ms"])
    row("   c=32  req/s", lambda n: lat[n]["c32"]["rps"], ",.0f")
    row("   c=32  % of direct", lambda n: 100 * lat[n]["c32"]["rps_vs_baseline"], ".0f")
    ngr = lat.get("nginx", {}).get("c32", {}).get("rps")
    row("   c=32  % of nginx", lambda n: 100 * lat[n]["c32"]["rps"] / ngr if ngr else None, ".0f")
    row("   c=32  CPU % (proxy)", lambda n: lat[n]["c32"]["proxy_cpu_pct"], ".0f")
    row("   c=32  CPU µs/req (proxy)", lambda n: lat[n]["c32"]["proxy_cpu_us_per_req"], ".0f")
    row("   c=32  req/s per core (1e6/CPU µs)", lambda n: 1e6 / lat[n]["c32"]["proxy_cpu_us_per_req"], ",.0f")
    row("2. stream chunks/s", lambda n: st[n]["chunks_per_s"], ",.0f")
    row("   stream % of direct", lambda n: 100 * st[n]["vs_baseline"], ".0f")
    row("   TTFT p50 ms", lambda n: st[n]["ttft_ms"])
    row("   added TTFT ms", lambda n: st[n]["added_ttft_ms"])
    many = res.get("many", {})
    row("3. 1,000 streams: errors", lambda n: many[n]["errors"], "d")
    row("   connect retries (EAGAIN)", lambda n: many[n]["connect_retries"], "d")
    row("   peak RSS MB", lambda n: many[n]["peak_rss_mb"], ".1f")
    row("   idle RSS MB", lambda n: many[n]["idle_rss_mb"] if n == "harbord" else res["idle"][n]["rss_mb"], ".1f")
    row("   CPU s (whole run)", lambda n: many[n]["proxy_cpu_s"], ".2f")
    row("   CPU % avg / peak", lambda n: f"{many[n]['proxy_cpu_pct']:.0f} / {many[n]['proxy_cpu_pct_peak']:.0f}",
        "s")
    row("   TTFT p99 ms", lambda n: many[n]["ttft_p99_ms"], ".1f")
    row("   slowest stream s", lambda n: many[n]["total_max_s"], ".2f")
    start = res.get("startup", {})

    def ready(n: str) -> Any:
        if n == "harbord":
            return f"{start['ready1_ms']:.0f} (socket {start['accept_ms']:.0f})"
        if n == "nginx":
            return start["nginx_ready_ms"]
        if n.startswith("litellm"):
            return start["litellm_ready_ms"]
        return None

    row("4. start-up to READY ms", ready, ".0f")
    pol = res.get("policy", {}).get("us_per_call", {})
    row("5. policy.plan µs/decision", lambda n: pol["plan/fast (typical)"] if n == "harbord" else None, ".2f")
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                              for i in range(len(rows[0]))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def chart(res: dict[str, Any], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, st, many, start = res["latency"], res["stream"], res.get("many", {}), res.get("startup", {})
    proxies = [n for n in names if lat.get(n, {}).get("c1", {}).get("added_p50_ms") is not None]
    colors = {"direct": "#777777", "harbord": "#1f77b4", "harbord (INFO log)": "#6baed6", "nginx": "#2ca02c",
              "aiohttp relay": "#9467bd", "raw relay": "#c5b0d5", "litellm (ollama_chat)": "#d62728",
              "litellm (openai)": "#ff9896"}
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(f"harbord benchmark ({res['machine']['date']}, {res['machine']['nproc']} cores, "
                 f"commit {res['machine']['harbord_commit']}): medians of {res['reps']} runs", fontsize=12)

    def bars(ax: Any, labels: list[str], values: list[float], title: str, ylabel: str, log: bool = False,
             line: float | None = None, line_label: str = "", fmt_s: str = "{:.3g}") -> None:
        xs = range(len(labels))
        ax.bar(xs, values, color=[colors.get(n, "#999999") for n in labels])
        ax.set_xticks(list(xs), [n.replace(" (", "\n(").replace(" relay", "\nrelay") for n in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if line is not None:
            ax.axhline(line, color="k", linestyle="--", linewidth=1)
            ax.text(len(labels) - 0.5, line, line_label, ha="right", va="bottom", fontsize=8)
        for x, v in zip(xs, values, strict=True):
            if v == v:
                ax.text(x, v, fmt_s.format(v), ha="center", va="bottom", fontsize=8)

    vals = [max(lat[n]["c1"]["added_p50_ms"], 1e-3) for n in proxies]
    bars(axes[0][0], proxies, vals, "1. added latency, p50, c=1 (ms, log)", "ms", True, 0.5, "target 0.5 ms")
    vals = [max(lat[n]["c1"]["added_p99_ms"], 1e-3) for n in proxies]
    bars(axes[0][1], proxies, vals, "1. added latency, p99, c=1 (ms, log)", "ms", True, 2.0, "target 2 ms")
    vals = [100 * lat[n]["c32"]["rps_vs_baseline"] for n in proxies]
    bars(axes[0][2], proxies, vals, "1. throughput at c=32, % of direct", "%", False, 80, "target 80 %",
         "{:.0f}")
    sn = [n for n in names if n in st]
    bars(axes[1][0], sn, [st[n]["chunks_per_s"] for n in sn], "2. chunks/s per 1,000-token stream (log)",
         "chunks/s", True, 50_000, "target 50k", "{:,.0f}")
    vals = [st[n].get("added_ttft_ms", float("nan")) for n in proxies]
    bars(axes[1][1], proxies, [max(v, 1e-3) for v in vals], "2. added time to first token (ms, log)", "ms", True,
         0.5, "target 0.5 ms")
    labels, values, shades = [], [], []
    for n in ("harbord", "nginx", "aiohttp relay", "raw relay", "litellm (ollama_chat)"):
        idle = many.get(n, {}).get("idle_rss_mb") if n == "harbord" else res["idle"].get(n, {}).get("rss_mb")
        if idle is None and n not in many:
            continue
        labels.append(f"{n.split(' (')[0]} idle")
        values.append(idle if idle is not None else float("nan"))
        shades.append("#9ecae1")
        if n in many:
            labels.append(f"{n.split(' (')[0]} 1k streams")
            values.append(many[n]["peak_rss_mb"])
            shades.append("#1f77b4")
    ax = axes[1][2]
    ax.bar(range(len(labels)), values, color=shades)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_yscale("log")
    title = "3. RSS idle / with 1,000 slow streams (MB, log)"
    if start:
        title += f"\n4. READY=1 {start['ready1_ms']:.0f} ms (target 300)"
    if res.get("policy"):
        title += f";  5. plan() {res['policy']['us_per_call']['plan/fast (typical)']:.2f} µs"
    ax.set_title(title, fontsize=9)
    ax.axhline(150, color="k", linestyle="--", linewidth=1)
    ax.axhline(50, color="k", linestyle=":", linewidth=1)
    for x, v in enumerate(values):
        if v == v:
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_markdown(res: dict[str, Any], rows: list[list[str]], targets: list[dict[str, Any]], path: Path,
                   command: str) -> None:
    m = res["machine"]
    lines = [
        "# harbord benchmarks",
        "",
        "Generated by `bench/run.py`; hand-written analysis in `bench/notes.md` is appended below.",
        "",
        "## Command",
        "",
        "```sh",
        "python3 bench/run.py            # full run (~7 min): 3 repetitions, profile",
        "python3 bench/run.py --quick    # ~1.5 min: 1 repetition, shorter runs, no profile",
        "```",
        "",
        f"This run: `{command}`, {res['reps']} repetition(s), took {res['wall_s']:.0f} s. "
        "Numbers are medians over the repetitions. The first run installs `bench/.venv` (system site packages "
        "+ matplotlib + py-spy, via pip), nginx (apt-get) and `bench/.venv-litellm` (`pip install "
        "'litellm[proxy]'`); that is not part of the timed run.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} cores: {m['cpu_model']}; {m['memory']} RAM; kernel {m['kernel']}",
        f"- Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, msgspec {m['msgspec']}",
        f"- nginx {str(res.get('nginx_version') or 'n/a').removeprefix('nginx version: nginx/')}; "
        f"LiteLLM {res.get('litellm_version') or 'n/a'}",
        f"- harbord at commit `{m['harbord_commit']}`" + (" (with uncommitted changes in harbord/)"
                                                           if m["harbord_tree_dirty"] else ""),
        f"- placement: {res['placement']}",
        f"- the machine while the bench ran: {res.get('system_load', {}).get('machine_busy_pct', 'n/a')} % of "
        f"all cores busy (the bench's own processes included), load average "
        f"{res.get('system_load', {}).get('loadavg_start', '?')} at the start and "
        f"{res.get('system_load', {}).get('loadavg_end', '?')} at the end; other sessions' test suites share "
        "this machine, so read the ratios and the CPU-per-request rows rather than the absolute times",
        f"- {m['date']}",
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "Columns: **direct** = the load generator straight to the backend (TCP); **harbord** = through harbord's "
        "Unix socket at `log_level = \"warning\"`; **harbord (INFO log)** = the same with the per-request log "
        "line (the file's default level is info); **nginx** = nginx proxying its Unix socket to the backend "
        "(`proxy_buffering off`, HTTP/1.1 keep-alive upstream, 1 worker); **aiohttp relay** = "
        "`bench/bare_relay.py --impl aiohttp`, a bare aiohttp-server-to-ClientSession relay on uvloop with no "
        "routing or bookkeeping (the floor for harbord's current design); **raw relay** = `bench/bare_relay.py "
        "--impl raw`, raw asyncio protocols on uvloop forwarding the request and the answer's bytes verbatim "
        "(what a Python hop can cost); **litellm** = LiteLLM's proxy on TCP "
        "loopback (1 uvicorn worker), with the backend configured as `ollama_chat/` (client speaks OpenAI "
        "`/v1/chat/completions`, LiteLLM calls `/api/chat`; its added latency is against direct `/api/chat`) and "
        "as `openai/` (LiteLLM calls the backend's `/v1/chat/completions`; added latency against direct "
        "`/v1/chat/completions`, which the bench also measures). In the **direct** column the CPU rows are the "
        "backend's.",
        "",
        "## Targets (issue 5)",
        "",
        "| target | measured | limit | met |",
        "|---|---:|---:|:---:|",
    ]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['value']} | {t['limit']} | {met} |")
    lines += ["", "## The scenarios", "", SCENARIOS_MD, ""]
    bc = res.get("backend_check", {})
    if bc:
        lines += ["## Is the backend the bottleneck?", "",
                  "Both fake backends measured direct, same load generator and placement:", "",
                  "| backend | c=1 p50 ms | c=32 req/s | backend CPU µs/req | 1,000-token stream chunks/s |",
                  "|---|---:|---:|---:|---:|"]
        for label, r in bc.items():
            lines.append(f"| `{label}` | {r['c1']['p50_ms']:.3f} | {r['c32']['rps']:,.0f} | "
                         f"{fmt(r['c32']['backend_cpu_us_per_req'], '.0f')} | {r['stream']['chunks_per_s_p50']:,.0f} |")
        hs = res.get("latency", {}).get("harbord", {}).get("c32", {})
        fo, lean = bc.get("tests/fakeollama.py", {}), bc.get("bench/backend.py", {})
        if fo and lean:
            ratio = fo["c32"]["rps"] / max(hs.get("rps", 1), 1)
            lines += ["", f"`tests/fakeollama.py` is faithful but costs {fo['c32']['backend_cpu_us_per_req']:.0f} "
                      f"µs of CPU per request and tops out at {fo['c32']['rps']:,.0f} req/s and "
                      f"{fo['stream']['chunks_per_s_p50']:,.0f} chunks/s direct: only "
                      f"{ratio:.1f}x harbord's {hs.get('rps', 0):,.0f} req/s, so as the "
                      "backend it would cap the direct, nginx and relay columns and hide what a proxy hop costs. "
                      f"`bench/backend.py` (raw asyncio + uvloop, prebuilt NDJSON lines in Ollama's shapes, one "
                      f"`send()` per token) costs {lean['c32']['backend_cpu_us_per_req']:.0f} µs per request and "
                      f"streams {lean['stream']['chunks_per_s_p50']:,.0f} chunks/s, so the bench uses it.", ""]
    lat = res.get("latency", {})
    lines += ["## Does the load generator keep up?", "",
              "`bench/loadgen.py` is raw asyncio protocols on uvloop (no HTTP library). Its own CPU, as a share "
              "of one core, during the runs (median):", "",
              "| target | c=1 loadgen CPU % | c=32 loadgen CPU % | c=32 req/s |", "|---|---:|---:|---:|"]
    for n, v in lat.items():
        lines.append(f"| {n} | {v['c1']['loadgen_cpu_pct']:.0f} | {v['c32']['loadgen_cpu_pct']:.0f} | "
                     f"{v['c32']['rps']:,.0f} |")
    d32 = lat.get("direct", {}).get("c32", {})
    if d32:
        lines += ["", f"Direct to the backend the same generator, sharing CPU 0 with the backend, drives "
                  f"{d32['rps']:,.0f} req/s at c=32 (itself at {d32['loadgen_cpu_pct']:.0f} % of the core): many times "
                  "any Python proxy's rate, so through a proxy it is not what limits the numbers. The CPU columns "
                  "of the results table are the proxy's own (the backend's for direct).", ""]
    h1 = lat.get("harbord", {}).get("c1", {})
    hi1 = lat.get("harbord (INFO log)", {}).get("c1", {})
    h32 = lat.get("harbord", {}).get("c32", {})
    hi32 = lat.get("harbord (INFO log)", {}).get("c32", {})
    if h1 and hi1:
        lines += ["## The per-request INFO log line", "",
                  f"- c=1: p50 {h1['p50_ms']:.3f} ms at warning vs {hi1['p50_ms']:.3f} ms at info "
                  f"({1000 * (hi1['p50_ms'] - h1['p50_ms']):+.0f} µs); CPU per request "
                  f"{h1.get('proxy_cpu_us_per_req', 0):.0f} vs {hi1.get('proxy_cpu_us_per_req', 0):.0f} µs.",
                  f"- c=32: {h32['rps']:,.0f} vs {hi32['rps']:,.0f} req/s "
                  f"({100 * (hi32['rps'] / h32['rps'] - 1):+.0f} %); CPU per request "
                  f"{h32.get('proxy_cpu_us_per_req', 0):.0f} vs {hi32.get('proxy_cpu_us_per_req', 0):.0f} µs.", ""]
    st = res.get("startup", {})
    if st:
        lines += ["## Start-up", "",
                  f"Median of {len(st['runs'])} starts of `python3 -m harbord` with both backends up: the socket "
                  f"accepts after {st['accept_ms']:.0f} ms, `/harbor/status` answers after {st['status_ms']:.0f} ms, "
                  f"`READY=1` reaches `NOTIFY_SOCKET` after {st['ready1_ms']:.0f} ms. Floors on this machine: "
                  + ", ".join(f"`{k}` {v:.0f} ms" for k, v in st["floors_ms"].items()) + ".", ""]
    pol = res.get("policy", {}).get("us_per_call", {})
    if pol:
        lines += ["## Routing decision and per-request bookkeeping (µs per call)", "",
                  "| what | µs |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.2f} |" for k, v in pol.items()]
        lines.append("")
    prof = res.get("profile", {})
    if prof:
        lines += ["## Profile (py-spy, `--gil --function`, 500 Hz, 4 s per scenario)", "",
                  "Shares are of samples where harbord held the GIL (idle time in epoll is not sampled). "
                  "Multiply by the CPU per request to get µs.", ""]
        for label, p in prof.items():
            load = p.get("load", {})
            lines += [f"### {label}: harbord CPU {p['cpu_pct_during_profile']:.0f}% of a core, "
                      f"{p['samples']} samples, load {json.dumps({k: v for k, v in load.items() if v is not None})}",
                      "", "| inclusive % | function |", "|---:|---|"]
            lines += [f"| {pct} | `{f}` |" for f, pct in p["inclusive"][:30]]
            lines += ["", "| self % | function |", "|---:|---|"]
            lines += [f"| {pct} | `{f}` |" for f, pct in p["self"][:15]]
            lines.append("")
    if res.get("notes"):
        lines += ["## What did not work / caveats", ""] + [f"- {n}" for n in res["notes"]] + [""]
    notes = BENCH / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    path.write_text("\n".join(lines))


SCENARIOS_MD = """\
1. **Added latency**: small non-streaming `/api/chat` (`stream: false`, 8 tokens, ~450-byte answer), C
   keep-alive connections each sending one request after the other for 3 s after a 0.5 s warm-up. Added
   = proxy minus direct, per repetition, then the median.
2. **Streaming relay**: one 1,000-token `/api/chat` stream at a time (no delay between tokens; the backend
   writes each token with its own `send()`), 30 streams per repetition: chunks (NDJSON lines) per second
   over the whole request. Time to first token is measured on the same streams with a 3 ms pause after
   the first token (`bench:gap=0.003`), so the first token is timed on its own and not behind the burst.
3. **Many streams**: 1,000 concurrent `/api/chat` streams at 20 tokens/s (`bench:delay=0.05`), 200 tokens
   each (100 with `--quick`), opened 50 every 50 ms, through a freshly started harbord; a connect that gets
   EAGAIN (listen backlog full) is retried and counted. Errors: any stream without status 200, the expected
   line count and the final `"done":true`. RSS from `/proc/PID/status` (idle VmRSS 1 s after start; VmHWM
   after the run), CPU from `/proc/PID/stat` utime+stime, sampled every 0.25 s for the peak.
4. **Start-up**: process spawn until the Unix socket accepts, until `/harbor/status` answers, and until
   `READY=1` arrives on a `NOTIFY_SOCKET` datagram socket the bench binds (both backends up).
5. **Routing decision**: `harbord.policy.plan(...)` on BackendViews built like `tests/test_policy.py`
   (`bench/policy_bench.py`), plus `Harbor.plan` and the other per-request bookkeeping.
"""


def main() -> int:
    p = argparse.ArgumentParser(description="harbord's benchmark suite (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="one repetition, shorter runs, no profile (~1.5 min)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--no-litellm", dest="litellm", action="store_false")
    p.add_argument("--no-nginx", dest="nginx", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    p.add_argument("--nice", type=int, default=0, help="lower the bench's niceness by N (root; all its "
                   "processes inherit it) to be less disturbed by other load on a shared machine")
    p.add_argument("--only", default="", help="comma list of scenarios: backend,latency,stream,many,startup,"
                   "policy,profile (default: all), or placement (bench/placement.py, only when named)")
    p.add_argument("--out", default=None, help="where results go (default docs/; bench/out/ with --only)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs, profiles)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the table, chart and markdown from an existing bench-results.json")
    args = p.parse_args()
    bootstrap()
    if args.report_only:
        out = Path(args.out) if args.out else ROOT / "docs"
        res = json.loads((out / "bench-results.json").read_text())
        names = [n for n, t in res["target_endpoints"].items() if not t.get("hidden")]
        rows, targets = table(res, names), evaluate(res)
        chart(res, names, out / "bench-results.png")
        write_markdown(res, rows, targets, out / "benchmarks.md", res["command"])
        print(render(rows))
        return 0
    only = [s for s in args.only.split(",") if s]
    if "placement" in only:  # its own script and report (bench/placement-results.md), not in the full run
        rc = subprocess.run([sys.executable, str(BENCH / "placement.py"), *(["--quick"] if args.quick else []),
                             *(["--keep"] if args.keep else [])], cwd=ROOT).returncode
        only.remove("placement")
        if not only or rc != 0:
            return rc
        args.only = ",".join(only)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.quick:
        args.profile = False
    if (os.cpu_count() or 1) < 2:
        args.pin = False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4200:
        log("warning: RLIMIT_NOFILE below 4200; 1,000 streams through a proxy need ~2 fds each per process")
    (BENCH / "out").mkdir(exist_ok=True)
    if args.nice:
        os.nice(-args.nice)
    if args.pin:
        os.sched_setaffinity(0, {0})  # the bench's own bookkeeping stays off the proxy's core
    bench = Bench(args)
    command = "python3 bench/run.py" + (" --quick" if args.quick else "")
    at_start = machine()  # the commit measured is the one at the start
    try:
        res = bench.run()
    finally:
        bench.procs.stop_all()
        if not args.keep:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        else:
            log(f"kept {bench.tmp}")
    at_end = machine()
    res["machine"] = at_start
    if (at_end["harbord_commit"], at_end["harbord_tree_dirty"]) != (at_start["harbord_commit"],
                                                                    at_start["harbord_tree_dirty"]):
        bench.notes.append(f"harbord changed during the run (commit {at_start['harbord_commit']} at the start, "
                           f"{at_end['harbord_commit']} at the end): processes started later ran newer code")
    res["reps"] = args.reps
    res["quick"] = args.quick
    res["command"] = command
    res["placement"] = ("load generator + backends pinned to CPU 0 (taskset-equivalent sched_setaffinity), "
                        "proxy under test alone on CPU 1" if args.pin else "not pinned (kernel placement)") + (
                        f"; niceness -{args.nice}" if args.nice else "")
    res["notes"] = [
        *bench.notes,
        "LiteLLM refuses to start without a master key (UnsafeMasterKeyError): the bench sets a random "
        "LITELLM_MASTER_KEY and sends it as a Bearer token; it also sets LITELLM_LOCAL_MODEL_COST_MAP=True, "
        "or LiteLLM tries to fetch its model cost map from the internet at start-up.",
    ] if "litellm (ollama_chat)" in bench.targets else bench.notes
    res["nginx_version"] = getattr(bench, "nginx_version", None)
    res["litellm_version"] = getattr(bench, "litellm_version", None)
    res["target_endpoints"] = {n: {k: v for k, v in t.items() if k not in ("proc", "auth")}
                               for n, t in bench.targets.items()}
    names = [n for n, t in bench.targets.items() if not t.get("hidden")]
    rows = table(res, names)
    targets = evaluate(res)
    res["targets"] = targets
    out = Path(args.out) if args.out else (BENCH / "out" if args.only else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-results.json").write_text(json.dumps(res, indent=1, default=str))
    try:
        chart(res, names, out / "bench-results.png")
    except Exception as err:  # a chart must not lose the numbers
        log(f"chart failed: {err!r}")
    write_markdown(res, rows, targets, out / "benchmarks.md", command)
    print(render(rows))
    print()
    for t in targets:
        verdict = "n/a " if t["met"] is None else ("MET " if t["met"] else "MISS")
        print(f"{verdict}  {t['target']}: {t['value']} (target {t['limit']})")
    print(f"\nwrote {out / 'bench-results.json'}, {out / 'bench-results.png'}, {out / 'benchmarks.md'} "
          f"in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
