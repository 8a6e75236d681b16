"""harbord as harborctl's commands see it.

The transport, the error mapping (`{"error": ...}` answers become HarborError, a dead
socket HarborUnavailable) and the model-name quoting are the client library's
(harbord.client); this adds the daemon's raw JSON next to the decoded value, so
`--json` prints exactly what harbord said.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

from harbord.client import HarborClient, HarborUnavailable, decode

T = TypeVar("T")

START_HINT = "is it running? start it with 'systemctl --user start harbord.socket' or run 'harbord'"


@dataclass(frozen=True)
class Answer(Generic[T]):
    raw: bytes  # harbord's JSON as it came
    value: T  # decoded with the schema


class Daemon:
    def __init__(self, socket: Path, timeout: float | None) -> None:
        self.socket = socket
        self.client = HarborClient(socket, timeout)

    def call(
        self,
        method: str,
        path: str,
        tp: type[T],
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
    ) -> Answer[T]:
        json = None if body is None else msgspec.to_builtins(body)
        resp = self.client.request(method, path, params=params, json=json)
        return Answer(resp.content, decode(resp.content, tp))

    def get(self, path: str, tp: type[T], **params: str) -> Answer[T]:
        return self.call("GET", path, tp, params=params)

    def close(self) -> None:
        self.client.close()


def unreachable(err: HarborUnavailable) -> str:
    """The one line harborctl prints when nothing answers on the socket."""
    return f"harborctl: cannot reach harbord at {err.socket}: {START_HINT}"
