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
        capacity = {
            b.name: {"loaded": len(b.loaded), "of": b.capacity, "source": b.capacity_source}
            for b in status.backends
        }
        kept_hot = {b.name: b.kept_hot for b in status.backends}
        output.raw_json(
            msgspec.json.encode({"backends": loaded, "capacity": capacity, "kept_hot": kept_hot})
        )
        return EX_OK
    print(render(status, time.time()))
    return EX_OK


def render(status: Status, now: float) -> str:
    rows = [
        (
            m.name,
            b.name,
            output.size(m.size),
            processor(m),
            context(m),
            until(m.expires_at, now),
            "kept hot" if m.name in b.kept_hot else "",
        )
        for b in status.backends
        for m in b.loaded
    ]
    # Each backend's capacity, under the table (a daemon before residency has none).
    lines = [
        capacity_line(b.name, len(b.loaded), b.capacity, b.capacity_source)
        for b in status.backends
        if b.capacity is not None
    ]
    if not rows:
        return "\n".join(["no model is loaded on any backend", *lines])
    header = ("MODEL", "BACKEND", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL", "")
    return "\n".join([output.table(header, rows), *lines])


_SOURCES = {
    "config": "max_loaded in the configuration",
    "unit": "OLLAMA_MAX_LOADED_MODELS of its unit",
    "learned": "learned from an eviction",
    "default": "Ollama's default",
}


def capacity_line(name: str, loaded: int, capacity: int | None, source: str | None) -> str:
    """`gpu: 1 of 1 models (learned from an eviction)`."""
    if capacity is None:
        return f"{name}: {loaded} loaded"
    noun = "model" if capacity == 1 else "models"
    return f"{name}: {loaded} of {capacity} {noun} ({_SOURCES.get(source or '', source)})"


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
