"""Pins and affinity, kept in memory and persisted atomically.

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

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import msgspec

from harbord.schemas import UNDECODABLE, Affinity, Pin, StateFile

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# How often a served model's `last_served` alone is saved (affinity expires after it).
AFFINITY_SAVE_EVERY = 60.0
_TMP_PREFIX, _TMP_SUFFIX = ".state-", ".tmp"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StateFile)


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.pins: dict[str, Pin] = {}
        self.affinity: dict[str, Affinity] = {}
        self.note: str | None = None
        self._affinity_saved_at = 0.0

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

    # -- changes ------------------------------------------------------------

    def affinity_save_due(self, now: float) -> bool:
        """Whether an affinity's new `last_served` is worth a write: at most once per
        AFFINITY_SAVE_EVERY, not once per answer (a restart loses that much of it)."""
        if now - self._affinity_saved_at < AFFINITY_SAVE_EVERY:
            return False
        self._affinity_saved_at = now
        return True

    def expire(self, now: float) -> list[str]:
        """Drop expired pins; returns the models that were unpinned."""
        gone = [model for model, pin in self.pins.items() if not pin.active(now)]
        for model in gone:
            del self.pins[model]
        return gone
