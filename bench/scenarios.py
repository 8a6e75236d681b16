"""The scenarios: added latency, streaming, many streams, start-up, routing cost, backend check, profile.

Each `scenario_*` drives the targets `Stack` started with the load generator and stores
its medians in `self.results`; `run()` runs the ones asked for, in an order that keeps
CPU 1 quiet for the start-up and policy timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import BENCH, ROOT, SystemLoad, chat_body, cpu_seconds, http_get, log, med, mem_kb, rss_mb
from stack import Stack


class Bench(Stack):
    """The scenarios over the stack; `run()` returns every result as one dict."""

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
                subprocess.run(cmd, cwd=ROOT, capture_output=True, env=self.bytecode_env(dict(os.environ)),
                               preexec_fn=(lambda: os.sched_setaffinity(0, {self.PROXY_CPU})) if self.pin else None)
                ts.append((time.perf_counter() - t0) * 1000)
            floors[label] = med(ts)
        out = {k: med([r[k] for r in runs]) for k in ("accept_ms", "status_ms", "ready1_ms")}
        out["runs"] = runs
        out["floors_ms"] = floors
        for name in ("nginx", "litellm (ollama_chat)"):
            if name in self.targets:
                out[f"{name.split()[0]}_ready_ms"] = self.targets[name]["start_s"] * 1000
        out["bytecode"] = "cached" if self.args.bytecode_cache else "as the environment says"
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
