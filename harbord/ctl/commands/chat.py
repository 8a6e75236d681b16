"""harborctl chat: one prompt through harbord's /api/chat, streamed to stdout.

stdout gets the answer only; stderr gets which backend served and the fallbacks,
so `harborctl chat llama3.2 "hi" > answer.txt` keeps a clean file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

import msgspec

from harbord.client import HarborClient, HarborError, Served
from harbord.ctl import EX_FAILED, EX_OK, EX_USAGE, output
from harbord.ctl.http import Daemon
from harbord.schemas import INTENTS

HELP = "chat with MODEL through harbord (the prompt from stdin when not given)"
TIMEOUT = None  # a heavy model on the CPU may take minutes


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("prompt", metavar="PROMPT", nargs="?")
    parser.add_argument("--intent", choices=INTENTS, help="fast: low latency; heavy: big models")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument("--backend", metavar="NAME", help="this backend only, no fallback")
    parser.add_argument("--system", metavar="TEXT", help="a system prompt")


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("(reading the prompt from stdin; end it with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        output.error("empty prompt: give it as an argument or on stdin")
        return EX_USAGE
    messages = [{"role": "user", "content": prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    client = daemon.client
    try:
        _chat(client, args, messages)
    except HarborError as err:
        output.error(err.message)
        _served(client.last, "answered by")
        return EX_FAILED
    _served(client.last, "served by")
    return EX_OK


def _chat(client: HarborClient, args: argparse.Namespace, messages: list[dict[str, str]]) -> None:
    model, intent, backend = args.model, args.intent, args.backend
    chunks: Iterable[dict[str, Any]]
    if args.no_stream:
        chunks = [client.chat(model, messages, intent=intent, backend=backend)]
    else:
        chunks = client.chat(model, messages, intent=intent, backend=backend, stream=True)
    last = ""
    try:
        for chunk in chunks:
            text = msgspec.json.encode(chunk).decode() + "\n" if args.json else _text(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            last = text or last
    finally:  # the answer ends with a newline, also when an error cuts it short
        if last and not last.endswith("\n"):
            print()


def _text(chunk: dict[str, Any]) -> str:
    message = chunk.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _served(served: Served | None, verb: str) -> None:
    """One line on stderr: who served (or answered with an error), the fallbacks, the id."""
    if served is None or (served.backend is None and served.request_id is None):
        return
    text = f"{verb} {served.backend}" if served.backend else "not served"
    if served.fallbacks:
        text += f" after {', '.join(served.fallbacks)}"
    if served.request_id:
        text += f" (request {served.request_id}: harborctl explain {served.request_id})"
    print(output.paint(text, "dim", sys.stderr), file=sys.stderr)
