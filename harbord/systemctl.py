"""Running `systemctl --user`, D-Bus-free: argument lists with a timeout, never a shell."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil

# A systemd service name as harbord accepts it from the configuration: no
# leading '-', no whitespace, no shell or glob characters.
UNIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9:_.@\\-]{0,240}\.service\Z")
MANAGER_STATES = ("running", "degraded", "starting", "initializing", "maintenance")
SHOW_TIMEOUT = 10.0


class SystemctlError(Exception):
    pass


async def systemctl(*args: str, timeout: float = SHOW_TIMEOUT) -> tuple[int, str, str]:
    """Run `systemctl --user ARGS`; (exit code, stdout, stderr). Raises SystemctlError."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "systemctl",
            "--user",
            "--no-pager",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise SystemctlError(f"cannot run systemctl: {err.strerror or err}") from None
    try:
        async with asyncio.timeout(timeout):
            out, errout = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # harbord is stopping: no systemctl left behind
        raise
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SystemctlError(
            f"systemctl --user {args[0]} did not answer within {timeout:g}s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), errout.decode(errors="replace")


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


async def manager_problem() -> str | None:
    """None when a user manager answers; else why supervision is off."""
    if shutil.which("systemctl") is None:
        return "systemctl not found"
    try:
        code, out, err = await systemctl("is-system-running")
        if out.strip() in MANAGER_STATES:
            return None
        code, _, err2 = await systemctl("show-environment")
    except SystemctlError as error:
        return str(error)
    if code == 0:
        return None
    reason = first_line(err2) or first_line(err) or out.strip() or f"exit code {code}"
    return f"no systemd user manager ({reason})"


def parse_show(text: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    return props
