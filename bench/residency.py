#!/usr/bin/env python3
"""Residency under workloads that use more than one model (issue 16), harbord against a user
without it (every request straight to the GPU Ollama).

    python3 bench/residency.py            # ~3 minutes
    python3 bench/residency.py --quick    # ~1.5 minutes
    python3 bench/run.py --only residency # the same, from the suite's entry point

The fakes behave like the issue's workstation (tests/fakeollama): a 12 GiB GPU holding one
model at a time (OLLAMA_MAX_LOADED_MODELS=1, as the shipped unit), 1.5 s loads, a chat's first
token in 150 ms, an embedding in 5 ms; a CPU holding three, a chat's first token in 1 s, an
embedding in 30 ms. harbord is given neither capacity nor speeds: it learns them.

Scenarios, each with fresh processes, each run twice (through harbord, and straight to the GPU):

- rag:  a retrieval-augmented chat: each turn embeds the question (nomic-embed-text), then
        streams the answer (llama3.1), no intent; a turn every 0.6-1 s (about 50 turns in
        the full run: the two turns harbord learns in are under its p95 only past 40).
- day:  a model-switching day: the same chat every 2-3 s, an embedding before each chat, a
        small task model (llama3.2:1b, a title) after every third chat, and one coding agent
        (qwen2.5-coder:7b at num_ctx 16384, back to back, no intent).
- idle: the chat alone on a warm GPU: the first token's idle value.

Reported per scenario: the chat's time to first token p50/p95 (and the RAG turn's, embedding
included) against its idle value, and model loads per 100 requests (counted by the fakes).
Targets: the RAG turn's p95 within 1.5x of the idle first token; loads per 100 requests at most
a fifth of the straight-to-GPU figure. It writes bench/residency-results.md and
bench/out/residency-results.json; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from placement import GIB, ROOT, Procs, ensure_deps, pct, start_harbord
from placement import start_fake as placement_fake

CHAT, EMBED, TASK, CODER = "llama3.1:8b", "nomic-embed-text:latest", "llama3.2:1b", "qwen2.5-coder:7b"
MODELS = {CHAT: 4_920_753_328, EMBED: 274_302_450, TASK: 1_321_098_329, CODER: 4_683_087_332}
# model_info: blocks, embedding length, heads, KV heads, trained context
MODEL_INFO = {CHAT: "32,4096,32,8,131072", EMBED: "12,768,12,12,2048", TASK: "16,2048,32,8,131072",
              CODER: "28,3584,28,4,32768"}
GPU_FLAGS = ["--vram", str(12 * GIB), "--max-loaded", "1", "--load-time", "1.5",
             f"--load-time={EMBED}=0.4", f"--load-time={TASK}=0.6", "--prompt-delay", "0.15",
             "--embed-time", "0.005", "--tokens-per-second", "60", "--parallel", "1"]
CPU_FLAGS = ["--cpu", "--max-loaded", "3", "--load-time", "1.0", f"--load-time={EMBED}=0.3",
             "--prompt-delay", "1", "--embed-time", "0.03", "--tokens-per-second", "10", "--parallel", "2"]
CHAT_TOKENS = 16
P95_LIMIT = 1.5
LOADS_LIMIT = 0.2


def log(msg: str) -> None:
    print(f"[residency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def start_fake(procs: Procs, name: str, flags: list[str]) -> int:
    return await placement_fake(procs, name, flags, MODELS, MODEL_INFO)


@dataclass
class Sample:
    what: str  # chat, embed, task, agent
    ms: float  # first token (chat, task, agent) or whole answer (embed)
    backend: str
    error: str = ""


@dataclass
class Run:
    scenario: str
    route: str  # harbord, straight
    samples: list[Sample] = field(default_factory=list)
    turns_ms: list[float] = field(default_factory=list)  # rag: embed + chat first token
    loads: int = 0
    requests: int = 0


class Client:
    """Requests to harbord's socket, or straight to the GPU fake over TCP."""

    def __init__(self, session: Any, base: str) -> None:
        self.session, self.base = session, base

    async def chat(self, model: str, prompt: str, num_ctx: int | None = None, tokens: int = CHAT_TOKENS) -> Sample:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                "stream": True, "options": {"num_predict": tokens}}
        if num_ctx:
            body["options"]["num_ctx"] = num_ctx
        t0 = time.monotonic()
        first: float | None = None
        async with self.session.post(f"{self.base}/api/chat", data=json.dumps(body)) as resp:
            backend = resp.headers.get("X-Harbor-Backend", "gpu")
            if resp.status != 200:
                return Sample("chat", 0.0, backend, f"{resp.status} {(await resp.text())[:120]}")
            async for line in resp.content:
                if first is None and line.strip() and b'"content":"' in line and b'"content":""' not in line:
                    first = time.monotonic() - t0
        return Sample("chat", (first or time.monotonic() - t0) * 1000, backend)

    async def embed(self, text: str) -> Sample:
        t0 = time.monotonic()
        body = json.dumps({"model": EMBED, "input": text})
        async with self.session.post(f"{self.base}/api/embed", data=body) as resp:
            await resp.read()
            return Sample("embed", (time.monotonic() - t0) * 1000, resp.headers.get("X-Harbor-Backend", "gpu"),
                          "" if resp.status == 200 else str(resp.status))


async def fake_loads(ports: list[int]) -> int:
    """Loads the fakes counted, asked over TCP (a session on harbord's socket would send
    every URL to harbord, which passes /_fake/stats to the GPU)."""
    import aiohttp

    total = 0
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/_fake/stats") as resp:
                total += int((await resp.json()).get("loads", 0))
    return total


async def scenario(procs: Procs, name: str, route: str, duration: float, seed: int) -> Run:
    import aiohttp

    gpu = await start_fake(procs, f"{name}-{route}-gpu", GPU_FLAGS)
    ports = [gpu]
    if route == "harbord":
        cpu = await start_fake(procs, f"{name}-{route}-cpu", CPU_FLAGS)
        ports.append(cpu)
        sock = await start_harbord(procs, f"{name}-{route}-harbord", {"gpu": gpu, "cpu": cpu}, vram_key=False)
        connector: Any = aiohttp.UnixConnector(path=str(sock), limit=0)
        base = "http://harbord"
    else:
        connector, base = aiohttp.TCPConnector(limit=0), f"http://127.0.0.1:{gpu}"
    rng = random.Random(seed)
    run = Run(name, route)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        client = Client(session, base)
        run.samples.append(await client.chat(CHAT, "warm up"))  # the chat model is warm, as a user's is
        before = await fake_loads(ports)
        t_close = time.monotonic() + duration
        n = 0

        async def agent() -> None:
            k = 0
            while time.monotonic() < t_close:
                k += 1
                sample = await client.chat(CODER, f"[step {k}] fix the failing test", num_ctx=16384, tokens=60)
                sample.what = "agent"
                run.samples.append(sample)

        agent_task = asyncio.create_task(agent()) if name == "day" else None
        while time.monotonic() < t_close:
            n += 1
            t = time.monotonic()
            if name in ("rag", "day"):
                e = await client.embed(f"question {n}")
                run.samples.append(e)
            c = await client.chat(CHAT, f"question {n}: what is a tuple?")
            run.samples.append(c)
            if name == "rag":
                run.turns_ms.append(e.ms + c.ms)
            if name == "day" and n % 3 == 0:
                s = await client.chat(TASK, f"a title for chat {n}", tokens=8)
                s.what = "task"
                run.samples.append(s)
            gap = (0.6, 1.0) if name == "rag" else (2.0, 3.0) if name == "day" else (0.5, 1.0)
            await asyncio.sleep(max(0.0, t + rng.uniform(*gap) - time.monotonic()))
        if agent_task is not None:
            await agent_task
        run.loads = await fake_loads(ports) - before
    procs.stop_all()
    run.requests = len(run.samples) - 1  # not the warm-up
    return run


def summary(run: Run) -> dict[str, Any]:
    chats = [s.ms for s in run.samples[1:] if s.what == "chat" and not s.error]
    out: dict[str, Any] = {
        "chat_ttft_p50_ms": pct(chats, 50), "chat_ttft_p95_ms": pct(chats, 95), "chats": len(chats),
        "requests": run.requests, "loads": run.loads,
        "loads_per_100": round(100 * run.loads / run.requests, 1) if run.requests else None,
        "errors": sum(1 for s in run.samples if s.error),
        "served": {w: dict(sorted({s.backend: sum(1 for x in run.samples[1:] if x.what == w and x.backend == s.backend)
                                   for s in run.samples[1:] if s.what == w}.items()))
                   for w in sorted({s.what for s in run.samples[1:]})},
    }
    if run.turns_ms:
        out["turn_p50_ms"], out["turn_p95_ms"] = pct(run.turns_ms, 50), pct(run.turns_ms, 95)
        out["turns_ms"] = [round(t) for t in run.turns_ms]
    out["calls"] = [(s.what, s.backend, round(s.ms)) for s in run.samples]
    return out


def report(results: dict[str, dict[str, Any]], idle_p50: float, idle_p95: float, command: str) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    lines = ["# Residency (issue 16): harbord against every request straight to the GPU", "",
             f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Idle: the chat alone on a warm GPU, first token p50 {ms(idle_p50)}, p95 {ms(idle_p95)}.", "",
             "| scenario | route | chat first token p50 / p95 | vs idle p95 | RAG turn p50 / p95 | vs idle p95 "
             "| loads / 100 requests | requests | errors | served by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in results.items():
        scen, route = key.split("/")
        turn = f"{ms(s.get('turn_p50_ms'))} / {ms(s.get('turn_p95_ms'))}" if "turn_p95_ms" in s else "-"
        turn_x = f"{s['turn_p95_ms'] / idle_p95:.2f}x" if "turn_p95_ms" in s else "-"
        lines.append(f"| {scen} | {route} | {ms(s['chat_ttft_p50_ms'])} / {ms(s['chat_ttft_p95_ms'])} | "
                     f"{(s['chat_ttft_p95_ms'] or 0) / idle_p95:.2f}x | {turn} | {turn_x} | {s['loads_per_100']} | "
                     f"{s['requests']} | {s['errors']} | {s['served']} |")
    lines += ["", "Targets:"]
    rag = results.get("rag/harbord")
    if rag and "turn_p95_ms" in rag:
        x = rag["turn_p95_ms"] / idle_p95
        lines.append(f"- {'MET ' if x <= P95_LIMIT else 'MISS'} RAG turn p95 {x:.2f}x the idle first token "
                     f"(target <= {P95_LIMIT}x)")
    for scen in ("rag", "day"):
        h, s = results.get(f"{scen}/harbord"), results.get(f"{scen}/straight")
        if h and s and s["loads_per_100"]:
            ratio = h["loads_per_100"] / s["loads_per_100"]
            lines.append(f"- {'MET ' if ratio <= LOADS_LIMIT else 'MISS'} {scen}: {h['loads_per_100']} loads per 100 "
                         f"requests, {ratio:.2f} of straight-to-GPU's {s['loads_per_100']} (target <= {LOADS_LIMIT})")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="harbord-residency-") as tmp:
        procs = Procs(Path(tmp))
        try:
            idle = await scenario(procs, "idle", "harbord", args.duration / 2, args.seed)
            idle_chats = [s.ms for s in idle.samples[1:] if s.what == "chat"]
            idle_p50, idle_p95 = pct(idle_chats, 50) or 1.0, pct(idle_chats, 95) or 1.0
            log(f"idle chat first token p50 {idle_p50:.0f} ms, p95 {idle_p95:.0f} ms")
            for scen in ("rag", "day"):
                for route in ("harbord", "straight"):
                    run = await scenario(procs, scen, route, args.duration, args.seed)
                    results[f"{scen}/{route}"] = s = summary(run)
                    log(f"{scen} {route}: {s}")
        finally:
            procs.stop_all()
    command = "python3 bench/residency.py" + (" --quick" if args.quick else "")
    text = report(results, idle_p50, idle_p95, command)
    print(text)
    Path(args.md).write_text(text)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "residency-results.json").write_text(json.dumps(
        {"idle_p50_ms": idle_p50, "idle_p95_ms": idle_p95, "results": results}, indent=1))
    return 0


def main() -> int:
    ensure_deps()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 s per scenario instead of 40 s")
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--md", default=str(ROOT / "bench" / "residency-results.md"))
    args = p.parse_args()
    if args.duration is None:
        args.duration = 20.0 if args.quick else 40.0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
