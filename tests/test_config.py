"""Configuration: defaults, precedence (flag > env > file > default) and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from harbord.config import ConfigError, Overrides, load, parse_duration, parse_size


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "harbord.toml"
    path.write_text(text)
    return path


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run"), **extra}


def test_defaults_need_no_file(tmp_path: Path) -> None:
    cfg = load(env=env_for(tmp_path))
    assert cfg.path is None
    assert cfg.socket == tmp_path / "run" / "harbor.sock"
    assert cfg.state_dir == tmp_path / ".local/state/harbor"
    assert {n: (b.url, b.kind) for n, b in cfg.backends.items()} == {
        "gpu": ("http://127.0.0.1:11434", "gpu"),
        "cpu": ("http://127.0.0.1:11435", "cpu"),
    }
    assert cfg.backends["gpu"].unit.startswith("ollama-gpu@")
    assert cfg.routing.default_intent == "fast"
    assert cfg.routing.oom_pin_for == 24 * 3600


def test_xdg_locations(tmp_path: Path) -> None:
    cfg_home = tmp_path / "cfg"
    (cfg_home / "harbor").mkdir(parents=True)
    (cfg_home / "harbor" / "harbord.toml").write_text('log_level = "debug"\n')
    cfg = load(
        env=env_for(tmp_path, XDG_CONFIG_HOME=str(cfg_home), XDG_STATE_HOME=str(tmp_path / "st"))
    )
    assert cfg.path == cfg_home / "harbor" / "harbord.toml"
    assert cfg.log_level == "debug"
    assert cfg.state_dir == tmp_path / "st" / "harbor"


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'socket = "/file.sock"\n[backends.gpu]\nurl = "http://127.0.0.1:1"\n'
        '[backends.cpu]\nurl = "http://127.0.0.1:2"\n',
    )
    env = env_for(tmp_path, HARBOR_CONFIG=str(path))
    cfg = load(env=env)
    assert (str(cfg.socket), cfg.backends["gpu"].url) == ("/file.sock", "http://127.0.0.1:1")

    env.update(HARBOR_SOCKET="/env.sock", OLLAMA_GPU_URL="http://127.0.0.1:3")
    cfg = load(env=env)
    assert (str(cfg.socket), cfg.backends["gpu"].url) == ("/env.sock", "http://127.0.0.1:3")
    assert cfg.sources["backends.gpu.url"] == "env OLLAMA_GPU_URL"
    assert cfg.backends["cpu"].url == "http://127.0.0.1:2"

    cfg = load(Overrides(socket="/flag.sock", gpu_url="http://127.0.0.1:4"), env=env)
    assert (str(cfg.socket), cfg.backends["gpu"].url) == ("/flag.sock", "http://127.0.0.1:4")
    assert cfg.sources["socket"] == "flag --socket"


def test_named_backends_are_not_fixed_at_two(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[backends.big-gpu]
url = "http://127.0.0.1:11500"
kind = "gpu"
vram = "12GiB"
first_byte_timeout = "10m"
[backends.gpu]
max_model_size = "6GB"
[backends.cpu]
[backends.cpu2]
url = "http://127.0.0.1:11501"
kind = "cpu"

[models."codellama:13b"]
intent = "heavy"
pin = "cpu2"
""",
    )
    cfg = load(Overrides(config=str(path)), env=env_for(tmp_path))
    assert list(cfg.backends) == ["big-gpu", "gpu", "cpu", "cpu2"]
    assert cfg.backends["big-gpu"].vram == 12 * 1024**3
    assert cfg.backends["big-gpu"].first_byte_timeout == 600
    assert cfg.backends["big-gpu"].unit.startswith("ollama-big-gpu@")
    assert cfg.backends["gpu"].url == "http://127.0.0.1:11434"  # inherited from the default
    assert cfg.backends["gpu"].memory_limit == 6_000_000_000
    assert cfg.models["codellama:13b"].intent == "heavy"
    assert cfg.models["codellama:13b"].pin == "cpu2"


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("log_level = 3\n", "log_level", "Expected `str`"),
        ("colour = true\n", "colour", "unknown key"),
        ('[routing]\ndefault_intent = "quick"\n', "routing.default_intent", "Invalid enum value"),
        ('[routing]\noom_pin_for = "a day"\n', "routing.oom_pin_for", "expected a duration"),
        ('[backends.gpu]\nurl = "ftp://x"\n', "backends.gpu", "expected http://host:port"),
        ('[backends.gpu]\nvram = "lots"\n', "backends.gpu.vram", "expected a size"),
        (
            '[backends.tpu]\nurl = "http://127.0.0.1:1"\n',
            "backends.tpu.kind",
            "required key is missing",
        ),
        ("[backends.gpu]\ntimeout = 3\n", "backends.gpu.timeout", "unknown key"),
        ('[models."x"]\npin = "tpu"\n', 'models."x".pin', "expected one of"),
        ('[models."x"]\nintent = "slow"\n', 'models."x".intent', "Invalid enum value"),
        ('[tcp]\nlisten = "nowhere"\n', "tcp.listen", "expected host:port"),
    ],
)
def test_errors_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, what: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(Overrides(config=str(path)), env=env_for(tmp_path))
    message = str(err.value)
    assert message.startswith(str(path))
    assert f"'{key}'" in message
    assert what in message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "socket = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(Overrides(config=str(path)), env=env_for(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        load(Overrides(config=str(tmp_path / "nope.toml")), env=env_for(tmp_path))


def test_env_url_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env OLLAMA_CPU_URL"):
        load(env=env_for(tmp_path, OLLAMA_CPU_URL="not a url"))


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (30, 30.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        ("1.5", 1.5),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    ("raw", "size"),
    [(1024, 1024), ("8GiB", 8 * 1024**3), ("7.5GB", 7_500_000_000), ("512MiB", 512 * 1024**2)],
)
def test_parse_size(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", [-1, "fast", True, "1w"])
def test_parse_duration_rejects(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_placement_keys_default(tmp_path: Path) -> None:
    cfg = load(env=env_for(tmp_path))
    gpu, cpu = cfg.backends["gpu"], cfg.backends["cpu"]
    # As the shipped units set OLLAMA_NUM_PARALLEL.
    assert (gpu.parallel, cpu.parallel) == (1, 2)
    # None: Ollama's own default context (memory.ollama_default_context).
    assert (gpu.default_context, gpu.kv_cache_type) == (None, "f16")
    assert cfg.routing.affinity_ttl == 300  # Ollama's keep-alive, 5m
    assert cfg.routing.cpu_slowdown == 6.0
    assert cfg.routing.fast_head_start == 10


def test_placement_keys_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[routing]\naffinity_ttl = "10m"\ncpu_slowdown = 4.5\nfast_head_start = "2s"\n'
        '[backends.gpu]\nparallel = 4\ndefault_context = 65536\nkv_cache_type = "q8_0"\n'
        "[backends.cpu]\nparallel = 0\n",
    )
    cfg = load(Overrides(config=str(path)), env=env_for(tmp_path))
    gpu = cfg.backends["gpu"]
    assert (gpu.parallel, gpu.default_context, gpu.kv_cache_type) == (4, 65536, "q8_0")
    assert cfg.backends["cpu"].parallel == 2  # 0: the kind's default
    assert (cfg.routing.affinity_ttl, cfg.routing.cpu_slowdown) == (600, 4.5)
    assert cfg.routing.fast_head_start == 2
    # An environment URL override keeps them.
    cfg = load(
        Overrides(config=str(path)),
        env=env_for(tmp_path, OLLAMA_GPU_URL="http://127.0.0.1:9"),
    )
    assert (cfg.backends["gpu"].parallel, cfg.backends["gpu"].kv_cache_type) == (4, "q8_0")


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("[backends.gpu]\nparallel = -1\n", "backends.gpu.parallel", ">= 0"),
        ('[backends.gpu]\nparallel = "two"\n', "backends.gpu.parallel", "Expected `int`"),
        ("[backends.cpu]\ndefault_context = 0\n", "backends.cpu.default_context", ">= 1"),
        ('[backends.gpu]\nkv_cache_type = "q5_1"\n', "backends.gpu.kv_cache_type", "Invalid enum"),
        ("[routing]\ncpu_slowdown = 0\n", "routing.cpu_slowdown", "> 0"),
        ('[routing]\naffinity_ttl = "soon"\n', "routing.affinity_ttl", "expected a duration"),
        ("[routing]\nfast_head_start = -1\n", "routing.fast_head_start", "expected a duration"),
    ],
)
def test_placement_key_errors(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(Overrides(config=str(path)), env=env_for(tmp_path))
    message = str(err.value)
    assert message.startswith(str(path))
    assert f"'{key}'" in message
    assert what in message


def test_memory_keys(tmp_path: Path) -> None:
    cfg = load(env=env_for(tmp_path))
    assert cfg.backends["cpu"].ram is None and cfg.routing.ram_reserve is None
    assert cfg.backends["gpu"].flash_attention is None  # Ollama's default per model
    path = write(
        tmp_path,
        '[routing]\nram_reserve = "2 GiB"\n[backends.cpu]\nram = "24 GiB"\n'
        "[backends.gpu]\nflash_attention = true\n",
    )
    cfg = load(Overrides(config=str(path)), env=env_for(tmp_path))
    assert cfg.backends["cpu"].ram == 24 * 1024**3
    assert cfg.routing.ram_reserve == 2 * 1024**3
    assert cfg.backends["gpu"].flash_attention is True


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ('[backends.cpu]\nram = "lots"\n', "backends.cpu.ram", "size"),
        ('[backends.gpu]\nram = "8 GiB"\n', "backends.gpu", "ram is for cpu backends"),
        ('[backends.gpu]\nflash_attention = "yes"\n', "backends.gpu.flash_attention", "bool"),
        ("[routing]\nram_reserve = -1\n", "routing.ram_reserve", "size"),
    ],
)
def test_memory_key_errors(tmp_path: Path, text: str, key: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(Overrides(config=str(path)), env=env_for(tmp_path))
    message = str(err.value)
    assert message.startswith(str(path))
    assert f"'{key}'" in message
    assert what in message
