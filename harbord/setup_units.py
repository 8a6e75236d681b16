"""`harborctl setup`: install and enable harbord's systemd user units.

Copies the units into `$XDG_CONFIG_HOME/systemd/user/` with harbord.service's
`ExecStart=` pointing at this installation's `harbord`, reloads the user
manager, enables `harbord.socket` and, when `ollama` is installed, the two
backend units. Safe to run again: files that are already right are left alone
and units that are already enabled and running are not touched. `--dry-run`
says what it would do and changes nothing, even without a user manager (it then
assumes nothing is enabled). `--json` prints a SetupReport instead of the text.
The unit files and their fitting to this systemd: harbord.unit_files.
"""

from __future__ import annotations

import argparse
import getpass
import io
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

import msgspec

from harbord import unit_files
from harbord.unit_files import UNIT_FILES, rewrite_exec_start

# Where `ollama` may be: the units look in the same places (see their ExecStart=).
OLLAMA_DIRS = ("~/.local/bin", "/usr/local/bin", "/usr/bin", "/bin")
BACKEND_PORTS = {"ollama-gpu": 11434, "ollama-cpu": 11435}
SYSTEMCTL_TIMEOUT = 120.0


class SetupError(unit_files.UnitFileError):
    """Setup cannot go on; the text says why and what to do."""


class SetupReport(msgspec.Struct):
    """What `harborctl setup --json` prints: the steps taken (or, dry_run, to take)."""

    ok: bool
    dry_run: bool
    steps: list[str]
    advice: list[str]
    error: str | None
    unit_dir: str
    packaged_units: str | None  # the system directory, when a package installed the units
    user_manager: bool  # reachable; false only under --dry-run (a real run fails then)
    systemd_version: int | None


@dataclass
class Setup:
    env: Mapping[str, str]
    dry_run: bool
    out: TextIO
    harbord: str | None = None
    with_backends: bool = True
    done: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    manager: bool = True
    systemd: int | None = None
    packaged: Path | None = None

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
        if not self.manager:  # --dry-run without a manager: as if nothing were enabled
            return ""
        return self.systemctl(verb, unit, change=False).stdout.strip()

    def check_manager(self) -> None:
        try:
            result = self.systemctl("show-environment", change=False)
            lines = result.stderr.strip().splitlines()
            reason = lines[0] if lines else "no answer"
        except SetupError as err:  # no systemctl, or no answer
            result, reason = None, str(err)
        if result is not None and result.returncode == 0:
            return
        problem = (
            f"cannot reach your systemd user manager ({reason}). Log in to a session with "
            "systemd (or run `loginctl enable-linger $USER` as an administrator) and try again"
        )
        if not self.dry_run:
            raise SetupError(problem)
        self.manager = False
        self.advice.append(problem + "; what is listed assumes no unit is enabled yet")

    # -- the steps -----------------------------------------------------------------------

    def executable(self) -> str:
        """ExecStart= for harbord: the `harbord` script of this installation."""
        if self.harbord:
            path = Path(self.harbord).expanduser()
            if not path.is_absolute() or not os.access(path, os.X_OK):
                raise SetupError(
                    f"--harbord {self.harbord}: expected an absolute path to an executable"
                )
            return unit_files.quote(str(path))
        beside = Path(sys.executable).parent / "harbord"
        if beside.is_file() and os.access(beside, os.X_OK):
            return unit_files.quote(str(beside))
        found = shutil.which("harbord", path=self.env.get("PATH"))
        if found:
            return unit_files.quote(os.path.abspath(found))
        # Not installed as a script (e.g. run from a checkout): the module works as well.
        return f"{unit_files.quote(os.path.abspath(sys.executable))} -m harbord"

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
                text = unit_files.service_for(rewrite_exec_start(text, exec_start), self.systemd)
            target = self.unit_dir / name
            try:
                current = target.read_text(encoding="utf-8")
            except FileNotFoundError:
                current = None
            except OSError as err:
                raise SetupError(f"cannot read {target}: {err.strerror}") from None
            if current == text:
                continue
            verb = "install" if current is None else "update"
            fitted = name == "harbord.service" and not unit_files.knows_notify_reload(self.systemd)
            why = f" (Type=notify: systemd {self.systemd} predates notify-reload)" if fitted else ""
            self.say(f"{verb} {target}{why}")
            changed = True
            if not self.dry_run:
                unit_files.write_atomically(target, text)
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

    def reload_fallback(self) -> bool:
        """For a packaged unit: the Type=notify drop-in on old systemd, gone on a new one."""
        drop_in = self.unit_dir / unit_files.FALLBACK_DROP_IN
        if unit_files.knows_notify_reload(self.systemd):
            if not drop_in.exists():
                return False
            self.say(f"remove {drop_in} (systemd {self.systemd} knows Type=notify-reload)")
            if not self.dry_run:
                drop_in.unlink()
            return True
        try:
            if drop_in.read_text(encoding="utf-8") == unit_files.FALLBACK_DROP_IN_TEXT:
                return False
        except OSError:
            pass
        self.say(f"install {drop_in} (systemd {self.systemd} is older than 253)")
        if not self.dry_run:
            drop_in.parent.mkdir(parents=True, exist_ok=True)
            unit_files.write_atomically(drop_in, unit_files.FALLBACK_DROP_IN_TEXT)
        return True

    def run(self) -> int:
        self.check_manager()
        self.systemd = unit_files.systemd_version()
        packaged = self.packaged = unit_files.packaged_units(self.executable())
        if packaged is not None:
            print(f"harbord's units come with its package, in {packaged}", file=self.out)
            if (self.unit_dir / "harbord.service").exists():
                self.advice.append(
                    f"{self.unit_dir / 'harbord.service'} (from an earlier setup) overrides the "
                    "packaged unit; remove it and run `systemctl --user daemon-reload` to use the "
                    "package's"
                )
            if self.reload_fallback():
                self.systemctl("daemon-reload")
        elif self.install_units(unit_files.units_source()):
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
        example = unit_files.env_example()
        print(
            "  - harborctl status    (harbord starts on the first request to "
            "$XDG_RUNTIME_DIR/harbor.sock)\n"
            "  - settings: ~/.config/harbor/harbord.toml; Ollama overrides: "
            "~/.config/harbor/ollama.env" + (f" (example: {example})" if example else ""),
            file=self.out,
        )
        return 0


# -- helpers -----------------------------------------------------------------------------


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
        parser.add_argument(
            "--json", action="store_true", help="print a JSON report"
        )  # harborctl's
        options = parser.parse_args(list(options) if options is not None else [])
    out = out or sys.stdout
    as_json = bool(getattr(options, "json", False))
    setup = Setup(
        env=os.environ if env is None else env,
        dry_run=bool(getattr(options, "dry_run", False)),
        out=io.StringIO() if as_json else out,  # the text is not wanted with --json
        harbord=getattr(options, "harbord", None),
        with_backends=not getattr(options, "no_backends", False),
    )
    error: str | None = None
    try:
        code = setup.run()
    except unit_files.UnitFileError as err:
        error, code = str(err), 1
        print(f"harborctl setup: {err}", file=sys.stderr)
    if as_json:
        report = SetupReport(
            ok=code == 0,
            dry_run=setup.dry_run,
            steps=setup.done,
            advice=setup.advice,
            error=error,
            unit_dir=str(setup.unit_dir),
            packaged_units=str(setup.packaged) if setup.packaged else None,
            user_manager=setup.manager,
            systemd_version=setup.systemd,
        )
        out.write(msgspec.json.encode(report).decode() + "\n")
    return code


if __name__ == "__main__":
    sys.exit(run_setup(sys.argv[1:]))
