"""harborctl pins: GET /harbor/pins, the active pins."""

from __future__ import annotations

import argparse
import time

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon
from harbord.schemas import Pin

HELP = "list the models pinned to a backend"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.PINS)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(render(answer.value, time.time()))
    return EX_OK


def render(pins: dict[str, Pin], now: float) -> str:
    if not pins:
        return "no pins"
    header = ("MODEL", "BACKEND", "SOURCE", "SINCE", "EXPIRES", "REASON")
    rows = [
        (model, p.backend, p.source, output.ago(p.since, now), output.until(p.until, now), p.reason)
        for model, p in pins.items()
    ]
    return output.table(header, rows)
