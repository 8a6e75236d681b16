"""Finding a GPU's memory without configuration: the I/O behind memory.choose_budget.

Three places say how much memory a GPU has, read here in the order of their worth:
the "inference compute" lines Ollama logs at start (the GPU unit's journal), the
GPU's own sysfs figures (AMD), and `nvidia-smi` where it is installed. Each read has
a timeout and a failure is no error: the source counts as not found, and `missing`
says why, for `harborctl status`. Parsing is memory.py's (pure); this module only
runs the commands and reads the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harbord.memory import parse_inference_compute, parse_nvidia_smi, parse_sysfs_vram
from harbord.schemas import GpuMemory

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
DRM_ROOT = Path("/sys/class/drm")
# Enough of a long-running unit's journal to hold its last start; the lines that
# matter are a handful, the rest is skipped as it streams by.
JOURNAL_LINES = 20000
_MARK = 'msg="inference compute"'


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """What each source said about the GPU(s); empty where it said nothing."""

    journal: tuple[GpuMemory, ...] = ()
    sysfs: tuple[GpuMemory, ...] = ()
    nvidia_smi: tuple[GpuMemory, ...] = ()
    missing: tuple[str, ...] = ()  # "journal: no 'inference compute' line", ...

    @property
    def total(self) -> int | None:
        """The GPUs' total memory from the first source that knows it (default context)."""
        for devices in (self.journal, self.sysfs, self.nvidia_smi):
            if devices:
                return sum(d.total for d in devices)
        return None


async def _run(argv: Sequence[str], timeout: float, keep: str | None = None) -> str | None:
    """A command's stdout (only lines containing `keep`, when given); None when it
    cannot run, fails or takes longer than `timeout`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    assert proc.stdout is not None
    kept: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            async for raw in proc.stdout:  # streamed: a long journal is never held whole
                line = raw.decode(errors="replace")
                if keep is None or keep in line:
                    kept.append(line)
            code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # harbord is stopping: nothing left behind, not even a zombie
        await proc.wait()
        raise
    except (TimeoutError, ValueError):  # ValueError: a line over asyncio's 64 KiB limit
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    return "".join(kept) if code == 0 else None


async def read_journal(
    unit: str, timeout: float = READ_TIMEOUT, journalctl: str = "journalctl"
) -> tuple[list[GpuMemory], str | None]:
    """The GPUs of the unit's last start, from its journal; (devices, why not found)."""
    if not unit:
        return [], "journal: the backend has no unit"
    if shutil.which(journalctl) is None:
        return [], "journal: journalctl not found"
    argv = [journalctl, "--user", "-u", unit, "-o", "cat", "--no-pager", "-n", str(JOURNAL_LINES)]
    out = await _run(argv, timeout, keep=_MARK)
    if out is None:
        return [], f"journal: journalctl -u {unit} failed"
    devices = parse_inference_compute(out.splitlines())
    return devices, None if devices else f"journal: no GPU in {unit}'s 'inference compute' lines"


def _read_sysfs_sync(root: Path) -> list[GpuMemory]:
    devices: list[GpuMemory] = []
    for total_file in sorted(root.glob("card*/device/mem_info_vram_total")):
        try:
            total = total_file.read_text()
        except OSError:
            continue
        try:
            used: str | None = total_file.with_name("mem_info_vram_used").read_text()
        except OSError:
            used = None
        device = parse_sysfs_vram(total, used)
        if device is not None:
            devices.append(device)
    return devices


async def read_sysfs(
    root: Path = DRM_ROOT, timeout: float = READ_TIMEOUT
) -> tuple[list[GpuMemory], str | None]:
    """AMD GPUs' VRAM from sysfs (a file read in a thread: sysfs can be slow)."""
    try:
        async with asyncio.timeout(timeout):
            devices = await asyncio.to_thread(_read_sysfs_sync, root)
    except (TimeoutError, OSError):
        devices = []
    return devices, None if devices else f"sysfs: no mem_info_vram_total under {root}"


async def read_nvidia_smi(
    timeout: float = READ_TIMEOUT, nvidia_smi: str = "nvidia-smi"
) -> tuple[list[GpuMemory], str | None]:
    if shutil.which(nvidia_smi) is None:
        return [], "nvidia-smi: not installed"
    argv = [nvidia_smi, "--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits"]
    out = await _run(argv, timeout)
    devices = parse_nvidia_smi(out) if out is not None else []
    return devices, None if devices else "nvidia-smi: no GPU reported"


@dataclass(frozen=True, slots=True)
class Sources:
    """Where to look; tests point these at files and scripts of their own."""

    journalctl: str = "journalctl"
    drm_root: Path = DRM_ROOT
    nvidia_smi: str = "nvidia-smi"
    timeout: float = READ_TIMEOUT


async def discover(unit: str, sources: Sources | None = None) -> GpuFigures:
    """Every source at once; a source that fails is reported missing, never raised."""
    where = sources or Sources()
    # A task group, not gather: cancelled, it waits for each read to kill its command.
    async with asyncio.TaskGroup() as group:
        reading_journal = group.create_task(read_journal(unit, where.timeout, where.journalctl))
        reading_sysfs = group.create_task(read_sysfs(where.drm_root, where.timeout))
        reading_smi = group.create_task(read_nvidia_smi(where.timeout, where.nvidia_smi))
    journal, sysfs, smi = reading_journal.result(), reading_sysfs.result(), reading_smi.result()
    missing = tuple(why for _, why in (journal, sysfs, smi) if why is not None)
    return GpuFigures(tuple(journal[0]), tuple(sysfs[0]), tuple(smi[0]), missing)
