"""Configuration values: the parsers of what a config file or the environment holds, and
the errors they raise, naming the file (or variable) and the key.

Durations ("500ms", "5m"), sizes ("8GiB"), names (backends, models), backend URLs and
listener addresses; `convert` turns raw TOML data into a config Struct with these parsers,
and its error says where and what. The schema and the loading are in harbord.config.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import msgspec

# Names that end up in unit names, URLs and file paths: keep them boring.
# \Z, not $: $ also matches before a trailing newline.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Ollama model names: [host/][namespace/]model[:tag]
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+-]{0,199}\Z")


class ConfigError(Exception):
    """A configuration problem, phrased for the user who has to fix it."""


class Seconds(float):
    """A duration: a number of seconds or a string such as "500ms", "30s", "5m", "24h"."""


class ByteSize(int):
    """A size: a number of bytes or a string such as "512MiB", "8GiB", "7.5GB"."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> Seconds:
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30 or "30s", "5m", "24h"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a duration >= 0")
        return Seconds(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if match:
            return Seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"])
    raise ValueError(f'expected a duration such as 30 or "30s", "5m", "24h", got {value!r}')


def parse_size(value: object) -> ByteSize:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return ByteSize(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return ByteSize(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))
    raise ValueError(f'expected a size such as 8589934592 or "8GiB", got {value!r}')


def dec_hook(tp: type, obj: object) -> object:
    if tp is Seconds:
        return parse_duration(obj)
    if tp is ByteSize:
        return parse_size(obj)
    raise NotImplementedError


def enc_hook(obj: object) -> object:
    if isinstance(obj, Seconds):
        return float(obj)
    if isinstance(obj, ByteSize):
        return int(obj)
    raise NotImplementedError(type(obj))


def parse_url(url: str) -> str:
    """A backend's URL, http(s)://host[:port], without its trailing slash."""
    if not re.match(r"^https?://[^/\s]+/?$", url):
        raise ValueError(f"url: expected http://host:port, got {url!r}")
    return url.rstrip("/")


def parse_listen(listen: str) -> str:
    """A listener's "host:port" ("[::1]:port" for IPv6); its host."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):(\d{1,5})", listen)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"expected host:port, got {listen!r}")
    return match.group(1)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validation_message(err: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    """Split msgspec's "<what> - at `$.a.b`" into (key, what)."""
    text = str(err)
    match = re.search(r" - at `\$(.*)`$", text)
    what = text[: match.start()] if match else text
    path = match.group(1).lstrip(".") if match else ""
    key = ".".join(x for x in (prefix, path) if x)
    field_match = re.match(r"Object contains unknown field `(.+)`", what)
    if field_match:
        key = ".".join(x for x in (key, field_match.group(1)) if x)
        what = "unknown key"
    elif what.startswith("Object missing required field"):
        missing = what.split("`")[1]
        key = ".".join(x for x in (key, missing) if x)
        what = "required key is missing"
    return key, what


def convert(raw: object, tp: type[Any], where: str, prefix: str) -> Any:
    try:
        return msgspec.convert(raw, tp, dec_hook=dec_hook)
    except msgspec.ValidationError as err:
        key, what = _validation_message(err, prefix)
        raise ConfigError(f"{where}: key '{key}': {what}") from None
