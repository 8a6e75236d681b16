"""harbord as harborctl's commands see it: a HarborClient on the socket.

The transport, the error mapping (`{"error": ...}` answers become HarborError, a dead
socket HarborUnavailable) and the endpoints' table are the client library's
(harbord.client, harbord.harbor_endpoints). A command that prints `--json` uses
`daemon.client.fetch(ENDPOINT, ...)`, whose `raw` is exactly what harbord said.
"""

from __future__ import annotations

from pathlib import Path

from harbord.client import HarborClient, HarborUnavailable

START_HINT = "is it running? start it with 'systemctl --user start harbord.socket' or run 'harbord'"


class Daemon:
    def __init__(self, socket: Path, timeout: float | None) -> None:
        self.socket = socket
        self.client = HarborClient(socket, timeout)

    def close(self) -> None:
        self.client.close()


def unreachable(err: HarborUnavailable) -> str:
    """The one line harborctl prints when nothing answers on the socket."""
    return f"harborctl: cannot reach harbord at {err.socket}: {START_HINT}"
