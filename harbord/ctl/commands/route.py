"""harborctl route: GET /harbor/route, the plan harbord would follow, with its reasons."""

from __future__ import annotations

import argparse

from harbord import harbor_endpoints as api
from harbord.ctl import EX_FAILED, EX_OK, output
from harbord.ctl.http import Daemon
from harbord.schemas import INTENTS, Plan

HELP = "show which backends a request for MODEL would go to, and why"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--intent", choices=INTENTS, help="as the X-Harbor-Intent header would")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.ROUTE, model=args.model, intent=args.intent)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(render(answer.value))
    return EX_OK if answer.value.steps else EX_FAILED


def render(plan: Plan, indent: str = "") -> str:
    """The plan's steps and left-out backends; shared with `explain`."""
    lines = [
        f"{indent}{plan.model or '-'}: intent {plan.intent} (from {plan.intent_source})"
        + (", backend forced by the request" if plan.forced else "")
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
    return "\n".join(lines)
