"""The report's chart: docs/bench-results.png, six panels of the results (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
