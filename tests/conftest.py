"""Shared fixtures: the in-process stacks (tests/inproc.py has the helpers), and a
second Unix user for the tests of who may reach harbord."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.inproc import (
    ClientFactory,
    ServerFactory,
    Stack,
    StackFactory,
    assert_no_tasks_left,
    start_stack,
)
from tests.scripted_server import Handler, Serve, Server


@pytest.fixture
async def make_stack(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> AsyncIterator[StackFactory]:
    """make_stack(backends=None, **options): a started `Stack` (see inproc.start_stack).

    Every stack is closed after the test, and then no task may be left running.
    """
    stacks: list[Stack] = []

    async def make(backends: dict[str, str] | None = None, **options: Any) -> Stack:
        workdir = tmp_path / f"harbor{len(stacks)}"
        stack = await start_stack(aiohttp_server, aiohttp_client, workdir, backends, **options)
        stacks.append(stack)
        return stack

    yield make

    for stack in stacks:
        await stack.close()
    await assert_no_tasks_left()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    """A gpu and a cpu fake behind a harbor with default backend settings."""
    return await make_stack()


OTHER_USER = "harbor-test-other"


@pytest.fixture(scope="session")
def other_user() -> str:
    """A second Unix user; creating one needs root (CI runs as root)."""
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        if os.geteuid() != 0:
            if os.environ.get("CI"):
                pytest.fail("the second-user test needs root in CI")
            pytest.skip("creating a second user needs root")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
        )
    return OTHER_USER


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """serve(handler): a scripted backend on loopback (tests/scripted_server.py)."""
    servers: list[Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()
        for task in server.handlers:
            task.cancel()
        await asyncio.gather(*server.handlers, return_exceptions=True)
