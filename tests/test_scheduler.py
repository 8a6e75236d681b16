"""Scheduler.place reuses a request's plan only while nothing the plan read has changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harbord import scheduler as scheduler_module
from harbord.policy import RouteRequest
from harbord.scheduler import PLAN_REUSE_S, Scheduler
from harbord.schemas import PsModel
from harbord.state import StateStore
from tests.inproc import load_config

CONFIG = """
[backends.gpu]
url = "http://127.0.0.1:1"
kind = "gpu"
[backends.cpu]
url = "http://127.0.0.1:2"
kind = "cpu"
"""
GB = 1_000_000_000
CHAT = RouteRequest(model="llama3.1:8b")


@pytest.fixture
def scheduler(tmp_path: Path) -> Scheduler:
    made = Scheduler(load_config(tmp_path, CONFIG), StateStore(tmp_path / "state"))
    for backend in made.backends.values():
        backend.mark_up("0.14.3")
        backend.set_inventory({"llama3.1:8b": 5 * GB, "nomic-embed-text:latest": GB // 3}, [])
    return made


def test_the_same_request_gets_the_same_plan_while_nothing_changed(scheduler: Scheduler) -> None:
    first = scheduler.place(CHAT)
    assert scheduler.place(RouteRequest(model="llama3.1:8b")) is first
    # another request (a context, an intent) is another plan
    assert scheduler.place(RouteRequest(model="llama3.1:8b", num_ctx=8192)) is not first
    assert scheduler.place(RouteRequest(model="llama3.1:8b", intent_header="heavy")) is not first
    # every placed request is counted as use, reused plan or not
    assert scheduler.usage["llama3.1:8b"].recent == 2


def test_a_change_in_what_the_plan_read_makes_a_new_plan(scheduler: Scheduler) -> None:
    gpu, cpu = scheduler.backends["gpu"], scheduler.backends["cpu"]
    first = scheduler.place(CHAT)
    assert first.backends == ["gpu", "cpu"]

    gpu.limiter.active += 1  # a request took a slot
    busy = scheduler.place(CHAT)
    assert busy is not first
    gpu.limiter.active -= 1

    scheduler.state.pin("llama3.1:8b", "cpu", "by hand", None, "operator")
    pinned = scheduler.place(CHAT)
    assert pinned.backends[0] == "cpu"
    scheduler.state.unpin("llama3.1:8b")
    assert scheduler.place(CHAT).backends[0] == "gpu"

    later = "2999-01-01T00:00:00Z"
    embed = PsModel(name="nomic-embed-text:latest", size=GB // 3, size_vram=GB // 3,
                    expires_at=later, context_length=2048)  # fmt: skip
    before = scheduler.place(CHAT)
    cpu.set_inventory(None, [embed])  # residency read: a new plan
    assert scheduler.place(CHAT) is not before

    before = scheduler.place(CHAT)
    gpu.mark_down("connection refused", cooldown=True)
    down = scheduler.place(CHAT)
    assert down is not before and down.backends == ["cpu"]


def test_a_plan_is_reused_for_a_short_while_only(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(scheduler_module.time, "time", lambda: clock[0])
    first = scheduler.place(CHAT)
    clock[0] += PLAN_REUSE_S / 2
    assert scheduler.place(CHAT) is first
    clock[0] += PLAN_REUSE_S
    assert scheduler.place(CHAT) is not first
