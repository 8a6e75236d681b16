"""harborctl check: GET /harbor/check, printed as JSON (the seed's shape) either way."""

from __future__ import annotations

import argparse

import msgspec

from harbord import harbor_endpoints as api
from harbord.ctl import EX_FAILED, EX_OK, output
from harbord.ctl.http import Daemon

HELP = "print each backend's health as JSON; exit 1 unless all are healthy"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.CHECK)
    output.raw_json(answer.raw if args.json else msgspec.json.format(answer.raw, indent=2))
    healthy = all(entry.status == "healthy" for entry in answer.value.values())
    return EX_OK if healthy else EX_FAILED
