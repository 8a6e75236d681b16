"""The backend unit's environment (unit_env.py): what `systemctl show` and its files say."""

from __future__ import annotations

from harbord import unit_env

SHOW = """ActiveState=active
Environment=OLLAMA_HOST=127.0.0.1:11434 "OLLAMA_MODELS=/home/a b/models" OLLAMA_MAX_LOADED_MODELS=1
EnvironmentFiles=/home/a/.config/harbor/ollama.env (ignore_errors=yes)
EnvironmentFiles=/home/a/.config/harbor/ollama-gpu.env (ignore_errors=yes)
"""


def test_assignments_and_files_in_systemds_order() -> None:
    props = {"Environment": SHOW.splitlines()[1].removeprefix("Environment=")}
    assert unit_env.env_file_paths(SHOW) == [
        "/home/a/.config/harbor/ollama.env",
        "/home/a/.config/harbor/ollama-gpu.env",
    ]
    files = [
        "# overrides\nOLLAMA_FLASH_ATTENTION=1\n",
        "export OLLAMA_MAX_LOADED_MODELS='2'\nOLLAMA_KV_CACHE_TYPE=q8_0\n",
    ]
    env = unit_env.unit_environment(props["Environment"], files)
    assert env["OLLAMA_MODELS"] == "/home/a b/models"
    assert unit_env.max_loaded(env) == 2  # the file read last wins, as systemd applies it
    assert unit_env.flash_attention(env) is True
    assert unit_env.kv_cache_type(env) == "q8_0"


def test_unset_or_odd_values_are_none() -> None:
    assert unit_env.max_loaded({"OLLAMA_MAX_LOADED_MODELS": "0"}) is None  # Ollama's default
    assert unit_env.max_loaded({"OLLAMA_MAX_LOADED_MODELS": "many"}) is None
    assert unit_env.flash_attention({"OLLAMA_FLASH_ATTENTION": "false"}) is False
    assert unit_env.flash_attention({}) is None
    assert unit_env.kv_cache_type({"OLLAMA_KV_CACHE_TYPE": "q5_1"}) is None
    assert unit_env.assignments('A="unterminated') == {}
