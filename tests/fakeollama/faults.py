"""The fault set a test switches on (``--faults``, ``POST /_fake/faults``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .models import _key
from .wire import (
    MIDSTREAM_TEXT,
    OOM_TEXT,
)

# --------------------------------------------------------------------------------------
# Faults

GARBAGE_KINDS: Final = frozenset({"nonjson", "truncated", "html", "wrong_ctype", "error200"})
FAULT_KEYS: Final = frozenset(
    {
        "oom_models",
        "oom_text",
        "missing_models",
        "driver_error",
        "driver_text",
        "busy",
        "hang",
        "hang_generation",
        "load_delay",
        "token_delay",
        "die_after_chunks",
        "error_after_chunks",
        "error_text",
        "garbage",
        "status",
        "pull_total",
        "pull_error",
        "only_models",
    }
)


def _names(raw: Any, key: str) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f"fault {key!r} must be a list of model names")
    return frozenset(_key(x) for x in raw)


def _num(raw: Any, key: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError(f"fault {key!r} must be a non-negative number")
    return float(raw)


def _int(raw: Any, key: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"fault {key!r} must be a non-negative integer")
    return raw


def _flag(raw: Any, key: str) -> bool:
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise ValueError(f"fault {key!r} must be true or false")
    return raw


def _text(raw: Any, key: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"fault {key!r} must be a string")
    return raw


@dataclass(frozen=True, slots=True)
class Faults:
    """A parsed fault set; see the module's CLI help for what each key does."""

    oom_models: frozenset[str] = frozenset()
    oom_text: str = OOM_TEXT
    missing_models: frozenset[str] = frozenset()
    driver_error: bool = False
    driver_text: str | None = None
    busy: bool = False
    hang: bool = False
    hang_generation: bool = False
    load_delay: float = 0.0
    token_delay: float | None = None
    die_after_chunks: int | None = None
    error_after_chunks: int | None = None
    error_text: str = MIDSTREAM_TEXT
    garbage: str | None = None
    status: tuple[int, str] | None = None
    pull_total: int = 1_000_000
    pull_error: str | None = None
    only_models: frozenset[str] | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Faults:
        """Validate a fault set given as JSON; raises ValueError on bad input."""
        if not isinstance(raw, Mapping):
            raise ValueError("faults must be a JSON object")
        unknown = sorted(set(raw) - FAULT_KEYS)
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
        garbage = _text(raw.get("garbage"), "garbage")
        if garbage is not None and garbage not in GARBAGE_KINDS:
            raise ValueError(f"fault 'garbage' must be one of {', '.join(sorted(GARBAGE_KINDS))}")
        status: tuple[int, str] | None = None
        st = raw.get("status")
        if st is not None:
            if (
                not isinstance(st, Mapping)
                or isinstance(st.get("code"), bool)
                or not isinstance(st.get("code"), int)
                or not 100 <= st["code"] <= 599
            ):
                raise ValueError('fault \'status\' must be {"code": int, "error": str}')
            status = (int(st["code"]), str(st.get("error", "")))
        pull_total = _int(raw.get("pull_total"), "pull_total")
        only = raw.get("only_models")
        return cls(
            oom_models=_names(raw.get("oom_models"), "oom_models"),
            oom_text=_text(raw.get("oom_text"), "oom_text") or OOM_TEXT,
            missing_models=_names(raw.get("missing_models"), "missing_models"),
            driver_error=_flag(raw.get("driver_error"), "driver_error"),
            driver_text=_text(raw.get("driver_text"), "driver_text"),
            busy=_flag(raw.get("busy"), "busy"),
            hang=_flag(raw.get("hang"), "hang"),
            hang_generation=_flag(raw.get("hang_generation"), "hang_generation"),
            load_delay=_num(raw.get("load_delay"), "load_delay") or 0.0,
            token_delay=_num(raw.get("token_delay"), "token_delay"),
            die_after_chunks=_int(raw.get("die_after_chunks"), "die_after_chunks"),
            error_after_chunks=_int(raw.get("error_after_chunks"), "error_after_chunks"),
            error_text=_text(raw.get("error_text"), "error_text") or MIDSTREAM_TEXT,
            garbage=garbage,
            status=status,
            pull_total=1_000_000 if pull_total is None else pull_total,
            pull_error=_text(raw.get("pull_error"), "pull_error"),
            only_models=None if only is None else _names(only, "only_models"),
        )

    def applies(self, model: str) -> bool:
        """Whether the model-independent faults hit a request for ``model``."""
        if self.only_models is None or not model:
            return True
        return _key(model) in self.only_models
