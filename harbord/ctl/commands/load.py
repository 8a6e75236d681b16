"""harborctl load: preload MODEL, POST /api/generate with an empty prompt (as `ollama run`
does before the first prompt); harbord routes it like a real request and says where."""

from __future__ import annotations

import argparse
from typing import Any

from harbord.client import Served
from harbord.config import parse_duration
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon

HELP = "load MODEL into memory ahead of its first request (where harbord would send it)"
TIMEOUT = None  # a big model loading into system RAM may take minutes
FOREVER = -1  # Ollama's keep_alive for "never unload"


def keep_alive(text: str) -> float:
    """Seconds from 30s, 10m, 2h or a plain number; "forever" (or a negative number) is -1."""
    if text == "forever" or text.lstrip().startswith("-"):
        return FOREVER
    try:
        seconds = float(parse_duration(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}, or forever") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a keep-alive of 0 unloads: use 'harborctl unload'")
    return seconds


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--backend", metavar="NAME", help="load it on this backend")
    parser.add_argument(
        "--keep-alive", type=keep_alive, metavar="DURATION",
        help="how long it stays loaded unused: 10m, 2h, forever (default: the backend's, 5m)",
    )  # fmt: skip


def request_body(model: str, keep: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": "", "stream": False}
    if keep is not None:  # seconds as a number: Ollama reads a string as a Go duration
        body["keep_alive"] = int(keep) if keep == int(keep) else keep
    return body


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    headers = {"X-Harbor-Backend": args.backend} if args.backend else {}
    resp = daemon.client.request(
        "POST", "/api/generate", json=request_body(args.model, args.keep_alive), headers=headers
    )
    if args.json:
        output.raw_json(resp.content)
        return EX_OK
    served = Served.from_headers(resp.headers)
    where = served.backend or "the backend harbord chose"
    after = f" (after {', '.join(served.fallbacks)})" if served.fallbacks else ""
    print(f"loaded {args.model} on {where}{after}{_kept(args)}")
    return EX_OK


def _kept(args: argparse.Namespace) -> str:
    if args.keep_alive is None:
        return ""
    if args.keep_alive == FOREVER:
        return ", kept until unloaded"
    return f", kept {output.duration(args.keep_alive)} after its last use"
