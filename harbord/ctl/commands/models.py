"""harborctl models: GET /harbor/models, each model with the backends that have it."""

from __future__ import annotations

import argparse

from harbord import harbor_endpoints as api
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon
from harbord.schemas import Inventory

HELP = "list the models and the backends that have them"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.MODELS)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(render(answer.value))
    return EX_OK


def render(inventory: Inventory) -> str:
    lines = []
    if inventory.models:
        rows = [(model, ", ".join(backends)) for model, backends in inventory.models.items()]
        lines.append(output.table(("MODEL", "BACKENDS"), rows))
    else:
        lines.append("no models on any backend")
    empty = [name for name, names in inventory.backends.items() if not names]
    if empty:
        lines.append(
            output.paint(
                f"no models from {', '.join(empty)} (none pulled, or not answering)", "dim"
            )
        )
    return "\n".join(lines)
