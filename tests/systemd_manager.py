"""A private `systemd --user` manager for the system tests.

Follows ../shared/systemd-user-manager.md: a delegated cgroup subtree (both
hierarchies on a hybrid host, one on pure cgroup2), `/run/systemd/system`, a
private XDG_RUNTIME_DIR (mode 0700), a fresh HOME and XDG_CONFIG_HOME, the
manager started with setsid, and ready when `is-system-running` says
`running`. Teardown stops the units, ends the manager by its PID, kills by PID
whatever is still in the subtree, and removes the cgroups and directories.

    manager = UserManager.start()
    manager.install_unit("harbord.service", text)
    manager.systemctl("start", "harbord.service")
    manager.show("harbord.service", "ActiveState", "MainPID")
    manager.close()

Everything lives below /var/lib/harbor-systemd-tests (HARBOR_SYSTEMD_BASE
overrides it), neither /tmp nor /run: harbord.service has PrivateTmp=yes, so
it could not see a runtime directory or HOME below /tmp; and where /run is not
a mount point of its own (as on these VMs, unlike a systemd host), the units'
mount namespaces get an empty tmpfs on /run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SYSTEMD = Path("/lib/systemd/systemd")
RUN_SYSTEMD = Path("/run/systemd")
BASE = Path(os.environ.get("HARBOR_SYSTEMD_BASE") or "/var/lib/harbor-systemd-tests")
REQUIRE_ENV = "HARBOR_REQUIRE_SYSTEMD"


class ManagerUnavailable(Exception):
    """This host cannot run a private user manager; the text says why."""


def required() -> bool:
    """CI sets HARBOR_REQUIRE_SYSTEMD=1: a missing manager must fail, not skip."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def cgroup_roots() -> list[Path]:
    """The hierarchies to delegate a subtree in: cgroup2, plus the named v1 one on a hybrid host."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4:
                mounts[fields[1]] = fields[2] + " " + fields[3]
    base = "/sys/fs/cgroup"
    if mounts.get(base, "").startswith("cgroup2 "):
        return [Path(base)]
    roots = []
    unified = mounts.get(f"{base}/unified", "")
    if unified.startswith("cgroup2 "):
        roots.append(Path(f"{base}/unified"))
    named = mounts.get(f"{base}/systemd", "")
    if named.startswith("cgroup ") and "name=systemd" in named:
        roots.append(Path(f"{base}/systemd"))
    return roots


def unavailable() -> str | None:
    """Why this host cannot run a private user manager, or None when it can."""
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} is missing (install the systemd package)"
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    if os.geteuid() != 0:
        return "the private user manager needs root (for /run/systemd and a cgroup subtree)"
    roots = cgroup_roots()
    if not roots:
        return "no cgroup2 or name=systemd hierarchy is mounted under /sys/fs/cgroup"
    for root in roots:
        if not os.access(root, os.W_OK):
            return f"{root} is not writable: no cgroup subtree can be delegated"
    return None


class UserManager:
    def __init__(self, base: Path, uid: int | None = None) -> None:
        self.base = base
        self.uid = uid  # None: the manager runs as root, like the tests
        self.account = pwd.getpwuid(os.getuid() if uid is None else uid)
        self.runtime = base / "runtime"
        self.home = base / "home"
        self.config_home = self.home / ".config"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.logs = base / "logs"
        self.cgroups: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def start(cls, timeout: float = 30.0, uid: int | None = None) -> UserManager:
        """A manager for root, or for the unprivileged user `uid` (as a real user's would be)."""
        reason = unavailable()
        if reason is None and uid is not None and shutil.which("setpriv") is None:
            reason = "setpriv (util-linux) is needed to start a manager for another user"
        if reason is not None:
            raise ManagerUnavailable(reason)
        BASE.mkdir(mode=0o711, parents=True, exist_ok=True)
        BASE.chmod(0o711)
        base = Path(tempfile.mkdtemp(prefix="harbor-systemd-", dir=BASE))
        base.chmod(0o711)
        manager = cls(base, uid)
        try:
            manager._launch(timeout)
        except BaseException:
            manager.close()
            raise
        return manager

    @property
    def env(self) -> dict[str, str]:
        """The environment of the manager, and of systemctl talking to it."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "HOME": str(self.home),
            "USER": self.account.pw_name,
            "LOGNAME": self.account.pw_name,
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(self.config_home),
        }

    def _launch(self, timeout: float) -> None:
        # On a systemd host PID 1 provides these: the "booted with systemd" marker,
        # and the staging directory for units' mount namespaces (without it every
        # unit with ProtectSystem=, PrivateTmp=, ... fails with 226/NAMESPACE).
        (RUN_SYSTEMD / "system").mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (RUN_SYSTEMD / "unit-root").mkdir(mode=0o700)
        for path in (self.runtime, self.home, self.unit_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o700)
        self.home.chmod(0o700)
        name = f"{self.base.name}.slice"
        for root in cgroup_roots():
            cgroup = root / name
            cgroup.mkdir()
            self.cgroups.append(cgroup)
        manager = [str(SYSTEMD), "--user"]
        if self.uid is not None:
            self.chown(self.runtime, self.home, self.logs, *self.cgroups)
            gid = self.account.pw_gid
            manager = [
                "setpriv",
                f"--reuid={self.uid}",
                f"--regid={gid}",
                "--clear-groups",
                *manager,
            ]
        # The launcher moves itself into the subtree (as root), then becomes the manager.
        script = 'for f in "$@"; do echo $$ > "$f" || exit 1; done; exec $MANAGER'
        with open(self.logs / "manager.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    script.replace("$MANAGER", shlex.join(manager)),
                    "sh",
                    *(str(c / "cgroup.procs") for c in self.cgroups),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd="/",
            )
        private = self.runtime / "systemd" / "private"
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, log_tail = self.proc.returncode, self.manager_log()[-2000:]
                raise ManagerUnavailable(f"systemd --user exited with {code}: {log_tail}")
            if private.exists():
                state = self.systemctl("is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.05)
        raise ManagerUnavailable(
            f"systemd --user was not running after {timeout:g}s (state {state!r}): "
            f"{self.manager_log()[-2000:]}"
        )

    def close(self) -> None:
        """Stop every unit, end the manager and anything left in its cgroups, remove it all."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.systemctl("stop", "--", "*.service", "*.socket", check=False, timeout=60)
            # A user manager answers SIGTERM by stopping everything and exiting.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._kill_leftovers()
        for cgroup in self.cgroups:
            for path in sorted((p for p in cgroup.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)

    def chown(self, *paths: Path) -> None:
        """Give paths (recursively) to the manager's user."""
        assert self.uid is not None
        for top in paths:
            for path in [top, *top.rglob("*")]:
                os.chown(path, self.uid, self.account.pw_gid, follow_symlinks=False)

    def leftover_pids(self) -> list[int]:
        pids: set[int] = set()
        for cgroup in self.cgroups:
            for procs in cgroup.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (cgroup / "cgroup.procs").read_text().split())
        return sorted(pids)

    def _kill_leftovers(self) -> None:
        deadline = time.monotonic() + 10
        while (pids := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    # -- talking to it -----------------------------------------------------------------

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["systemctl", "--user", "--no-pager", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=self.uid,
            group=None if self.uid is None else self.account.pw_gid,
            extra_groups=None if self.uid is None else [],
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"systemctl --user {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "-p", ",".join(props), "--", unit).stdout
        values: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def main_pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def install_unit(self, name: str, text: str) -> Path:
        path = self.unit_dir / name
        path.write_text(text, encoding="utf-8")
        if self.uid is not None:
            self.chown(path)
        return path

    def drop_in(self, unit: str, name: str, text: str) -> Path:
        directory = self.unit_dir / f"{unit}.d"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.conf"
        path.write_text(text, encoding="utf-8")
        if self.uid is not None:
            self.chown(directory)
        return path

    def remove_drop_in(self, unit: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.unit_dir / f"{unit}.d" / f"{name}.conf").unlink()

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 15.0,
        what: str = "condition",
        step: float = 0.1,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(step)

    def manager_log(self) -> str:
        path = self.logs / "manager.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def user_manager(uid: int | None = None) -> Iterator[UserManager]:
    manager = UserManager.start(uid=uid)
    try:
        yield manager
    finally:
        manager.close()


def escape_exec(word: str) -> str:
    """One ExecStart= word: systemd's specifiers and variables escaped, quoted if needed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in escaped):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped
