"""harbord in-process, for fast tests: a Harbor, its app and fake Ollama backends on one loop.

`start_stack` builds a `Stack`: fake Ollama servers from `tests.fakeollama.build_app`
served with pytest-aiohttp's `aiohttp_server`, a configuration loaded through the
public loader from TOML text, `Harbor(config)` started against them, and
`make_app(harbor)` behind `aiohttp_client`. tests/conftest.py wraps it in the
`make_stack` and `stack` fixtures (`stack` is the usual gpu and cpu pair).

Tests see harbord only from the outside: HTTP answers, `/harbor/*`, the
harbor's pins and decisions, and each fake's request log (`Fake.requests`).

Teardown lifts every fault first (a hung fake handler resumes), closes the
client, the harbor and the fakes, then checks that no task is left behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harbord.config import Config, Overrides, load
from harbord.harbor import Harbor
from harbord.server import make_app
from tests.fakeollama import SERVER_KEY, FakeServer, Record, build_app
from tests.harness import FAST_ROUTING

MODEL = "llama3.2"
# Seconds an in-process server waits for open requests when it closes.
SHUTDOWN_S = 0.5


class ServerFactory(Protocol):
    def __call__(self, app: web.Application, **kwargs: Any) -> Awaitable[TestServer]: ...


class ClientFactory(Protocol):
    def __call__(self, server: TestServer) -> Awaitable[TestClient[Any, Any]]: ...


@dataclass
class Fake:
    """One backend's server; `server` is None for a hand-written app (no request log)."""

    name: str
    test_server: TestServer
    server: FakeServer | None

    @property
    def url(self) -> str:
        return str(self.test_server.make_url("")).rstrip("/")

    @property
    def fake(self) -> FakeServer:
        assert self.server is not None, f"{self.name} is not a fake Ollama"
        return self.server

    def set_faults(self, faults: Mapping[str, Any]) -> None:
        self.fake.set_faults(faults)

    def requests(self, path: str | None = None) -> list[Record]:
        """The fake's log of model-endpoint requests, oldest first; without a path,
        harbord's own background reads of /api/show (model_facts.py) left out."""
        if path is None:
            return [r for r in self.fake.log if r.path != "/api/show"]
        return [r for r in self.fake.log if r.path == path]

    def states(self, path: str = "/api/chat") -> list[str]:
        return [r.state for r in self.requests(path)]


@dataclass
class Stack:
    harbor: Harbor
    client: TestClient[Any, Any]
    fakes: dict[str, Fake]
    harbor_server: TestServer
    closed: bool = field(default=False)

    @property
    def gpu(self) -> Fake:
        return self.fakes["gpu"]

    @property
    def cpu(self) -> Fake:
        return self.fakes["cpu"]

    async def chat(
        self,
        model: str = MODEL,
        *,
        stream: bool | None = None,
        openai: bool = False,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> aiohttp.ClientResponse:
        """POST a one-message chat on /api/chat (or /v1/chat/completions); the answer unread."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            **extra,
        }
        if stream is not None:
            body["stream"] = stream
        path = "/v1/chat/completions" if openai else "/api/chat"
        return await self.client.post(path, json=body, headers=headers)

    async def get_json(self, path: str) -> Any:
        response = await self.client.get(path)
        assert response.status == 200, await response.text()
        return await response.json()

    async def backend(self, name: str) -> dict[str, Any]:
        status = await self.get_json("/harbor/status")
        found: dict[str, Any] = next(b for b in status["backends"] if b["name"] == name)
        return found

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0
    ) -> None:
        """Poll `predicate` until it holds; the timeout only bounds a failing test."""
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fake in self.fakes.values():
            if fake.server is not None:
                fake.server.set_faults({})  # hung handlers resume and finish
        await self.client.close()
        await self.harbor.close()
        for fake in self.fakes.values():
            await fake.test_server.close()


StackFactory = Callable[..., Awaitable[Stack]]


def backend_toml(name: str, url: str, extra: str = "") -> str:
    kind = "cpu" if name.startswith("cpu") else "gpu"
    return f'[backends.{name}]\nurl = "{url}"\nkind = "{kind}"\n{extra}\n'


def load_config(tmp_path: Path, text: str) -> Config:
    """The configuration from TOML text, through the public loader, kept inside tmp_path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "harbord.toml"
    path.write_text(text)
    return load(
        Overrides(
            config=str(path),
            socket=str(tmp_path / "harbor.sock"),
            state_dir=str(tmp_path / "state"),
        ),
        env={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)},
    )


async def read_lines(response: aiohttp.ClientResponse) -> list[bytes]:
    """Every non-empty line of a streamed answer."""
    body = await response.read()
    return [line for line in body.split(b"\n") if line.strip()]


async def read_ndjson(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    return [json.loads(line) for line in await read_lines(response)]


async def start_stack(
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    workdir: Path,
    backends: Mapping[str, str] | None = None,
    *,
    config: str = "",
    routing: str = FAST_ROUTING,
    apps: Mapping[str, web.Application] | None = None,
    models: Mapping[str, int] | None = None,
    faults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Stack:
    """Serve the backends, load the configuration, start the harbor and its app.

    `backends` maps each backend's name to extra TOML lines for its table (a name
    starting with "cpu" is a cpu backend; default: gpu and cpu); `config` is extra
    top-level TOML and `routing` the [routing] table. `apps` replaces a backend's
    fake with any aiohttp application; `models` goes to every fake; `faults` maps a
    backend's name to the faults its fake has from the start (before the first probe).
    """
    backends = backends or {"gpu": "", "cpu": ""}
    fakes: dict[str, Fake] = {}
    for name in backends:
        app = (apps or {}).get(name)
        if app is None:
            app = build_app(name=name, models=models, faults=(faults or {}).get(name))
        server = await aiohttp_server(app, shutdown_timeout=SHUTDOWN_S)
        fakes[name] = Fake(name, server, app.get(SERVER_KEY))
    tables = [backend_toml(name, fakes[name].url, extra) for name, extra in backends.items()]
    harbor = Harbor(load_config(workdir, "\n".join([config, routing, *tables])))
    await harbor.start()
    harbor_server = await aiohttp_server(make_app(harbor), shutdown_timeout=SHUTDOWN_S)
    client = await aiohttp_client(harbor_server)
    return Stack(harbor, client, fakes, harbor_server)


async def assert_no_tasks_left() -> None:
    """Nothing but the caller still runs on the loop: no prober, save or handler task."""
    await asyncio.sleep(0)  # let cancelled tasks finish their last step
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not left, f"tasks left running: {left}"
