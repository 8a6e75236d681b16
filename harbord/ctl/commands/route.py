"""harborctl route: GET /harbor/route, the plan harbord would follow, with its reasons."""

from __future__ import annotations

import argparse

from harbord import harbor_endpoints as api
from harbord.ctl import EX_FAILED, EX_OK, output
from harbord.ctl.http import Daemon
from harbord.memory import format_context, format_gb, format_gib
from harbord.schemas import INTENTS, BackendEstimate, Plan

HELP = "show which backends a request for MODEL would go to, and why"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--intent", choices=INTENTS, help="as the X-Harbor-Intent header would")
    parser.add_argument(
        "--num-ctx", type=_tokens, metavar="N", help="the context, as options.num_ctx would"
    )


def _tokens(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 1, got {text!r}")
    return int(text)


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(
        api.ROUTE, model=args.model, intent=args.intent, num_ctx=args.num_ctx
    )
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(render(answer.value))
    return EX_OK if answer.value.steps else EX_FAILED


def render(plan: Plan, indent: str = "") -> str:
    """The plan's steps and left-out backends; shared with `explain`."""
    context = f", context {format_context(plan.num_ctx)}" if plan.num_ctx else ""
    lines = [
        f"{indent}{plan.model or '-'}: intent {plan.intent} (from {plan.intent_source}){context}"
        + (", backend forced by the request" if plan.forced else f"; decided by {plan.rule}")
    ]
    for i, step in enumerate(plan.steps, 1):
        lines.append(
            f"{indent}  {i}. {output.paint(step.backend, 'bold')}: {'; '.join(step.reasons)}"
        )
    if not plan.steps:
        lines.append(output.paint(f"{indent}  no backend can serve it", "red"))
    for step in plan.excluded:
        lines.append(f"{indent}  left out {step.backend}: {'; '.join(step.reasons)}")
    lines += [f"{indent}  note: {note}" for note in plan.notes]
    if plan.estimates:
        header = (
            "BACKEND",
            "CONTEXT",
            "NEEDS",
            "BUDGET",
            "RUNNING",
            "QUEUED",
            "TAKES",
            "DONE IN",
            "LOAD",
            "EVICTS",
        )
        rows = [_estimate(e) for e in plan.estimates]
        lines.append(output.table(header, rows, indent=f"{indent}  "))
        lines += [f"{indent}  {line}" for e in plan.estimates if (line := memory_parts(e))]
    if plan.refused:
        lines.append(output.paint(f"{indent}  refused: {plan.refused}", "red"))
    return "\n".join(lines)


def memory_parts(e: BackendEstimate) -> str | None:
    """`gpu: 17.4 GB weights + 3.3 GB KV + ... = 23.3 GB, estimated` (or measured)."""
    if e.needs is None or e.weights is None:
        return None
    parts = [
        (e.weights, "weights"),
        (e.kv, "KV"),
        (e.graph, "graph"),
        (e.projector, "projector"),
        (e.reserve, "reserve"),
    ]
    shown = " + ".join(f"{format_gb(size)} {name}" for size, name in parts if size)
    if e.needs_source == "measured" and e.measured_at:
        how = f"measured by Ollama at {format_context(e.measured_at)}"
        if e.measured_at != e.num_ctx:
            how += f", moved to {format_context(e.num_ctx)} by the estimate"
        return f"{e.backend}: {format_gb(e.needs)}, {how} (estimate: {shown})"
    return f"{e.backend}: {shown} = {format_gb(e.needs)}, estimated"


def _estimate(e: BackendEstimate) -> tuple[str, ...]:
    """One backend's numbers: the memory estimate against its budget, and its load."""
    budget = "-"
    if e.budget is not None:
        budget = format_gib(e.budget) + (f" ({e.budget_source})" if e.budget_source else "")
    return (
        e.backend,
        format_context(e.num_ctx),
        format_gb(e.needs) if e.needs is not None else "-",
        budget,
        f"{e.in_flight} of {e.parallel}",
        str(e.queued),
        output.millis(e.service_ms),
        output.millis(e.expected_finish_ms),
        _load(e),
        ", ".join(e.evicts) or "-",
    )


def _load(e: BackendEstimate) -> str:
    """Whether the model is loaded there, else the load it would take."""
    if e.resident is None:
        return "-"
    if e.resident:
        return "loaded"
    how = "learned" if e.load_learned else "estimated"
    return f"{output.millis(e.load_ms)} ({how})"
