"""harborctl status: GET /harbor/status, summarised. Exit 1 unless every backend is up."""

from __future__ import annotations

import argparse
import time

from harbord import harbor_endpoints as api
from harbord.ctl import EX_FAILED, EX_OK, output
from harbord.ctl.http import Daemon
from harbord.ctl.output import paint
from harbord.memory import format_context, format_gib
from harbord.schemas import BackendStatus, Status, UnitStatus

HELP = "show harbord's backends, units, counters and pins"
TIMEOUT = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, daemon: Daemon) -> int:
    answer = daemon.client.fetch(api.STATUS)
    if args.json:
        output.raw_json(answer.raw)
    else:
        print(render(answer.value, time.time()))
    return exit_code(answer.value)


def exit_code(status: Status) -> int:
    healthy = all(b.health == "up" and not b.cooldown for b in status.backends)
    return EX_OK if healthy else EX_FAILED


def render(status: Status, now: float) -> str:
    lines = [
        *_summary(status),
        "",
        _backends(status.backends),
    ]
    lines += _details(status.backends, now)
    if status.pins:
        lines += ["", paint("pins", "bold")]
        for model, pin in status.pins.items():
            expires = output.until(pin.until, now)
            lines.append(f"  {model} → {pin.backend}  {pin.reason} ({pin.source}, {expires})")
    if status.affinity:
        lines += ["", paint("affinity", "bold")]
        for model, a in status.affinity.items():
            last = f", last served {output.ago(a.last_served, now)}" if a.last_served else ""
            lines.append(f"  {model} → {a.backend} (since {output.ago(a.since, now)}{last})")
    if status.state_note:
        lines += ["", paint(f"note: {status.state_note}", "yellow")]
    return "\n".join(lines)


def _summary(status: Status) -> list[str]:
    """The three lines to read at a glance: uptime, the counters, backends up and pins."""
    c = status.counters
    by_backend = ", ".join(f"{name} {n}" for name, n in c.by_backend.items())
    up = sum(b.health == "up" and not b.cooldown for b in status.backends)
    verdict: output.Style = "green" if up == len(status.backends) else "red" if not up else "yellow"
    pins = len(status.pins)
    return [
        f"{paint('harbord', 'bold')} {status.version}, up {output.duration(status.uptime_s)}"
        f" (pid {status.pid}, socket {status.socket}, supervision {status.supervision})",
        f"requests {c.requests}: {_counter(c.served, 'served', 'green')}"
        + (f" ({by_backend})" if by_backend else "")
        + f", {_counter(c.fallbacks, 'fallbacks', 'yellow')}, {_counter(c.failed, 'failed', 'red')}"
        f", {c.client_errors} client errors; {status.in_flight} in flight",
        f"backends: {paint(f'{up} of {len(status.backends)} up', verdict)};"
        f" {_counter(pins, 'pinned model' + ('s' if pins != 1 else ''), 'cyan')}",
    ]


def _counter(n: int, what: str, style: output.Style) -> str:
    """ "3 fallbacks", coloured when not zero."""
    return paint(f"{n} {what}", style) if n else f"{n} {what}"


def _backends(backends: list[BackendStatus]) -> str:
    header = (
        "BACKEND", "KIND", "HEALTH", "VERSION", "LATENCY", "IN FLIGHT", "QUEUED", "SERVED",
        "TTFB P50", "MODELS",
    )  # fmt: skip
    rows = [
        (
            b.name,
            b.kind,
            output.health(b.health, b.cooldown),
            b.version or "-",
            output.millis(b.latency_ms),
            str(b.in_flight),
            str(b.queued),
            str(b.served),
            output.millis(b.ttfb_p50_ms),
            str(len(b.models)),
        )
        for b in backends
    ]
    return output.table(header, rows)


def _details(backends: list[BackendStatus], now: float) -> list[str]:
    lines: list[str] = []
    for b in backends:
        if b.unit_status is not None:
            lines.append(f"  {b.name} unit {_unit(b.unit_status)}")
        if b.last_error and b.health != "up":
            lines.append(f"  {b.name} last error ({b.last_error_class or 'other'}): {b.last_error}")
        for loaded in b.loaded:
            on_gpu = f", {loaded.size_vram * 100 // loaded.size}% in VRAM" if loaded.size else ""
            lines.append(
                f"  {b.name} has {loaded.name} loaded ({output.size(loaded.size)}{on_gpu})"
            )
        lines += _placement(b)
        for warning in b.memory_pressure:
            lines.append(paint(f"  {b.name} memory pressure: {warning}", "yellow"))
    return ["", *lines] if lines else []


def _placement(b: BackendStatus) -> list[str]:
    """A GPU's memory budget and where the figure came from; spills learned; parallel."""
    lines: list[str] = []
    if b.kind == "gpu":
        budget = b.memory_budget
        if budget is not None:
            source = budget.source + (f": {budget.detail}" if budget.detail else "")
            lines.append(f"  {b.name} memory budget {format_gib(budget.bytes)} (from {source})")
        else:
            lines.append(f"  {b.name} memory budget unknown ({b.memory_note or 'not found'})")
    context = f", default context {format_context(b.default_context)}" if b.default_context else ""
    lines.append(f"  {b.name} serves {b.parallel} at once{context}")
    for model, ctx in sorted(b.spilled_contexts.items()):
        lines.append(
            paint(f"  {b.name} spilled {model} at {format_context(ctx)} context: "
                  "after the cpu backends at that context and more", "yellow")
        )  # fmt: skip
    return lines


def _unit(unit: UnitStatus) -> str:
    state = f"{unit.active_state}/{unit.sub_state}"
    style: output.Style = "green" if unit.active_state == "active" else "red"
    text = f"{unit.name}: {paint(state, style)}"
    if unit.since:
        text += f" since {unit.since}"
    restarts = f"{unit.n_restarts} restarts"
    if unit.harbor_restarts:
        restarts += f" ({unit.harbor_restarts} by harbord"
        if unit.last_restart:
            restarts += f", last {output.ago(unit.last_restart, time.time())}"
        restarts += ")"
    text += f", {restarts}"
    if unit.note:
        text += ", " + paint(unit.note, "yellow")
    elif unit.budget_exhausted:
        text += ", " + paint("restart budget spent", "yellow")
    return text
