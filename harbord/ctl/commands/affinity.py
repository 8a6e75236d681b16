"""harborctl affinity: GET /harbor/affinity; `affinity reset [MODEL]`: DELETE it."""

from __future__ import annotations

import argparse
import time

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, EX_USAGE, output
from harbord.ctl.http import Daemon
from harbord.schemas import Affinity

HELP = "list where each model last ran (affinity), or reset it"
TIMEOUT = 30.0
ACTIONS = ("list", "reset")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", metavar="ACTION", nargs="?", choices=ACTIONS, default="list",
        help="list (the default) or reset",
    )  # fmt: skip
    parser.add_argument(
        "model", metavar="MODEL", nargs="?", help="reset only this model's affinity"
    )


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    if args.action == "list":
        if args.model is not None:
            output.error("affinity: MODEL goes with reset: harborctl affinity reset MODEL")
            return EX_USAGE
        listed = daemon.client.fetch(api.AFFINITY)
        if args.json:
            output.raw_json(listed.raw)
        else:
            print(render(listed.value, time.time()))
        return EX_OK
    if args.model is None:
        reset = daemon.client.fetch(api.RESET_AFFINITY)
    else:
        reset = daemon.client.fetch(api.RESET_MODEL_AFFINITY, model=args.model)
    if args.json:
        output.raw_json(reset.raw)
    elif reset.value.reset:
        print(f"affinity reset: {', '.join(reset.value.reset)}")
    else:
        print("no affinity to reset")
    return EX_OK


def render(affinity: dict[str, Affinity], now: float) -> str:
    if not affinity:
        return "no affinity"
    header = ("MODEL", "BACKEND", "SINCE", "LAST SERVED")
    rows = [
        (
            model,
            a.backend,
            output.ago(a.since, now),
            output.ago(a.last_served, now) if a.last_served is not None else "-",
        )
        for model, a in sorted(affinity.items())
    ]
    return output.table(header, rows)
