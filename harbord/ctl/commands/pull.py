"""harborctl pull: POST /api/pull through harbord with progress, then who sees the model.

harbord sends a pull to one backend (the first GPU backend, or --backend) and streams
Ollama's progress through. On a terminal each layer gets a progress bar (bytes,
percentage, rate); otherwise a plain line per update, at most one per percent. The
model store is shared, so the other backends should list the model too once their
inventories refresh, which harbord starts when the pull ends: the backends that list
it are shown after a short wait. An `{"error"}` line or an error status: exit 1.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec

from harbord.client import HarborClient, HarborError, HarborUnavailable
from harbord.ctl import EX_FAILED, EX_OK, output
from harbord.ctl.http import Daemon
from harbord.views import normalize_model

HELP = "pull MODEL into the shared model store, with progress"
TIMEOUT = None  # a big model takes as long as it takes
SEE_FOR = 2.0  # seconds to wait for every backend's inventory to list the model
BAR_CELLS = 30
MIN_BAR_CELLS = 5
REDRAW_EVERY = 0.1  # seconds between two redraws of a bar


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument(
        "--backend", metavar="NAME", help="pull through this backend (default: the first GPU one)"
    )


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    progress = Progress(sys.stdout, tty=sys.stdout.isatty())
    succeeded = False
    try:
        for chunk in _pull(daemon.client, args.model, args.backend):
            if args.json:
                sys.stdout.write(msgspec.json.encode(chunk).decode() + "\n")
                sys.stdout.flush()
            else:
                progress.update(chunk, time.monotonic())
            succeeded = chunk.get("status") == "success"
    except HarborUnavailable:
        raise
    except HarborError as err:
        progress.close()
        output.error(f"pulling {args.model} failed: {err.message}")
        return EX_FAILED
    progress.close()
    if not succeeded:
        output.error(f"pulling {args.model}: the progress stream ended without success")
        return EX_FAILED
    if not args.json:
        print(where(daemon, args.model))
    return EX_OK


def _pull(client: HarborClient, model: str, backend: str | None) -> Iterator[dict[str, Any]]:
    chunks = client.pull(model, backend=backend)  # an {"error"} line raises HarborError
    if client.last_backend:
        note = f"pulling {model} through {client.last_backend}"
        print(output.paint(note, "dim", sys.stderr), file=sys.stderr, flush=True)
    return chunks


@dataclass
class Layer:
    total: int
    completed: int
    since: float  # monotonic time of its first update
    completed_then: int  # and how much was there already
    shown_percent: int = -1

    def rate(self, now: float) -> float | None:
        elapsed = now - self.since
        return (self.completed - self.completed_then) / elapsed if elapsed >= 0.2 else None


class Progress:
    """Ollama's progress lines as bars (a terminal) or plain lines (anything else)."""

    def __init__(self, out: TextIO, tty: bool, columns: int | None = None) -> None:
        self.out = out
        self.tty = tty
        self.columns = columns  # None: the terminal's, at each redraw
        self.layers: dict[str, Layer] = {}
        self.open: str | None = None  # the digest whose bar is on the current line
        self.drawn_at = 0.0
        self.last_status = ""

    def update(self, chunk: dict[str, Any], now: float) -> None:
        status = str(chunk.get("status") or "")
        digest, total, completed = chunk.get("digest"), chunk.get("total"), chunk.get("completed")
        if not (isinstance(digest, str) and isinstance(total, int) and total > 0):
            self.close()
            if status and status != self.last_status:
                self._write(status + "\n")
            self.last_status = status
            return
        done = completed if isinstance(completed, int) else 0  # Ollama leaves out a 0
        layer = self.layers.get(digest)
        if layer is None:
            layer = self.layers[digest] = Layer(total, done, now, done)
        layer.total, layer.completed = total, done
        label = status or f"pulling {digest.removeprefix('sha256:')[:12]}"
        if self.tty:
            if self.open != digest:
                self.close()
            if self.open != digest or done >= total or now - self.drawn_at >= REDRAW_EVERY:
                self._write(f"\r{self.bar(label, layer, now)}\033[K")
                self.open, self.drawn_at = digest, now
        elif (percent := done * 100 // total) != layer.shown_percent:
            layer.shown_percent = percent
            self._write(self.line(label, layer, now) + "\n")
        self.last_status = status

    def bar(self, label: str, layer: Layer, now: float) -> str:
        """label, bar, bytes, percentage, rate: the bar gets narrower on a narrow terminal."""
        fraction = layer.completed / layer.total
        numbers = f"{output.size(layer.completed)} / {output.size(layer.total)}"
        numbers += f"  {fraction * 100:3.0f}%"
        rate = layer.rate(now)
        if rate and layer.completed < layer.total:
            eta = (layer.total - layer.completed) / rate
            numbers += f"  {output.rate(rate)}, {output.duration(eta)} left"
        elif rate:
            numbers += f"  {output.rate(rate)}"
        width = (self.columns or _columns(self.out)) - 1  # not the last column: it may wrap
        cells = min(BAR_CELLS, width - len(label) - len(numbers) - 4)
        if cells < MIN_BAR_CELLS:
            return output.clip(f"{label}  {numbers}", width)
        return f"{label}  {output.bar(fraction, cells)}  {numbers}"

    def line(self, label: str, layer: Layer, now: float) -> str:
        text = f"{label}  {layer.completed}/{layer.total} bytes  {layer.shown_percent}%"
        rate = layer.rate(now)
        return text + (f"  {output.rate(rate)}" if rate else "")

    def close(self) -> None:
        """Ends the bar on the current line, if there is one."""
        if self.open is not None:
            self._write("\n")
            self.open = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _columns(out: TextIO) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        return 80


def where(daemon: Daemon, model: str) -> str:
    """Which backends list the model, waiting up to SEE_FOR for all of them to."""
    name = normalize_model(model).lower()
    deadline = time.monotonic() + SEE_FOR
    while True:
        inventory = daemon.client.models()
        seen = [b for b, names in inventory.backends.items() if name in map(str.lower, names)]
        if len(seen) == len(inventory.backends) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    missing = [b for b in inventory.backends if b not in seen]
    if not seen:
        return output.paint(
            f"no backend lists {name} yet; see 'harborctl models' in a moment", "yellow"
        )
    text = f"{name} is on {', '.join(seen)}"
    if not missing:
        return output.paint(text, "green")
    return text + output.paint(f"; not (yet) listed by {', '.join(missing)}", "yellow")
