"""What one attempt teaches placement: a pure function from its outcome to lessons.

The relay reports what happened (`Outcome`); `learn` says what follows from it
(`Lessons`); the scheduler applies the lessons to the backends' facts and the
pins. Nothing here does I/O or keeps state, so every lesson is testable as data:
an out-of-memory error on a GPU pins the model to a CPU backend, a refused
connection cools the backend down, a served answer is a service time (and a load,
when it loaded the model), a transient failure teaches nothing that outlives it.
"""

from __future__ import annotations

import re

import msgspec

from harbord.schemas import BackendKind, ErrorClass

# A load this short is the model being found already loaded (Ollama reports a few ms).
LOAD_SEEN_MS = 50.0
_LOAD_DURATION = re.compile(rb'"load_duration"\s*:\s*(\d+)')

# Routed paths whose answer neither loads the model nor says how long a generation takes.
NOT_A_LOAD = frozenset(("/api/show", "/v1/messages/count_tokens"))


# Frozen msgspec structs, not frozen dataclasses: made on every answer, and a frozen
# dataclass's __init__ costs ten times more.
class Outcome(msgspec.Struct, frozen=True):
    """One attempt on one backend, as the relay saw it."""

    backend: str
    kind: BackendKind
    model: str | None
    path: str
    served: bool
    error_class: ErrorClass | None = None
    text: str = ""
    refused: bool = False  # the connection was refused (nothing listens)
    after_first_byte: bool = False
    service_ms: float | None = None  # sent to done, for a whole served answer
    load_ms: float | None = None  # Ollama's load_duration, when the answer said


class PinLesson(msgspec.Struct, frozen=True):
    model: str
    backend: str
    reason: str


class Lessons(msgspec.Struct, frozen=True):
    healthy: bool = False  # the backend answered: it is up
    failure: bool = False  # record the failure (health, cooldown)
    pin: PinLesson | None = None
    service_ms: float | None = None  # a service time for (backend, model)
    load_ms: float | None = None  # a load time for (backend, model)
    resident: bool = False  # the model is loaded there now
    read_loaded: bool = False  # worth reading /api/ps now (a load, or a spill to learn)


def learn(outcome: Outcome, cpu_backend: str | None) -> Lessons:
    """The lessons of `outcome`; `cpu_backend` is where an OOM pins the model to."""
    if outcome.served and outcome.error_class is None:
        if outcome.model is None or outcome.path in NOT_A_LOAD:
            return Lessons(healthy=True)
        loaded = outcome.load_ms is not None and outcome.load_ms >= LOAD_SEEN_MS
        service = outcome.service_ms
        if service is not None and loaded and outcome.load_ms is not None:
            # The answer's own time: a load is learned apart, and counted apart by the
            # policy (only where the model is not loaded).
            service = max(service - outcome.load_ms, 0.0)
        return Lessons(
            healthy=True,
            service_ms=service,
            load_ms=outcome.load_ms if loaded else None,
            resident=True,
            read_loaded=True,
        )
    pin = None
    if (
        outcome.error_class == "oom"
        and outcome.kind == "gpu"
        and outcome.model is not None
        and cpu_backend is not None
    ):
        pin = PinLesson(
            outcome.model, cpu_backend, f"out of memory on {outcome.backend}: {outcome.text[:160]}"
        )
    return Lessons(failure=outcome.error_class is not None, pin=pin)


def load_duration_ms(answer_tail: bytes) -> float | None:
    """Ollama's `load_duration` (ns) in the last bytes of a native answer, in ms. Read
    from the last occurrence by hand: it runs on every answer, and a regex over the
    tail costs several times more."""
    at = answer_tail.rfind(b'"load_duration"')
    if at < 0:
        return None
    found = _LOAD_DURATION.match(answer_tail, at)
    return int(found[1]) / 1e6 if found else None
