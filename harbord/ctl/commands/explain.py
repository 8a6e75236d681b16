"""harborctl explain: how recent requests were routed, attempt by attempt."""

from __future__ import annotations

import argparse
import time

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, output
from harbord.ctl.commands import route
from harbord.ctl.http import Daemon
from harbord.schemas import Attempt, Decision

HELP = "show how a request (the last one by default) was routed and why"
TIMEOUT = 30.0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "request_id", metavar="REQUEST_ID", nargs="?",
        help="as in the X-Harbor-Request-Id header and harbord's log",
    )  # fmt: skip
    parser.add_argument(
        "--last", type=_count, default=1, metavar="N", help="the N latest requests (default: 1)"
    )


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    if args.request_id:
        one = daemon.client.fetch(api.DECISION, id=args.request_id)
        raw, decisions = one.raw, [one.value]
    else:
        many = daemon.client.fetch(api.DECISIONS, limit=args.last)
        raw, decisions = many.raw, many.value
    if args.json:
        output.raw_json(raw)
    elif not decisions:
        print("no recent requests")
    else:
        now = time.time()
        print("\n\n".join(render(d, now) for d in decisions))
    return EX_OK


def render(d: Decision, now: float) -> str:
    lines = [
        f"{output.paint('request ' + d.id, 'bold')}  {output.clock(d.time)}"
        f" ({output.ago(d.time, now)})",
        f"  {d.method} {d.path}",
        route.render(d.plan, indent="  ")
        if d.plan is not None
        else f"  refused before routing: {d.error or 'no plan'}",
    ]
    if d.attempts:
        lines.append("  attempts:")
        header = ("BACKEND", "OUTCOME", "ERROR", "STATUS", "TIME", "MESSAGE")
        rows = [_attempt(a) for a in d.attempts]
        table = output.table(header, rows, indent="    ").split("\n")
        lines.append(table[0])
        for i, attempt in enumerate(d.attempts):
            lines.append(table[i + 1])
            if i + 1 < len(d.attempts) and attempt.outcome != "served":
                why = f"failed ({attempt.error_class or 'other'})"
                if attempt.outcome == "skipped":
                    why = "was skipped" + (
                        f" ({attempt.error_class})" if attempt.error_class else ""
                    )
                following = d.attempts[i + 1].backend
                lines.append(f"      → {following} tried next because {attempt.backend} {why}")
    if d.served_by:
        result = f"served by {output.paint(d.served_by, 'green')}"
    else:
        result = output.paint("not served", "red")
    status = f"status {d.status}" if d.status else "the client went away"
    if d.first_byte_ms is not None:
        status += f", first byte after {output.duration(d.first_byte_ms / 1000)}"
    lines.append(f"  {result}, {status}, in {output.duration(d.duration_ms / 1000)}")
    return "\n".join(lines)


def _attempt(a: Attempt) -> tuple[str, ...]:
    outcome = output.paint(a.outcome, "green" if a.outcome == "served" else "red")
    message = (a.error or "") + (" (after the first byte)" if a.after_first_byte else "")
    return (
        a.backend,
        outcome,
        a.error_class or "-",
        str(a.status) if a.status else "-",
        output.millis(a.ms) if a.ms else "-",
        message or "-",
    )
