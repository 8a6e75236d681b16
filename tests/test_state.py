"""Pins and affinity on disk: round trip, atomic writes, corrupt and unwritable files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harbord.schemas import Affinity, Pin
from harbord.state import StateStore


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.pins["llama3:latest"] = Pin("cpu", "out of memory on gpu", 10.0, 100.0, "oom")
    store.affinity["qwen:7b"] = Affinity("gpu", 5.0)
    assert store.save()
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"

    again = StateStore(tmp_path / "state")
    again.load()
    assert again.pins == store.pins
    assert again.affinity == store.affinity
    assert again.note is None


def test_missing_file_is_a_clean_start(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.load()
    assert (store.pins, store.affinity, store.note) == ({}, {}, None)


def test_old_state_file_still_loads(tmp_path: Path) -> None:
    # A version-1 file as written by harbord 0.1.0: keep loading it.
    (tmp_path / "state.json").write_text(
        '{"version":1,"pins":{"codellama:13b":{"backend":"cpu","reason":"out of memory on gpu: '
        'CUDA error: out of memory","since":1795700000.0,"until":1795786400.0,"source":"oom"}},'
        '"affinity":{"llama3.2:latest":{"backend":"gpu","since":1795700000.0}}}'
    )
    store = StateStore(tmp_path)
    store.load()
    assert store.pins["codellama:13b"].backend == "cpu"
    assert store.pins["codellama:13b"].source == "oom"
    assert store.affinity["llama3.2:latest"].backend == "gpu"


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"pins": {"x": {"backend": 3}}}', b"\xff\xfe", b"[]"]
)
def test_corrupt_file_is_set_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    store = StateStore(tmp_path)
    store.load()
    assert (store.pins, store.affinity) == ({}, {})
    assert store.note is not None and "corrupt" in store.note
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / "state.json").exists()


def test_unwritable_directory_keeps_state_in_memory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory modes; a path under a regular file cannot be created by anyone.
        blocker = tmp_path / "file"
        blocker.write_text("")
        directory = blocker / "state"
    else:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o500)
    store = StateStore(directory)
    store.pins["m:latest"] = Pin("cpu", "op", 1.0)
    assert not store.save()
    assert store.note is not None and "cannot save state" in store.note
    assert "m:latest" in store.pins


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(5):
        store.affinity[f"m{i}:latest"] = Affinity("gpu", float(i))
        assert store.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_expire(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.pins = {"a:latest": Pin("cpu", "x", 0.0, 10.0), "b:latest": Pin("cpu", "x", 0.0, None)}
    assert store.expire(11.0) == ["a:latest"]
    assert list(store.pins) == ["b:latest"]
