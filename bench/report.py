"""The report's numbers: the machine, the issue's targets met or not, the results table.

`machine()` says what ran where; `evaluate()` checks issue 5's targets; `table()` lays the
results out one row per metric and one column per target, which `render()` prints and
`markdown_table()` writes into docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import time
from typing import Any

from harness import ROOT


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
