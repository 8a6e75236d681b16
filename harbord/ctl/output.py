"""Human output: aligned tables, durations, sizes, and colour only for a terminal.

Colour follows the common conventions, first match wins: NO_COLOR set and not empty
means none (no-color.org; an explicit "no" beats a blanket "force", as in CPython 3.13);
FORCE_COLOR set and not empty (force-color.org) or CLICOLOR_FORCE set and not "0"
(bixense.com/clicolors) means colour even into a pipe; TERM=dumb means none; otherwise
colour when the stream is a terminal.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Literal, TextIO

Style = Literal["bold", "dim", "red", "green", "yellow", "cyan"]
_CODES: dict[Style, str] = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
}
_ANSI = re.compile(r"\033\[[0-9;]*m")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
HEALTH_STYLE: dict[str, Style] = {"up": "green", "degraded": "yellow", "down": "red"}


def colour(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR") or env.get("CLICOLOR_FORCE", "0") not in ("", "0"):
        return True
    if dumb_terminal(env):
        return False
    return (stream or sys.stdout).isatty()


def dumb_terminal(env: Mapping[str, str] | None = None) -> bool:
    """TERM=dumb: a terminal that takes no escape codes (Emacs shell, some CI logs)."""
    return (os.environ if env is None else env).get("TERM") == "dumb"


def paint(text: str, style: Style, stream: TextIO | None = None) -> str:
    return f"\033[{_CODES[style]}m{text}\033[0m" if colour(stream) else text


def width(text: str) -> int:
    return len(_ANSI.sub("", text))


def clip(text: str, limit: int) -> str:
    """At most `limit` visible characters; colour codes are kept and closed when cut."""
    if width(text) <= limit:
        return text
    parts, codes = _ANSI.split(text), _ANSI.findall(text)
    kept: list[str] = []
    left = limit
    for i, part in enumerate(parts):
        kept.append(part[: max(left, 0)])
        left -= len(part)
        if left <= 0:
            break
        if i < len(codes):
            kept.append(codes[i])
    return "".join(kept) + ("\033[0m" if codes else "")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Columns padded to their widest cell (colour codes not counted)."""
    lines = [[paint(h, "bold") for h in header], *rows]
    widths = [max(width(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        indent
        + "  ".join(c + " " * (w - width(c)) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )


def duration(seconds: float) -> str:
    """250ms, 4.2s, 45s, 5m 3s, 23h, 2d 4h: the two largest units, zeros left out."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = round(seconds)
    for i, (unit, size) in enumerate(_UNITS):
        if total >= size:
            text = f"{total // size}{unit}"
            if i + 1 < len(_UNITS):
                next_unit, next_size = _UNITS[i + 1]
                if rest := (total % size) // next_size:
                    text += f" {rest}{next_unit}"
            return text
    return "0s"


def millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 10_000 else duration(value / 1000)


def until(when: float | None, now: float) -> str:
    if when is None:
        return "until unpinned"
    return f"in {duration(when - now)}" if when > now else "expired"


def ago(when: float, now: float) -> str:
    return f"{duration(max(now - when, 0))} ago"


def clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def rate(bytes_per_s: float) -> str:
    return f"{size(int(bytes_per_s))}/s"


def bar(fraction: float, cells: int) -> str:
    """A progress bar `cells` wide, e.g. ████░░░░."""
    done = round(min(max(fraction, 0.0), 1.0) * cells)
    return "█" * done + "░" * (cells - done)


def health(state: str, cooldown: bool) -> str:
    text = paint(state, HEALTH_STYLE[state]) if state in HEALTH_STYLE else paint(state, "dim")
    return text + (", " + paint("cooling down", "yellow") if cooldown else "")


def raw_json(raw: bytes) -> None:
    """harbord's JSON as it came, one document per line."""
    sys.stdout.write(raw.decode("utf-8").rstrip("\n") + "\n")


def error(message: str) -> None:
    print(f"harborctl: {message}", file=sys.stderr)
