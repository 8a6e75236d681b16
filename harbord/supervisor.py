"""Supervision of the backends' systemd user units, without D-Bus: the doing.

One loop ticks a few times a second and looks at each backend (cheap: no I/O).
A backend's unit is read with `systemctl --user show` every
`supervisor.poll_interval`, and at once when the backend's health changes.
Each look gathers the facts and asks restart_policy.decide what to do (restart
a hung backend, reset-and-start a failed unit, leave a stopped one alone,
back off, respect the budget); this module only reads, acts and reports.
After harbord restarted a backend, the models it had loaded (its last
`/api/ps`) are loaded again. Every systemctl call is an argument list with a
timeout, never a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from harbord.backends import Backend
from harbord.config import SupervisorConfig
from harbord.harbor import Harbor
from harbord.restart_policy import (
    Action,
    RestartDecision,
    RestartHistory,
    UnitFacts,
    after_restart,
    decide,
    fresh_history,
    requested,
    unit_note,
)
from harbord.schemas import UnitStatus
from harbord.systemctl import (
    UNIT_RE,
    SystemctlError,
    first_line,
    manager_problem,
    parse_show,
    systemctl,
)
from harbord.unit_env import (
    SHOW_ENVIRONMENT,
    env_file_paths,
    flash_attention,
    kv_cache_type,
    max_loaded,
    unit_environment,
)
from harbord.warming import loaded_models, warm

log = logging.getLogger(__name__)

SHOW_PROPERTIES = (
    "ActiveState,SubState,NRestarts,MainPID,StateChangeTimestamp,LoadState," + SHOW_ENVIRONMENT
)

TICK = 0.25  # seconds between the cheap looks at the backends
ACTION_TIMEOUT = 120.0  # a stop may take TimeoutStopSec, then the start


@dataclass
class Watch:
    """What the supervisor remembers about one backend's unit."""

    name: str
    history: RestartHistory
    unit: str = ""
    props: dict[str, str] = field(default_factory=dict)
    next_poll: float = 0.0
    seen: tuple[object, ...] = ()
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    harbor_restarts: int = 0
    last_restart: float | None = None
    note: str | None = None  # what harbord is doing to it: "restarting", "warming"
    error: str | None = None  # why the unit could not be read
    warm_task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, harbor: Harbor) -> None:
        self.harbor = harbor
        self.watches: dict[str, Watch] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._enabled = True

    @property
    def config(self) -> SupervisorConfig:
        return self.harbor.config.supervisor  # read each time: a reload may change it

    async def start(self) -> None:
        """Read every unit once (so the status at READY=1 shows them), then keep watching."""
        self.harbor.supervision = "on"
        self.harbor.restart_backend = self.restart
        backends = self.harbor.backends.items()
        for name in self.harbor.backends:
            self.watches[name] = Watch(name, fresh_history(self.config))
        await asyncio.gather(*(self._poll(self.watches[n], b) for n, b in backends))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="supervisor")

    async def stop(self) -> None:
        self.harbor.restart_backend = None
        tasks = [self._task] if self._task is not None else []
        for watch in self.watches.values():
            tasks += [t for t in (watch.task, watch.warm_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def kick(self) -> None:
        """Look at every unit now (e.g. after a reload)."""
        for watch in self.watches.values():
            watch.next_poll = 0.0
        self._kick.set()

    # -- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._tick(loop.time())
            except Exception:  # the loop must survive anything one tick does
                log.exception("supervisor tick failed")
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._kick.wait()

    def _tick(self, now: float) -> None:
        if not self.config.enabled:
            if self._enabled:
                self._enabled = False
                self.harbor.supervision = "off: disabled in the configuration"
                log.info(
                    "supervision off: disabled in the configuration (supervisor.enabled = false)"
                )
                for backend in self.harbor.backends.values():
                    if backend.unit_status is not None:
                        backend.unit_status.supervised = False
                        backend.unit_status.note = None
                self.harbor.status_changed()
            return
        if not self._enabled:
            self._enabled = True
            self.harbor.supervision = "on"
            log.info("supervision on again")
            self.kick()

        for name in [n for n in self.watches if n not in self.harbor.backends]:
            watch = self.watches.pop(name)
            for task in (watch.task, watch.warm_task):
                if task is not None:
                    task.cancel()
        for name, backend in self.harbor.backends.items():
            watch = self.watches.setdefault(name, Watch(name, fresh_history(self.config)))
            seen = (backend.health, backend.hung, backend.config.unit)
            if watch.task is not None and not watch.task.done():
                continue
            if now >= watch.next_poll or seen != watch.seen:
                watch.seen = seen
                watch.next_poll = now + self.config.poll_interval
                watch.task = asyncio.get_running_loop().create_task(
                    self._check(watch, backend), name=f"supervise-{name}"
                )

    async def _check(self, watch: Watch, backend: Backend) -> None:
        try:
            async with watch.lock:
                await self._poll(watch, backend)
                facts = self._facts(watch, backend)
                now = time.monotonic()
                decision = decide(facts, watch.history, self.config, now, self._enabled)
                watch.history = decision.history
                if decision.budget_change is not None:
                    self._budget_changed(watch, backend, decision)
                if decision.action != "none":
                    await self._act(watch, backend, decision.action, decision.reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("supervising %s failed", backend.name)

    # -- reading the unit -----------------------------------------------------------

    async def _poll(self, watch: Watch, backend: Backend) -> None:
        unit = backend.config.unit
        watch.unit = unit
        if not UNIT_RE.match(unit):
            self._publish(watch, backend, error=f"not a valid service name: {unit!r}")
            return
        try:
            code, out, err = await systemctl("show", "-p", SHOW_PROPERTIES, "--", unit)
        except SystemctlError as error:
            self._publish(watch, backend, error=str(error))
            return
        if code != 0:
            self._publish(
                watch, backend, error=first_line(err) or f"systemctl show: exit code {code}"
            )
            return
        props = parse_show(out)
        env = unit_environment(props.get("Environment", ""), _read_env_files(env_file_paths(out)))
        backend.residency.set_capacity_sources(max_loaded(env))
        backend.set_unit_memory_settings(flash_attention(env), kv_cache_type(env))
        old = watch.props
        if (old.get("ActiveState"), old.get("SubState")) != (
            props.get("ActiveState"),
            props.get("SubState"),
        ):
            log.info(
                "unit %s (%s): %s/%s",
                unit,
                backend.name,
                props.get("ActiveState", "?"),
                props.get("SubState", "?"),
            )
        watch.props = props
        self._publish(watch, backend)

    def _note(self, watch: Watch, backend: Backend, note: str | None) -> None:
        watch.note = note
        self._publish(watch, backend)

    @staticmethod
    def _facts(watch: Watch, backend: Backend) -> UnitFacts:
        props = watch.props if watch.error is None else {}
        return UnitFacts(
            unit=watch.unit or backend.config.unit,
            load_state=props.get("LoadState", ""),
            active_state=props.get("ActiveState", ""),
            sub_state=props.get("SubState", ""),
            read_error=watch.error,
            backend_up=backend.health == "up",
            hung=backend.hung,
            hung_reason=backend.last_error or "hung",
        )

    def _publish(self, watch: Watch, backend: Backend, error: str | None = None) -> None:
        """Fill backend.unit_status from what we know; tell systemd's STATUS= when it changed."""
        watch.error = error
        props = watch.props if error is None else {}
        facts = self._facts(watch, backend)
        status = UnitStatus(
            name=facts.unit,
            active_state=facts.active_state or "unknown",
            sub_state=facts.sub_state or "unknown",
            main_pid=_int(props.get("MainPID")),
            n_restarts=_int(props.get("NRestarts")),
            since=props.get("StateChangeTimestamp") or None,
            supervised=error is None and facts.load_state == "loaded" and self._enabled,
            harbor_restarts=watch.harbor_restarts,
            last_restart=watch.last_restart,
            budget_exhausted=watch.history.budget_exhausted,
            note=unit_note(facts, watch.history, self.config, watch.note),
        )
        if status != backend.unit_status:
            backend.unit_status = status
            self.harbor.status_changed()

    # -- deciding and acting ------------------------------------------------------------

    def _budget_changed(self, watch: Watch, backend: Backend, decision: RestartDecision) -> None:
        if decision.budget_change == "spent":
            if watch.warm_task is not None:
                watch.warm_task.cancel()
            log.error(
                "restart budget spent for %s (%s): %d restarts within %gs; not restarting it "
                "until the window has passed (requests go to the other backends)",
                backend.name,
                watch.unit,
                len(decision.history.restarts),
                self.config.budget_window,
            )
        else:
            log.info("restart budget for %s (%s) is available again", backend.name, watch.unit)
        self._publish(watch, backend)

    async def _act(
        self, watch: Watch, backend: Backend, action: Action, reason: str, automatic: bool = True
    ) -> tuple[bool, str]:
        """Restart or start the unit; warm the models afterwards. Call with watch.lock held.

        Automatic restarts spend the budget and back off; one the operator asks for
        starts both afresh."""
        unit = watch.unit
        models = loaded_models(backend, time.time())
        log.warning(
            "%s %s (%s): %s",
            "starting" if action != "restart" else "restarting",
            unit,
            backend.name,
            reason,
        )
        self._note(watch, backend, "restarting")
        watch.harbor_restarts += 1
        watch.last_restart = time.time()
        watch.history = after_restart(watch.history, self.config, time.monotonic(), automatic)
        if watch.warm_task is not None:
            watch.warm_task.cancel()  # it was for the process this action replaces
        ok, message = await self._systemctl_action(action, unit)
        done = "restarted" if action == "restart" else "started"
        watch.note = None
        # The old process is gone (it may have answered a probe while stopping): the
        # new one counts as down until the prober hears from it.
        backend.hung = False
        backend.probe_timeouts = 0
        backend.mark_down(f"{done} by harbord")
        backend.wake.set()
        if ok:
            log.info("%s %s (%s): done", done, unit, backend.name)
            if models and self.config.warm_after_restart:
                watch.warm_task = asyncio.get_running_loop().create_task(
                    warm(
                        self.harbor, backend, models, lambda note: self._note(watch, backend, note)
                    ),
                    name=f"warm-{backend.name}",
                )
        else:
            verb = "restart" if action == "restart" else "start"
            log.error("could not %s %s (%s): %s", verb, unit, backend.name, message)
        await self._poll(watch, backend)
        return ok, message

    @staticmethod
    async def _systemctl_action(action: Action, unit: str) -> tuple[bool, str]:
        verb = "restart" if action == "restart" else "start"
        try:
            if action == "reset-and-start":
                await systemctl("reset-failed", "--", unit)
            code, _, err = await systemctl(verb, "--", unit, timeout=ACTION_TIMEOUT)
        except SystemctlError as error:
            return False, str(error)
        if code != 0:
            return False, first_line(err) or f"systemctl {verb}: exit code {code}"
        return True, f"{unit} {'restarted' if verb == 'restart' else 'started'}"

    async def restart(self, name: str) -> tuple[bool, str]:
        """On demand (POST /harbor/backends/NAME/restart): not held back by backoff or budget,
        and it gives the backend a fresh budget."""
        backend = self.harbor.backends.get(name)
        if backend is None:
            return False, f"no backend named {name!r}"
        if not self._enabled:
            return False, "supervision is disabled in the configuration"
        watch = self.watches.setdefault(name, Watch(name, fresh_history(self.config)))
        async with watch.lock:
            await self._poll(watch, backend)
            decision = requested(self._facts(watch, backend))
            if decision.action == "none":
                return False, decision.reason
            return await self._act(
                watch, backend, decision.action, decision.reason, automatic=False
            )


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


async def start_supervision(harbor: Harbor) -> Supervisor | None:
    """Supervise the backend units when a systemd user manager is there; None otherwise."""
    if not harbor.config.supervisor.enabled:
        harbor.supervision = "off: disabled in the configuration"
        log.info("supervision off: disabled in the configuration (supervisor.enabled = false)")
        return None
    problem = await manager_problem()
    if problem is not None:
        harbor.supervision = f"off: {problem}"
        log.info("supervision off: %s", problem)
        return None
    supervisor = Supervisor(harbor)
    await supervisor.start()
    log.info(
        "supervision on: watching %s",
        ", ".join(f"{b.name}={b.config.unit}" for b in harbor.backends.values()),
    )
    return supervisor


def _read_env_files(paths: list[str]) -> list[str]:
    """The unit's environment files that exist (systemd skips the missing `-` ones too)."""
    texts = []
    for path in paths:
        with contextlib.suppress(OSError, UnicodeDecodeError), open(path, encoding="utf-8") as f:
            texts.append(f.read(64 * 1024))
    return texts
