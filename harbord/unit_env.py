"""The environment a backend's unit gives its Ollama, from `systemctl show`. Pure.

harbord reads the settings that shape placement from the unit it supervises
rather than asking the user to repeat them: today OLLAMA_MAX_LOADED_MODELS (how
many models the backend holds at once), OLLAMA_FLASH_ATTENTION and
OLLAMA_KV_CACHE_TYPE (what its KV cache takes). `Environment=` assignments come first;
`EnvironmentFile=` files are read after them and win, as systemd applies them.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping

SHOW_ENVIRONMENT = "Environment,EnvironmentFiles"


def assignments(text: str) -> dict[str, str]:
    """`A=1 "B=two words"` (the Environment property) as a mapping."""
    try:
        words = shlex.split(text)
    except ValueError:
        return {}
    found: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if sep and name:
            found[name] = value
    return found


def env_file_paths(show_output: str) -> list[str]:
    """The paths of every `EnvironmentFiles=PATH (ignore_errors=yes)` line."""
    paths = []
    for line in show_output.splitlines():
        if line.startswith("EnvironmentFiles="):
            path = line.removeprefix("EnvironmentFiles=").rsplit(" (", 1)[0].strip()
            if path:
                paths.append(path)
    return paths


def env_file(text: str) -> dict[str, str]:
    """An environment file: `NAME=value` lines, `#` comments, optional quotes."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip():
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[name.strip()] = value
    return found


def unit_environment(environment: str, files: Iterable[str]) -> dict[str, str]:
    """The unit's environment: its Environment= property, then each file's text."""
    env = assignments(environment)
    for text in files:
        env.update(env_file(text))
    return env


def max_loaded(env: Mapping[str, str]) -> int | None:
    """OLLAMA_MAX_LOADED_MODELS when set to a positive number (0 means Ollama's default)."""
    value = env.get("OLLAMA_MAX_LOADED_MODELS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def flash_attention(env: Mapping[str, str]) -> bool | None:
    """OLLAMA_FLASH_ATTENTION as Ollama reads it (strconv.ParseBool); None: not set."""
    value = env.get("OLLAMA_FLASH_ATTENTION", "").strip().lower()
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    return None


def kv_cache_type(env: Mapping[str, str]) -> str | None:
    """OLLAMA_KV_CACHE_TYPE when it names a type harbord sizes; None otherwise."""
    value = env.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower()
    return value if value in ("f16", "q8_0", "q4_0") else None
