"""Configuration: its schema, and loading it from defaults, an optional TOML file,
environment and flags.

Precedence is flag > environment > file > default, and every effective value
remembers where it came from (`Config.sources`), so `--check-config` can say.
Errors name the file, the key and what was expected. The value parsers (durations,
sizes, URLs, names) and those error messages are in harbord.config_values; their names
are importable from here too.
"""

from __future__ import annotations

import getpass
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from harbord.config_values import (
    MODEL_RE,
    NAME_RE,
    ByteSize,
    ConfigError,
    Seconds,
    convert,
    enc_hook,
    is_loopback,
    parse_duration,
    parse_listen,
    parse_size,
    parse_url,
)
from harbord.schemas import BackendKind, Intent, KvCacheType

# What callers import from here, whichever module defines it.
__all__ = [
    "MODEL_RE",
    "NAME_RE",
    "BackendConfig",
    "ByteSize",
    "Config",
    "ConfigError",
    "FileConfig",
    "ModelRule",
    "Overrides",
    "RoutingConfig",
    "Seconds",
    "SupervisorConfig",
    "TcpConfig",
    "default_backends",
    "default_config_path",
    "default_socket",
    "is_loopback",
    "load",
    "parse_duration",
    "parse_size",
    "runtime_dir",
]


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    kind: BackendKind
    unit: str = ""
    connect_timeout: Seconds = Seconds(3)
    # A cold model load can take minutes (Ollama's own OLLAMA_LOAD_TIMEOUT is 5m);
    # a hung backend is caught by the prober, not by this timeout.
    first_byte_timeout: Seconds = Seconds(600)
    # A non-streaming answer arrives whole when it is done: a long CPU answer takes
    # many minutes, so it gets its own, much longer, limit.
    answer_timeout: Seconds = Seconds(3600)
    idle_timeout: Seconds = Seconds(300)
    max_model_size: ByteSize | None = None
    vram: ByteSize | None = None
    max_concurrency: int = 0  # 0: no limit
    max_queue: int = 64
    queue_timeout: Seconds = Seconds(30)
    # Requests one loaded model serves at once: the unit's OLLAMA_NUM_PARALLEL.
    # 0: as the shipped units set it, 1 for a gpu backend, 2 for a cpu one.
    parallel: Annotated[int, msgspec.Meta(ge=0)] = 0
    # The context of a request without options.num_ctx: the unit's
    # OLLAMA_CONTEXT_LENGTH. None: Ollama's own default (memory.ollama_default_context).
    default_context: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # The unit's OLLAMA_KV_CACHE_TYPE: what one KV-cache element takes (Ollama
    # quantizes the cache only with flash attention on).
    kv_cache_type: KvCacheType = "f16"
    # Models the backend holds loaded at once: the unit's OLLAMA_MAX_LOADED_MODELS.
    # None: read from the unit's environment, else learned from an eviction, else
    # Ollama's default (residency.choose_capacity).
    max_loaded: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # The unit's OLLAMA_FLASH_ATTENTION. None: Ollama's default for each model.
    flash_attention: bool | None = None
    # A cpu backend's memory for models. None: this host's MemTotal less
    # routing.ram_reserve (memory.cpu_budget).
    ram: ByteSize | None = None

    def __post_init__(self) -> None:
        if self.ram is not None and self.kind != "cpu":
            raise ValueError("ram is for cpu backends (a gpu backend has vram)")
        if self.parallel == 0:
            self.parallel = 1 if self.kind == "gpu" else 2
        self.url = parse_url(self.url)
        if self.max_concurrency < 0 or self.max_queue < 0:
            raise ValueError("max_concurrency and max_queue must be >= 0")

    @property
    def memory_limit(self) -> int | None:
        """The largest model that fits, from the model-size limit or the VRAM size."""
        limits = [x for x in (self.max_model_size, self.vram) if x]
        return min(limits) if limits else None


class ModelRule(msgspec.Struct, forbid_unknown_fields=True):
    intent: Intent | None = None
    pin: str | None = None


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True):
    default_intent: Intent = "fast"
    oom_pin_for: Seconds = Seconds(24 * 3600)
    probe_interval: Seconds = Seconds(5)
    probe_interval_down: Seconds = Seconds(1)
    probe_timeout: Seconds = Seconds(2)
    inventory_interval: Seconds = Seconds(30)
    # Consecutive timed-out probes after which a backend counts as hung.
    hung_after_probes: int = 3
    # Affinity keeps a model where it last ran for as long as the backend's
    # keep-alive (OLLAMA_KEEP_ALIVE, 5m) keeps it loaded there.
    affinity_ttl: Seconds = Seconds(300)
    # How many times longer a request takes on a cpu backend than on a gpu one,
    # until the cpu backend has served that model and its own times are known.
    cpu_slowdown: Annotated[float, msgspec.Meta(gt=0)] = 6.0
    # A waiting `fast` request goes before a `heavy` one that arrived up to this
    # much earlier; a `heavy` one that waited longer goes first (no starving).
    fast_head_start: Seconds = Seconds(10)
    # When a GPU backend is idle and the model fast requests use most was evicted
    # from it, load it again in the background (residency: keep it hot).
    keep_hot: bool = True
    # What a cpu backend without `ram` leaves the desktop of this host's memory.
    # None: a tenth of MemTotal, at most 4 GiB.
    ram_reserve: ByteSize | None = None


class SupervisorConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True
    keep_running: bool = False
    restart_budget: int = 5
    budget_window: Seconds = Seconds(600)
    backoff_initial: Seconds = Seconds(2)
    backoff_max: Seconds = Seconds(120)
    warm_after_restart: bool = True
    poll_interval: Seconds = Seconds(5)


class TcpConfig(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = ""  # host:port; empty = no TCP listener
    token_file: str = ""


class FileConfig(msgspec.Struct, forbid_unknown_fields=True):
    socket: str | None = None
    state_dir: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_bodies: bool = False
    allow_root: bool = True
    max_body_size: ByteSize = ByteSize(64 * 1024**2)
    drain_timeout: Seconds = Seconds(30)
    client_timeout: Seconds = Seconds(60)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    tcp: TcpConfig = msgspec.field(default_factory=TcpConfig)
    backends: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}


@dataclass
class Config:
    """The effective configuration."""

    socket: Path
    state_dir: Path
    log_level: str
    log_bodies: bool
    allow_root: bool
    max_body_size: int
    drain_timeout: float
    client_timeout: float
    routing: RoutingConfig
    supervisor: SupervisorConfig
    tcp: TcpConfig
    backends: dict[str, BackendConfig]
    models: dict[str, ModelRule]
    path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def backend_names(self) -> list[str]:
        return list(self.backends)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as plain data, for --check-config."""
        values = {
            "socket": str(self.socket),
            "state_dir": str(self.state_dir),
            "log_level": self.log_level,
            "log_bodies": self.log_bodies,
            "allow_root": self.allow_root,
            "max_body_size": self.max_body_size,
            "drain_timeout": self.drain_timeout,
            "client_timeout": self.client_timeout,
            "routing": self.routing,
            "supervisor": self.supervisor,
            "tcp": self.tcp,
            "backends": self.backends,
            "models": self.models,
        }
        result: dict[str, Any] = msgspec.to_builtins(values, enc_hook=enc_hook)
        return result


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line; None means not given."""

    config: str | None = None
    socket: str | None = None
    state_dir: str | None = None
    log_level: str | None = None
    gpu_url: str | None = None
    cpu_url: str | None = None


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    value = env.get(var)
    if value and os.path.isabs(value):
        return Path(value)
    return Path(env.get("HOME") or os.path.expanduser("~")) / fallback


def runtime_dir(env: Mapping[str, str]) -> Path:
    value = env.get("XDG_RUNTIME_DIR")
    if value and os.path.isabs(value):
        return Path(value)
    return Path(f"/run/user/{os.getuid()}")


def default_socket(env: Mapping[str, str]) -> Path:
    return (
        Path(env["HARBOR_SOCKET"]) if env.get("HARBOR_SOCKET") else runtime_dir(env) / "harbor.sock"
    )


def default_config_path(env: Mapping[str, str]) -> Path:
    return _xdg(env, "XDG_CONFIG_HOME", ".config") / "harbor" / "harbord.toml"


def default_backends() -> dict[str, dict[str, Any]]:
    user = _user()
    return {
        "gpu": {
            "url": "http://127.0.0.1:11434",
            "kind": "gpu",
            "unit": f"ollama-gpu@{user}.service",
        },
        "cpu": {
            "url": "http://127.0.0.1:11435",
            "kind": "cpu",
            "unit": f"ollama-cpu@{user}.service",
        },
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry and no $USER: fall back to the uid
        return str(os.getuid())


def load(overrides: Overrides | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration. Raises ConfigError."""
    overrides = overrides or Overrides()
    env = os.environ if env is None else env
    sources: dict[str, str] = {}

    path: Path | None
    explicit = overrides.config or env.get("HARBOR_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
    else:
        path = default_config_path(env)
        if not path.is_file():
            path = None

    raw: dict[str, Any] = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read: {err}") from None
    file_cfg: FileConfig = convert(raw, FileConfig, where, "")
    for key in raw:
        if not isinstance(raw[key], dict):
            sources[key] = f"file {path}"

    # Backends: the file's table replaces the defaults, but entries named like a
    # default backend inherit its url, kind and unit.
    defaults = default_backends()
    backend_raw = file_cfg.backends or defaults
    backends: dict[str, BackendConfig] = {}
    for name, table in backend_raw.items():
        if not NAME_RE.match(name):
            raise ConfigError(
                f"{where}: key 'backends.{name}': backend names are letters, digits, '_', '.', '-'"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: key 'backends.{name}': expected a table")
        merged = {**defaults.get(name, {}), **table}
        merged.setdefault("unit", f"ollama-{name}@{_user()}.service")
        backends[name] = convert(merged, BackendConfig, where, f"backends.{name}")
        from_file = bool(file_cfg.backends) and "url" in table
        sources[f"backends.{name}.url"] = f"file {path}" if from_file else "default"
    if not backends:
        raise ConfigError(f"{where}: key 'backends': at least one backend is needed")

    models: dict[str, ModelRule] = {}
    for model, table in file_cfg.models.items():
        rule: ModelRule = convert(table, ModelRule, where, f'models."{model}"')
        if rule.pin is not None and rule.pin not in backends:
            raise ConfigError(
                f"{where}: key 'models.\"{model}\".pin': expected one of {sorted(backends)}, "
                f"got {rule.pin!r}"
            )
        models[model] = rule

    # Environment, then flags, over the file.
    def url_override(name: str, env_var: str, flag: str | None) -> None:
        value, source = (
            (flag, f"flag --{name}-url") if flag else (env.get(env_var), f"env {env_var}")
        )
        if not value:
            return
        target = (
            name
            if name in backends
            else next((n for n, b in backends.items() if b.kind == name), None)
        )
        if target is None:
            raise ConfigError(f"{source}: no backend named or of kind {name!r} to apply it to")
        updated = {**msgspec.to_builtins(backends[target], enc_hook=enc_hook), "url": value}
        backends[target] = convert(updated, BackendConfig, source, f"backends.{target}")
        sources[f"backends.{target}.url"] = source

    url_override("gpu", "OLLAMA_GPU_URL", overrides.gpu_url)
    url_override("cpu", "OLLAMA_CPU_URL", overrides.cpu_url)

    if overrides.socket:
        socket_path, sources["socket"] = Path(overrides.socket), "flag --socket"
    elif env.get("HARBOR_SOCKET"):
        socket_path, sources["socket"] = Path(env["HARBOR_SOCKET"]), "env HARBOR_SOCKET"
    elif file_cfg.socket:
        socket_path = Path(os.path.expanduser(file_cfg.socket))
    else:
        socket_path, sources["socket"] = default_socket(env), "default"

    if overrides.state_dir:
        state_dir, sources["state_dir"] = Path(overrides.state_dir), "flag --state-dir"
    elif file_cfg.state_dir:
        state_dir = Path(os.path.expanduser(file_cfg.state_dir))
    else:
        state_dir = _xdg(env, "XDG_STATE_HOME", ".local/state") / "harbor"
        sources["state_dir"] = "default"

    log_level: str = file_cfg.log_level
    if overrides.log_level:
        log_level, sources["log_level"] = overrides.log_level, "flag --log-level"

    if file_cfg.routing.hung_after_probes < 1:
        raise ConfigError(f"{where}: key 'routing.hung_after_probes': expected an integer >= 1")
    listen = file_cfg.tcp.listen
    if listen:
        try:
            host = parse_listen(listen)
        except ValueError as err:
            raise ConfigError(f"{where}: key 'tcp.listen': {err}") from None
        if not is_loopback(host) and not file_cfg.tcp.token_file:
            raise ConfigError(
                f"{where}: key 'tcp.token_file': a listener on {listen} (not loopback) needs a "
                "bearer token file"
            )

    return Config(
        socket=socket_path,
        state_dir=state_dir,
        log_level=log_level,
        log_bodies=file_cfg.log_bodies,
        allow_root=file_cfg.allow_root,
        max_body_size=file_cfg.max_body_size,
        drain_timeout=file_cfg.drain_timeout,
        client_timeout=file_cfg.client_timeout,
        routing=file_cfg.routing,
        supervisor=file_cfg.supervisor,
        tcp=file_cfg.tcp,
        backends=backends,
        models=models,
        path=path,
        sources=sources,
    )
