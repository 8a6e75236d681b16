"""harborctl completion: the generated scripts complete in real shells.

bash runs everywhere (it is what the test machines have). zsh and fish are checked
when installed; without them those tests skip with the reason, and fail instead when
HARBOR_REQUIRE_SHELLS=1 (CI), so a missing shell cannot hide a broken script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harbord.ctl import completion
from harbord.ctl.main import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
# Backend names only this test's harbord.toml has: they can only come from the config.
CONFIG = """\
[backends.rtx]
url = "http://127.0.0.1:11434"
kind = "gpu"

[backends.bigiron]
url = "http://127.0.0.1:11435"
kind = "cpu"
"""
BACKENDS = ["bigiron", "rtx"]


def need(shell: str) -> str:
    path = shutil.which(shell)
    if path is None:
        reason = f"{shell} is not installed (apt-get install {shell})"
        if os.environ.get("HARBOR_REQUIRE_SHELLS"):
            pytest.fail(f"HARBOR_REQUIRE_SHELLS is set, but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A `harborctl` on PATH (this checkout) and a harbord.toml naming two backends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "harborctl"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m harbord.ctl.main "$@"\n')
    shim.chmod(0o755)
    (tmp_path / "config" / "harbor").mkdir(parents=True)
    (tmp_path / "config" / "harbor" / "harbord.toml").write_text(CONFIG)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
    }


def generated(shell: str, tmp_path: Path) -> Path:
    path = tmp_path / f"harborctl.{shell}"
    path.write_text(completion.script(build_parser(), shell))
    return path


# --- bash: runs everywhere ------------------------------------------------------------


def bash_complete(script: Path, env: dict[str, str], *words: str) -> list[str]:
    """What bash offers for the last of `words` (the word being typed, maybe "")."""
    program = f"""
source {script}
spec=$(complete -p harborctl) || exit 3
function=$(printf '%s' "$spec" | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
"$function" harborctl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return sorted(line for line in done.stdout.splitlines() if line)


def test_bash_completes_subcommands_options_and_backends(
    tmp_path: Path, env: dict[str, str]
) -> None:
    script = generated("bash", tmp_path)
    assert bash_complete(script, env, "harborctl", "") == sorted(COMMANDS)
    assert bash_complete(script, env, "harborctl", "re") == ["restart"]
    assert bash_complete(script, env, "harborctl", "co") == ["completion"]
    # Backend names from the configuration, wherever a backend is asked for.
    assert bash_complete(script, env, "harborctl", "restart", "") == BACKENDS
    assert bash_complete(script, env, "harborctl", "restart", "r") == ["rtx"]
    assert bash_complete(script, env, "harborctl", "pin", "llama3.2", "") == BACKENDS
    assert bash_complete(script, env, "harborctl", "pull", "llama3.2", "--backend", "") == BACKENDS
    assert bash_complete(script, env, "harborctl", "chat", "m", "--backend", "b") == ["bigiron"]
    assert bash_complete(script, env, "harborctl", "completion", "") == ["bash", "fish", "zsh"]
    assert "--dry-run" in bash_complete(script, env, "harborctl", "setup", "--")


def test_backend_names_fall_back_to_the_default_pair(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "config" / "harbor" / "harbord.toml").unlink()
    script = generated("bash", tmp_path)
    assert bash_complete(script, env, "harborctl", "restart", "") == ["cpu", "gpu"]
    # A broken harbord.toml does not break completion either.
    (tmp_path / "config" / "harbor" / "harbord.toml").write_text("[backends.x\n")
    assert bash_complete(script, env, "harborctl", "restart", "") == ["cpu", "gpu"]


# --- zsh and fish: when installed -------------------------------------------------------


def test_zsh_script_is_valid_zsh_and_knows_the_backends(tmp_path: Path) -> None:
    zsh = need("zsh")
    script = generated("zsh", tmp_path)
    text = script.read_text()
    assert text.startswith("#compdef harborctl")
    assert all(name in text for name in COMMANDS)
    assert "_harborctl_backends" in text and "completion --backends" in text
    done = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def fish_complete(fish: str, script: Path, env: dict[str, str], line: str) -> list[str]:
    done = subprocess.run(
        [fish, "--no-config", "-c", f"source {script}; complete -C {line!r}"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return sorted(line.split("\t")[0] for line in done.stdout.splitlines() if line)


def test_fish_completes_subcommands_and_backends(tmp_path: Path, env: dict[str, str]) -> None:
    fish = need("fish")
    script = generated("fish", tmp_path)
    syntax = subprocess.run([fish, "--no-execute", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert fish_complete(fish, script, env, "harborctl ") == sorted(COMMANDS)
    assert fish_complete(fish, script, env, "harborctl re") == ["restart"]
    assert fish_complete(fish, script, env, "harborctl restart ") == BACKENDS
    assert fish_complete(fish, script, env, "harborctl pin llama3.2 ") == BACKENDS
    assert fish_complete(fish, script, env, "harborctl pin ") == []  # MODEL: not a backend
    assert fish_complete(fish, script, env, "harborctl pull x --backend ") == BACKENDS
    assert fish_complete(fish, script, env, "harborctl completion ") == ["bash", "fish", "zsh"]


# --- the subcommand --------------------------------------------------------------------


def test_completion_subcommand_prints_scripts_and_backends(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing"))
    assert main(["completion", "bash"]) == 0
    assert "-F _shtab_harborctl harborctl" in capsys.readouterr().out
    assert main(["completion", "--backends"]) == 0
    assert capsys.readouterr().out.split() == ["gpu", "cpu"]  # config order
    assert main(["completion"]) == 64
    assert "which shell?" in capsys.readouterr().err
    assert main(["completion", "tcsh"]) == 64


def test_without_shtab_bash_says_how_to_get_it_and_fish_still_works(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "shtab", None)  # import shtab raises ImportError
    assert main(["completion", "zsh"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "pip install 'harbord[completion]'" in err and "python3-shtab" in err
    assert main(["completion", "fish"]) == 0
    assert "complete -c harborctl" in capsys.readouterr().out


# What a package build root has when it makes the completion scripts: harborctl's own
# needs (httpx, msgspec, shtab), none of the daemon's server side.
_SERVER_ONLY = """
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"aiohttp", "prometheus_client", "multidict", "sdnotify",
                                  "uvloop", "yarl"}:
            raise ImportError(f"{name} is not in a build root")
sys.meta_path.insert(0, Refuse())
sys.argv = ["harborctl", "completion", "bash"]
runpy.run_module("harbord.ctl.main", run_name="__main__")
"""


def test_completions_are_made_without_the_daemons_server_packages() -> None:
    made = subprocess.run(
        [sys.executable, "-c", _SERVER_ONLY], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert "complete" in made.stdout and "harborctl" in made.stdout
