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

This file is the entry point (options, then the outputs); the rest lives beside it:
harness.py (venv, processes, /proc readings, the load generator's runs), stack.py
(the backends and proxies under test), scenarios.py (what is measured), report.py
(targets and the table), report_chart.py (the PNG) and report_md.py (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from harness import BENCH, ROOT, bootstrap, log
from report import evaluate, machine, render, table
from report_chart import chart
from report_md import write_markdown
from scenarios import Bench


def main() -> int:
    p = argparse.ArgumentParser(description="harbord's benchmark suite (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="one repetition, shorter runs, no profile (~1.5 min)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    p.add_argument("--no-litellm", dest="litellm", action="store_false")
    p.add_argument("--no-nginx", dest="nginx", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    p.add_argument("--no-bytecode-cache", dest="bytecode_cache", action="store_false",
                   help="start harbord with this environment's PYTHONDONTWRITEBYTECODE (modules compiled from "
                   "source at every start) instead of from cached bytecode as an installed harbord runs")
    p.add_argument("--nice", type=int, default=0, help="lower the bench's niceness by N (root; all its "
                   "processes inherit it) to be less disturbed by other load on a shared machine")
    p.add_argument("--only", default="", help="comma list of scenarios: backend,latency,stream,many,startup,"
                   "policy,profile (default: all), or placement / residency (bench/placement.py, "
                   "bench/residency.py, only when named)")
    p.add_argument("--out", default=None, help="where results go (default docs/; bench/out/ with --only)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs, profiles)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the table, chart and markdown from an existing bench-results.json")
    args = p.parse_args()
    bootstrap(Path(__file__))
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
    for script in ("placement", "residency"):  # their own scripts and reports, not in the full run
        if script not in only:
            continue
        cmd = [sys.executable, str(BENCH / f"{script}.py"), *(["--quick"] if args.quick else [])]
        if script == "placement" and args.keep:
            cmd.append("--keep")
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        only.remove(script)
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
