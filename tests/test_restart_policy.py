"""The restart policy, table-driven: unit state x health x backoff x budget x supervision."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgspec
import pytest

from harbord.config import SupervisorConfig
from harbord.restart_policy import (
    RestartHistory,
    UnitFacts,
    after_restart,
    decide,
    fresh_history,
    requested,
    review,
    unit_note,
)

NOW = 10_000.0
CFG = SupervisorConfig(restart_budget=3, budget_window=600, backoff_initial=2, backoff_max=120)

ACTIVE = UnitFacts("ollama-gpu.service", "loaded", "active", "running", backend_up=True)
HUNG = replace(ACTIVE, backend_up=False, hung=True, hung_reason="probe timed out twice")
FAILED = UnitFacts("ollama-gpu.service", "loaded", "failed", "failed")
STOPPED = UnitFacts("ollama-gpu.service", "loaded", "inactive", "dead")
FRESH = fresh_history(CFG)

# name, facts, history, decide() keyword arguments, expected (action, reason fragment)
CASES: list[tuple[str, UnitFacts, RestartHistory, dict[str, Any], tuple[str, str]]] = [
    ("healthy unit", ACTIVE, FRESH, {}, ("none", "not hung")),
    ("hung backend", HUNG, FRESH, {}, ("restart", "probe timed out twice")),
    ("failed unit", FAILED, FRESH, {}, ("reset-and-start", "the unit failed")),
    ("stopped by the user", STOPPED, FRESH, {}, ("none", "left alone")),
    (
        "stopped, keep_running",
        STOPPED,
        FRESH,
        {"cfg": msgspec.structs.replace(CFG, keep_running=True)},
        ("start", "keep_running"),
    ),
    (
        "failed, keep_running",
        FAILED,
        FRESH,
        {"cfg": msgspec.structs.replace(CFG, keep_running=True)},
        ("reset-and-start", "failed"),
    ),
    (
        "systemd restarting it",
        replace(HUNG, active_state="activating", sub_state="auto-restart"),
        FRESH,
        {},
        ("none", "activating"),
    ),
    (
        "hung but the unit is reloading",
        replace(HUNG, active_state="reloading"),
        FRESH,
        {},
        ("none", "reloading"),
    ),
    (
        "unit unreadable",
        replace(HUNG, read_error="systemctl timed out"),
        FRESH,
        {},
        ("none", "systemctl timed out"),
    ),
    (
        "unit not installed",
        replace(FAILED, load_state="not-found"),
        FRESH,
        {},
        ("none", "not-found"),
    ),
    (
        "unit not read yet",
        UnitFacts("ollama-gpu.service", hung=True),
        FRESH,
        {},
        ("none", "unknown"),
    ),
    ("supervision off", HUNG, FRESH, {"supervising": False}, ("none", "supervision is off")),
    ("supervision off, failed", FAILED, FRESH, {"supervising": False}, ("none", "off")),
    (
        "backoff not elapsed",
        HUNG,
        RestartHistory((NOW - 1,), backoff=4, next_allowed=NOW + 1),
        {},
        ("none", "backing off (probe timed out twice)"),
    ),
    (
        "backoff just elapsed",
        HUNG,
        RestartHistory((NOW - 2,), backoff=4, next_allowed=NOW),
        {},
        ("restart", "probe timed out twice"),
    ),
    (
        "backing off, but nothing wanted",
        ACTIVE,
        RestartHistory((NOW - 1,), backoff=4, next_allowed=NOW + 1),
        {},
        ("none", "not hung"),
    ),
    (
        "budget spent",
        FAILED,
        RestartHistory((NOW - 30, NOW - 20, NOW - 10), backoff=16, next_allowed=NOW - 1),
        {},
        ("none", "restart budget spent: 3 restarts within 600s"),
    ),
    (
        "budget spent, wanted nothing anyway",
        ACTIVE,
        RestartHistory((NOW - 30, NOW - 20, NOW - 10), backoff=16, next_allowed=NOW - 1),
        {},
        ("none", "not hung"),
    ),
    (
        "budget back once the oldest restart left the window",
        FAILED,
        RestartHistory((NOW - 601, NOW - 20, NOW - 10), 16, NOW - 1, budget_exhausted=True),
        {},
        ("reset-and-start", "the unit failed"),
    ),
]


@pytest.mark.parametrize(
    ("facts", "history", "kwargs", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    facts: UnitFacts, history: RestartHistory, kwargs: dict[str, Any], expected: tuple[str, str]
) -> None:
    cfg = kwargs.get("cfg", CFG)
    decision = decide(facts, history, cfg, NOW, kwargs.get("supervising", True))
    action, reason = expected
    assert decision.action == action
    assert reason in decision.reason


def test_supervision_off_leaves_the_history_alone() -> None:
    stale = RestartHistory(
        (NOW - 5000,), backoff=64, next_allowed=NOW - 4000, budget_exhausted=True
    )
    decision = decide(HUNG, stale, CFG, NOW, supervising=False)
    assert decision.history == stale
    assert decision.budget_change is None


def test_the_budget_is_spent_once_and_says_when_it_comes_back() -> None:
    history = RestartHistory((NOW - 30, NOW - 20, NOW - 10), backoff=16, next_allowed=NOW - 1)
    first = decide(HUNG, history, CFG, NOW)
    assert first.action == "none"
    assert first.budget_change == "spent"
    assert first.history.budget_exhausted
    assert first.wait_until == NOW - 30 + 600  # the oldest leaves the window
    again = decide(HUNG, first.history, CFG, NOW + 1)
    assert again.action == "none"
    assert again.budget_change is None  # said once
    assert again.history.budget_exhausted
    back = decide(HUNG, again.history, CFG, NOW - 30 + 600 + 0.5)
    assert back.budget_change == "available again"
    assert not back.history.budget_exhausted
    assert back.history.restarts == (NOW - 20, NOW - 10)
    assert back.action == "restart"


def test_the_budget_comes_back_even_when_nothing_is_wanted() -> None:
    spent = RestartHistory((NOW - 30, NOW - 20, NOW - 10), 16, NOW - 1, budget_exhausted=True)
    decision = decide(ACTIVE, spent, CFG, NOW + 600)
    assert decision.action == "none"
    assert decision.budget_change == "available again"
    assert decision.history.restarts == ()


def test_a_budget_of_zero_never_comes_back() -> None:
    decision = decide(FAILED, FRESH, msgspec.structs.replace(CFG, restart_budget=0), NOW)
    assert decision.action == "none"
    assert decision.budget_change == "spent"
    assert decision.wait_until is None


def test_backing_off_says_until_when() -> None:
    history = RestartHistory((NOW - 1,), backoff=4, next_allowed=NOW + 1)
    decision = decide(HUNG, history, CFG, NOW)
    assert decision.wait_until == NOW + 1
    assert decision.history == history


@pytest.mark.parametrize(
    ("facts", "last_restart", "backoff"),
    [
        (ACTIVE, NOW - 120, 2),  # up for backoff_max since the last restart: back to the start
        (ACTIVE, NOW - 119, 64),  # not long enough
        (HUNG, NOW - 500, 64),  # not healthy
        (replace(ACTIVE, backend_up=False), NOW - 500, 64),  # down
        (ACTIVE, NOW - 700, 2),  # the restart left the window: no restarts at all
    ],
)
def test_review_resets_the_backoff_of_a_backend_that_stays_up(
    facts: UnitFacts, last_restart: float, backoff: float
) -> None:
    history = RestartHistory((last_restart,), backoff=64, next_allowed=last_restart + 32)
    assert review(history, facts, CFG, NOW).backoff == backoff


def test_review_forgets_restarts_older_than_the_window() -> None:
    history = RestartHistory((NOW - 900, NOW - 600, NOW - 599), backoff=8)
    assert review(history, HUNG, CFG, NOW).restarts == (NOW - 600, NOW - 599)


def test_automatic_restarts_double_the_backoff_up_to_the_max() -> None:
    cfg = msgspec.structs.replace(CFG, backoff_max=10)
    history, waits = FRESH, []
    for step in range(5):
        history = after_restart(history, cfg, NOW + step, automatic=True)
        waits.append(history.next_allowed - (NOW + step))
    assert waits == [2, 4, 8, 10, 10]
    assert history.restarts == tuple(NOW + step for step in range(5))


def test_an_operator_restart_starts_backoff_and_budget_afresh() -> None:
    spent = RestartHistory((NOW - 30, NOW - 20, NOW - 10), 64, NOW + 50, budget_exhausted=True)
    history = after_restart(spent, CFG, NOW, automatic=False)
    assert history == RestartHistory((), backoff=2, next_allowed=NOW + 2)


def test_a_hung_backend_over_time() -> None:
    """Restarts at 2, 4, 8 s of backoff, then the budget stops them until the window passes."""
    history, now, restarted_at = FRESH, NOW, []
    changes = []
    while now < NOW + 610:
        decision = decide(HUNG, history, CFG, now)
        history = decision.history
        if decision.budget_change is not None:
            changes.append((decision.budget_change, now - NOW))
        if decision.action == "restart":
            restarted_at.append(now - NOW)
            history = after_restart(history, CFG, now, automatic=True)
        now += 1
    assert restarted_at == [0, 2, 6, 601]
    # At 601 the first restart leaves the window: one more spends the budget again, and
    # at 603 the second one leaves it too, but the backoff (now 16 s) holds the next one.
    assert changes == [
        ("spent", 7),
        ("available again", 601),
        ("spent", 602),
        ("available again", 603),
    ]


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (FAILED, ("reset-and-start", "restart requested by the operator")),
        (ACTIVE, ("restart", "restart requested by the operator")),
        (STOPPED, ("restart", "restart requested by the operator")),
        (replace(FAILED, read_error="boom"), ("none", "ollama-gpu.service: boom")),
        (
            replace(FAILED, load_state="not-found"),
            ("none", "ollama-gpu.service is not installed (not-found)"),
        ),
    ],
)
def test_requested(facts: UnitFacts, expected: tuple[str, str]) -> None:
    decision = requested(facts)
    assert (decision.action, decision.reason) == expected


SPENT = replace(FRESH, budget_exhausted=True)


@pytest.mark.parametrize(
    ("facts", "history", "keep_running", "doing", "note"),
    [
        (ACTIVE, FRESH, False, None, None),
        (ACTIVE, FRESH, False, "warming", "warming"),
        (FAILED, SPENT, False, "restarting", "restarting"),
        (FAILED, SPENT, False, None, "restart budget spent"),
        (FAILED, FRESH, False, None, "unit failed"),
        (STOPPED, FRESH, False, None, "stopped; left alone"),
        (STOPPED, FRESH, True, None, "stopped"),
        (replace(ACTIVE, sub_state="auto-restart"), FRESH, False, None, "restarting (systemd)"),
        (replace(ACTIVE, active_state="activating"), FRESH, False, None, "restarting (systemd)"),
        (replace(ACTIVE, read_error="no bus"), SPENT, False, "warming", "no bus"),
        (replace(ACTIVE, load_state="not-found"), FRESH, False, "warming", "unit not installed"),
        (replace(ACTIVE, load_state="masked"), FRESH, False, None, "unit masked"),
    ],
)
def test_unit_note(
    facts: UnitFacts, history: RestartHistory, keep_running: bool, doing: str | None, note: str
) -> None:
    cfg = msgspec.structs.replace(CFG, keep_running=keep_running)
    assert unit_note(facts, history, cfg, doing) == note
