"""harborctl restart: POST /harbor/backends/{name}/restart (needs systemd supervision)."""

from __future__ import annotations

import argparse

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon

HELP = "restart BACKEND's systemd unit"
TIMEOUT = 120.0  # a unit's stop may take up to its TimeoutStopSec


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backend", metavar="BACKEND")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    # An answer other than 200 (409 not restarted, 501 no supervision) raises HarborError
    # with harbord's message: main prints it and exits 1.
    answer = daemon.client.fetch(api.RESTART, name=args.backend)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(answer.value.message or f"restarted {args.backend}")
    return EX_OK
