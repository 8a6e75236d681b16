"""harborctl unpin: DELETE /harbor/pins/{model}."""

from __future__ import annotations

import argparse

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon

HELP = "let harbord route MODEL freely again"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.UNPIN, model=args.model)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(f"unpinned {answer.value.unpinned}")
    return EX_OK
