"""harborctl top: a live view of the backends, pins and the latest routing decisions.

On a terminal it takes the alternate screen and redraws every --interval seconds
(at once after a resize); `q` or Ctrl-C quits and gives the terminal back as it was.
When stdout is not a terminal, TERM is dumb, or with --once, it prints one plain snapshot. If
harbord stops answering, the last view stays up under a warning and the next
refresh tries again; only a first failure to connect ends it (exit 2).
Requests/s is each backend's `served` count, differenced between two refreshes.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import termios
import time
import tty
from contextlib import ExitStack
from dataclasses import dataclass
from types import FrameType
from typing import Literal, TextIO

from harbord import harbor_endpoints as api
from harbord.client import HarborError, HarborUnavailable
from harbord.ctl import EX_OK, output
from harbord.ctl.http import Daemon
from harbord.ctl.output import paint
from harbord.schemas import Attempt, BackendStatus, Decision, Status

HELP = "watch the backends, pins and the latest routing decisions, live"
TIMEOUT = 5.0  # per refresh; a daemon slower than that is shown as not answering
QUIT_KEYS = b"qQ\x03"  # \x03: Ctrl-C, should the terminal pass it through as a key


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return int(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval", type=_seconds, default=1.0, metavar="SECONDS",
        help="time between refreshes (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--last", type=_count, default=10, metavar="N",
        help="how many routing decisions to show (default: 10)",
    )  # fmt: skip
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")


@dataclass(frozen=True)
class Snapshot:
    status: Status
    decisions: list[Decision]
    at: float  # time.monotonic() when it came
    raw: bytes  # {"status": ..., "decisions": ...} as harbord sent them


def fetch(daemon: Daemon, last: int) -> Snapshot:
    status = daemon.client.fetch(api.STATUS)
    decisions = daemon.client.fetch(api.DECISIONS, limit=last)
    raw = b'{"status":' + status.raw + b',"decisions":' + decisions.raw + b"}"
    return Snapshot(status.value, decisions.value, time.monotonic(), raw)


def rates(before: Snapshot | None, after: Snapshot) -> dict[str, float]:
    """Requests served per second by each backend between two snapshots of one daemon."""
    if before is None or before.status.started_at != after.status.started_at:
        return {}
    elapsed = after.at - before.at
    served = {b.name: b.served for b in before.status.backends}
    return {
        b.name: max(b.served - served[b.name], 0) / elapsed
        for b in after.status.backends
        if b.name in served and elapsed > 0
    }


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    first = fetch(daemon, args.last)  # HarborUnavailable here: main's exit 2
    if args.json:
        output.raw_json(first.raw)
    elif args.once or not sys.stdout.isatty() or output.dumb_terminal():
        print("\n".join(render(first, {}, time.time())))
    else:
        _live(daemon, args, first)
    return EX_OK


def _live(daemon: Daemon, args: argparse.Namespace, snap: Snapshot) -> None:
    before: Snapshot | None = None
    problem: str | None = None
    next_fetch = time.monotonic() + args.interval
    try:
        with Screen(sys.stdout, sys.stdin) as screen:
            while True:
                lines = render(snap, rates(before, snap), time.time(), problem)
                footer = f"q quits · every {args.interval:g}s · {time.strftime('%H:%M:%S')}"
                screen.draw(lines, paint(footer, "dim"))
                event = screen.wait(next_fetch - time.monotonic())
                if event == "quit":
                    return
                if event != "timeout":
                    continue  # a resize or another key: redraw what we have
                next_fetch = time.monotonic() + args.interval
                try:
                    snap, before, problem = fetch(daemon, args.last), snap, None
                except HarborError as err:
                    age = output.duration(time.monotonic() - snap.at)
                    why = err.reason if isinstance(err, HarborUnavailable) else err.message
                    problem = (
                        f"harbord is not answering ({why}): below is what it said {age} ago;"
                        f" trying again every {args.interval:g}s on {daemon.socket}"
                    )
    except KeyboardInterrupt:
        return


def render(
    snap: Snapshot, per_s: dict[str, float], now: float, problem: str | None = None
) -> list[str]:
    s, c = snap.status, snap.status.counters
    lines = [
        f"{paint('harbord', 'bold')} {s.version}  up {output.duration(s.uptime_s)}"
        f"  pid {s.pid}  requests {c.requests}: {c.served} served,"
        f" {_counter(c.fallbacks, 'fallbacks', 'yellow')}, {_counter(c.failed, 'failed', 'red')};"
        f" {s.in_flight} in flight"
    ]
    if problem:
        lines.append(paint(problem, "red"))
    lines += ["", _backends(s.backends, per_s)]
    for b in s.backends:
        if b.last_error and b.health != "up":
            lines.append(f"  {b.name}: {b.last_error_class or 'other'}: {b.last_error}")
        lines += [paint(f"  {b.name} memory pressure: {w}", "yellow") for w in b.memory_pressure]
    lines += ["", paint("PINS", "bold")]
    if not s.pins:
        lines.append(paint("  none", "dim"))
    for model, pin in s.pins.items():
        lines.append(
            f"  {model} → {pin.backend}  {output.until(pin.until, now)}"
            f"  ({pin.source}: {pin.reason})"
        )
    lines += ["", paint("LATEST REQUESTS", "bold")]
    if snap.decisions:
        rows = [_decision(d) for d in snap.decisions]
        header = ("ID", "TIME", "MODEL", "INTENT", "SERVED BY", "FALLBACKS", "STATUS", "TTFB", "MS")
        lines.append(output.table(header, rows, indent="  "))
    else:
        lines.append(paint("  none yet", "dim"))
    return "\n".join(lines).split("\n")


def _counter(n: int, what: str, style: output.Style) -> str:
    return paint(f"{n} {what}", style) if n else f"{n} {what}"


def _backends(backends: list[BackendStatus], per_s: dict[str, float]) -> str:
    header = (
        "BACKEND", "KIND", "HEALTH", "UNIT", "IN FLIGHT", "QUEUED", "REQ/S", "TTFT P50", "VRAM",
        "LOADED",
    )  # fmt: skip
    rows = []
    for b in backends:
        vram = sum(m.size_vram for m in b.loaded)
        rate = per_s.get(b.name)
        rows.append((
            paint(b.name, "bold"),
            b.kind,
            output.health(b.health, b.cooldown),
            _unit(b),
            str(b.in_flight),
            paint(str(b.queued), "yellow") if b.queued else "0",
            "-" if rate is None else f"{rate:.1f}",
            output.millis(b.ttfb_p50_ms),
            output.size(vram) if b.loaded else "-",
            ", ".join(m.name for m in b.loaded) or "-",
        ))  # fmt: skip
    return output.table(header, rows)


def _unit(b: BackendStatus) -> str:
    u = b.unit_status
    if u is None:
        return "-"
    state = paint(
        f"{u.active_state}/{u.sub_state}", "green" if u.active_state == "active" else "red"
    )
    return state + (f", {u.n_restarts} restarts" if u.n_restarts else "")


def _fallback(a: Attempt) -> str:
    return f"{a.backend}={a.error_class or ('skipped' if a.outcome == 'skipped' else 'other')}"


def _decision(d: Decision) -> tuple[str, ...]:
    fallbacks = ", ".join(_fallback(a) for a in d.attempts if a.outcome != "served")
    if not d.status:
        status = paint("gone", "yellow")  # the client went away before an answer
    else:
        status = paint(str(d.status), "red" if d.status >= 400 else "green")
    return (
        d.id,
        time.strftime("%H:%M:%S", time.localtime(d.time)),
        d.model or d.path,
        d.intent or "-",
        paint(d.served_by, "green") if d.served_by else paint("not served", "red"),
        paint(fallbacks, "yellow") if fallbacks else "-",
        status,
        output.millis(d.first_byte_ms),
        f"{d.duration_ms:.0f}",
    )


Event = Literal["quit", "key", "resize", "timeout"]


class Screen:
    """The terminal while `top` runs: alternate screen, no cursor, keys one at a time
    (cbreak: no echo, Ctrl-C still a signal). Everything is undone on the way out."""

    def __init__(self, out: TextIO, keys: TextIO) -> None:
        self.out = out
        self.keys: int | None = keys.fileno() if keys.isatty() else None
        self._stack = ExitStack()
        self._wakeup = -1

    def __enter__(self) -> Screen:
        with ExitStack() as stack:
            if self.keys is not None:
                fd, saved = self.keys, termios.tcgetattr(self.keys)
                stack.callback(termios.tcsetattr, fd, termios.TCSADRAIN, saved)
                tty.setcbreak(fd)
            # A resize (SIGWINCH) writes to the pipe, so wait() redraws at once.
            self._wakeup, w = os.pipe()
            stack.callback(os.close, self._wakeup)
            stack.callback(os.close, w)
            os.set_blocking(w, False)
            stack.callback(signal.signal, signal.SIGWINCH, signal.signal(signal.SIGWINCH, _ignore))
            stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(w))
            stack.callback(self._write, "\033[?25h\033[?1049l")  # cursor back, main screen
            self._write("\033[?1049h\033[?25l\033[H\033[2J")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def draw(self, lines: list[str], footer: str) -> None:
        columns, rows = os.get_terminal_size(self.out.fileno())
        # Not the last column: some terminals wrap there. The footer takes the last row.
        body = [output.clip(line, columns - 1) for line in lines[: max(rows - 1, 0)]]
        body += [""] * (rows - 1 - len(body))
        text = "\033[K\n".join([*body, output.clip(footer, columns - 1)])
        self._write(f"\033[H{text}\033[K\033[J")

    def wait(self, timeout: float) -> Event:
        watch = [self._wakeup] + ([self.keys] if self.keys is not None else [])
        ready, _, _ = select.select(watch, [], [], max(timeout, 0.0))
        if self._wakeup in ready:
            os.read(self._wakeup, 512)
            return "resize"
        if self.keys is not None and self.keys in ready:
            pressed = os.read(self.keys, 64)
            if not pressed:  # end of input: no more keys, Ctrl-C still works
                self.keys = None
            return "quit" if any(k in QUIT_KEYS for k in pressed) else "key"
        return "timeout"


def _ignore(signum: int, frame: FrameType | None) -> None:
    pass
