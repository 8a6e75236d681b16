"""What the bench measures: the fake backends and every proxy under test, started and addressed.

`Stack` starts the two lean fake Ollamas (bench/backend.py), harbord (at warning and at
info level), the two bare relays (bench/bare_relay.py), nginx and LiteLLM's proxy, and
names each as a target the scenarios drive: its address, its process (whose CPU counts),
the shape of request it speaks and the target its added latency is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    MODEL,
    Procs,
    chat_body,
    ensure_litellm,
    ensure_nginx,
    free_port,
    http_get,
    loadgen,
    log,
    rss_mb,
    tree,
    v1_body,
    wait_http,
)


class Stack:
    """The processes under test and the targets they make (setup() starts them all)."""

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
        return self.bytecode_env(env)

    def bytecode_env(self, env: dict[str, str]) -> dict[str, str]:
        """harbord runs from cached bytecode, as an installed harbord does (pip compiles it).

        Where PYTHONDONTWRITEBYTECODE is set (as on the shared dev machine) every start would
        compile harbord's modules from source, ~30 ms of start-up no user pays. The cache sits
        in the temp dir; the first harbord started (setup) fills it.
        """
        if self.args.bytecode_cache:
            env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(self.tmp / "pycache")
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

    # -- the targets --------------------------------------------------------------

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
