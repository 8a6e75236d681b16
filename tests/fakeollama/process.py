"""Running the fake as a process: serve(), the command line and main()."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from .faults import Faults
from .models import Arch
from .scheduler import DEFAULT_MAX_LOADED
from .server import FakeServer
from .wire import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODEL_SIZE,
    DEFAULT_TOKENS,
    DEFAULT_VERSION,
)

# --------------------------------------------------------------------------------------
# Process entry point


async def serve(
    server: FakeServer,
    host: str = "127.0.0.1",
    port: int = 11434,
    *,
    ready_file: str | None = None,
    exit_with_parent: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``server`` until SIGTERM/SIGINT (or ``stop`` is set)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    runner = web.AppRunner(
        server.app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=0.2,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
    await site.start()
    actual_port = int(runner.addresses[0][1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready_file:
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{actual_port}\n")
        os.replace(tmp, ready_file)
    watcher: asyncio.Task[None] | None = None
    if exit_with_parent:
        parent = os.getppid()

        async def watch() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
            stop.set()

        watcher = asyncio.create_task(watch())
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        # hung handlers are cancelled by aiohttp after shutdown_timeout
        await runner.cleanup()


def _parse_model(spec: str) -> tuple[str, int]:
    name, _, size = spec.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"bad --model {spec!r}")
    try:
        return name, int(float(size)) if size else DEFAULT_MODEL_SIZE
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size in --model {spec!r}") from None


def _parse_show_info(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, raw = spec.partition("=")
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not name or not isinstance(info, dict):
        raise argparse.ArgumentTypeError(f"bad --show-info {spec!r}")
    return name, info


def _parse_arch(spec: str) -> tuple[str, Arch]:
    name, _, nums = spec.partition("=")
    try:
        vals = [int(x) for x in nums.split(",")]
    except ValueError:
        vals = []
    if not name or len(vals) not in (4, 5) or min(vals) <= 0 or vals[1] % vals[2]:
        raise argparse.ArgumentTypeError(f"bad --model-info {spec!r}")
    ctx_max = vals[4] if len(vals) == 5 else 131072
    return name, Arch(vals[0], vals[1], vals[2], vals[3], ctx_max)


def _parse_seconds(spec: str) -> tuple[str, float]:
    """``SECONDS`` (the default, as model ``""``) or ``MODEL=SECONDS``."""
    name, _, secs = spec.rpartition("=")
    try:
        value = float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad seconds in {spec!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative seconds in {spec!r}")
    return name, value


def _parse_size(raw: str) -> int:
    try:
        return int(float(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad byte count {raw!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fakeollama",
        description="A fake Ollama server for tests.",
        epilog=(
            "Fault keys (--faults JSON or POST /_fake/faults): oom_models, oom_text, "
            "missing_models, driver_error, driver_text, busy, hang, hang_generation, "
            "load_delay, token_delay, die_after_chunks, error_after_chunks, error_text, "
            "garbage (nonjson|truncated|html|wrong_ctype|error200), status {code,error}, "
            "pull_total, pull_error, only_models."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port (see --ready-file)")
    p.add_argument("--name", default="fake", help="shown in replies ('[NAME] ') and X-Fake-Backend")
    p.add_argument("--version", default=DEFAULT_VERSION, help="what /api/version reports")
    p.add_argument("--model", action="append", type=_parse_model, metavar="NAME[=SIZE_BYTES]")
    p.add_argument("--vram", type=_parse_size, default=None, help="GPU memory in bytes")
    p.add_argument("--cpu", action="store_true", help="a CPU server: size_vram is always 0")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="reply length in tokens")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between chunks")
    p.add_argument(
        "--model-info",
        action="append",
        type=_parse_arch,
        metavar="NAME=BLOCKS,EMBED,HEADS,KV_HEADS[,CTX]",
        help="a model's architecture (model_info; decides its KV cache per token)",
    )
    p.add_argument(
        "--show-info",
        action="append",
        type=_parse_show_info,
        metavar="NAME=JSON",
        help="a model's raw /api/show model_info (any architecture's keys), as a JSON object",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=DEFAULT_CONTEXT,
        help="context when a request sets no num_ctx (OLLAMA_CONTEXT_LENGTH)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="requests per model at once (OLLAMA_NUM_PARALLEL)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="waiting requests before 503 busy (OLLAMA_MAX_QUEUE)",
    )
    p.add_argument(
        "--max-loaded-models",
        "--max-loaded",
        dest="max_loaded_models",
        type=int,
        default=DEFAULT_MAX_LOADED,
        help="models loaded at once (OLLAMA_MAX_LOADED_MODELS; default %(default)s, "
        "as Ollama per GPU); 1 = a GPU that evicts; 0 = no limit",
    )
    p.add_argument(
        "--ram",
        type=_parse_size,
        default=None,
        help="a CPU server's memory in bytes: loads past it evict idle models (or fail alone)",
    )
    p.add_argument(
        "--load-time",
        action="append",
        type=_parse_seconds,
        metavar="[MODEL=]SECONDS",
        help="seconds loading a model takes (repeat per model; no MODEL: the default)",
    )
    p.add_argument(
        "--prompt-delay",
        action="append",
        type=_parse_seconds,
        metavar="[MODEL=]SECONDS",
        help="seconds of prompt evaluation before the first token (repeat per model)",
    )
    p.add_argument(
        "--embed-time",
        action="append",
        type=_parse_seconds,
        metavar="[MODEL=]SECONDS",
        help="seconds an embedding request takes once its model is loaded (repeat per model)",
    )
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=None,
        help="generation speed (overrides --token-delay)",
    )
    p.add_argument(
        "--silent-sse-errors",
        action="store_true",
        help="end /v1/messages and /v1/responses streams on an error without an error event",
    )
    p.add_argument("--faults", default=None, help="fault set as JSON (or @FILE)")
    p.add_argument("--ready-file", default=None, help="write the port here once listening")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent dies")
    return p.parse_args(argv)


def _load_faults(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    if raw.startswith("@"):
        with open(raw[1:]) as fh:
            raw = fh.read()
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("--faults must be a JSON object")
    return data


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="fakeollama %(levelname)s %(name)s: %(message)s",
    )
    try:
        faults = _load_faults(args.faults)
        Faults.parse(faults)
    except (OSError, ValueError) as exc:
        print(f"fakeollama: bad --faults: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        server = FakeServer(
            name=args.name,
            version=args.version,
            models=args.model,
            vram=args.vram,
            cpu=args.cpu,
            tokens=args.tokens,
            token_delay=args.token_delay,
            faults=faults,
            model_info=dict(args.model_info or ()),
            show_info=dict(args.show_info or ()),
            context_length=args.context_length,
            parallel=args.parallel,
            max_queue=args.max_queue,
            max_loaded_models=args.max_loaded_models,
            load_time=dict(args.load_time or ()),
            prompt_delay=dict(args.prompt_delay or ()),
            embed_time=dict(args.embed_time or ()),
            ram=args.ram,
            tokens_per_second=args.tokens_per_second,
            silent_sse_errors=args.silent_sse_errors,
        )
        await serve(
            server,
            args.host,
            args.port,
            ready_file=args.ready_file,
            exit_with_parent=args.exit_with_parent,
        )

    try:
        _run(run())
    except OSError as exc:
        print(f"fakeollama: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
