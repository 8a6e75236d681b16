"""The listening socket: taken from systemd (socket activation) or bound here.

When binding ourselves, a live socket at the path means another harbord is
running, so we refuse; a stale one is removed. The socket is created with
mode 0600 (umask during bind, then chmod before listen), so nobody can
connect during a chmod window.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

SD_LISTEN_FDS_START = 3


class ListenError(Exception):
    pass


def systemd_socket() -> socket.socket | None:
    """The first socket systemd passed us (LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenError("the socket systemd passed is not a Unix stream socket")
    sock.setblocking(False)
    return sock


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_unix(path: Path, backlog: int = 1024) -> socket.socket:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ListenError(f"cannot create {path.parent}: {err.strerror}") from None
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ListenError(
                f"{path} exists and is not a socket; remove it or set another socket path"
            )
        if _is_live(path):
            raise ListenError(f"{path} is in use: is harbord already running? (harborctl status)")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock
