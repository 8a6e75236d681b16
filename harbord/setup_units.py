"""`harborctl setup`: install and enable harbord's systemd user units.

Copies the units into `$XDG_CONFIG_HOME/systemd/user/` with harbord.service's
`ExecStart=` pointing at this installation's `harbord`, reloads the user
manager, enables `harbord.socket` and, when `ollama` is installed, the two
backend units. Safe to run again: files that are already right are left alone
and units that are already enabled and running are not touched. `--dry-run`
says what it would do and changes nothing.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

UNIT_FILES = ("harbord.service", "harbord.socket", "ollama-gpu@.service", "ollama-cpu@.service")
SHIPPED_EXEC_START = "ExecStart=/usr/bin/harbord"
EXAMPLE = "ollama.env.example"
# Where a distro package puts user units (then setup only enables them).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/user"), Path("/usr/local/lib/systemd/user"))
# Where `ollama` may be: the units look in the same places (see their ExecStart=).
OLLAMA_DIRS = ("~/.local/bin", "/usr/local/bin", "/usr/bin", "/bin")
BACKEND_PORTS = {"ollama-gpu": 11434, "ollama-cpu": 11435}
SYSTEMCTL_TIMEOUT = 120.0


class SetupError(Exception):
    """Setup cannot go on; the text says why and what to do."""


@dataclass
class Setup:
    env: Mapping[str, str]
    dry_run: bool
    out: TextIO
    harbord: str | None = None
    with_backends: bool = True
    done: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    # -- where things are ----------------------------------------------------------

    @property
    def user(self) -> str:
        return self.env.get("USER") or getpass.getuser()

    @property
    def unit_dir(self) -> Path:
        base = self.env.get("XDG_CONFIG_HOME")
        if not base or not os.path.isabs(base):
            base = os.path.join(self.env.get("HOME") or os.path.expanduser("~"), ".config")
        return Path(base) / "systemd" / "user"

    def say(self, text: str) -> None:
        prefix = "would: " if self.dry_run else ""
        print(f"{prefix}{text}", file=self.out)
        self.done.append(text)

    # -- systemctl --------------------------------------------------------------------

    def systemctl(self, *args: str, change: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `systemctl --user ARGS`; under --dry-run, changes are only said."""
        if change and self.dry_run:
            self.say("systemctl --user " + shlex.join(args))
            return subprocess.CompletedProcess(["systemctl", *args], 0, "", "")
        try:
            result = subprocess.run(
                ["systemctl", "--user", "--no-pager", *args],
                capture_output=True,
                text=True,
                timeout=SYSTEMCTL_TIMEOUT,
                env=dict(self.env),
                check=False,
            )
        except FileNotFoundError:
            raise SetupError("systemctl not found: harbord's units need systemd") from None
        except subprocess.TimeoutExpired:
            raise SetupError(f"systemctl --user {args[0]} did not answer within 120s") from None
        if change:
            if result.returncode != 0:
                detail = result.stderr.strip() or f"exit code {result.returncode}"
                raise SetupError(f"systemctl --user {shlex.join(args)} failed: {detail}")
            self.say("systemctl --user " + shlex.join(args))
        return result

    def query(self, verb: str, unit: str) -> str:
        return self.systemctl(verb, unit, change=False).stdout.strip()

    def check_manager(self) -> None:
        result = self.systemctl("show-environment", change=False)
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[0] if result.stderr.strip() else "no answer"
            raise SetupError(
                f"cannot reach your systemd user manager ({reason}). Log in to a session with "
                "systemd (or run `loginctl enable-linger $USER` as an administrator) and try again"
            )

    # -- the steps -----------------------------------------------------------------------

    def executable(self) -> str:
        """ExecStart= for harbord: the `harbord` script of this installation."""
        if self.harbord:
            path = Path(self.harbord).expanduser()
            if not path.is_absolute() or not os.access(path, os.X_OK):
                raise SetupError(
                    f"--harbord {self.harbord}: expected an absolute path to an executable"
                )
            return quote(str(path))
        beside = Path(sys.executable).parent / "harbord"
        if beside.is_file() and os.access(beside, os.X_OK):
            return quote(str(beside))
        found = shutil.which("harbord", path=self.env.get("PATH"))
        if found:
            return quote(os.path.abspath(found))
        # Not installed as a script (e.g. run from a checkout): the module works as well.
        return f"{quote(os.path.abspath(sys.executable))} -m harbord"

    def install_units(self, source: Path) -> bool:
        """Write the units that are missing or different; True when any file changed."""
        exec_start = self.executable()
        if exec_start.startswith(("/tmp/", "/var/tmp/", '"/tmp/', '"/var/tmp/')):
            self.advice.append(
                f"harbord is installed under a temporary directory ({exec_start}); harbord.service "
                "uses PrivateTmp=yes and will not find it there. Install it elsewhere."
            )
        changed = False
        if not self.unit_dir.is_dir():
            self.say(f"create {self.unit_dir}")
            if not self.dry_run:
                self.unit_dir.mkdir(parents=True, exist_ok=True)
        for name in UNIT_FILES:
            text = (source / name).read_text(encoding="utf-8")
            if name == "harbord.service":
                text = rewrite_exec_start(text, exec_start)
            target = self.unit_dir / name
            try:
                current = target.read_text(encoding="utf-8")
            except FileNotFoundError:
                current = None
            except OSError as err:
                raise SetupError(f"cannot read {target}: {err.strerror}") from None
            if current == text:
                continue
            self.say(f"{'install' if current is None else 'update'} {target}")
            changed = True
            if not self.dry_run:
                write_atomically(target, text)
        return changed

    def enable(self, units: Sequence[str]) -> None:
        """`enable --now` the units that are not enabled and running already."""
        pending = [
            unit
            for unit in units
            if self.query("is-enabled", unit) != "enabled"
            or self.query("is-active", unit) != "active"
        ]
        if pending:
            self.systemctl("enable", "--now", *pending)

    def backends(self) -> None:
        units = [f"ollama-gpu@{self.user}.service", f"ollama-cpu@{self.user}.service"]
        ollama = find_ollama(self.env)
        if ollama is None:
            self.advice.append(
                "ollama was not found (looked in PATH and "
                + ", ".join(OLLAMA_DIRS)
                + "). Install it "
                "(https://ollama.com/download), or set OLLAMA_BIN=/path/to/ollama in "
                "~/.config/harbor/ollama.env, then run:\n"
                f"    systemctl --user enable --now {' '.join(units)}"
            )
            return
        print(f"ollama found: {ollama}", file=self.out)
        for unit in units:
            port = BACKEND_PORTS[unit.split("@")[0]]
            if self.query("is-active", unit) != "active" and port_in_use(port):
                self.advice.append(
                    f"something else already listens on 127.0.0.1:{port}, so {unit} cannot start; "
                    "often it is the system-wide ollama.service of the official installer: "
                    "`sudo systemctl disable --now ollama.service`"
                )
        self.enable(units)

    def lingering(self) -> None:
        if shutil.which("loginctl", path=self.env.get("PATH")) is None:
            linger = ""
        else:
            try:
                result = subprocess.run(
                    ["loginctl", "show-user", self.user, "--property=Linger", "--value"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                linger = result.stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                linger = ""
        if linger != "yes":
            self.advice.append(
                "user units stop when you log out. To keep harbord and the backends running "
                f"without a session: loginctl enable-linger {self.user}"
            )

    def run(self) -> int:
        self.check_manager()
        packaged = packaged_units(self.executable())
        if packaged is not None:
            print(f"harbord's units come with its package, in {packaged}", file=self.out)
            if (self.unit_dir / "harbord.service").exists():
                self.advice.append(
                    f"{self.unit_dir / 'harbord.service'} (from an earlier setup) overrides the "
                    "packaged unit; remove it and run `systemctl --user daemon-reload` to use the "
                    "package's"
                )
        elif self.install_units(units_source()):
            self.systemctl("daemon-reload")
            if self.query("is-active", "harbord.service") == "active":
                self.advice.append(
                    "harbord.service is running with the old unit; to use the new one: "
                    "systemctl --user restart harbord.service"
                )
        self.enable(["harbord.socket"])
        if self.with_backends:
            self.backends()
        self.lingering()
        if not self.done:
            print("nothing to do: harbord's units are installed and enabled", file=self.out)
        print("\nnext:", file=self.out)
        for text in self.advice:
            print(f"  - {text}", file=self.out)
        example = env_example()
        print(
            "  - harborctl status    (harbord starts on the first request to "
            "$XDG_RUNTIME_DIR/harbor.sock)\n"
            "  - settings: ~/.config/harbor/harbord.toml; Ollama overrides: "
            "~/.config/harbor/ollama.env" + (f" (example: {example})" if example else ""),
            file=self.out,
        )
        return 0


# -- helpers -----------------------------------------------------------------------------


def quote(path: str) -> str:
    """A path as one ExecStart= word: specifiers and variables escaped, quoted if needed."""
    escaped = path.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in escaped):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def rewrite_exec_start(text: str, exec_start: str) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\n") == SHIPPED_EXEC_START:
            lines[i] = f"ExecStart={exec_start}\n"
            return "".join(lines)
    raise SetupError(f"harbord.service has no line {SHIPPED_EXEC_START!r} to point at harbord")


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        raise SetupError(f"cannot write {path}: {err.strerror}") from None


def units_source() -> Path:
    """The shipped unit files: in the source tree, or where the wheel put them."""
    candidates = [
        Path(__file__).resolve().parent.parent / "units",
        Path(sys.prefix) / "share" / "harbord" / "units",
        Path("/usr/local/share/harbord/units"),
        Path("/usr/share/harbord/units"),
    ]
    for path in candidates:
        if all((path / name).is_file() for name in UNIT_FILES):
            return path
    raise SetupError(
        "harbord's unit files were not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "); reinstall harbord"
    )


def packaged_units(exec_start: str) -> Path | None:
    """The system directory holding harbord's units, when they belong to this harbord."""
    for directory in SYSTEM_UNIT_DIRS:
        try:
            service = (directory / "harbord.service").read_text(encoding="utf-8")
        except OSError:
            continue
        if all((directory / name).is_file() for name in UNIT_FILES) and (
            f"ExecStart={exec_start}\n" in service
        ):
            return directory
    return None


def env_example() -> Path | None:
    candidates = [
        Path(__file__).resolve().parent.parent / "units",
        Path(sys.prefix) / "share" / "harbord" / "units",
        Path("/usr/share/doc/harbord"),
    ]
    return next((p / EXAMPLE for p in candidates if (p / EXAMPLE).is_file()), None)


def find_ollama(env: Mapping[str, str]) -> str | None:
    if env.get("OLLAMA_BIN") and os.access(env["OLLAMA_BIN"], os.X_OK):
        return env["OLLAMA_BIN"]
    home = env.get("HOME") or os.path.expanduser("~")
    dirs = [d.replace("~", home, 1) for d in OLLAMA_DIRS]
    search = os.pathsep.join([*(env.get("PATH") or "").split(os.pathsep), *dirs])
    return shutil.which("ollama", path=search)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would be done, change nothing"
    )
    parser.add_argument(
        "--no-backends", action="store_true", help="do not enable the Ollama backend units"
    )
    parser.add_argument(
        "--harbord",
        metavar="PATH",
        help="the harbord executable for ExecStart= (default: the one installed with this Python)",
    )


def run_setup(
    options: argparse.Namespace | Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """`harborctl setup`. options: parsed arguments (see add_arguments) or an argv list."""
    if options is None or not isinstance(options, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="harborctl setup", description=__doc__.split("\n")[0])
        add_arguments(parser)
        options = parser.parse_args(list(options) if options is not None else [])
    out = out or sys.stdout
    setup = Setup(
        env=os.environ if env is None else env,
        dry_run=bool(getattr(options, "dry_run", False)),
        out=out,
        harbord=getattr(options, "harbord", None),
        with_backends=not getattr(options, "no_backends", False),
    )
    try:
        return setup.run()
    except SetupError as err:
        print(f"harborctl setup: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run_setup(sys.argv[1:]))
