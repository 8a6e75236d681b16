"""harborctl unload: POST /api/generate with an empty prompt and keep_alive 0 (what
`ollama stop` sends). Without --backend harbord sends it to every backend that may have
MODEL loaded and names them in X-Harbor-Backend ("gpu,cpu")."""

from __future__ import annotations

import argparse

from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon

HELP = "unload MODEL from memory, on every backend (or one)"
TIMEOUT = 60.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--backend", metavar="NAME", help="unload it from this backend only")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    headers = {"X-Harbor-Backend": args.backend} if args.backend else {}
    body = {"model": args.model, "prompt": "", "keep_alive": 0, "stream": False}
    resp = daemon.client.request("POST", "/api/generate", json=body, headers=headers)
    if args.json:
        output.raw_json(resp.content)
        return EX_OK
    backends = [b.strip() for b in resp.headers.get("X-Harbor-Backend", "").split(",")]
    where = ", ".join(b for b in backends if b)
    print(f"unloaded {args.model}" + (f" from {where}" if where else ""))
    return EX_OK
