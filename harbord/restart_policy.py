"""When to restart a backend's unit: pure functions from facts to a decision.

No I/O and no clock here, as in policy.py: the supervisor gathers the facts
(the unit's state from `systemctl --user show`, the backend's health, its own
restart history, the time), asks `decide`, and does what the decision says.

- supervision off, or the unit unreadable or not installed: nothing;
- unit active but the backend hung: restart it;
- unit failed (e.g. systemd's start limit was hit): reset-failed, then start;
- unit inactive: the user stopped it, so leave it alone, unless
  `keep_running` says to start it again.

Automatic restarts back off exponentially (`backoff_initial` doubling up to
`backoff_max`) and spend a budget of `restart_budget` per `budget_window`;
a spent budget stops them until enough restarts have left the window. A
backend that stays healthy for `backoff_max` gets its backoff back to the
start. A restart the operator asks for is held back by neither, and starts
both afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from harbord.config import SupervisorConfig

# "reset-and-start": `systemctl reset-failed`, then `start`.
Action = Literal["none", "restart", "reset-and-start", "start"]
BudgetChange = Literal["spent", "available again"]


@dataclass(frozen=True, slots=True)
class UnitFacts:
    """What the supervisor knows about one backend and its unit at decision time."""

    unit: str
    load_state: str = ""  # systemd's LoadState; "" when not known
    active_state: str = ""  # ActiveState
    sub_state: str = ""  # SubState
    read_error: str | None = None  # why the unit could not be read; None when it was
    backend_up: bool = False  # the prober's health is "up"
    hung: bool = False  # the prober's backend.hung
    hung_reason: str = "hung"  # what the prober last saw go wrong


@dataclass(frozen=True, slots=True)
class RestartHistory:
    """The supervisor's own automatic restarts of one unit (monotonic seconds)."""

    restarts: tuple[float, ...] = ()  # oldest first; only those inside the budget window
    backoff: float = 0.0  # the wait after the next automatic restart
    next_allowed: float = 0.0  # no automatic restart before this
    budget_exhausted: bool = False


@dataclass(frozen=True, slots=True)
class RestartDecision:
    action: Action
    reason: str
    history: RestartHistory  # what to remember after this look
    wait_until: float | None = None  # backing off or budget spent: when that ends
    budget_change: BudgetChange | None = None  # the budget ran out, or came back, just now


def fresh_history(cfg: SupervisorConfig) -> RestartHistory:
    return RestartHistory(backoff=cfg.backoff_initial)


def review(
    history: RestartHistory, facts: UnitFacts, cfg: SupervisorConfig, now: float
) -> RestartHistory:
    """Forget restarts older than the window; reset the backoff of a backend that stays up."""
    restarts = tuple(t for t in history.restarts if now - t <= cfg.budget_window)
    exhausted = history.budget_exhausted and len(restarts) >= cfg.restart_budget
    backoff = history.backoff
    healthy = facts.backend_up and not facts.hung
    if healthy and (not restarts or now - restarts[-1] >= cfg.backoff_max):
        backoff = cfg.backoff_initial
    return replace(history, restarts=restarts, backoff=backoff, budget_exhausted=exhausted)


def wanted(facts: UnitFacts, cfg: SupervisorConfig) -> tuple[Action, str]:
    """What the unit's state asks for, before backoff and budget have their say."""
    if facts.read_error is not None:
        return "none", f"the unit could not be read: {facts.read_error}"
    if facts.load_state != "loaded":
        return "none", f"the unit is not loaded ({facts.load_state or 'unknown'})"
    if facts.active_state == "active" and facts.hung:
        return "restart", facts.hung_reason
    if facts.active_state == "failed":
        return "reset-and-start", "the unit failed"
    if facts.active_state == "inactive":
        if cfg.keep_running:
            return "start", "the unit is stopped and supervisor.keep_running is set"
        return "none", "the unit was stopped (by the user): left alone"
    return "none", f"the unit is {facts.active_state or 'unknown'} and the backend is not hung"


def decide(
    facts: UnitFacts,
    history: RestartHistory,
    cfg: SupervisorConfig,
    now: float,
    supervising: bool = True,
) -> RestartDecision:
    """The automatic decision for one look at a unit."""
    if not supervising:
        return RestartDecision("none", "supervision is off", history)
    reviewed = review(history, facts, cfg, now)
    came_back: BudgetChange | None = (
        "available again" if history.budget_exhausted and not reviewed.budget_exhausted else None
    )
    action, reason = wanted(facts, cfg)
    if action == "none":
        return RestartDecision("none", reason, reviewed, budget_change=came_back)
    spent = len(reviewed.restarts)
    if spent >= cfg.restart_budget:
        # Enough restarts must leave the window to bring the count below the budget
        # (never, with a budget of 0).
        oldest_to_go = spent - cfg.restart_budget
        frees_at = (
            reviewed.restarts[oldest_to_go] + cfg.budget_window if oldest_to_go < spent else None
        )
        return RestartDecision(
            "none",
            f"restart budget spent: {spent} restarts within {cfg.budget_window:g}s ({reason})",
            replace(reviewed, budget_exhausted=True),
            wait_until=frees_at,
            budget_change=None if reviewed.budget_exhausted else "spent",
        )
    if now < reviewed.next_allowed:
        return RestartDecision(
            "none",
            f"backing off ({reason})",
            reviewed,
            wait_until=reviewed.next_allowed,
            budget_change=came_back,
        )
    return RestartDecision(action, reason, reviewed, budget_change=came_back)


def requested(facts: UnitFacts) -> RestartDecision:
    """A restart the operator asks for: refused only when the unit cannot be acted on.

    Its history is not used: `after_restart(..., automatic=False)` starts it afresh."""
    history = RestartHistory()
    if facts.read_error is not None:
        return RestartDecision("none", f"{facts.unit}: {facts.read_error}", history)
    if facts.load_state != "loaded":
        reason = f"{facts.unit} is not installed ({facts.load_state or '?'})"
        return RestartDecision("none", reason, history)
    action: Action = "reset-and-start" if facts.active_state == "failed" else "restart"
    return RestartDecision(action, "restart requested by the operator", history)


def after_restart(
    history: RestartHistory, cfg: SupervisorConfig, now: float, automatic: bool
) -> RestartHistory:
    """The history once a restart was started: automatic ones spend the budget and back off;
    one the operator asked for starts both afresh."""
    if automatic:
        return replace(
            history,
            restarts=(*history.restarts, now),
            next_allowed=now + history.backoff,
            backoff=min(history.backoff * 2, cfg.backoff_max),
        )
    return RestartHistory(backoff=cfg.backoff_initial, next_allowed=now + cfg.backoff_initial)


def unit_note(
    facts: UnitFacts, history: RestartHistory, cfg: SupervisorConfig, doing: str | None
) -> str | None:
    """The short note the status shows for the unit; `doing` is what harbord is at
    ("restarting", "warming"), which wins over what the unit's state alone would say."""
    if facts.read_error is not None:
        return facts.read_error
    if facts.load_state and facts.load_state != "loaded":
        return (
            "unit not installed" if facts.load_state == "not-found" else f"unit {facts.load_state}"
        )
    if doing is not None:
        return doing
    if history.budget_exhausted:
        return "restart budget spent"
    if facts.active_state == "failed":
        return "unit failed"
    if facts.active_state == "inactive":
        return "stopped" if cfg.keep_running else "stopped; left alone"
    if facts.sub_state == "auto-restart" or facts.active_state == "activating":
        return "restarting (systemd)"
    return None
