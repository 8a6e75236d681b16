"""harbord's unit files: where the shipped ones are, and harbord.service made to fit.

Fitting means ExecStart= pointing at this installation's harbord, and the unit type
for the systemd that runs it. The shipped unit is `Type=notify-reload` (systemd 253+):
systemd sends SIGHUP itself and the reload job waits for harbord's RELOADING=1 ...
READY=1, so `systemctl --user reload` returns once the new configuration is in use and
fails when harbord does not answer. systemd 252 and older do not know that type (they
log "Failed to parse service type" and run the unit as Type=simple, which cannot
reload); for them `harborctl setup` installs harbord.service as `Type=notify` with an
`ExecReload=` that sends SIGHUP, or, when the unit comes from a distro package, writes
FALLBACK_DROP_IN. Pure text and file lookups; harbord.setup_units runs systemctl.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

UNIT_FILES = ("harbord.service", "harbord.socket", "ollama-gpu@.service", "ollama-cpu@.service")
SHIPPED_EXEC_START = "ExecStart=/usr/bin/harbord"
EXAMPLE = "ollama.env.example"
# Where a distro package puts user units (then setup only enables them).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/user"), Path("/usr/local/lib/systemd/user"))

NOTIFY_RELOAD_SINCE = 253
SHIPPED_TYPE = "Type=notify-reload"
OLD_SYSTEMD_RELOAD = "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n"
# For a packaged harbord.service, in ~/.config/systemd/user/ (see harbord(8)).
FALLBACK_DROP_IN = "harbord.service.d/reload-before-systemd-253.conf"
FALLBACK_DROP_IN_TEXT = (
    "# Written by `harborctl setup`: this systemd is older than 253 and does not know\n"
    "# Type=notify-reload. Remove this file once systemd is 253 or newer.\n"
    "[Service]\n" + OLD_SYSTEMD_RELOAD
)
_VERSION = re.compile(r"^systemd (\d+)\b")


class UnitFileError(Exception):
    """The unit files cannot be found or fitted; the text says why and what to do."""


def parse_version(systemctl_version: str) -> int | None:
    """252 from `systemctl --version`'s first line, "systemd 252 (252.38-1~deb12u1)"."""
    match = _VERSION.match(systemctl_version.strip())
    return int(match.group(1)) if match else None


def systemd_version() -> int | None:
    """The installed systemd's version (`systemctl --version`), None when there is none."""
    try:
        result = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(result.stdout)


def knows_notify_reload(version: int | None) -> bool:
    # Unknown (no systemctl): assume a current systemd, as the shipped unit does.
    return version is None or version >= NOTIFY_RELOAD_SINCE


def service_for(text: str, version: int | None) -> str:
    """harbord.service's text for this systemd: before 253, Type=notify with ExecReload=."""
    if knows_notify_reload(version):
        return text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip("\n") == SHIPPED_TYPE:
            lines[i] = OLD_SYSTEMD_RELOAD
            return "".join(lines)
    return text  # someone's own unit: leave its Type= alone


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
    raise UnitFileError(f"harbord.service has no line {SHIPPED_EXEC_START!r} to point at harbord")


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
    raise UnitFileError(
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


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        raise UnitFileError(f"cannot write {path}: {err.strerror}") from None
