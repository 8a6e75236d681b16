"""Supervision of the backends' systemd user units (filled in by the systemd work)."""

from __future__ import annotations

from harbord.harbor import Harbor


class Supervisor:
    async def stop(self) -> None:
        return None


async def start_supervision(harbor: Harbor) -> Supervisor | None:
    return None
