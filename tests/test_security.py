"""Who may reach harbord: peer credentials on the socket, the TCP listener's token."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakeproc import FakeOllama, free_port
from tests.harness import Harbord, gpu_cpu


@pytest.fixture
def backends() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    with FakeOllama.start("gpu") as gpu, FakeOllama.start("cpu", cpu=True) as cpu:
        yield gpu, cpu


def curl_as(user: str, socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "runuser",
            "-u",
            user,
            "--",
            "curl",
            "-sS",
            "-i",
            "--unix-socket",
            str(socket_path),
            "http://localhost/harbor/status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_other_user_is_refused(backends: tuple[FakeOllama, FakeOllama], other_user: str) -> None:
    gpu, cpu = backends
    # The other user must be able to reach the directory to try at all: pytest's
    # tmp_path is private to root, so use an open one.
    workdir = Path(tempfile.mkdtemp(prefix="harbor-peer-"))
    workdir.chmod(0o755)
    daemon = Harbord.start(
        workdir,
        gpu_cpu(gpu, cpu),
        extra_config="allow_root = false\n",
    )
    try:
        (workdir / "run").chmod(0o755)
        # Mode 0600: the kernel refuses the connection.
        refused = curl_as(other_user, daemon.socket)
        assert refused.returncode == 7, refused.stderr  # curl: could not connect
        # Even with the socket opened up by mistake, the peer check refuses.
        daemon.socket.chmod(0o666)
        forbidden = curl_as(other_user, daemon.socket)
        assert forbidden.stdout.startswith("HTTP/1.1 403"), forbidden.stdout + forbidden.stderr
        assert "forbidden" in forbidden.stdout
        # The daemon's own user is still served.
        with daemon.client() as client:
            assert client.get("/harbor/status").status_code == 200
        assert "refused a connection from uid" in daemon.log()
    finally:
        daemon.stop()
        shutil.rmtree(workdir)


def test_own_user_is_served(tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]) -> None:
    gpu, cpu = backends
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        with daemon.client() as client:
            assert client.get("/harbor/status").status_code == 200
    finally:
        daemon.stop()


def test_no_tcp_listener_by_default(
    tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    daemon = Harbord.start(tmp_path, gpu_cpu(gpu, cpu))
    try:
        assert daemon.proc is not None
        listening = Path(f"/proc/{daemon.proc.pid}/net/tcp").read_text()
        inodes = {
            os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")
        }
        # State 0A is LISTEN: none of the daemon's own sockets may be in it.
        own = {i.split("[")[1].rstrip("]") for i in inodes if i.startswith("socket:[")}
        for line in listening.splitlines()[1:]:
            fields = line.split()
            assert not (fields[3] == "0A" and fields[9] in own), line
    finally:
        daemon.stop()


def test_tcp_listener_loopback_without_token(
    tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    port = free_port()
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        extra_config=f'[tcp]\nlisten = "127.0.0.1:{port}"\n',
    )
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{port}/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "stream": False},
            timeout=10,
        )
        assert reply.status_code == 200
        assert reply.headers["X-Harbor-Backend"] == "gpu"
        assert "has no token_file: every user of this machine can use it" in daemon.log()
    finally:
        daemon.stop()


def test_tcp_listener_with_token(tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]) -> None:
    gpu, cpu = backends
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-tests\n")
    token_file.chmod(0o600)
    port = free_port()
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        extra_config=f'[tcp]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n',
    )
    try:
        url = f"http://127.0.0.1:{port}/harbor/status"
        assert httpx.get(url, timeout=5).status_code == 401
        assert (
            httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        )
        good = httpx.get(url, headers={"Authorization": "Bearer s3cret-token-for-tests"}, timeout=5)
        assert good.status_code == 200
        # The token is harbord's: it never reaches the backend.
        httpx.post(
            f"http://127.0.0.1:{port}/api/chat",
            timeout=10,
            headers={"Authorization": "Bearer s3cret-token-for-tests"},
            json={"model": "llama3.2", "messages": [], "stream": False},
        )
        forwarded = [r for r in gpu.requests() if r["path"] == "/api/chat"][-1]
        assert "authorization" not in {k.lower() for k in forwarded["headers"]}
        # The Unix socket needs no token.
        with daemon.client() as client:
            assert client.get("/harbor/status").status_code == 200
    finally:
        daemon.stop()


def test_non_loopback_listener_needs_a_token(tmp_path: Path) -> None:
    config = tmp_path / "harbord.toml"
    config.write_text('[tcp]\nlisten = "0.0.0.0:11400"\n')
    result = subprocess.run(
        [sys.executable, "-m", "harbord", "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "tcp.token_file" in result.stderr and str(config) in result.stderr


def test_world_readable_token_is_refused(
    tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-tests\n")
    token_file.chmod(0o644)
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        wait=False,
        extra_config=f'[tcp]\nlisten = "127.0.0.1:{free_port()}"\ntoken_file = "{token_file}"\n',
    )
    assert daemon.proc is not None
    assert daemon.proc.wait(15) != 0
    assert "readable by others" in daemon.log()


def test_trickled_headers_are_cut_off(
    tmp_path: Path, backends: tuple[FakeOllama, FakeOllama]
) -> None:
    gpu, cpu = backends
    daemon = Harbord.start(
        tmp_path,
        gpu_cpu(gpu, cpu),
        extra_config='client_timeout = "1s"\n',
    )
    try:
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(str(daemon.socket))
        slow.sendall(b"GET /harbor/status HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        slow.settimeout(5)
        started = time.monotonic()
        assert slow.recv(100) == b""  # closed by harbord
        assert time.monotonic() - started < 4
        slow.close()
        # A slow body gets a 408.
        body_sock = socket.socket(socket.AF_UNIX)
        body_sock.connect(str(daemon.socket))
        body_sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        body_sock.settimeout(5)
        assert body_sock.recv(200).startswith(b"HTTP/1.1 408")
        body_sock.close()
        with daemon.client() as client:  # others are still served
            assert client.get("/harbor/status").status_code == 200
    finally:
        daemon.stop()
