"""The manual pages: they build, lint clean, and cannot drift from the code.

The pages are scdoc sources in man/ (`man/build OUTDIR` builds them). The
options are taken from the real argparse parsers of harbord and harborctl,
the configuration keys from the msgspec Structs in harbord.config, the
environment variables from harbord/config.py's source and the exit codes
from the modules' constants: a new option, subcommand, key or exit code
fails here until it is documented, and a documented one that is gone fails
too. The example configurations (the one in harbord.toml(5) and
packaging/harbord.toml.example) must load and name every key.

Needs scdoc and mandoc (Debian: `apt-get install scdoc mandoc`); scripts/test
installs them when run as root. Without them the tests fail when run as root
or in CI, and skip otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import pytest

from harbord import config, daemon
from harbord.ctl import main as ctl_main

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
EXAMPLE = ROOT / "packaging" / "harbord.toml.example"
PAGES = ("harbord.8", "harborctl.1", "harbord.toml.5")


# -- scdoc sources -----------------------------------------------------------


def source(page: str) -> str:
    return (MAN / f"{page}.scd").read_text(encoding="utf-8")


def sections(text: str, level: int = 1) -> dict[str, str]:
    """The text under each heading of the given level ('#' or '##'), by title."""
    marker = "#" * level + " "
    result: dict[str, str] = {}
    title: str | None = None
    body: list[str] = []
    literal = False
    for line in text.splitlines():
        if line.startswith("```"):
            literal = not literal
        if not literal and (line.startswith(marker) or (level == 2 and line.startswith("# "))):
            if title is not None:
                result[title] = "\n".join(body)
            title = line[len(marker) :].strip() if line.startswith(marker) else None
            body = []
        elif title is not None:
            body.append(line)
    if title is not None:
        result[title] = "\n".join(body)
    return result


def definitions(text: str) -> list[tuple[str, str]]:
    """scdoc definition lists: a term line, then its tab-indented description."""
    items: list[tuple[str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("*") and i + 1 < len(lines) and lines[i + 1].startswith("\t"):
            description = []
            for following in lines[i + 1 :]:
                if not following.startswith("\t"):
                    break
                description.append(following.strip())
            items.append((line, " ".join(description)))
    return items


def option_terms(text: str) -> set[str]:
    """The options named in a section's definition terms: *--config* _FILE_ -> --config."""
    found: set[str] = set()
    for term, _ in definitions(text):
        found.update(re.findall(r"\*(--?[A-Za-z][\w-]*)\*", term))
    return found


def literal_blocks(text: str) -> list[str]:
    return re.findall(r"^```\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


# -- the code's side -----------------------------------------------------------


class _Captured(Exception):
    pass


def captured_parser(entry: Callable[[list[str]], object]) -> argparse.ArgumentParser:
    """The parser an entry point builds, caught at its parse_args call."""
    caught: list[argparse.ArgumentParser] = []

    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        caught.append(self)
        raise _Captured

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", catch),
        contextlib.suppress(_Captured),
    ):
        entry([])
    assert caught, f"{entry} built no argparse parser"
    return caught[0]


def harbord_parser() -> argparse.ArgumentParser:
    return captured_parser(daemon.parse_args)


def harborctl_parser() -> argparse.ArgumentParser:
    build = getattr(ctl_main, "build_parser", None)
    return build() if build is not None else captured_parser(ctl_main.main)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [
        str(action.metavar or action.dest).upper()
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
    ]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# Tables of harbord.toml: where each is documented and which Struct holds its keys.
TABLES: dict[str, tuple[str, type[msgspec.Struct]]] = {
    "": ("TOP-LEVEL KEYS", config.FileConfig),
    "backends": ("[backends.NAME]", config.BackendConfig),
    "models": ('[models."NAME"]', config.ModelRule),
}


def struct_tables() -> dict[str, tuple[str, type[msgspec.Struct]]]:
    """Every table of the file: the top level, each Struct-typed field, backends, models."""
    tables = dict(TABLES)
    for field in msgspec.structs.fields(config.FileConfig):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            tables[field.name] = (f"[{field.name}]", field.type)
        elif field.name not in tables and _is_table(field.type):
            pytest.fail(
                f"FileConfig.{field.name} is a table this test does not know: add it to TABLES"
            )
    return tables


def _is_table(tp: Any) -> bool:
    return getattr(tp, "__origin__", None) is dict


def scalar_keys(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {
        f.name: f
        for f in msgspec.structs.fields(struct)
        if not (isinstance(f.type, type) and issubclass(f.type, msgspec.Struct))
        and not (struct is config.FileConfig and f.name in TABLES)
    }


def all_keys() -> set[str]:
    """Every key as a dotted path, with NAME for the per-backend and per-model tables."""
    keys: set[str] = set()
    for table, (_, struct) in struct_tables().items():
        prefix = {"": "", "backends": "backends.NAME.", "models": "models.NAME."}.get(
            table, f"{table}."
        )
        keys.update(prefix + key for key in scalar_keys(struct))
    return keys


def keys_in(data: dict[str, Any]) -> set[str]:
    keys: set[str] = set()
    for key, value in data.items():
        if key in ("backends", "models"):
            for table in value.values():
                keys.update(f"{key}.NAME.{k}" for k in table)
        elif isinstance(value, dict):
            keys.update(f"{key}.{k}" for k in value)
        else:
            keys.add(key)
    return keys


# -- building and linting -------------------------------------------------------


def _required() -> bool:
    return os.geteuid() == 0 or bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in ("scdoc", "mandoc") if shutil.which(tool) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed (apt-get install scdoc mandoc)"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("man")
    result = subprocess.run([str(MAN / "build"), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, f"man/build failed:\n{result.stderr}"
    return out


@pytest.mark.parametrize("page", PAGES)
def test_page_lints_clean(built: Path, page: str) -> None:
    result = subprocess.run(
        ["mandoc", "-Tlint", "-W", "warning", str(built / page)], capture_output=True, text=True
    )
    assert result.stdout + result.stderr == "", f"mandoc -Tlint warnings for {page}"
    assert result.returncode == 0


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_groff_without_warnings(built: Path, page: str) -> None:
    """What lintian checks: man --warnings, through groff, prints nothing on stderr."""
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.skip("man-db and groff not installed")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
    result = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(built / page)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("page", PAGES)
def test_page_has_name_and_title(built: Path, page: str) -> None:
    name, section = page.rsplit(".", 1)
    text = (built / page).read_text()
    assert f'.TH "{name}" "{section}"' in text
    assert ".SH NAME" in text and ".SH SEE ALSO" in text


# -- harbord(8) ------------------------------------------------------------------


def test_every_harbord_option_is_documented() -> None:
    page = sections(source("harbord.8"))
    code = options(harbord_parser())
    documented = option_terms(page["OPTIONS"])
    assert code - documented == set(), "harbord options missing from harbord(8) OPTIONS"
    assert documented - code == set(), "harbord(8) documents options harbord does not have"
    synopsis = page["SYNOPSIS"]
    for option in code - {"-h", "--help"}:
        assert f"*{option}*" in synopsis, f"{option} missing from harbord(8) SYNOPSIS"


def test_harbord_page_has_the_sections_it_needs() -> None:
    page = sections(source("harbord.8"))
    for title in (
        "OPTIONS",
        "ROUTING",
        "SIGNALS",
        "FILES",
        "ENVIRONMENT",
        "EXIT STATUS",
        "SYSTEMD INTEGRATION",
        "EXAMPLES",
    ):
        assert title in page, f"harbord(8) lacks {title}"
    assert {"*SIGHUP*", "*SIGTERM*"} <= {t.split(",")[0] for t, _ in definitions(page["SIGNALS"])}


def test_every_environment_variable_is_documented() -> None:
    text = (ROOT / "harbord" / "config.py").read_text()
    names = set(re.findall(r"""["']((?:HARBOR|OLLAMA|XDG)_[A-Z_]+)["']""", text))
    assert names, "found no environment variables in harbord/config.py"
    documented = sections(source("harbord.8"))["ENVIRONMENT"]
    assert {n for n in names if f"*{n}*" not in documented} == set()


def test_every_harbord_exit_code_is_documented() -> None:
    codes = {v for k, v in vars(daemon).items() if k.startswith("EXIT_") and isinstance(v, int)}
    documented = {
        int(t.strip("*")) for t, _ in definitions(sections(source("harbord.8"))["EXIT STATUS"])
    }
    assert codes | {0} <= documented


# -- harborctl(1) ----------------------------------------------------------------


def command_sections() -> dict[str, str]:
    return sections(sections(source("harborctl.1"))["COMMANDS"], level=2)


def test_every_harborctl_global_option_is_documented() -> None:
    page = sections(source("harborctl.1"))
    code = options(harborctl_parser())
    documented = option_terms(page["OPTIONS"])
    assert code - documented == set(), "harborctl options missing from harborctl(1) OPTIONS"
    assert documented - code == set(), "harborctl(1) documents options harborctl does not have"


def test_every_harborctl_subcommand_is_documented() -> None:
    commands = command_sections()
    code = subcommands(harborctl_parser())
    assert code, "harborctl has no subcommands?"
    assert set(code) - set(commands) == set(), "subcommands missing from harborctl(1) COMMANDS"
    assert set(commands) - set(code) == set(), (
        "harborctl(1) documents subcommands that do not exist"
    )


@pytest.mark.parametrize("command", sorted(subcommands(harborctl_parser())))
def test_every_harborctl_subcommand_option_is_documented(command: str) -> None:
    parser = harborctl_parser()
    text = command_sections().get(command)
    assert text is not None, f"harborctl(1) has no '## {command}' under COMMANDS"
    sub = subcommands(parser)[command]
    own = options(sub) - options(parser)
    documented = option_terms(text)
    assert own - documented == set(), f"options of 'harborctl {command}' missing from harborctl(1)"
    assert documented - own == set(), f"harborctl(1) documents options 'harborctl {command}' lacks"
    synopsis = next(
        (line for line in text.splitlines() if line.startswith(f"*harborctl* *{command}*")), ""
    )
    synopsis += next((line for line in text.splitlines()[1:] if line.startswith("\\[")), "")
    assert synopsis, f"no synopsis line '*harborctl* *{command}* ...' for {command}"
    for option in own:
        assert f"*{option}*" in synopsis, f"{option} missing from the synopsis of {command}"
    for metavar in positionals(sub):
        assert f"_{metavar}_" in synopsis, f"{metavar} missing from the synopsis of {command}"


def test_every_harborctl_exit_code_is_documented() -> None:
    import harbord.ctl as ctl

    codes = {v for k, v in vars(ctl).items() if k.startswith("EX_") and isinstance(v, int)}
    documented = {
        int(t.strip("*")) for t, _ in definitions(sections(source("harborctl.1"))["EXIT STATUS"])
    }
    assert codes <= documented


# -- harbord.toml(5) ---------------------------------------------------------------


def _documented_keys(title: str) -> dict[str, str]:
    page = sections(source("harbord.toml.5"))
    assert title in page, f"harbord.toml(5) has no section '# {title}'"
    keys = {}
    for term, description in definitions(page[title]):
        match = re.fullmatch(r"\*(\w+)\* = _(\w+)_", term)
        assert match, f"harbord.toml(5) {title}: term {term!r} is not '*key* = _type_'"
        keys[match.group(1)] = description
    return keys


@pytest.mark.parametrize("table", sorted(struct_tables()))
def test_every_config_key_is_documented(table: str) -> None:
    title, struct = struct_tables()[table]
    code = scalar_keys(struct)
    documented = _documented_keys(title)
    assert set(code) - set(documented) == set(), f"keys missing from harbord.toml(5) {title}"
    assert set(documented) - set(code) == set(), (
        f"harbord.toml(5) {title} documents keys that do not exist"
    )


# Defaults computed at load time, not in the Struct.
COMPUTED_DEFAULTS = {("backends", "unit"), ("", "socket"), ("", "state_dir")}
REQUIRED = {("backends", "url"), ("backends", "kind")}


def _parse_default(text: str, field: msgspec.structs.FieldInfo) -> object:
    if text == "none":
        return None
    value = tomllib.loads(f"v = {text}")["v"]
    types = str(field.type)
    if "Seconds" in types:
        return float(config.parse_duration(value))
    if "ByteSize" in types:
        return int(config.parse_size(value))
    return value


@pytest.mark.parametrize("table", sorted(struct_tables()))
def test_documented_defaults_match_the_code(table: str) -> None:
    title, struct = struct_tables()[table]
    documented = _documented_keys(title)
    for name, field in scalar_keys(struct).items():
        description = documented[name]
        if (table, name) in REQUIRED:
            assert "Required" in description, f"{table}.{name}: say that it is required"
            continue
        assert "Default:" in description, f"harbord.toml(5) {title} {name}: no 'Default:'"
        if (table, name) in COMPUTED_DEFAULTS:
            continue
        match = re.search(r"Default: \*([^*]+)\*|Default: (none)", description)
        assert match, f"harbord.toml(5) {title} {name}: the default is not '*value*' or 'none'"
        shown = _parse_default(match.group(1) or match.group(2), field)
        default = field.default if field.default is not msgspec.NODEFAULT else None
        if isinstance(default, float) or isinstance(shown, float):
            assert shown is not None and default is not None
            assert float(shown) == pytest.approx(float(default)), f"{table}.{name}"  # type: ignore[arg-type]
        else:
            assert shown == default, (
                f"harbord.toml(5) {title} {name}: documented {shown!r}, code {default!r}"
            )


def _load(text: str, tmp_path: Path) -> config.Config:
    path = tmp_path / "harbord.toml"
    path.write_text(text)
    return config.load(env={"HARBOR_CONFIG": str(path), "HOME": str(tmp_path)})


def test_full_example_in_the_page_loads_and_names_every_key(tmp_path: Path) -> None:
    example = sections(source("harbord.toml.5"))["EXAMPLE"]
    blocks = literal_blocks(example)
    assert len(blocks) == 1
    text = blocks[0].replace("\\\\", "\\")
    _load(text, tmp_path)
    assert all_keys() - keys_in(tomllib.loads(text)) == set()


def uncommented(text: str) -> str:
    """The example file with every commented-out setting and table switched on."""
    return re.sub(r"^#(\[|\w+ = )", r"\1", text, flags=re.MULTILINE)


def test_example_file_loads_as_is_and_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    _load(text, tmp_path)
    full = uncommented(text)
    cfg = _load(full, tmp_path)
    assert list(cfg.backends) == ["gpu", "cpu"]
    assert all_keys() - keys_in(tomllib.loads(full)) == set(), "keys missing from the example file"


def test_example_file_shows_the_defaults(tmp_path: Path) -> None:
    """Uncommented, the example file is the defaults, but for what it says is not."""
    shown = _load(uncommented(EXAMPLE.read_text()), tmp_path).to_dict()
    defaults = _load("", tmp_path).to_dict()
    for cfg in (shown, defaults):
        for key in ("socket", "state_dir", "models"):  # per user; no rules by default
            cfg.pop(key)
        for backend in cfg["backends"].values():
            backend.pop("unit")  # per user
    for key in ("vram", "max_model_size", "default_context", "max_loaded"):  # "Not set by default"
        assert defaults["backends"]["gpu"][key] is None
        shown["backends"]["gpu"][key] = None
    for table, key in (
        (shown["routing"], "ram_reserve"),
        (shown["backends"]["gpu"], "flash_attention"),
        (shown["backends"]["cpu"], "ram"),
    ):  # "not set": Ollama's or the host's own figure
        table[key] = None
    assert shown == defaults


def test_example_file_lines_are_short() -> None:
    assert [line for line in EXAMPLE.read_text().splitlines() if len(line) > 79] == []
