"""harborctl completion: shell completion scripts made from harborctl's own parser.

bash and zsh scripts come from shtab, which reads the argparse parser, so they
never fall behind a new subcommand or option. The fish script is written here
from the same parser: Debian 13's shtab (1.7) has no fish. The distro packages
run this at build time and install the scripts; pip users run
`harborctl completion SHELL` and need shtab for bash and zsh (the `completion`
extra): a soft import, since the daemon and the other commands never need it.

Backend names (restart's and pin's BACKEND, every --backend) complete from the
configured backends, `harborctl completion --backends`: read from harbord.toml
(default: gpu and cpu), not asked of harbord, so completing is instant and works
while harbord is down.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator

from harbord import config
from harbord.ctl import EX_FAILED, EX_OK, EX_USAGE
from harbord.ctl.http import Daemon

HELP = "print a shell completion script: bash, zsh or fish"
TIMEOUT = None  # unused: completion does not call harbord
SHELLS = ("bash", "zsh", "fish")
PROG = "harborctl"
BACKENDS_FUNCTION = "_harborctl_backends"
LIST_BACKENDS = f"{PROG} completion --backends 2>/dev/null"
# How each shell asks for the backend names (shtab's `.complete` convention).
BACKEND_COMPLETE = {"bash": BACKENDS_FUNCTION, "zsh": BACKENDS_FUNCTION}
PREAMBLE = {
    # shtab calls the function with the word being completed; stdout is the answer.
    "bash": f'{BACKENDS_FUNCTION}() {{\n  compgen -W "$({LIST_BACKENDS})" -- "$1"\n}}\n',
    "zsh": f'{BACKENDS_FUNCTION}() {{\n  compadd -- ${{(f)"$({LIST_BACKENDS})"}}\n}}\n',
}
NO_SHTAB = (
    "the bash and zsh scripts are made with shtab, which is not installed: "
    "pip install 'harbord[completion]' (Debian, Ubuntu: apt install python3-shtab). "
    "The distro packages of harbord ship the scripts ready-made."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", metavar="SHELL", nargs="?", choices=SHELLS, help=", ".join(SHELLS))
    parser.add_argument(
        "--backends", action="store_true", help="list the configured backend names and exit"
    )


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    if args.backends:
        print("\n".join(backend_names()))
        return EX_OK
    if args.shell is None:
        print(f"{PROG} completion: which shell? one of {', '.join(SHELLS)}", file=sys.stderr)
        return EX_USAGE
    from harbord.ctl.main import build_parser  # main imports this module

    try:
        sys.stdout.write(script(build_parser(), args.shell))
    except ImportError:
        print(f"{PROG} completion: {NO_SHTAB}", file=sys.stderr)
        return EX_FAILED
    return EX_OK


def backend_names() -> list[str]:
    """The backends in harbord.toml; the default pair when it cannot be read."""
    try:
        return list(config.load().backends)
    except (config.ConfigError, OSError):
        return list(config.default_backends())


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `shell`; ImportError when bash or zsh lack shtab."""
    mark_backends(parser)
    if shell == "fish":
        return fish_script(parser)
    import shtab

    return shtab.complete(parser, shell=shell, preamble=PREAMBLE[shell]).rstrip("\n") + "\n"


def mark_backends(parser: argparse.ArgumentParser) -> None:
    """Tag every argument that names a backend, so the scripts complete the names."""
    for _, action in _actions(parser):
        if _takes_backend(action):
            action.complete = BACKEND_COMPLETE  # type: ignore[attr-defined]


def _takes_backend(action: argparse.Action) -> bool:
    return action.dest == "backend" or action.metavar == "BACKEND"


def _actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    """(subcommand path, action) for every argument of the parser and its subparsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))
        else:
            yield path, action


# -- fish ------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._get_subactions()}
            return [(name, helps.get(name, "")) for name in action.choices]
    return []


def _first_line(text: str | None) -> str:
    return (text or "").split("\n")[0].replace("%%", "%").replace("%(default)s", "")


def fish_script(parser: argparse.ArgumentParser) -> str:
    subcommands = _subcommands(parser)
    names = " ".join(name for name, _ in subcommands)
    with_value = sorted(
        {
            option
            for _, action in _actions(parser)
            if action.nargs != 0 and action.option_strings
            for option in action.option_strings
        }
    )
    lines = [
        f"# fish completion for {PROG}, made from its parser by `{PROG} completion fish`.",
        f"complete -c {PROG} -f",
        "",
        "# The positional argument being typed after the subcommand, counted from 1.",
        "function __harborctl_position",
        "    set -l words (commandline -opc)",
        "    set -l count 0",
        "    set -l skip 0",
        "    for word in $words[2..-1]",
        "        if test $skip -eq 1",
        "            set skip 0",
        f"        else if contains -- $word {' '.join(with_value)}",
        "            set skip 1",
        "        else if not string match -q -- '-*' $word",
        "            set count (math $count + 1)",
        "        end",
        "    end",
        "    echo $count",
        "end",
        "",
    ]
    top = f"not __fish_seen_subcommand_from {names}"
    for name, help_ in subcommands:
        lines.append(f"complete -c {PROG} -n {shlex.quote(top)} -a {name} -d {_q(help_)}")
    for path, action in _actions(parser):
        if action.help == argparse.SUPPRESS:
            continue
        where = f"__fish_seen_subcommand_from {path[0]}" if path else top
        candidates = _fish_candidates(action)
        if action.option_strings:
            flags = " ".join(
                f"-l {o[2:]}" if o.startswith("--") else f"-s {o[1:]}"
                for o in action.option_strings
            )
            # -x: only the candidates; -r: a value, which may be a file (--socket)
            value = "" if action.nargs == 0 else f" -x -a {candidates}" if candidates else " -r"
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(where)} {flags}{value}"
                f" -d {_q(_first_line(action.help))}"
            )
        elif path and candidates:
            index = _position(parser, path, action)
            condition = f"{where}; and test (__harborctl_position) -eq {index}"
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(condition)} -a {candidates}"
                f" -d {_q(str(action.metavar or action.dest))}"
            )
    return "\n".join(lines) + "\n"


def _fish_candidates(action: argparse.Action) -> str:
    if _takes_backend(action):
        return shlex.quote(f"({LIST_BACKENDS})")
    if action.choices:
        return shlex.quote(" ".join(str(c) for c in action.choices))
    return ""


def _position(
    parser: argparse.ArgumentParser, path: tuple[str, ...], action: argparse.Action
) -> int:
    """How many words precede this positional: the subcommand and the positionals before."""
    positionals = [a for p, a in _actions(parser) if p == path and not a.option_strings]
    return positionals.index(action) + 1


def _q(text: str) -> str:
    return shlex.quote(text) if text else "''"
