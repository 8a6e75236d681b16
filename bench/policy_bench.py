#!/usr/bin/env python3
"""Scenario 5: what one routing decision costs, and the rest of harbord's per-request
bookkeeping that runs on the event loop (no I/O), in microseconds per call.

  plan/*       harbord.policy.plan(...) with BackendViews built as tests/test_policy.py does
  harbor.plan  Harbor.plan(...) on a Harbor built from a real config (two backends, inventory set)
  request/*    the other CPU work `server.routed` and `relay.Relay` do per request, one piece
               at a time, so the profile's numbers can be read against them

Prints one JSON object. Run from the repository root:

    python3 bench/policy_bench.py [--quick] [--timer wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harbord import config  # noqa: E402
from harbord.config import MODEL_RE, ModelRule  # noqa: E402
from harbord.harbor import Harbor  # noqa: E402
from harbord.ledger import new_request_id  # noqa: E402
from harbord.policy import BackendView, RouteRequest, plan  # noqa: E402
from harbord.relay import upstream_headers  # noqa: E402
from harbord.schemas import Affinity, Decision, MemoryBudget, ModelFacts, Pin  # noqa: E402

NOW = 1_000_000.0
GB = 1_000_000_000
GPU = BackendView("gpu", "gpu", "up", models={"llama3.2:latest": 2 * GB, "big:13b": 8 * GB},
                  memory_limit=6 * GB)
CPU = BackendView("cpu", "cpu", "up", models={"llama3.2:latest": 2 * GB, "big:13b": 8 * GB})
# Placement (issue 11): the views as the daemon fills them, with a memory budget,
# load and service times, and model facts for the KV-cache estimate.
GIB = 1024**3
FACTS = {"llama3.1:8b": ModelFacts("llama", 32, 4096, 32, 8, context_length=131072)}
PLACED_MODELS = {"llama3.1:8b": 4_900_000_000, "llama3.2:latest": 2 * GB}
GPU_P = BackendView("gpu", "gpu", "up", models=PLACED_MODELS, budget=MemoryBudget(8 * GIB, "journal"),
                    service_ms={"llama3.1:8b": 1000.0})
CPU_P = BackendView("cpu", "cpu", "up", models=PLACED_MODELS, parallel=2)
BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}'


# Wall time by default. On a machine shared with other work, `--timer cpu` counts this
# process's CPU time only (time.process_time), which is what a decision costs.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def per_call_us(fn, quick: bool) -> float:  # type: ignore[no-untyped-def]
    timer = timeit.Timer(fn, timer=_clock)
    number = 100
    while timer.timeit(number) < 0.01:  # calibrate to >= ~20 ms per run
        number *= 2
    number *= 2
    runs = timer.repeat(repeat=3 if quick else 7, number=number)
    return statistics.median(runs) / number * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timer", choices=sorted(CLOCK), default="wall")
    args = p.parse_args()
    quick = args.quick
    global _clock
    _clock = CLOCK[args.timer]
    logging.basicConfig(level=logging.WARNING)  # as harbord at log_level = "warning"
    results: dict[str, float] = {}
    views = (GPU, CPU)
    cases = {
        "plan/fast (typical)": (RouteRequest("llama3.2"), views, {}, {}, {}),
        "plan/heavy header": (RouteRequest("llama3.2", intent_header="heavy"), views, {}, {}, {}),
        "plan/pinned": (RouteRequest("llama3.2"), views,
                        {"llama3.2:latest": Pin("cpu", "operator", NOW - 10)}, {}, {}),
        "plan/affinity": (RouteRequest("llama3.2"), views, {},
                          {"llama3.2:latest": Affinity("cpu", NOW - 10)}, {}),
        "plan/too big for gpu": (RouteRequest("big:13b"), views, {}, {}, {}),
        "plan/model rule": (RouteRequest("llama3.2"), views, {}, {},
                            {"llama3.2": ModelRule(intent="heavy")}),
        "plan/gpu down": (RouteRequest("llama3.2"), (replace(GPU, health="down"), CPU), {}, {}, {}),
        "plan/forced backend": (RouteRequest("llama3.2", forced_backend="cpu"), views, {}, {}, {}),
        "plan/placement: fits at default context": (RouteRequest("llama3.1:8b"), (GPU_P, CPU_P), {}, {}, {}),
        "plan/placement: memory (64k does not fit)": (RouteRequest("llama3.1:8b", num_ctx=65536),
                                                      (GPU_P, CPU_P), {}, {}, {}),
        "plan/placement: spill learned at 32k": (
            RouteRequest("llama3.1:8b", num_ctx=32768),
            (replace(GPU_P, budget=None, spilled_contexts={"llama3.1:8b": 32768}), CPU_P), {}, {}, {}),
        "plan/placement: busy spill to the cpu": (
            RouteRequest("llama3.1:8b"), (replace(GPU_P, in_flight=1, queued=6), CPU_P), {}, {}, {}),
        "plan/placement: gpu busy, stays": (
            RouteRequest("llama3.1:8b"), (replace(GPU_P, in_flight=1), CPU_P), {}, {}, {}),
        "plan/placement: affinity between two gpus": (
            RouteRequest("llama3.1:8b"), (GPU_P, replace(GPU_P, name="gpu2"), CPU_P), {},
            {"llama3.1:8b": Affinity("gpu2", NOW - 10, NOW - 5)}, {}),
    }
    for name, (req, bvs, pins, aff, rules) in cases.items():
        results[name] = per_call_us(lambda req=req, bvs=bvs, pins=pins, aff=aff, rules=rules:
                                    plan(req, bvs, pins, aff, rules, "fast", NOW, model_facts=FACTS), quick)

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "harbord.toml"
        cfg_path.write_text('log_level = "warning"\n[backends.gpu]\nurl = "http://127.0.0.1:1"\nkind = "gpu"\n'
                            '[backends.cpu]\nurl = "http://127.0.0.1:2"\nkind = "cpu"\n')
        cfg = config.load(config.Overrides(config=str(cfg_path), state_dir=tmp, socket=f"{tmp}/s.sock"),
                          env={})
        harbor = Harbor(cfg)
        for b in harbor.backends.values():
            b.health = "up"
            b.set_inventory({"llama3.2:latest": 2 * GB}, [])
        req = RouteRequest("llama3.2")
        results["harbor.plan (Harbor.plan, 2 backends)"] = per_call_us(lambda: harbor.plan(req), quick)

        # The rest of the per-request work in server.routed / relay, piece by piece.
        import importlib

        import msgspec
        from harbord.schemas import RequestFacts

        _log_decision = None
        for module in ("harbord.relay", "harbord.server"):  # it has moved between them
            _log_decision = getattr(importlib.import_module(module), "_log_decision", None)
            if _log_decision is not None:
                break

        facts_decoder = msgspec.json.Decoder(RequestFacts)
        results["request/decode RequestFacts (msgspec)"] = per_call_us(lambda: facts_decoder.decode(BODY), quick)
        results["request/MODEL_RE.match"] = per_call_us(lambda: MODEL_RE.match("llama3.2"), quick)
        results["request/new_request_id"] = per_call_us(new_request_id, quick)
        the_plan = harbor.plan(req)

        def make_decision() -> Decision:
            return Decision(id="1-1", time=time.time(), method="POST", path="/api/chat",
                            model=the_plan.model, intent=the_plan.intent, plan=the_plan)

        results["request/Decision(...)"] = per_call_us(make_decision, quick)
        d = make_decision()
        d.served_by, d.status, d.duration_ms = "gpu", 200, 0.4
        results["request/ledger.close(decision)"] = per_call_us(lambda: harbor.ledger.close(make_decision()), quick)
        if _log_decision is not None:
            try:
                _log_decision(d)
            except Exception:  # its signature may have changed: skip it then
                _log_decision = None
        if _log_decision is not None:
            results["request/_log_decision at WARNING (logged nowhere)"] = per_call_us(
                lambda: _log_decision(d), quick)  # type: ignore[misc]
        headers = {"Host": "localhost", "User-Agent": "ollama-python/0.4", "Accept": "application/json",
                   "Content-Type": "application/json", "Content-Length": "80"}
        from multidict import CIMultiDict

        cim = CIMultiDict(headers)
        results["request/upstream_headers(...)"] = per_call_us(lambda: upstream_headers(cim), quick)
        total = sum(v for k, v in results.items() if k.startswith("request/")) + \
            results["harbor.plan (Harbor.plan, 2 backends)"]
        results["request/sum of the above + Harbor.plan"] = total

    json.dump({"us_per_call": results, "timer": args.timer, "python": sys.version.split()[0]},
              sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
