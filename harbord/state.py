"""Pins and affinity: every change to them, kept in memory and persisted atomically.

The relay, the API and housekeeping change pins and affinity only through the
StateStore's methods, and each change schedules a save: one write at a time, off
the event loop, with one more if something changed during it.

The file is `state.json` in the state directory. Writes go to a temporary
file in the same directory, are fsynced, renamed over the old file and the
directory is fsynced: a crash leaves the old or the new state, never a torn
one (only a stray temporary file, removed at the next start). A file that
does not decode is set aside (`state.json.corrupt-<time>`) and the daemon
starts clean; a directory we cannot write to (checked at start) leaves the
state in memory only. Either way `note` says what happened, for logs and
status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from harbord.affinity import (
    affinities_to_drop,
    affinity_after_serve,
    affinity_expired,
    expired_affinities,
    should_learn_affinity,
)
from harbord.schemas import UNDECODABLE, Affinity, Pin, Plan, StateFile
from harbord.views import BackendView, normalize_model

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# How often a served model's `last_served` alone is saved (affinity expires after it).
AFFINITY_SAVE_EVERY = 60.0
_TMP_PREFIX, _TMP_SUFFIX = ".state-", ".tmp"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StateFile)


class StateStore:
    def __init__(self, directory: Path, affinity_ttl: float = 300.0) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.pins: dict[str, Pin] = {}
        self.affinity: dict[str, Affinity] = {}
        self.affinity_ttl = affinity_ttl  # routing.affinity_ttl, kept current on reload
        self.note: str | None = None
        self.pins_set: collections.Counter[str] = collections.Counter()  # by source, /metrics
        self._affinity_saved_at = 0.0
        self._save_task: asyncio.Task[None] | None = None
        self._save_again = False
        # Bumped by every change of the pins or affinities (each is saved): the
        # scheduler reuses a plan only while this stays the same.
        self.generation = 0

    def load(self) -> None:
        self._read()
        self._prepare_directory()

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            self.note = f"cannot read {self.path}: {err.strerror}; starting with empty state"
            log.warning("%s", self.note)
            return
        try:
            state = _decoder.decode(data)
        except UNDECODABLE as err:
            self._set_aside(str(err) or type(err).__name__)
            return
        self.pins = dict(state.pins)
        self.affinity = dict(state.affinity)
        self.generation += 1

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
        try:
            os.replace(self.path, aside)
            where = f"set aside as {aside.name}"
        except OSError as move_err:
            where = f"could not be set aside ({move_err.strerror})"
        self.note = f"state file {self.path} is corrupt ({why}); {where}; starting with empty state"
        log.warning("%s", self.note)

    def _prepare_directory(self) -> None:
        """Remove what killed saves left behind, and find out now whether saving works."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale in self.directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                stale.unlink()
            fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=self.directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            note = f"cannot save state in {self.directory}: {err.strerror}; keeping it in memory"
            log.warning("%s", note)
            self.note = note if self.note is None else f"{note}; {self.note}"

    def snapshot(self) -> bytes:
        return _encoder.encode(StateFile(pins=self.pins, affinity=self.affinity))

    def save(self, data: bytes | None = None) -> bool:
        """Write the state atomically. Returns False (and sets `note`) on failure."""
        payload = self.snapshot() if data is None else data
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            note = f"cannot save state in {self.directory}: {err.strerror}; keeping it in memory"
            if note != self.note:
                log.warning("%s", note)
            self.note = note
            return False
        if self.note and self.note.startswith("cannot save"):
            self.note = None
        return True

    # -- saving ----------------------------------------------------------------

    def schedule_save(self) -> None:
        """Save soon, off the event loop; changes during a save cause one more."""
        self.generation += 1
        if self._save_task is not None and not self._save_task.done():
            self._save_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool or a test): save now
            self.save()
            return
        self._save_task = loop.create_task(self._save())

    async def _save(self) -> None:
        while True:
            self._save_again = False
            await asyncio.to_thread(self.save, self.snapshot())
            if not self._save_again:
                return

    async def flush(self) -> None:
        """Wait for a save in progress (at shutdown)."""
        if self._save_task is not None:
            await asyncio.shield(self._save_task)

    # -- pins ------------------------------------------------------------------

    def pin(
        self, model: str, backend: str, reason: str, for_seconds: float | None, source: str
    ) -> Pin:
        now = time.time()
        until = now + for_seconds if for_seconds else None
        pin = Pin(
            backend=backend,
            reason=reason,
            since=now,
            until=until,
            source="oom" if source == "oom" else "operator",
        )
        self.pins_set[pin.source] += 1
        self.pins[normalize_model(model)] = pin
        log.info(
            "pinned %s to %s: %s%s",
            model,
            backend,
            reason,
            f" (for {for_seconds:.0f}s)" if for_seconds else "",
        )
        self.schedule_save()
        return pin

    def unpin(self, model: str) -> bool:
        removed = self.pins.pop(normalize_model(model), None)
        if removed is not None:
            log.info("unpinned %s (was %s)", model, removed.backend)
            self.schedule_save()
        return removed is not None

    def active_pins(self, now: float) -> dict[str, Pin]:
        return {m: p for m, p in self.pins.items() if p.active(now)}

    # -- affinity --------------------------------------------------------------

    def learn_affinity(self, plan: Plan, served_backend: str, forced: bool = False) -> bool:
        """An answer for plan.model was served by `served_backend`: remember it, unless
        the plan did not choose it on its own (affinity.should_learn_affinity). True
        when learned. The relay calls this once per answer served."""
        model = plan.model
        if model is None or not should_learn_affinity(plan, served_backend, forced):
            return False
        now = time.time()
        current = self.affinity.get(model)
        self.affinity[model] = affinity_after_serve(current, served_backend, now)
        if current is None or current.backend != served_backend:
            log.info("affinity: %s stays on %s", model, served_backend)
            self.schedule_save()
        elif now - self._affinity_saved_at >= AFFINITY_SAVE_EVERY:
            # last_served alone: saved at most once per AFFINITY_SAVE_EVERY, not once per
            # answer (a restart loses that much of it).
            self._affinity_saved_at = now
            self.schedule_save()
        return True

    def active_affinity(self, now: float | None = None) -> dict[str, Affinity]:
        """The affinities the policy still uses (not expired), by model."""
        when = time.time() if now is None else now
        ttl = self.affinity_ttl
        return {m: a for m, a in self.affinity.items() if not affinity_expired(a, when, ttl)}

    def reset_affinity(self, model: str | None = None) -> list[str]:
        """Forget the affinity of `model` (all when None); the models forgotten."""
        affinity = self.affinity
        models = list(affinity) if model is None else [normalize_model(model)]
        cleared = [m for m in models if affinity.pop(m, None) is not None]
        if cleared:
            log.info("affinity reset: %s", ", ".join(cleared))
            self.schedule_save()
        return cleared

    def drop_affinity_away_from(self, came_up: str, views: Sequence[BackendView]) -> None:
        """`came_up` is healthy again: forget the affinities that kept models off it."""
        gone = affinities_to_drop(self.affinity, views, came_up)
        for model in gone:
            log.info("affinity of %s to %s dropped: %s is up", model,
                     self.affinity.pop(model).backend, came_up)  # fmt: skip
        if gone:
            self.schedule_save()

    # -- housekeeping ----------------------------------------------------------

    def expire(self, now: float | None = None) -> list[str]:
        """Drop expired pins and affinities; returns the models that were unpinned."""
        when = time.time() if now is None else now
        unpinned = [model for model, pin in self.pins.items() if not pin.active(when)]
        for model in unpinned:
            del self.pins[model]
            log.info("pin of %s expired", model)
        forgotten = expired_affinities(self.affinity, when, self.affinity_ttl)
        for model in forgotten:
            del self.affinity[model]
        if forgotten:
            log.info("affinity expired: %s", ", ".join(forgotten))
        if unpinned or forgotten:
            self.schedule_save()
        return unpinned
