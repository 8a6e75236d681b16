"""GPU memory discovery (harbord.gpu_memory): the journal, sysfs and nvidia-smi, read
through stand-in commands and a sysfs tree in tmp_path; every failure is "not found"."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from harbord.gpu_memory import (
    GpuFigures,
    Sources,
    discover,
    read_journal,
    read_nvidia_smi,
    read_sysfs,
)
from harbord.memory import GIB, MIB
from harbord.schemas import GpuMemory
from tests.inproc import assert_no_tasks_left

JOURNAL = """\
time=2026-12-01T08:00:00.000Z level=INFO source=routes.go:1 msg="server config" env="map[]"
time=2026-12-01T08:00:01.000Z level=INFO source=types.go:130 msg="inference compute" \
id=GPU-1 library=CUDA compute=8.9 driver=12.4 name=CUDA0 \
description="NVIDIA GeForce RTX 4070" total="11.7 GiB" available="11.2 GiB"
time=2026-12-01T09:00:00.000Z level=INFO source=server.go:1 msg="llama runner started"
"""


def script(tmp_path: Path, name: str, body: str) -> str:
    """An executable stand-in for a command; it records its arguments in NAME.args."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{path}.args"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def sysfs_card(root: Path, card: str, total: str, used: str | None = None) -> None:
    device = root / card / "device"
    device.mkdir(parents=True)
    (device / "mem_info_vram_total").write_text(total)
    if used is not None:
        (device / "mem_info_vram_used").write_text(used)


async def test_the_journal_gives_the_gpus_of_the_units_last_start(tmp_path: Path) -> None:
    (tmp_path / "journal.txt").write_text(JOURNAL)
    journalctl = script(tmp_path, "journalctl", f'cat "{tmp_path}/journal.txt"')
    devices, missing = await read_journal("ollama-gpu.service", journalctl=journalctl)
    assert devices == [GpuMemory(int(11.7 * GIB), int(11.2 * GIB), "NVIDIA GeForce RTX 4070")]
    assert missing is None
    args = Path(journalctl + ".args").read_text().split()
    assert args[:7] == ["--user", "-u", "ollama-gpu.service", "-o", "cat", "--no-pager", "-n"]


async def test_a_journal_without_the_line_or_a_failing_journalctl_is_not_found(
    tmp_path: Path,
) -> None:
    quiet = script(tmp_path, "quiet", "echo 'level=INFO msg=\"listening\"'")
    assert await read_journal("u.service", journalctl=quiet) == (
        [],
        "journal: no GPU in u.service's 'inference compute' lines",
    )
    failing = script(tmp_path, "failing", "echo 'No journal files were found.' >&2; exit 1")
    assert await read_journal("u.service", journalctl=failing) == (
        [],
        "journal: journalctl -u u.service failed",
    )
    assert await read_journal("u.service", journalctl=str(tmp_path / "none")) == (
        [],
        "journal: journalctl not found",
    )
    assert await read_journal("", journalctl=quiet) == ([], "journal: the backend has no unit")


async def test_a_journalctl_that_hangs_is_cut_off_and_not_found(tmp_path: Path) -> None:
    hangs = script(tmp_path, "hangs", "exec sleep 30")
    devices, missing = await read_journal("u.service", timeout=0.2, journalctl=hangs)
    assert (devices, missing) == ([], "journal: journalctl -u u.service failed")


async def test_sysfs_reads_each_amd_card_and_skips_the_rest(tmp_path: Path) -> None:
    sysfs_card(tmp_path, "card0", f"{16 * GIB}\n", f"{GIB}\n")
    sysfs_card(tmp_path, "card1", "not a number\n")
    (tmp_path / "card2" / "device").mkdir(parents=True)  # an Intel or NVIDIA card: no file
    devices, missing = await read_sysfs(tmp_path)
    assert devices == [GpuMemory(16 * GIB, 15 * GIB)]
    assert missing is None
    assert await read_sysfs(tmp_path / "absent") == (
        [],
        f"sysfs: no mem_info_vram_total under {tmp_path / 'absent'}",
    )


async def test_nvidia_smi_in_mib_and_when_it_is_missing_or_says_nothing(tmp_path: Path) -> None:
    smi = script(tmp_path, "nvidia-smi", "echo '12282, 1024'; echo '[N/A], [N/A]'")
    devices, missing = await read_nvidia_smi(nvidia_smi=smi)
    assert devices == [GpuMemory(12282 * MIB, (12282 - 1024) * MIB)]
    assert missing is None
    assert Path(smi + ".args").read_text().split() == [
        "--query-gpu=memory.total,memory.used",
        "--format=csv,noheader,nounits",
    ]
    assert await read_nvidia_smi(nvidia_smi=str(tmp_path / "none")) == (
        [],
        "nvidia-smi: not installed",
    )
    empty = script(tmp_path, "empty-smi", "exit 9")
    assert await read_nvidia_smi(nvidia_smi=empty) == ([], "nvidia-smi: no GPU reported")


async def test_discover_gathers_every_source_and_says_what_it_did_not_find(
    tmp_path: Path,
) -> None:
    (tmp_path / "journal.txt").write_text(JOURNAL)
    journalctl = script(tmp_path, "journalctl", f'cat "{tmp_path}/journal.txt"')
    sysfs_card(tmp_path / "drm", "card0", f"{8 * GIB}")
    found = await discover(
        "ollama-gpu.service",
        Sources(journalctl=journalctl, drm_root=tmp_path / "drm", nvidia_smi=str(tmp_path / "x")),
    )
    assert [d.total for d in found.journal] == [int(11.7 * GIB)]
    assert [d.total for d in found.sysfs] == [8 * GIB]
    assert found.nvidia_smi == ()
    assert found.missing == ("nvidia-smi: not installed",)
    assert found.total == int(11.7 * GIB)  # the journal first

    nothing = await discover(
        "",
        Sources(journalctl=journalctl, drm_root=tmp_path / "none", nvidia_smi=str(tmp_path / "x")),
    )
    assert (nothing.journal, nothing.sysfs, nothing.nvidia_smi, nothing.total) == ((), (), (), None)
    assert len(nothing.missing) == 3
    assert GpuFigures(sysfs=(GpuMemory(4 * GIB),)).total == 4 * GIB


async def test_stopping_mid_read_leaves_no_process_behind(tmp_path: Path) -> None:
    hangs = script(tmp_path, "hangs", f'echo $$ > "{tmp_path}/pid"; exec sleep 30')
    reading = asyncio.create_task(read_journal("u.service", timeout=60, journalctl=hangs))
    pid_file = tmp_path / "pid"
    while not pid_file.exists() or not pid_file.read_text().strip():
        await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)


async def test_discover_cancelled_waits_for_every_read_to_end(tmp_path: Path) -> None:
    hangs = script(tmp_path, "hangs", f'echo $$ > "{tmp_path}/pid"; exec sleep 30')
    where = Sources(journalctl=hangs, drm_root=tmp_path, nvidia_smi=hangs, timeout=60)
    discovering = asyncio.create_task(discover("u.service", where))
    while not (tmp_path / "pid").exists():
        await asyncio.sleep(0.01)
    discovering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await discovering
    await assert_no_tasks_left()  # no read of the three still winding down
