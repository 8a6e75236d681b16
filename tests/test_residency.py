"""Residency (issue 16), table-driven: what is loaded where, what a load costs, whom it evicts.

The pure pieces (residency.py) and the policy's residency rule over BackendViews
that carry resident models, capacity, learned load times and fast usage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import pytest

from harbord import residency
from harbord.policy import BackendView, RouteRequest, plan
from harbord.residency import Resident, Usage
from harbord.residency_facts import ResidencyFacts, parse_expiry
from harbord.schemas import MemoryBudget, Plan, PsModel

NOW = 1_000_000.0
GB = 1_000_000_000
CHAT = "llama3.1:latest"
EMBED = "nomic-embed-text:latest"
CODER = "qwen2.5-coder:7b"
TASK = "llama3.2:1b"  # a small model for titles beside the chat model (Open WebUI's)
MODELS = {CHAT: int(4.9 * GB), EMBED: int(0.27 * GB), CODER: int(4.7 * GB), TASK: int(1.3 * GB)}

# A 12 GiB GPU holding one model at a time, with the chat model loaded; a CPU with nothing.
GPU = BackendView(
    "gpu",
    "gpu",
    "up",
    models=MODELS,
    budget=MemoryBudget(12 * 1024**3, "config"),
    resident={CHAT: Resident(int(5.5 * GB), 4096, NOW + 1800, NOW - 5)},
    capacity=1,
    capacity_source="unit",
    load_ms={CHAT: 1500.0},
    service_ms={CHAT: 150.0, EMBED: 5.0},
)
CPU = BackendView(
    "cpu",
    "cpu",
    "up",
    models=MODELS,
    parallel=2,
    resident={},
    capacity=3,
    service_ms={EMBED: 30.0, CHAT: 1000.0},
)
# The chat model is interactive: 14 fast requests in the last five minutes.
CHATTING = {CHAT: Usage(14, NOW - 5)}


def place(
    model: str,
    backends: tuple[BackendView, ...] = (GPU, CPU),
    intent: str | None = None,
    usage: Mapping[str, Usage] = CHATTING,
    num_ctx: int | None = None,
) -> Plan:
    return plan(
        RouteRequest(model, intent_header=intent, num_ctx=num_ctx),
        backends,
        {},
        {},
        {},
        "fast",
        NOW,
        usage=usage,
    )


CASES = [
    # name, model, backends, intent, usage, expected order, deciding rule
    ("chat stays on the gpu where it is loaded", CHAT, (GPU, CPU), None, CHATTING, ["gpu", "cpu"]),
    (
        "an embedding that would evict the hot chat model goes to the cpu",
        EMBED,
        (GPU, CPU),
        None,
        CHATTING,
        ["cpu", "gpu"],
    ),
    (
        "the same embedding with nobody chatting: the gpu (a load evicts nothing hot)",
        EMBED,
        (GPU, CPU),
        None,
        {},
        ["gpu", "cpu"],
    ),
    (
        "chat used long ago is not hot: its eviction costs nothing",
        EMBED,
        (GPU, CPU),
        None,
        {CHAT: Usage(14, NOW - 3600)},
        ["gpu", "cpu"],
    ),
    (
        "room for both (capacity 3): nothing evicted, the gpu",
        EMBED,
        (replace(GPU, capacity=3), CPU),
        None,
        CHATTING,
        ["gpu", "cpu"],
    ),
    (
        "no room in memory though capacity allows it: the hot model would go, the cpu",
        CODER,
        (
            replace(
                GPU,
                capacity=3,
                budget=MemoryBudget(8 * 1024**3, "config"),
                service_ms={CHAT: 150.0, CODER: 150.0},
            ),
            replace(CPU, service_ms={CODER: 400.0}),
        ),
        None,
        CHATTING,
        ["cpu", "gpu"],
    ),
    (
        "a busy hot model is evicted once it is done: the cpu all the same",
        EMBED,
        (replace(GPU, running={CHAT: 1}, in_flight=0), CPU),
        None,
        CHATTING,
        ["cpu", "gpu"],
    ),
    (
        "heavy never weighs the gpu against the cpu",
        EMBED,
        (GPU, CPU),
        "heavy",
        CHATTING,
        ["cpu", "gpu"],
    ),
    (
        "the cpu much slower than a reload: the gpu even so",
        CHAT + "x",
        (
            replace(GPU, models={**MODELS, CHAT + "x": 5 * GB}, service_ms={CHAT + "x": 200.0}),
            replace(CPU, models={**MODELS, CHAT + "x": 5 * GB}, service_ms={CHAT + "x": 20000.0}),
        ),
        None,
        CHATTING,
        ["gpu", "cpu"],
    ),
    (
        "a task model never served anywhere: the gpu (a cpu it never ran on is nominally slow)",
        TASK,
        (replace(GPU, service_ms={CHAT: 150.0}), CPU),
        None,
        CHATTING,
        ["gpu", "cpu"],
    ),
    (
        "the task model again, quick on the gpu: the cpu, where its load is paid once and "
        "stays, while on the gpu each title would reload the chat model",
        TASK,
        (
            replace(
                GPU, service_ms={CHAT: 150.0, TASK: 280.0}, load_ms={CHAT: 1500.0, TASK: 600.0}
            ),
            CPU,
        ),
        None,
        {CHAT: Usage(14, NOW - 5, NOW - 40), TASK: Usage(2, NOW - 8, NOW - 16)},
        ["cpu", "gpu"],
    ),
    (
        "the chat model back after a task model took the one-model gpu: the gpu, not a cpu "
        "six times slower however many requests share its load",
        CHAT,
        (
            replace(GPU, resident={TASK: Resident(int(1.5 * GB), 4096, NOW + 1800, NOW - 2)}),
            replace(CPU, service_ms={EMBED: 30.0}),
        ),
        None,
        {CHAT: Usage(14, NOW - 5, NOW - 40), TASK: Usage(2, NOW - 2, NOW - 16)},
        ["gpu", "cpu"],
    ),
    (
        "the cpu's residency not read yet (it served nothing): a candidate all the same",
        EMBED,
        (GPU, replace(CPU, resident=None)),
        None,
        CHATTING,
        ["cpu", "gpu"],
    ),
    (
        "residency not known yet (no /api/ps read): the rule stays out",
        EMBED,
        (replace(GPU, resident=None), replace(CPU, resident=None)),
        None,
        CHATTING,
        ["gpu", "cpu"],
    ),
    (
        "expired chat model: nothing to evict",
        EMBED,
        (replace(GPU, resident={CHAT: Resident(int(5.5 * GB), 4096, NOW - 1, NOW - 400)}), CPU),
        None,
        CHATTING,
        ["gpu", "cpu"],
    ),
]


@pytest.mark.parametrize(
    ("name", "model", "backends", "intent", "usage", "expected"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_residency_rule(
    name: str,
    model: str,
    backends: tuple[BackendView, ...],
    intent: str | None,
    usage: Mapping[str, Usage],
    expected: list[str],
) -> None:
    assert place(model, backends, intent, usage).backends == expected


def test_the_reasons_name_the_load_and_whom_it_evicts() -> None:
    result = place(EMBED)
    assert result.rule == "residency"
    gpu = next(s for s in result.steps if s.backend == "gpu")
    cpu = next(s for s in result.steps if s.backend == "cpu")
    assert f"evicts {CHAT} (fast, 14 requests in 5 min)" in "; ".join(gpu.reasons)
    assert "load 0.5 s (estimated)" in "; ".join(gpu.reasons)
    assert cpu.reasons[0].endswith("on gpu: first")
    estimates = {e.backend: e for e in result.estimates}
    assert estimates["gpu"].evicts == [CHAT]
    assert estimates["gpu"].resident is False
    assert estimates["gpu"].eviction_ms > 0
    assert (estimates["gpu"].capacity, estimates["gpu"].capacity_source) == (1, "unit")
    assert estimates["cpu"].evicts == []


def test_a_model_loaded_at_another_context_counts_as_not_loaded() -> None:
    result = place(CHAT, num_ctx=16384)
    gpu = next(e for e in result.estimates if e.backend == "gpu")
    assert gpu.resident is False
    assert gpu.load_learned is True
    assert gpu.load_ms == 1500.0


# -- the pure pieces ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "unit", "learned", "expected"),
    [
        (2, 1, 4, residency.Capacity(2, "config")),
        (None, 1, 4, residency.Capacity(1, "unit")),
        (None, None, 1, residency.Capacity(1, "learned")),
        (None, None, None, residency.Capacity(3, "default")),
    ],
)
def test_capacity_sources_in_order(
    configured: int | None, unit: int | None, learned: int | None, expected: residency.Capacity
) -> None:
    assert residency.choose_capacity(configured, unit, learned) == expected


@pytest.mark.parametrize(
    ("reference", "left", "listed", "memory_forced", "expected"),
    [
        ({CHAT}, {CHAT}, {EMBED}, False, 1),  # the chat model left as the embedding came
        ({CHAT, CODER}, {CHAT}, {CODER, EMBED}, False, 2),
        ({CHAT}, {CHAT}, set(), False, None),  # read inside the load: nothing came yet
        ({CHAT}, {CHAT}, {EMBED}, True, None),  # memory pushed it out, not a slot
        ({CHAT}, {CHAT}, {CHAT, EMBED}, False, None),  # it came back: nothing left
        ({CHAT}, set(), {CHAT, EMBED}, False, None),  # nothing left: nothing learned
    ],
)
def test_capacity_learned_from_an_eviction(
    reference: set[str], left: set[str], listed: set[str], memory_forced: bool,
    expected: int | None,
) -> None:  # fmt: skip
    assert residency.learn_capacity(reference, left, listed, memory_forced) == expected


def test_predicted_evictions_least_recently_used_idle_first() -> None:
    resident = {
        "a": Resident(GB, 0, None, NOW - 30),
        "b": Resident(GB, 0, None, NOW - 60),
        "c": Resident(GB, 0, None, NOW - 10),
    }
    assert residency.predicted_evictions(resident, "d", GB, 3, None, NOW) == ["b"]
    assert residency.predicted_evictions(resident, "d", GB, 2, None, NOW) == ["b", "a"]
    # b is busy: Ollama waits for it and takes the next idle one
    assert residency.predicted_evictions(resident, "d", GB, 3, None, NOW, {"b": 1}) == ["a"]
    # every one busy: Ollama waits for the least recently used to finish, then unloads it
    everyone = {"a": 1, "b": 1, "c": 1}
    assert residency.predicted_evictions(resident, "d", GB, 3, None, NOW, everyone) == ["b"]
    # memory: 3 GB resident + 2 GB needed in a 4 GB budget
    assert residency.predicted_evictions(resident, "d", 2 * GB, 9, 4 * GB, NOW) == ["b"]
    assert residency.predicted_evictions(resident, "a", GB, 3, None, NOW) == []


def test_next_request_chance_grows_with_use() -> None:
    chances = [residency.next_request_chance(Usage(n, NOW - 1), NOW) for n in (0, 1, 5, 14, 100)]
    assert chances[0] == 0.0
    assert chances == sorted(chances)
    assert 0.9 < chances[-1] < 1.0
    assert residency.next_request_chance(Usage(14, NOW - 400), NOW) == 0.0
    # the rate over the time the requests came in, not the whole window: three in the
    # last 20 s make the next one within a minute nearly certain; one alone is no rate
    spread = residency.next_request_chance(Usage(3, NOW - 1), NOW)
    burst = residency.next_request_chance(Usage(3, NOW - 1, NOW - 20), NOW)
    assert spread < 0.5 < 0.9 < burst
    once = residency.next_request_chance(Usage(1, NOW - 1, NOW - 1), NOW)
    assert once == residency.next_request_chance(Usage(1, NOW - 1, NOW - 50), NOW) < burst


def test_the_slot_goes_to_the_model_that_keeps_the_backend_busiest() -> None:
    usage = {CHAT: Usage(14, NOW - 5, NOW - 40), TASK: Usage(2, NOW - 2, NOW - 16)}
    reload = {CHAT: 1500.0, TASK: 600.0}
    service = {CHAT: 400.0, TASK: 290.0}
    task = residency.demand_ms(usage[TASK], 290.0, NOW, counting=1)
    chat = residency.demand_ms(usage[CHAT], 400.0, NOW, counting=1)
    assert (task, chat) == (870.0, 6000.0)
    # the title model evicting the chat model: counted
    cost, worst = residency.eviction_cost_ms([CHAT], usage, reload, NOW, task, service)
    assert worst == CHAT and cost > 1400.0
    # the chat model taking its slot back: the title model yields
    assert residency.eviction_cost_ms([TASK], usage, reload, NOW, chat, service) == (0.0, None)
    # a retrieval turn: as many embeddings as chats, but 5 ms each against 400
    rag = {CHAT: Usage(3, NOW - 5, NOW - 40), EMBED: Usage(4, NOW - 4, NOW - 41)}
    quick = {EMBED: 5.0, CHAT: 400.0}
    embedding = residency.demand_ms(rag[EMBED], 5.0, NOW, counting=1)
    assert residency.eviction_cost_ms([CHAT], rag, reload, NOW, embedding, quick)[0] > 0.0
    answer = residency.demand_ms(rag[CHAT], 400.0, NOW, counting=1)
    assert residency.eviction_cost_ms([EMBED], rag, {EMBED: 400.0}, NOW, answer, quick)[0] == 0


def test_a_load_that_stays_is_shared_by_the_requests_it_serves() -> None:
    assert residency.amortized_load_ms(900.0, None, NOW) == 900.0
    assert residency.amortized_load_ms(900.0, Usage(2, NOW - 5), NOW) == 300.0
    assert residency.amortized_load_ms(900.0, Usage(2, NOW - 400), NOW) == 900.0  # long ago


def test_keep_hot_only_after_an_eviction_and_not_after_the_users_unload() -> None:
    usage = {CHAT: Usage(14, NOW - 5), EMBED: Usage(3, NOW - 2)}
    evicted = {CHAT: NOW - 3}
    assert residency.model_to_keep_hot(usage, NOW, {EMBED: Resident()}, evicted, ()) == CHAT
    assert residency.model_to_keep_hot(usage, NOW, {CHAT: Resident()}, evicted, ()) is None
    assert residency.model_to_keep_hot(usage, NOW, {}, {}, ()) is None  # expired, not evicted
    assert residency.model_to_keep_hot(usage, NOW, {}, evicted, [CHAT]) is None


def _ps(name: str, expires: str, size: int = GB) -> PsModel:
    return PsModel(name=name, size=size, size_vram=size, expires_at=expires, context_length=4096)


def test_residency_facts_learn_capacity_and_evictions_from_ps() -> None:
    changes: list[int] = []
    facts = ResidencyFacts("gpu", None, lambda: changes.append(1))
    later = "2999-01-01T00:00:00.123456789Z"
    facts.sync([_ps(CHAT, later)], None)
    assert facts.resident is not None and set(facts.resident) == {CHAT}
    assert facts.capacity == residency.Capacity(3, "default")
    # the embedding answered (a load): before the next /api/ps read it is taken as loaded
    assert facts.answered(EMBED, NOW, 300.0) is True
    assert set(facts.resident) == {CHAT, EMBED}
    facts.sync([_ps(EMBED, later)], MemoryBudget(12 * 1024**3, "config"))
    assert facts.capacity == residency.Capacity(1, "learned")
    assert facts.evictions == {CHAT: 1}
    assert facts.loads == {EMBED: 1}
    assert CHAT in facts.evicted_at
    # an answer from a loaded model is no news
    assert facts.answered(EMBED, NOW, None) is False


def test_parse_expiry_reads_ollamas_nanoseconds_and_offsets() -> None:
    assert parse_expiry("2024-06-04T14:38:31.83753-07:00") == pytest.approx(1717537111.83753)
    assert parse_expiry("2024-06-04T21:38:31.837530123Z") == pytest.approx(1717537111.83753)
    assert parse_expiry(None) is None
    assert parse_expiry("soon") is None


@pytest.mark.parametrize(
    ("name", "intent", "num_ctx", "usage", "expected"),
    [
        ("a 16k agent with no intent never evicts the hot chat model", None, 16384, CHATTING,
         ["cpu", "gpu"]),
        ("...however much slower the cpu is", None, 32768, CHATTING, ["cpu", "gpu"]),
        ("with nobody chatting it takes the gpu", None, 16384, {}, ["gpu", "cpu"]),
        ("at the default context it is interactive: cost decides (the gpu)", None, None,
         CHATTING, ["gpu", "cpu"]),
        ("an explicit fast intent is the client's word: cost decides", "fast", 16384, CHATTING,
         ["gpu", "cpu"]),
    ],
)  # fmt: skip
def test_background_work_never_evicts_interactive_work(
    name: str, intent: str | None, num_ctx: int | None, usage: Mapping[str, Usage],
    expected: list[str],
) -> None:  # fmt: skip
    gpu = replace(GPU, service_ms={CHAT: 150.0, CODER: 1200.0})
    cpu = replace(CPU, service_ms={CODER: 20000.0})
    result = place(CODER, (gpu, cpu), intent, usage, num_ctx)
    assert result.backends == expected, result.steps
    assert result.background == (intent is None and num_ctx is not None)


def test_background_work_does_not_evict_even_a_little_used_interactive_model() -> None:
    """An embedding used once, 5 ms a time, keeps the GPU less busy than an agent would:
    interactive all the same, so the agent goes elsewhere."""
    gpu = replace(
        GPU,
        resident={EMBED: Resident(int(0.35 * GB), 2048, NOW + 1800, NOW - 2)},
        service_ms={EMBED: 5.0, CODER: 1200.0},
    )
    result = place(CODER, (gpu, CPU), None, {EMBED: Usage(1, NOW - 2)}, 16384)
    assert result.backends == ["cpu", "gpu"], result.steps


def test_capacity_learned_from_an_eviction_seen_while_loads_race() -> None:
    """On a busy backend the model a load evicted may itself be gone by the next read:
    any eviction seen, with models left, says the slots are full at that count."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    later = "2999-01-01T00:00:00Z"
    facts.sync([_ps(CHAT, later)], None)
    facts.sync([_ps(CODER, later)], None)  # loaded by another client: no answer relayed
    assert facts.capacity == residency.Capacity(1, "learned")
    facts.sync([_ps(CODER, later), _ps(EMBED, later)], None)  # two at once, no eviction
    assert facts.capacity == residency.Capacity(1, "learned")  # learned from evictions only
    facts.user_unloaded(CODER)
    facts.sync([_ps(EMBED, later)], None)  # the user's own unload is no eviction
    assert facts.evictions == {CHAT: 1}


def test_capacity_learned_when_the_read_falls_inside_the_load() -> None:
    facts = ResidencyFacts("gpu", None, lambda: None)
    later = "2999-01-01T00:00:00Z"
    facts.sync([_ps(CHAT, later)], None)
    facts.sync([], None)  # the chat model evicted, the coder still loading
    assert facts.capacity == residency.Capacity(3, "default")
    facts.sync([_ps(CODER, later)], None)
    assert facts.capacity == residency.Capacity(1, "learned")


def test_a_load_on_a_full_backend_takes_the_evicted_model_as_gone_at_once() -> None:
    facts = ResidencyFacts("gpu", 1, lambda: None)  # max_loaded = 1 in the configuration
    facts.sync([_ps(CHAT, "2999-01-01T00:00:00Z")], None)
    assert facts.answered(CODER, NOW, 1500.0) is True
    assert facts.resident is not None and set(facts.resident) == {CODER}
    assert facts.evictions == {CHAT: 1} and CHAT in facts.evicted_at
    # /api/ps then confirms it: counted once.
    facts.sync([_ps(CODER, "2999-01-01T00:00:00Z")], None)
    assert facts.evictions == {CHAT: 1}


def test_a_load_begun_at_the_slot_is_news_when_it_answers_even_without_a_load_duration() -> None:
    """A load too quick for load_duration to count (or an answer that does not say it):
    /api/ps is still worth reading then, since that is where a spill shows."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    facts.sync([], None)
    facts.started(CHAT)
    assert facts.answered(CHAT, NOW, None) is True
    assert facts.loads == {CHAT: 1}
    assert facts.answered(CHAT, NOW + 1, None) is False  # the second answer: no load
    facts.started(CODER)
    facts.sync([_ps(CODER, "2999-01-01T00:00:00Z")], None)  # /api/ps saw it first
    assert facts.answered(CODER, NOW + 2, None) is False
    assert facts.loads == {CHAT: 1}


def test_a_request_that_joins_a_load_under_way_does_not_teach_the_load_time() -> None:
    """Keep-hot began the chat model's load; a chat request came in halfway: its
    load_duration is the rest of that load, not what a load takes."""
    facts = ResidencyFacts("gpu", 1, lambda: None)
    facts.sync([], None)
    facts.started(CHAT)  # keep-hot's preload begins the load
    facts.started(CHAT)  # the chat joins it
    assert facts.answered(CHAT, NOW, 1500.0) is True  # the preload's answer: the whole load
    assert facts.answered(CHAT, NOW + 1, 700.0) is False  # the chat's: the rest of it
    assert facts.load_ms == {CHAT: 1500.0}
    # one load, and the chat's load_duration is not taken for an eviction and a reload
    assert facts.loads == {CHAT: 1} and facts.evictions == {}
    # a later load of its own, within the keep-alive: that one is news again
    facts.sync([], None)  # evicted by another client meanwhile
    facts.started(CHAT)
    assert facts.answered(CHAT, NOW + 5, 1400.0) is True and facts.loads == {CHAT: 2}


def test_a_request_that_takes_a_slot_for_another_model_is_a_load_from_then_on() -> None:
    facts = ResidencyFacts("gpu", 1, lambda: None)
    facts.sync([_ps(CHAT, "2999-01-01T00:00:00Z")], None)
    facts.started(CODER)  # still loading: the next plan already sees it
    assert facts.resident is not None and set(facts.resident) == {CODER}
    assert facts.evictions == {CHAT: 1}
    assert facts.answered(CODER, NOW, 1500.0) is True  # the load, counted once
    assert facts.loads == {CODER: 1} and facts.evictions == {CHAT: 1}
    facts.finished(CODER)
    assert facts.running == {}


def test_a_model_loaded_again_before_its_time_shows_an_eviction_no_read_saw() -> None:
    """Loads that follow each other fast may each fall between two /api/ps reads: the
    chat model loading again while harbord had it loaded says something evicted it."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    facts.sync([_ps(CHAT, "2999-01-01T00:00:00Z")], None)
    assert facts.answered(CHAT, NOW, None) is False  # loaded: no news
    facts.started(CODER)
    facts.answered(CODER, NOW + 1, 1500.0)
    facts.finished(CODER)
    facts.started(CHAT)
    assert facts.answered(CHAT, NOW + 3, 1500.0) is True  # loaded again: evicted meanwhile
    assert facts.capacity == residency.Capacity(1, "learned")
    # ...and with one slot, that load evicted the coder in turn.
    assert facts.evictions == {CHAT: 1, CODER: 1}


def test_a_model_loading_for_a_running_request_stays_resident_through_a_read() -> None:
    facts = ResidencyFacts("gpu", 1, lambda: None)
    facts.sync([_ps(CODER, "2999-01-01T00:00:00Z")], None)
    facts.started(CHAT)  # loading: the coder goes
    facts.sync([], None)  # the read falls inside the load
    assert facts.resident is not None and set(facts.resident) == {CHAT}


def test_an_answer_from_a_model_a_waiting_load_evicts_does_not_bring_it_back() -> None:
    facts = ResidencyFacts("gpu", 1, lambda: None)
    facts.sync([_ps(CODER, "2999-01-01T00:00:00Z")], None)
    facts.started(CODER)  # an agent's request on the loaded coder
    facts.started(CHAT)  # the chat waits behind it, and will evict the coder
    assert facts.resident is not None and set(facts.resident) == {CHAT}
    facts.finished(CODER)
    assert facts.answered(CODER, time.time() + 1, None) is False  # no load: still {chat}
    assert set(facts.resident) == {CHAT}


def test_an_answer_that_loaded_a_model_a_waiting_load_evicts_does_not_bring_it_back() -> None:
    """The agent's request loaded the coder (load_duration says so) while the chat's,
    taken since, waits to evict it: the load is counted, and the GPU is still {chat}."""
    facts = ResidencyFacts("gpu", 1, lambda: None)
    facts.sync([], None)
    facts.started(CODER)  # loading the coder
    facts.started(CHAT)  # the chat waits behind it, and will evict the coder
    facts.finished(CODER)
    assert facts.answered(CODER, time.time() + 1, 2000.0) is True  # a load: read /api/ps
    assert facts.resident is not None and set(facts.resident) == {CHAT}
    assert facts.loads == {CODER: 1}


def test_background_work_leaves_a_crowded_gpu_to_the_interactive_model() -> None:
    """The agent's model is still loaded, but the chat model is loading beside it on a
    one-model GPU (another request's): staying would swap them on every request."""
    crowded = replace(
        GPU,
        resident={
            CHAT: Resident(int(5.5 * GB), 4096, NOW + 1800, NOW - 1),
            CODER: Resident(int(5.5 * GB), 16384, NOW + 1800, NOW - 2),
        },
        service_ms={CHAT: 150.0, CODER: 1200.0},
    )
    result = place(CODER, (crowded, replace(CPU, service_ms={CODER: 9000.0})), None,
                   CHATTING, 16384)  # fmt: skip
    assert result.backends == ["cpu", "gpu"], result.steps
    assert result.rule == "residency"
    # Interactive work at the default context is not background: it stays.
    assert place(CHAT, (crowded, CPU), None, CHATTING).backends == ["gpu", "cpu"]


def test_capacity_counts_what_ps_lists_not_what_waits_for_a_slot() -> None:
    """Two loads begun at once on a one-model GPU (an embedding and an agent): the read
    after the embedding's answer lists it alone. The agent's request holds a harbord slot
    but waits in Ollama's queue: the GPU holds one model, not two."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    later = "2999-01-01T00:00:00Z"
    facts.sync([_ps(CHAT, later)], None)
    facts.started(EMBED)
    facts.started(CODER)
    facts.answered(EMBED, NOW, 400.0)
    facts.finished(EMBED)
    facts.sync([_ps(EMBED, later)], None)
    assert facts.capacity == residency.Capacity(1, "learned")
    assert facts.resident is not None and CODER in facts.resident  # loading, kept beside


def test_a_load_listed_by_ps_while_under_way_still_teaches_its_time() -> None:
    """Ollama lists a model in /api/ps from the moment its load begins: the load's own
    answer still counts as the load, and its load_duration as the model's load time."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    later = "2999-01-01T00:00:00Z"
    facts.sync([_ps(CHAT, later)], None)
    facts.started(CODER)
    facts.sync([_ps(CODER, later)], None)  # listed while loading; the chat model gone
    assert facts.capacity == residency.Capacity(1, "learned")
    assert facts.answered(CODER, NOW, 1500.0) is True
    assert facts.load_ms == {CODER: 1500.0}
    assert facts.loads == {CODER: 1}


def test_a_model_that_finishes_yields_the_slot_to_a_load_waiting_for_it() -> None:
    """On a one-model GPU an agent's load and a chat request began before the slots were
    known. When the agent's answer comes, the chat model is still waiting for room: it is
    not what the agent's load evicted, and once the agent is idle, Ollama evicts the
    agent for it. The next agent request must not see the agent as loaded there."""
    facts = ResidencyFacts("gpu", None, lambda: None)
    facts.sync([_ps(EMBED, "2999-01-01T00:00:00Z")], None)
    facts.started(CODER)
    facts.started(CHAT)
    facts.set_capacity_sources(1)  # learned meanwhile (here: the unit's setting)
    facts.answered(CODER, NOW, 3000.0)
    assert facts.resident is not None and {CODER, CHAT} <= set(facts.resident)
    facts.finished(CODER)
    assert set(facts.resident) == {CHAT}
    assert facts.evictions == {EMBED: 1, CODER: 1}
