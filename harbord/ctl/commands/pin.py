"""harborctl pin: PUT /harbor/pins/{model}, send MODEL to BACKEND only."""

from __future__ import annotations

import argparse
import time

from harbord import harbor_endpoints as api
from harbord.config import parse_duration
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon
from harbord.schemas import PinRequest

HELP = "send every request for MODEL to BACKEND (for a while, or until unpinned)"
TIMEOUT = 30.0


def _duration(text: str) -> float:
    try:
        seconds = float(parse_duration(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return seconds


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("backend", metavar="BACKEND")
    parser.add_argument(
        "--for", dest="for_seconds", type=_duration, metavar="DURATION",
        help="how long, e.g. 30m or 24h (default: until unpinned)",
    )  # fmt: skip
    parser.add_argument("--reason", default="pinned by operator", help="shown in status")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    request = PinRequest(args.backend, args.for_seconds, args.reason)
    answer = daemon.client.fetch(api.PIN, request, model=args.model)
    if args.json:
        output.raw_json(answer.raw)
        return EX_OK
    now = time.time()
    for model, pin in answer.value.items():
        how_long = f"for {output.duration(pin.until - now)}" if pin.until else "until unpinned"
        print(f"pinned {model} to {pin.backend} {how_long}")
    return EX_OK
