#!/usr/bin/env python3
"""Placement under a workload a user would recognise (issue 11): an interactive chat beside two
coding agents, through a real harbord, in front of two fake Ollama servers that behave like a
12 GiB GPU holding one model at a time and a CPU that runs two requests at once.

    python3 bench/placement.py            # 3 phases of 60 s, ~4 minutes
    python3 bench/placement.py --quick    # 3 phases of 20 s, ~1.5 minutes
    python3 bench/run.py --only placement # the same, from the suite's entry point

Phases, each with freshly started processes (no state carried over):

- idle:      harbord (gpu + cpu backends), the chat alone;
- mix:       harbord (gpu + cpu backends), the chat and two agent loops;
- cpu-alone: harbord with the cpu backend only, the two agent loops alone (the baseline for
             "the agents complete at least as many calls as on the CPU alone").

The chat: llama3.2:3b, `X-Harbor-Intent: fast`, default context, a short answer, one chat every
2-3 s (a user reads the answer, then types); its time to first token is measured from sending the
request to the first NDJSON chunk with content. The agents: codellama:13b with `options.num_ctx:
16384`, 100-200 output tokens per call, back to back, with no intent (coding agents do not set
harbord's header, so harbord's `routing.default_intent`, `fast`, applies). Targets (issue 11):
the chat's p95 under the mix within 1.5x of its idle p95; the agents' completed calls under the
mix at least their completed calls on the CPU alone.

It writes bench/placement-results.md (and bench/out/placement-results.json). Needs harbord's
dependencies (aiohttp, msgspec): run with any python3, it re-executes itself with the project's
.venv/bin/python, else bench/.venv/bin/python (made by bench/run.py). Everything runs on
127.0.0.1 and Unix sockets in a temp dir; every process it starts is stopped at the end, on an
error or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FAKE = ROOT / "tests" / "fakeollama"  # a package: python runs its __main__.py
GIB = 1024**3

CHAT_MODEL, CHAT_SIZE = "llama3.2:3b", 2_019_393_189
AGENT_MODEL, AGENT_SIZE = "codellama:13b", 7_365_960_935
AGENT_CTX = 16384
# model_info: blocks, embedding length, heads, KV heads, trained context (llama3.2 3B; llama 2 13B)
MODEL_INFO = {CHAT_MODEL: "28,3072,24,8,131072", AGENT_MODEL: "40,5120,40,40,16384"}
GPU_VRAM = 12 * GIB
CPU_RAM = 64 * GIB
GPU_FLAGS = ["--vram", str(GPU_VRAM), "--max-loaded-models", "1", "--load-time", "1.5",
             "--prompt-delay", "0.15", "--tokens-per-second", "60", "--parallel", "1"]
CPU_FLAGS = ["--cpu", "--prompt-delay", "1", "--tokens-per-second", "10", "--parallel", "2"]
CHAT_TOKENS = 24
CHAT_GAP = (2.0, 3.0)
AGENT_TOKENS = (100, 200)
AGENTS = 2
P95_LIMIT = 1.5
AGENT_PROMPT = ("You are a coding agent. Here is the repository context and the failing test.\n"
                + "def f(x):\n    return x + 1\n" * 40 + "Fix the bug and explain the change.")


def log(msg: str) -> None:
    print(f"[placement {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_deps() -> None:
    """Re-exec with a python that has harbord's dependencies (the project's venv, else the bench's)."""
    try:
        import aiohttp  # noqa: F401
        import msgspec  # noqa: F401
    except ImportError:
        for py in (ROOT / ".venv" / "bin" / "python", BENCH / ".venv" / "bin" / "python"):
            # A venv's python is a symlink to the base one: tell them apart by sys.prefix.
            if py.exists() and Path(sys.prefix).resolve() != py.parent.parent.resolve():
                os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit("bench/placement.py needs aiohttp and msgspec: make the project's venv (python3 -m venv .venv "
                 "&& .venv/bin/pip install -e .) or run python3 bench/run.py --only placement")


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process this run starts, stopped by pid at the end of a phase and of the run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=err, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def start_fake(procs: Procs, name: str, flags: list[str], sizes: dict[str, int] | None = None,
                     model_info: dict[str, str] | None = None) -> int:
    """A tests/fakeollama process with these models (default: this scenario's), its port."""
    ready = procs.tmp / f"{name}.port"
    sizes = sizes or {CHAT_MODEL: CHAT_SIZE, AGENT_MODEL: AGENT_SIZE}
    models = [f"--model={m}={s}" for m, s in sizes.items()]
    info = [f"--model-info={m}={v}" for m, v in (model_info or MODEL_INFO).items()]
    proc = procs.spawn(name, [sys.executable, str(FAKE), "--port", "0", "--name", name, "--ready-file", str(ready),
                              "--exit-with-parent", *models, *info, *flags])
    for _ in range(300):
        if ready.exists() and ready.read_text().strip():
            return int(ready.read_text())
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"fake {name} did not start:\n{log_tail(procs.tmp / f'{name}.log')}")


def harbord_config(path: Path, backends: dict[str, int], vram_key: bool) -> None:
    text = 'log_level = "warning"\n'
    for kind, port in backends.items():
        text += f'[backends.{kind}]\nurl = "http://127.0.0.1:{port}"\nkind = "{kind}"\n'
        if kind == "gpu" and vram_key:
            text += f"vram = {GPU_VRAM}\n"
        if kind == "cpu":
            # The workstation's RAM, not this machine's: two 16k agents of a 13B model on a
            # CPU serving two at a time take 34.5 GiB (Ollama sizes the KV cache per slot),
            # which a bench machine with less would refuse before asking the CPU fake.
            text += f"ram = {CPU_RAM}\n"
    path.write_text(text)


async def start_harbord(procs: Procs, name: str, backends: dict[str, int], vram_key: bool) -> Path:
    """harbord as bench/run.py starts it: its own runtime, config and state dirs in the temp dir."""
    import aiohttp

    run_dir = procs.tmp / name
    run_dir.mkdir(mode=0o700)
    cfg = procs.tmp / f"{name}.toml"
    harbord_config(cfg, backends, vram_key)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "OLLAMA_", "HARBOR_"))}
    env.update(XDG_RUNTIME_DIR=str(run_dir), XDG_CONFIG_HOME=str(run_dir / "config"),
               XDG_STATE_HOME=str(run_dir / "state"))
    proc = procs.spawn(name, [sys.executable, "-m", "harbord", "--config", str(cfg), "--state-dir",
                              str(run_dir / "state")], env=env)
    sock = run_dir / "harbor.sock"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        if sock.exists():
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s, \
                        s.get("http://harbord/harbor/status") as resp:
                    status = await resp.json()
                # an early answer may be an error document (still starting): wait for the real status
                backends_seen = status.get("backends") if isinstance(status, dict) else None
                if backends_seen and all(b.get("health") == "up" for b in backends_seen):
                    return sock
        await asyncio.sleep(0.1)
    raise RuntimeError(f"harbord did not come up with every backend up:\n{log_tail(procs.tmp / f'{name}.log')}")


# --------------------------------------------------------------------------- the clients


@dataclass
class Call:
    started: float  # seconds since the phase's window opened
    finished: float = 0.0
    ttft_s: float | None = None
    backend: str = "?"
    loaded: bool = False  # the final chunk's load_duration says this call loaded the model
    tokens: int = 0
    error: str = ""


async def chat_call(session: Any, t_open: float, model: str, tokens: int, *, intent: str | None,
                    num_ctx: int | None, prompt: str) -> Call:
    import aiohttp

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                            "options": {"num_predict": tokens}}
    if num_ctx is not None:
        body["options"]["num_ctx"] = num_ctx
    headers = {"Content-Type": "application/json"}
    if intent is not None:
        headers["X-Harbor-Intent"] = intent
    t0 = time.monotonic()
    call = Call(started=t0 - t_open)
    try:
        async with session.post("http://harbord/api/chat", data=json.dumps(body), headers=headers) as resp:
            call.backend = resp.headers.get("X-Harbor-Backend", "?")
            if resp.status != 200:
                call.error = f"{resp.status} {(await resp.text())[:200]}"
            else:
                async for line in resp.content:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if "error" in obj:
                        call.error = str(obj["error"])[:200]
                        break
                    if obj.get("message", {}).get("content"):
                        call.tokens += 1
                        if call.ttft_s is None:
                            call.ttft_s = time.monotonic() - t0
                    if obj.get("done"):
                        call.loaded = obj.get("load_duration", 0) > 0.5e9
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as err:
        call.error = f"{type(err).__name__}: {err}"[:200]
    call.finished = time.monotonic() - t_open
    return call


@dataclass
class PhaseResult:
    name: str
    duration_s: float
    chats: list[Call] = field(default_factory=list)
    agent_calls: list[Call] = field(default_factory=list)  # completed inside the window
    agent_in_flight: int = 0  # calls still running when the window closed (not counted)


async def run_phase(sock: Path, name: str, duration: float, chat: bool, agents: int, seed: int) -> PhaseResult:
    import aiohttp

    rng = random.Random(seed)
    result = PhaseResult(name, duration)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock), limit=0),
                                     timeout=timeout) as session:
        if chat:  # the chat model is warm before the window, as a user's chat model would be
            warm = await chat_call(session, time.monotonic(), CHAT_MODEL, CHAT_TOKENS, intent="fast",
                                   num_ctx=None, prompt="Hi.")
            if warm.error:
                raise RuntimeError(f"warm-up chat failed: {warm.error}")
        t_open = time.monotonic()
        t_close = t_open + duration

        async def chat_loop() -> None:
            n = 0
            while time.monotonic() < t_close:
                n += 1
                t = time.monotonic()
                result.chats.append(await chat_call(session, t_open, CHAT_MODEL, CHAT_TOKENS, intent="fast",
                                                    num_ctx=None, prompt=f"Quick question {n}: what is a tuple?"))
                # the next chat 2-3 s after this one started, or at once if this one took longer
                await asyncio.sleep(max(0.0, t + rng.uniform(*CHAT_GAP) - time.monotonic()))

        async def agent_loop(i: int) -> None:
            lengths = random.Random(seed * 100 + i)  # each agent's own sequence, whatever the interleaving
            n = 0
            while True:
                n += 1
                c = await chat_call(session, t_open, AGENT_MODEL, lengths.randint(*AGENT_TOKENS), intent=None,
                                    num_ctx=AGENT_CTX, prompt=f"[agent {i} step {n}] {AGENT_PROMPT}")
                if c.finished <= duration:
                    result.agent_calls.append(c)
                if c.error:
                    await asyncio.sleep(0.5)  # an agent retries, but not in a tight loop

        agent_tasks = [asyncio.create_task(agent_loop(i)) for i in range(agents)]
        if chat:
            await chat_loop()  # the last chat started before the window closed; it finishes
        await asyncio.sleep(max(0.0, t_close - time.monotonic()))
        result.agent_in_flight = len(agent_tasks)
        for task in agent_tasks:
            task.cancel()
        await asyncio.gather(*agent_tasks, return_exceptions=True)
    return result


# --------------------------------------------------------------------------- the phases


async def phase(procs: Procs, name: str, args: argparse.Namespace, *, kinds: tuple[str, ...], chat: bool,
                agents: int) -> PhaseResult:
    log(f"--- {name}: backends {'+'.join(kinds)}, chat {'on' if chat else 'off'}, {agents} agents, "
        f"{args.duration:.0f} s")
    backends: dict[str, int] = {}
    if "gpu" in kinds:
        backends["gpu"] = await start_fake(procs, f"{name}-gpu", GPU_FLAGS)
    if "cpu" in kinds:
        backends["cpu"] = await start_fake(procs, f"{name}-cpu", CPU_FLAGS)
    try:
        sock = await start_harbord(procs, f"{name}-harbord", backends, args.vram_key)
        res = await run_phase(sock, name, args.duration, chat, agents, seed=args.seed)
    finally:
        procs.stop_all()
    summary = summarize(res)
    if chat:
        log(f"{name}: chat TTFT p50 {fmt_ms(summary['chat']['ttft_p50_s'])}, p95 "
            f"{fmt_ms(summary['chat']['ttft_p95_s'])} over {summary['chat']['count']} chats, served by "
            f"{summary['chat']['backends']}")
    if agents:
        log(f"{name}: agents completed {summary['agents']['completed']} calls, served by "
            f"{summary['agents']['backends']}")
    return res


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: with ~25 chats, p95 is the second-slowest one."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(res: PhaseResult) -> dict[str, Any]:
    ok = [c for c in res.chats if not c.error and c.ttft_s is not None]
    ttfts = [c.ttft_s for c in ok if c.ttft_s is not None]
    done = [c for c in res.agent_calls if not c.error]
    return {
        "duration_s": res.duration_s,
        "chat": {
            "count": len(res.chats), "errors": len(res.chats) - len(ok),
            "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95),
            "ttft_max_s": max(ttfts, default=None),
            "backends": dict(Counter(c.backend for c in res.chats)),
            "loads": sum(c.loaded for c in res.chats),
        },
        "agents": {
            "completed": len(done), "errors": len(res.agent_calls) - len(done),
            "tokens": sum(c.tokens for c in done), "in_flight_at_close": res.agent_in_flight,
            "call_p50_s": pct([c.finished - c.started for c in done], 50),
            "backends": dict(Counter(c.backend for c in done)),
            "loads": sum(c.loaded for c in done),
        },
    }


# --------------------------------------------------------------------------- the report


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:,.0f} ms"


def git(*cmd: str) -> str:
    out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def evaluate(s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    idle, mix, cpu = s["idle"], s["mix"], s["cpu-alone"]
    i95, m95 = idle["chat"]["ttft_p95_s"], mix["chat"]["ttft_p95_s"]
    i50, m50 = idle["chat"]["ttft_p50_s"], mix["chat"]["ttft_p50_s"]
    ratio95 = m95 / i95 if i95 and m95 is not None else None
    ratio50 = m50 / i50 if i50 and m50 is not None else None
    return {
        "p95_ratio": ratio95, "p50_ratio": ratio50,
        "p95_met": ratio95 is not None and ratio95 <= P95_LIMIT,
        "agents_mix": mix["agents"]["completed"], "agents_cpu_alone": cpu["agents"]["completed"],
        "agents_met": mix["agents"]["completed"] >= cpu["agents"]["completed"],
    }


HISTORY_HEAD = ("| date | command | harbord/ | chat TTFT idle p50 / p95 | under the mix p50 / p95 | p95 ratio | "
                "agent calls mix / CPU alone |")


def history_row(out: dict[str, Any]) -> str:
    s, v = out["phases"], out["verdict"]
    idle, mix = s["idle"]["chat"], s["mix"]["chat"]
    ratio = "n/a" if v["p95_ratio"] is None else f"{v['p95_ratio']:.1f}x"
    return (f"| {out['date']} | `{out['command']}` | `{out['harbord_commit']}` | {fmt_ms(idle['ttft_p50_s'])} / "
            f"{fmt_ms(idle['ttft_p95_s'])} | {fmt_ms(mix['ttft_p50_s'])} / {fmt_ms(mix['ttft_p95_s'])} | {ratio} | "
            f"{v['agents_mix']} / {v['agents_cpu_alone']} |")


def history(previous: str, out: dict[str, Any]) -> list[str]:
    """The earlier runs' rows, kept from the previous report, and this run's row below them."""
    rows = [line for line in previous.splitlines() if line.startswith("| 20")]
    return ["## Runs so far", "", HISTORY_HEAD, "|---|---|---|---|---|---|---|", *rows, history_row(out)]


def markdown(out: dict[str, Any], previous: str = "") -> str:
    s, v = out["phases"], out["verdict"]
    idle, mix, cpu = s["idle"], s["mix"], s["cpu-alone"]

    def served(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {n}" for k, n in sorted(d.items())) or "-"

    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f}x"

    verdict = {True: "MET", False: "MISS"}
    lines = [
        "# Placement under a chat + coding-agents mix (issue 11)",
        "",
        f"Generated by `{out['command']}` on {out['date']} at commit `{out['commit']}` (harbord/ as last changed "
        f"in `{out['harbord_commit']}`" + (", with uncommitted changes" if out["dirty"] else "")
        + f"); {out['duration_s']:.0f} s per phase, "
        f"one run, on a {out['cpus']}-core machine shared with other work. Re-run after a change to placement "
        "with the same command (`python3 bench/run.py --only placement` runs it too).",
        "",
        "| | idle (chat alone) | mix (chat + 2 agents) | CPU alone (2 agents) |",
        "|---|---|---|---|",
        f"| chat time to first token, p50 | {fmt_ms(idle['chat']['ttft_p50_s'])} | "
        f"{fmt_ms(mix['chat']['ttft_p50_s'])} ({ratio(v['p50_ratio'])}) | |",
        f"| chat time to first token, p95 | {fmt_ms(idle['chat']['ttft_p95_s'])} | "
        f"{fmt_ms(mix['chat']['ttft_p95_s'])} ({ratio(v['p95_ratio'])}) | |",
        f"| chat time to first token, max | {fmt_ms(idle['chat']['ttft_max_s'])} | "
        f"{fmt_ms(mix['chat']['ttft_max_s'])} | |",
        f"| chats (errors) | {idle['chat']['count']} ({idle['chat']['errors']}) | "
        f"{mix['chat']['count']} ({mix['chat']['errors']}) | |",
        f"| chats served by | {served(idle['chat']['backends'])} | {served(mix['chat']['backends'])} | |",
        f"| chats that waited for a model load | {idle['chat']['loads']} | {mix['chat']['loads']} | |",
        f"| agent calls completed in the window (errors) | | {mix['agents']['completed']} "
        f"({mix['agents']['errors']}) | {cpu['agents']['completed']} ({cpu['agents']['errors']}) |",
        f"| agent output tokens in completed calls | | {mix['agents']['tokens']:,} | {cpu['agents']['tokens']:,} |",
        f"| agent call duration, p50 | | {fmt_ms(mix['agents']['call_p50_s'])} | "
        f"{fmt_ms(cpu['agents']['call_p50_s'])} |",
        f"| agent calls served by | | {served(mix['agents']['backends'])} | {served(cpu['agents']['backends'])} |",
        f"| agent calls that loaded the model | | {mix['agents']['loads']} | {cpu['agents']['loads']} |",
        "",
        "Targets (issue 11):",
        "",
        f"- {verdict[v['p95_met']]}: the chat's p95 under the mix within {P95_LIMIT}x of idle: "
        f"{ratio(v['p95_ratio'])}.",
        f"- {verdict[v['agents_met']]}: the agents complete at least as many calls under the mix as on the "
        f"CPU alone: {v['agents_mix']} vs {v['agents_cpu_alone']}.",
        "",
        "## Setup",
        "",
        "- harbord started as `bench/run.py` starts it (`python -m harbord --config X --state-dir Y`, its own "
        "XDG dirs, the Unix socket in a temp dir), `log_level = \"warning\"`, backends `gpu` and `cpu` with "
        "default keys" + (f", plus `vram = {GPU_VRAM}` (12 GiB) on `gpu`" if out["vram_key"] else
                          " (no `vram` key: harbord has to find the GPU's memory itself)")
        + f", and `ram = {CPU_RAM}` (64 GiB, a workstation's) on `cpu`.",
        f"- GPU: `python -m tests.fakeollama {' '.join(GPU_FLAGS)}` (12 GiB, one model loaded at a time, 1.5 s "
        "loads, 150 ms prompt, 60 tokens/s, one request at a time).",
        f"- CPU: `python -m tests.fakeollama {' '.join(CPU_FLAGS)}` (1 s prompt, 10 tokens/s, two at a time).",
        f"- Both list `{CHAT_MODEL}` ({CHAT_SIZE / 1e9:.1f} GB, model_info {MODEL_INFO[CHAT_MODEL]}) and "
        f"`{AGENT_MODEL}` ({AGENT_SIZE / 1e9:.1f} GB, model_info {MODEL_INFO[AGENT_MODEL]}: blocks, embedding, "
        f"heads, KV heads, context). At {AGENT_CTX:,} tokens the 13B model's f16 KV cache is "
        f"{2 * 40 * AGENT_CTX * 5120 * 2 / GIB:.1f} GiB, so weights + cache do not fit 12 GiB; the 3B chat "
        "model at the default 4,096 fits easily.",
        f"- The chat: `{CHAT_MODEL}`, `X-Harbor-Intent: fast`, no `num_ctx`, {CHAT_TOKENS} output tokens, a new "
        "chat 2-3 s after the previous one started (or as soon as it ends if it took longer); one warm-up "
        "chat before the window. Time to first token: request sent to the first NDJSON chunk with content, "
        "over harbord's socket. Percentiles are nearest-rank over the window's chats.",
        f"- The agents: {AGENTS} loops of `{AGENT_MODEL}` with `options.num_ctx: {AGENT_CTX}`, "
        f"{AGENT_TOKENS[0]}-{AGENT_TOKENS[1]} output tokens each, streamed, back to back, no intent: coding "
        "agents do not send harbord's header, so `routing.default_intent` (`fast`) applies. A call counts if "
        "it completed inside the window; calls still running at its end are dropped.",
        "- Each phase starts fresh fakes and a fresh harbord, so nothing learned carries over.",
        "",
        "## What to read into it",
        "",
        "- The fake GPU runs a spilled model as fast as one that fits (it only reports the spill in "
        "`/api/ps`); a real GPU whose model spilled to system RAM runs it several times slower, so the "
        "agents' calls on a spilled GPU are flattered here.",
        "- The CPU-alone figure is the agents with the CPU to themselves (harbord with the `cpu` backend only): "
        "what a placement that sends the 13B-at-16k model to the CPU should at least match.",
    ]
    if out.get("notes"):
        lines += ["", "## Notes from this run", "", *[f"- {n}" for n in out["notes"]]]
    lines += ["", *history(previous, out)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


async def amain(procs: Procs, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    phases: dict[str, dict[str, Any]] = {}
    plan = [("idle", ("gpu", "cpu"), True, 0), ("mix", ("gpu", "cpu"), True, AGENTS),
            ("cpu-alone", ("cpu",), False, AGENTS)]
    for name, kinds, chat, agents in plan:
        res = await phase(procs, name, args, kinds=kinds, chat=chat, agents=agents)
        # every call too, in the JSON only: which backend served which request, and when
        phases[name] = {**summarize(res), "chat_calls": [asdict(c) for c in res.chats],
                        "agent_calls": [asdict(c) for c in res.agent_calls]}
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description="placement under a chat + coding-agents mix (see the docstring)")
    p.add_argument("--quick", action="store_true", help="20 s per phase instead of 60")
    p.add_argument("--duration", type=float, default=None, help="seconds per phase (overrides --quick)")
    p.add_argument("--seed", type=int, default=11, help="seed for the chat gaps and the agents' lengths")
    p.add_argument("--no-vram-key", dest="vram_key", action="store_false",
                   help="leave `vram` out of the gpu backend's config (harbord finds the memory itself)")
    p.add_argument("--md", default=str(BENCH / "placement-results.md"), help="where the markdown report goes")
    p.add_argument("--json", default=str(BENCH / "out" / "placement-results.json"), help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with every process's log")
    p.add_argument("--harbord-commit", default=None,
                   help="the commit measured, when harbord/ is not a git checkout (an exported tree)")
    args = p.parse_args()
    ensure_deps()
    if args.duration is None:
        args.duration = 20.0 if args.quick else 60.0
    # SIGTERM ends the run like Ctrl-C: the finally below stops every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="harbord-placement-"))
    procs = Procs(tmp)
    # the commit checked out, and the last one that changed harbord/ (a bench-only commit on top changes nothing)
    commit = args.harbord_commit or git("rev-parse", "--short=12", "HEAD") or "unknown"
    harbord_commit = args.harbord_commit or git("log", "-1", "--format=%h", "--", "harbord") or "unknown"
    dirty = not args.harbord_commit and bool(git("status", "--porcelain", "--", "harbord"))
    t0 = time.monotonic()
    try:
        phases = asyncio.run(amain(procs, args))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    flags = (" --quick" if args.quick else "") + ("" if args.vram_key else " --no-vram-key")
    out: dict[str, Any] = {
        "command": "python3 bench/placement.py" + flags, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit, "harbord_commit": harbord_commit, "dirty": dirty, "cpus": os.cpu_count(),
        "duration_s": args.duration, "vram_key": args.vram_key, "wall_s": round(time.monotonic() - t0, 1),
        "phases": phases, "notes": [],
    }
    out["verdict"] = evaluate(phases)
    if dirty:
        out["notes"].append("harbord/ had uncommitted changes: the commit named is not all that ran")
    on_gpu = phases["mix"]["agents"]["backends"].get("gpu", 0)
    if on_gpu:
        out["notes"].append(
            f"{on_gpu} of the agents' {phases['mix']['agents']['completed']} calls under the mix ran on the GPU, "
            f"where the 13B model at {AGENT_CTX:,} context does not fit: each switch between the two models "
            f"reloads one ({phases['mix']['chat']['loads']} of {phases['mix']['chat']['count']} chats waited for "
            "a load), and the fake GPU admits waiting requests in arrival order, one at a time, so a chat also "
            "waits behind the agent call queued before it.")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    md = Path(args.md)
    md.write_text(markdown(out, md.read_text() if md.exists() else ""))
    v = out["verdict"]
    print(f"chat TTFT p95 idle {fmt_ms(phases['idle']['chat']['ttft_p95_s'])} -> mix "
          f"{fmt_ms(phases['mix']['chat']['ttft_p95_s'])} ({v['p95_ratio'] or 0:.1f}x, target <= {P95_LIMIT}x: "
          f"{'MET' if v['p95_met'] else 'MISS'}); agents {v['agents_mix']} calls vs {v['agents_cpu_alone']} on the "
          f"CPU alone ({'MET' if v['agents_met'] else 'MISS'}); wrote {args.md} and {args.json} "
          f"in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
