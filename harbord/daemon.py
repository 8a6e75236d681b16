"""`harbord`: the daemon's entry point, lifecycle and signals.

Signal handlers only set flags; the main loop acts on them (TERM/INT: drain
and stop; HUP: reload, ignored while draining). READY=1 goes to systemd once
the socket listens and the first probe round is done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path

import msgspec
from aiohttp import web

from harbord import __version__, config, logs
from harbord.guard import GuardedSite, PeerPolicy, read_token
from harbord.harbor import Harbor
from harbord.listen import ListenError, bind_unix, systemd_socket
from harbord.notify import Notifier, watchdog_interval
from harbord.server import make_app

log = logging.getLogger("harbord")

EXIT_CONFIG = 2
EXIT_LISTEN = 3

STATUS_REFRESH = 2.0
HOUSEKEEPING = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="harbord",
        description="Route Ollama API requests between GPU and CPU backends over a Unix socket.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: "
        "$XDG_CONFIG_HOME/harbor/harbord.toml; env HARBOR_CONFIG)",
    )
    parser.add_argument(
        "--socket", metavar="PATH", help="Unix socket to listen on (env HARBOR_SOCKET)"
    )
    parser.add_argument("--state-dir", metavar="DIR", help="where pins and affinity are kept")
    parser.add_argument(
        "--gpu-url", metavar="URL", help="URL of the gpu backend (env OLLAMA_GPU_URL)"
    )
    parser.add_argument(
        "--cpu-url", metavar="URL", help="URL of the cpu backend (env OLLAMA_CPU_URL)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective values and exit",
    )
    parser.add_argument("--version", action="version", version=f"harbord {__version__}")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> config.Overrides:
    return config.Overrides(
        config=args.config,
        socket=args.socket,
        state_dir=args.state_dir,
        log_level=args.log_level,
        gpu_url=args.gpu_url,
        cpu_url=args.cpu_url,
    )


def print_config(cfg: config.Config) -> None:
    print(f"# harbord {__version__}: effective configuration")
    print(f"# file: {cfg.path or '(none; defaults)'}")
    for key, source in sorted(cfg.sources.items()):
        print(f"# {key}: from {source}")
    print(msgspec.json.format(msgspec.json.encode(cfg.to_dict()), indent=2).decode())


class Daemon:
    def __init__(self, cfg: config.Config, overrides: config.Overrides) -> None:
        self.overrides = overrides
        self.harbor = Harbor(cfg)
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._bound_path: Path | None = None

    async def run(self) -> int:
        harbor, cfg = self.harbor, self.harbor.config
        loop = asyncio.get_running_loop()
        try:
            sock = systemd_socket()
            if sock is None:
                sock = bind_unix(cfg.socket)
                self._bound_path = cfg.socket
        except ListenError as err:
            log.error("%s", err)
            return EXIT_LISTEN

        raise_fd_limit()
        runners = [self._runner(make_app(harbor))]
        await runners[0].setup()
        await GuardedSite(runners[0], sock, PeerPolicy(cfg.allow_root), cfg.client_timeout).start()
        if cfg.tcp.listen:
            try:
                tcp_sock, token = tcp_listener(cfg)
            except (OSError, ValueError) as err:
                log.error("cannot start the TCP listener on %s: %s", cfg.tcp.listen, err)
                await runners[0].cleanup()
                return EXIT_LISTEN
            runners.append(self._runner(make_app(harbor, token)))
            await runners[1].setup()
            await GuardedSite(runners[1], tcp_sock, None, cfg.client_timeout).start()
            log.info(
                "also listening on http://%s%s", cfg.tcp.listen, " (bearer token)" if token else ""
            )
            if token is None:
                # Loopback is not private on a shared machine: every local user can connect.
                log.warning(
                    "the TCP listener on %s has no token_file: every user of this machine "
                    "can use it",
                    cfg.tcp.listen,
                )
        for signum, flag in (
            (signal.SIGTERM, self._stop),
            (signal.SIGINT, self._stop),
            (signal.SIGHUP, self._reload),
        ):
            loop.add_signal_handler(signum, flag.set)

        await harbor.start()
        await self._start_extras()
        harbor.status_changed = lambda: self.notifier.status(harbor.summary())
        self.notifier.ready(harbor.summary())
        log.info(
            "harbord %s listening on %s (%s)",
            __version__,
            cfg.socket,
            ", ".join(f"{b.name}={b.config.url}" for b in harbor.backends.values()),
        )
        if harbor.state.note:
            log.warning("%s", harbor.state.note)
        self._spawn(self._refresh_status())
        self._spawn(self._housekeeping())
        interval = watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval))

        while not self._stop.is_set():
            waiters = [
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._reload.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self.reload()

        self.notifier.stopping()
        harbor.draining = True
        self.notifier.status(harbor.summary())
        log.info(
            "stopping: draining %d request(s) for up to %gs",
            harbor.ledger.in_flight,
            cfg.drain_timeout,
        )
        # Stop listening, wait for handlers up to the drain time, then cancel the rest.
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_extras()
        await harbor.close()
        if self._bound_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._bound_path)
        log.info("stopped")
        return 0

    def _runner(self, app: web.Application) -> web.AppRunner:
        cfg = self.harbor.config
        return web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=cfg.drain_timeout,
            keepalive_timeout=cfg.client_timeout,
        )

    async def _start_extras(self) -> None:
        """Supervision of the backend units, when systemd is there."""
        from harbord.supervisor import start_supervision

        supervisor = await start_supervision(self.harbor)
        if supervisor is not None:
            self._extras = supervisor

    async def _stop_extras(self) -> None:
        extras = getattr(self, "_extras", None)
        if extras is not None:
            await extras.stop()

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = config.load(self.overrides)
        except config.ConfigError as err:
            log.error("reload refused, keeping the running configuration: %s", err)
        else:
            if new.socket != self.harbor.config.socket:
                log.warning(
                    "reload: the socket path changed to %s; that takes a restart", new.socket
                )
            logging.getLogger().setLevel(new.log_level.upper())
            await self.harbor.apply_config(new)
            log.info("configuration reloaded from %s", new.path or "defaults")
        self.notifier.ready(self.harbor.summary())

    async def _refresh_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH)
            self.notifier.status(self.harbor.summary())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            self.harbor.state.expire()

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: a stuck loop sends nothing and systemd steps in.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def raise_fd_limit() -> None:
    """Each relayed stream holds two descriptors: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tcp_listener(cfg: config.Config) -> tuple[socket.socket, str | None]:
    host, _, port = cfg.tcp.listen.rpartition(":")
    host = host.strip("[]")
    token = read_token(os.path.expanduser(cfg.tcp.token_file)) if cfg.tcp.token_file else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, int(port)), family=family, backlog=1024)
    sock.setblocking(False)
    return sock, token


def _run(coro: Coroutine[None, None, int]) -> int:
    """Run on uvloop when it is installed (the `uvloop` extra), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_from(args)
    try:
        cfg = config.load(overrides)
    except config.ConfigError as err:
        print(f"harbord: configuration error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print_config(cfg)
        return 0
    logs.setup(cfg.log_level)
    return _run(Daemon(cfg, overrides).run())


if __name__ == "__main__":
    sys.exit(main())
