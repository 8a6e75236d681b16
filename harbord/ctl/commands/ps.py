"""harborctl ps: the models loaded on each backend, from GET /harbor/status.

harbord's /api/ps puts every backend's models in one list, as Ollama's shape has no
place for where; /harbor/status keeps them per backend (as of its last look, at most
`inventory_interval` ago, or just after a request changed them).
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import datetime

import msgspec

from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon
from harbord.schemas import LoadedModel, Status

HELP = "list the models loaded in memory, and where"
TIMEOUT = 30.0
# Ollama shows a model kept with keep_alive < 0 as expiring centuries from now.
FOREVER_AFTER_S = 100 * 365 * 86400
_FRACTION = re.compile(r"(\.\d{6})\d+")  # nanoseconds; fromisoformat takes microseconds


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    status = daemon.client.status()
    if args.json:  # one object per backend: its loaded models as /api/ps gives them
        loaded = {b.name: b.loaded for b in status.backends}
        output.raw_json(msgspec.json.encode({"backends": loaded}))
        return EX_OK
    print(render(status, time.time()))
    return EX_OK


def render(status: Status, now: float) -> str:
    rows = [
        (m.name, b.name, output.size(m.size), processor(m), context(m), until(m.expires_at, now))
        for b in status.backends
        for m in b.loaded
    ]
    if not rows:
        return "no model is loaded on any backend"
    return output.table(("MODEL", "BACKEND", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), rows)


def processor(model: LoadedModel) -> str:
    """How much of the model is in GPU memory: 100% GPU, 35% GPU (the rest in RAM), CPU."""
    if model.size_vram <= 0:
        return "CPU"
    if model.size <= 0 or model.size_vram >= model.size:
        return "100% GPU"
    return f"{model.size_vram * 100 // model.size}% GPU"


def context(model: LoadedModel) -> str:
    return str(model.context_length) if model.context_length > 0 else "-"


def until(expires_at: str | None, now: float) -> str:
    """When Ollama unloads it, from now: in 4m 30s, forever, expired."""
    if not expires_at:
        return "-"
    try:
        when = datetime.fromisoformat(_FRACTION.sub(r"\1", expires_at.replace("Z", "+00:00")))
    except ValueError:
        return expires_at
    left = when.timestamp() - now
    if left > FOREVER_AFTER_S:
        return "forever"
    return f"in {output.duration(left)}" if left > 0 else "expired"
