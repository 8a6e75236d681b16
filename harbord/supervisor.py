"""Supervision of the backends' systemd user units, without D-Bus.

One loop ticks a few times a second and looks at each backend (cheap: no I/O).
A backend's unit is read with `systemctl --user show` every
`supervisor.poll_interval`, and at once when the backend's health changes.
What it does, per backend:

- unit active but the backend hung (the prober's `backend.hung`): restart it;
- unit failed (e.g. systemd's start limit was hit): `reset-failed`, then start;
- unit inactive: the user stopped it, so leave it alone, unless
  `supervisor.keep_running` says to start it again.

Restarts back off exponentially (`backoff_initial` doubling up to
`backoff_max`) and spend a budget of `restart_budget` per `budget_window`;
a spent budget stops the restarts and says so. After harbord restarted a
backend, the models it had loaded (its last `/api/ps`) are loaded again.
Every systemctl call is an argument list with a timeout, never a shell.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from harbord.backends import Backend
from harbord.config import SupervisorConfig
from harbord.harbor import Harbor
from harbord.schemas import UnitStatus
from harbord.systemctl import (
    UNIT_RE,
    SystemctlError,
    first_line,
    manager_problem,
    parse_show,
    systemctl,
)

log = logging.getLogger(__name__)

SHOW_PROPERTIES = "ActiveState,SubState,NRestarts,MainPID,StateChangeTimestamp,LoadState"

TICK = 0.25  # seconds between the cheap looks at the backends
ACTION_TIMEOUT = 120.0  # a stop may take TimeoutStopSec, then the start
WARM_WAIT = 180.0  # how long a restarted backend may take to answer before warming
WARM_ATTEMPTS = 3
FOREVER = 10 * 365 * 86400.0  # an expiry further away than this is keep_alive -1


def keep_alive_for(expires_at: str | None, now: float) -> str | int | None:
    """What to pass as keep_alive to get back the model's remaining time; None: the default."""
    if not expires_at:
        return None
    try:
        expires = datetime.datetime.fromisoformat(expires_at).timestamp()
    except ValueError:
        return None
    remaining = expires - now
    if remaining > FOREVER:
        return -1
    if remaining < 1:
        return None
    return f"{int(remaining)}s"


@dataclass
class Watch:
    """What the supervisor remembers about one backend's unit."""

    name: str
    unit: str = ""
    props: dict[str, str] = field(default_factory=dict)
    next_poll: float = 0.0
    seen: tuple[object, ...] = ()
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    backoff: float = 0.0
    next_allowed: float = 0.0
    harbor_restarts: int = 0
    last_restart: float | None = None
    budget_exhausted: bool = False
    note: str | None = None
    error: str | None = None
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
            self.watches[name] = Watch(name, backoff=self.config.backoff_initial)
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
            watch = self.watches.setdefault(name, Watch(name, backoff=self.config.backoff_initial))
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
                self._review_budget(watch, backend)
                action = self._decide(watch, backend)
                if action is not None:
                    verb, reason = action
                    await self._act(watch, backend, verb, reason)
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

    def _publish(self, watch: Watch, backend: Backend, error: str | None = None) -> None:
        """Fill backend.unit_status from what we know; tell systemd's STATUS= when it changed."""
        watch.error = error
        props = watch.props if error is None else {}
        load = props.get("LoadState", "")
        active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "unknown")
        note = watch.note
        if error is not None:
            note = error
        elif load and load != "loaded":
            note = "unit not installed" if load == "not-found" else f"unit {load}"
        elif note is None:
            if watch.budget_exhausted:
                note = "restart budget spent"
            elif active == "failed":
                note = "unit failed"
            elif active == "inactive":
                note = "stopped" if self.config.keep_running else "stopped; left alone"
            elif sub == "auto-restart" or active == "activating":
                note = "restarting (systemd)"
        status = UnitStatus(
            name=watch.unit or backend.config.unit,
            active_state=active,
            sub_state=sub,
            main_pid=_int(props.get("MainPID")),
            n_restarts=_int(props.get("NRestarts")),
            since=props.get("StateChangeTimestamp") or None,
            supervised=error is None and load == "loaded" and self._enabled,
            harbor_restarts=watch.harbor_restarts,
            last_restart=watch.last_restart,
            budget_exhausted=watch.budget_exhausted,
            note=note,
        )
        if status != backend.unit_status:
            backend.unit_status = status
            self.harbor.status_changed()

    # -- deciding and acting ------------------------------------------------------------

    def _decide(self, watch: Watch, backend: Backend) -> tuple[str, str] | None:
        props = watch.props
        if watch.error is not None or props.get("LoadState") != "loaded":
            return None
        active = props.get("ActiveState")
        if active == "active" and backend.hung:
            verb, reason = "restart", backend.last_error or "hung"
        elif active == "failed":
            verb, reason = "start-failed", "the unit failed"
        elif active == "inactive" and self.config.keep_running:
            verb, reason = "start", "the unit is stopped and supervisor.keep_running is set"
        else:
            return None
        if len(watch.restarts) >= self.config.restart_budget:
            if not watch.budget_exhausted:
                watch.budget_exhausted = True
                if watch.warm_task is not None:
                    watch.warm_task.cancel()
                log.error(
                    "restart budget spent for %s (%s): %d restarts within %gs; not restarting it "
                    "until the window has passed (requests go to the other backends)",
                    backend.name,
                    watch.unit,
                    len(watch.restarts),
                    self.config.budget_window,
                )
                self._publish(watch, backend)
            return None
        if time.monotonic() < watch.next_allowed:
            return None  # backing off; a later poll looks again
        return verb, reason

    def _review_budget(self, watch: Watch, backend: Backend) -> None:
        """Forget restarts older than the window; reset the backoff of a backend that stays up."""
        cfg, now = self.config, time.monotonic()
        while watch.restarts and now - watch.restarts[0] > cfg.budget_window:
            watch.restarts.popleft()
        if watch.budget_exhausted and len(watch.restarts) < cfg.restart_budget:
            watch.budget_exhausted = False
            log.info("restart budget for %s (%s) is available again", backend.name, watch.unit)
            self._publish(watch, backend)
        healthy = backend.health == "up" and not backend.hung
        if healthy and (not watch.restarts or now - watch.restarts[-1] >= cfg.backoff_max):
            watch.backoff = cfg.backoff_initial

    async def _act(
        self, watch: Watch, backend: Backend, verb: str, reason: str, automatic: bool = True
    ) -> tuple[bool, str]:
        """Restart or start the unit; warm the models afterwards. Call with watch.lock held.

        Automatic restarts spend the budget and back off; one the operator asks for
        starts both afresh."""
        unit = watch.unit
        models = [(m.name, keep_alive_for(m.expires_at, time.time())) for m in backend.loaded]
        log.warning(
            "%s %s (%s): %s",
            "starting" if verb != "restart" else "restarting",
            unit,
            backend.name,
            reason,
        )
        watch.note = "restarting"
        self._publish(watch, backend)
        now = time.monotonic()
        watch.harbor_restarts += 1
        watch.last_restart = time.time()
        if automatic:
            watch.restarts.append(now)
            watch.next_allowed = now + watch.backoff
            watch.backoff = min(watch.backoff * 2, self.config.backoff_max)
        else:
            watch.restarts.clear()
            watch.budget_exhausted = False
            watch.backoff = self.config.backoff_initial
            watch.next_allowed = now + watch.backoff
        if watch.warm_task is not None:
            watch.warm_task.cancel()  # it was for the process this action replaces
        ok, message = await self._systemctl_action(verb, unit)
        watch.note = None
        # The old process is gone (it may have answered a probe while stopping): the
        # new one counts as down until the prober hears from it.
        backend.hung = False
        backend.probe_timeouts = 0
        backend.mark_down(f"{'restarted' if verb == 'restart' else 'started'} by harbord")
        backend.wake.set()
        if ok:
            log.info(
                "%s %s (%s): done",
                "restarted" if verb == "restart" else "started",
                unit,
                backend.name,
            )
            if models and self.config.warm_after_restart:
                watch.warm_task = asyncio.get_running_loop().create_task(
                    self._warm(watch, backend, models), name=f"warm-{backend.name}"
                )
        else:
            log.error("could not %s %s (%s): %s", verb.split("-")[0], unit, backend.name, message)
        await self._poll(watch, backend)
        return ok, message

    async def _systemctl_action(self, verb: str, unit: str) -> tuple[bool, str]:
        try:
            if verb == "start-failed":
                await systemctl("reset-failed", "--", unit)
                verb = "start"
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
        watch = self.watches.setdefault(name, Watch(name, backoff=self.config.backoff_initial))
        async with watch.lock:
            await self._poll(watch, backend)
            if watch.error is not None:
                return False, f"{backend.config.unit}: {watch.error}"
            if watch.props.get("LoadState") != "loaded":
                return False, f"{watch.unit} is not installed ({watch.props.get('LoadState', '?')})"
            verb = "start-failed" if watch.props.get("ActiveState") == "failed" else "restart"
            return await self._act(
                watch, backend, verb, "restart requested by the operator", automatic=False
            )

    # -- warming ---------------------------------------------------------------------

    async def _warm(
        self, watch: Watch, backend: Backend, models: list[tuple[str, str | int | None]]
    ) -> None:
        """Load the models the backend had before the restart, once it answers again."""
        try:
            for model, keep_alive in models:
                for attempt in range(1, WARM_ATTEMPTS + 1):
                    if not await self._answering(backend):
                        log.warning(
                            "not warming %s: it did not answer within %gs", backend.name, WARM_WAIT
                        )
                        return
                    watch.note = "warming"
                    self._publish(watch, backend)
                    error = await self._load(backend, model, keep_alive)
                    if error is None or attempt == WARM_ATTEMPTS:
                        break
                    await asyncio.sleep(backend.config.connect_timeout)
                if error is not None:
                    log.warning("warming %s on %s failed: %s", model, backend.name, error)
            await self.harbor.prober.refresh_inventory(backend)  # status shows them loaded
        finally:
            watch.note = None
            self._publish(watch, backend)

    @staticmethod
    async def _answering(backend: Backend) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WARM_WAIT):
                while backend.health not in ("up", "degraded") or backend.hung:
                    await asyncio.sleep(TICK)
                return True
        return False

    async def _load(self, backend: Backend, model: str, keep_alive: str | int | None) -> str | None:
        """An empty generate loads the model; None when it did, else what went wrong."""
        body: dict[str, object] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=backend.config.connect_timeout,
            sock_read=backend.config.first_byte_timeout,
        )
        started = time.monotonic()
        try:
            async with self.harbor.session.post(
                f"{backend.config.url}/api/generate", json=body, timeout=timeout
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            return type(err).__name__
        if resp.status != 200:
            return f"the backend answered {resp.status}"
        log.info(
            "warmed %s on %s in %.1fs (keep_alive %s)",
            model,
            backend.name,
            time.monotonic() - started,
            keep_alive or "default",
        )
        return None


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
