"""harborctl: global options, the subcommand registry, exit codes.

Exit codes: 0 ok; 1 degraded or the command failed; 2 harbord unreachable; 64 usage.
A subcommand is a module in harbord/ctl/commands/ plus one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Protocol

from harbord import __version__
from harbord.client import HarborError, HarborUnavailable
from harbord.config import default_socket
from harbord.ctl import EX_FAILED, EX_UNREACHABLE, EX_USAGE, completion, output
from harbord.ctl.commands import (
    affinity,
    chat,
    check,
    explain,
    load,
    models,
    pin,
    pins,
    ps,
    pull,
    restart,
    route,
    setup,
    status,
    top,
    unload,
    unpin,
)
from harbord.ctl.http import Daemon, unreachable


class Command(Protocol):
    # Module constants; TIMEOUT None: wait as long as it takes.
    @property
    def HELP(self) -> str: ...
    @property
    def TIMEOUT(self) -> float | None: ...
    def configure(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace, daemon: Daemon) -> int: ...


COMMANDS: dict[str, Command] = {
    "status": status,
    "check": check,
    "models": models,
    "ps": ps,
    "load": load,
    "unload": unload,
    "chat": chat,
    "route": route,
    "pins": pins,
    "pin": pin,
    "unpin": unpin,
    "affinity": affinity,
    "restart": restart,
    "explain": explain,
    "top": top,
    "pull": pull,
    "setup": setup,
    "completion": completion,
}
DEFAULT_COMMAND = "status"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the subcommands too (`harborctl status --json`), where they must not
    # overwrite what was given before the subcommand: hence SUPPRESS there.
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help="harbord's socket (default: $HARBOR_SOCKET, else $XDG_RUNTIME_DIR/harbor.sock)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print harbord's JSON"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(None),
        help="how long to wait for an answer (default: 30, chat: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harborctl", description="Control and query harbord.")
    parser.add_argument("--version", action="version", version=f"harborctl {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.HELP, description=command.HELP)
        _global_options(sub_parser, top=False)
        command.configure(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors, --help, --version
        return exit_.code if isinstance(exit_.code, int) else EX_USAGE
    command = COMMANDS[args.command or DEFAULT_COMMAND]
    socket = Path(args.socket) if args.socket else default_socket(os.environ)
    timeout = args.timeout if args.timeout is not None else command.TIMEOUT
    daemon = Daemon(socket, timeout)
    try:
        return command.run(args, daemon)
    except HarborUnavailable as err:
        print(unreachable(err), file=sys.stderr)
        return EX_UNREACHABLE
    except HarborError as err:
        output.error(err.message)
        return EX_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `harborctl models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_FAILED
    finally:
        daemon.close()


if __name__ == "__main__":
    sys.exit(main())
