"""Three backends under names of their own (issue 15): two GPUs and a CPU, end to end.

harbord runs as a real process (tests/harness.py) against three tests/fakeollama.py
processes, configured as an operator with two graphics cards and a CPU Ollama would:

  rtx3060  gpu, 12 GiB, on 127.0.0.2 (loopback, a stand-in for another host); first
  rtx4090  gpu, 24 GiB
  ram      cpu

Nothing here is named `gpu` or `cpu`: routing by intent, memory fit, the OOM pin,
pass-through, unload and `harborctl status/route/ps` are shown to work from the
configuration alone, for any names and more than one backend of a kind. The 12 GiB
card comes first in the configuration, so a request that lands on the 24 GiB one got
there by a rule, not by order.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harbord import config
from tests.fakeproc import FakeOllama
from tests.harness import FAST_ROUTING, ROOT, Harbord
from tests.test_placement_e2e import (
    BIG,
    BIG_INFO,
    BIG_SPEC,
    GIB,
    SMALL,
    SMALL_SPEC,
    chat,
    chats,
    decisions_by_rule,
    get_json,
    harborctl,
    route,
    wait_until,
)

pytestmark = pytest.mark.e2e

OTHER_HOST = "127.0.0.2"
NAMES = ["rtx3060", "rtx4090", "ram"]
# 40 GB of weights: over both cards' memory whatever the context.
HUGE = "llama3.1:70b"
HUGE_SPEC = f"{HUGE}=40000000000"
# Listed by the 24 GiB card and the CPU only (the 12 GiB card's disk never had it).
CODER = "qwen2.5-coder:7b"
CODER_SPEC = f"{CODER}=4700000000"
EVERYWHERE = [SMALL_SPEC, BIG_SPEC, HUGE_SPEC]


@dataclass(frozen=True)
class Trio:
    """The three fakes and the daemon routing between them."""

    daemon: Harbord
    rtx3060: FakeOllama
    rtx4090: FakeOllama
    ram: FakeOllama

    def fake(self, name: str) -> FakeOllama:
        fake: FakeOllama = getattr(self, name)
        return fake


def trio_config(rtx3060: FakeOllama, rtx4090: FakeOllama, ram: FakeOllama) -> str:
    """What an operator writes: one table per backend, each with its kind, URL and unit."""
    return "\n".join(
        [
            'log_level = "debug"',
            'drain_timeout = "5s"',
            FAST_ROUTING,
            f'[backends.rtx3060]\nurl = "{rtx3060.url}"\nkind = "gpu"\n'
            'unit = "ollama-gpu@rtx3060.service"\nvram = "12GiB"\n',
            f'[backends.rtx4090]\nurl = "{rtx4090.url}"\nkind = "gpu"\n'
            'unit = "ollama-gpu@rtx4090.service"\nvram = "24GiB"\n',
            f'[backends.ram]\nurl = "{ram.url}"\nkind = "cpu"\nunit = "ollama-cpu@test.service"\n'
            'ram = "64GiB"\n',
        ]
    )


@contextlib.contextmanager
def running_trio(
    workdir: Path,
    gpu_args: Sequence[str] = (),
    cpu_args: Sequence[str] = (),
) -> Iterator[Trio]:
    """Start the three fakes and harbord; stop them all, and harbord must exit 0."""
    info = ["--model-info", BIG_INFO, *gpu_args]
    with (
        FakeOllama.start(
            "rtx3060", host=OTHER_HOST, models=EVERYWHERE, vram=12 * GIB, extra_args=info
        ) as rtx3060,
        FakeOllama.start(
            "rtx4090", models=[*EVERYWHERE, CODER_SPEC], vram=24 * GIB, extra_args=info
        ) as rtx4090,
        FakeOllama.start(
            "ram",
            models=[*EVERYWHERE, CODER_SPEC],
            cpu=True,
            extra_args=["--model-info", BIG_INFO, *cpu_args],
        ) as ram,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        daemon = Harbord(workdir, trio_config(rtx3060, rtx4090, ram))
        try:
            daemon.launch()
            yield Trio(daemon, rtx3060, rtx4090, ram)
        finally:
            code = daemon.stop()
        assert code == 0, daemon.log()[-3000:]  # only after a test that passed


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Trio]:
    with running_trio(tmp_path) as started:
        yield started


def steps(plan: dict[str, Any]) -> list[str]:
    return [step["backend"] for step in plan["steps"]]


def reasons(plan: dict[str, Any], backend: str) -> str:
    return "; ".join(next(s["reasons"] for s in plan["steps"] if s["backend"] == backend))


def loaded_where(daemon: Harbord) -> dict[str, list[str]]:
    """`harborctl ps --json`: backend name -> the models it has loaded."""
    shown = harborctl(daemon, "ps", "--json")
    assert shown.returncode == 0, shown.stderr
    backends: dict[str, list[dict[str, Any]]] = json.loads(shown.stdout)["backends"]
    return {name: [m["name"] for m in models] for name, models in backends.items()}


# -- the documented configuration --------------------------------------------------------


def documented_examples() -> list[str]:
    """The multi-backend TOML in README.md and harbord.toml(5)."""
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index("### More than two backends") :]
    page = (ROOT / "man" / "harbord.toml.5.scd").read_text()
    page = page[page.index("# MORE THAN TWO BACKENDS") :]
    found = [
        re.search(r"^```toml\n(.*?)^```$", readme, re.M | re.S),
        re.search(r"^```\n(.*?)^```$", page, re.M | re.S),
    ]
    assert None not in found
    return [match[1] for match in found if match is not None]


@pytest.mark.parametrize("which", [0, 1], ids=["README.md", "harbord.toml.5"])
def test_the_documented_example_loads(which: int, tmp_path: Path) -> None:
    path = tmp_path / "harbord.toml"
    path.write_text(documented_examples()[which])
    loaded = config.load(env={"HARBOR_CONFIG": str(path), "HOME": str(tmp_path)})
    kinds = {name: backend.kind for name, backend in loaded.backends.items()}
    assert kinds == {"rtx3060": "gpu", "rtx4090": "gpu", "ram": "cpu", "den": "gpu"}
    units = {name: backend.unit for name, backend in loaded.backends.items()}
    assert units["rtx4090"] == "ollama-gpu@rtx4090.service"
    assert loaded.backends["rtx3060"].vram == 12 * GIB


# -- the other host -------------------------------------------------------------------


def test_a_backend_on_another_address_is_probed_and_up(trio: Trio) -> None:
    """127.0.0.2 is another address as far as harbord knows: it probes it like any."""
    assert trio.rtx3060.url.startswith(f"http://{OTHER_HOST}:")
    status = trio.daemon.status()
    assert [b["name"] for b in status["backends"]] == NAMES
    assert [b["kind"] for b in status["backends"]] == ["gpu", "gpu", "cpu"]
    assert status["backends"][0]["url"] == trio.rtx3060.url
    assert status["backends"][1]["unit"] == "ollama-gpu@rtx4090.service"
    trio.daemon.wait_for(
        lambda: all(b["health"] == "up" for b in trio.daemon.status()["backends"]),
        what="all three backends up",
    )
    assert trio.daemon.backend("rtx3060")["version"] == "0.14.3"  # read from 127.0.0.2


# -- intent, and harborctl with the three names ------------------------------------------


def test_fast_goes_to_a_gpu_heavy_to_the_cpu_and_harborctl_names_all_three(
    trio: Trio,
) -> None:
    daemon = trio.daemon
    fast = chat(daemon)
    assert fast.headers["X-Harbor-Backend"] == "rtx3060"
    assert fast.json()["message"]["content"].startswith("[rtx3060]")
    heavy = chat(daemon, headers={"X-Harbor-Intent": "heavy"})
    assert heavy.headers["X-Harbor-Backend"] == "ram"
    with daemon.client() as client:  # the intent in the body, as harbord's clients send it
        body = {"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        by_body = client.post("/api/chat", json=body | {"intent": "heavy"})
    assert by_body.status_code == 200 and by_body.headers["X-Harbor-Backend"] == "ram"
    assert "intent" not in chats(trio.ram, SMALL)[-1]["body"]
    forced = chat(daemon, headers={"X-Harbor-Backend": "rtx4090"})
    assert forced.headers["X-Harbor-Backend"] == "rtx4090"
    assert [len(chats(trio.fake(n), SMALL)) for n in NAMES] == [1, 1, 2]

    # The plans: fast tries the GPUs in configuration order, then the CPU; heavy the
    # CPU first. The heavy answers made ram the model's affinity, which ranks below
    # intent: between the two cards the order decides (a forced answer teaches none).
    fast_plan = route(daemon, SMALL, intent="fast")
    assert steps(fast_plan) == NAMES
    assert fast_plan["rule"] == "order", fast_plan
    assert "affinity: served this model last" in reasons(fast_plan, "ram")
    assert "cpu fallback" in reasons(fast_plan, "ram")
    heavy_plan = route(daemon, SMALL, intent="heavy")
    assert steps(heavy_plan) == ["ram", "rtx3060", "rtx4090"]
    assert heavy_plan["rule"] == "intent"
    assert "heavy intent prefers cpu" in reasons(heavy_plan, "ram")

    shown = harborctl(daemon, "route", "llama3.2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.index("1. rtx3060") < shown.stdout.index("2. rtx4090")
    assert shown.stdout.index("2. rtx4090") < shown.stdout.index("3. ram")
    shown = harborctl(daemon, "route", "llama3.2", "--intent", "heavy")
    assert shown.returncode == 0 and "1. ram" in shown.stdout, shown

    # What each one has loaded, read by harbord from each /api/ps after the loads.
    wait_until(
        lambda: all(SMALL in models for models in loaded_where(daemon).values()),
        bound=10.0,
        what="llama3.2 loaded on all three in harbord's view",
    )
    assert set(loaded_where(daemon)) == set(NAMES)
    table = harborctl(daemon, "ps")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    rows = {line.split()[1]: line for line in lines[1 : 1 + len(NAMES)]}
    assert set(rows) == set(NAMES), table.stdout
    # Under the table, each backend's capacity: what it holds of how many models.
    assert lines[1 + len(NAMES) :] == [f"{n}: 1 of 3 models (Ollama's default)" for n in NAMES]
    assert "100% GPU" in rows["rtx3060"] and "100% GPU" in rows["rtx4090"]
    assert "CPU" in rows["ram"] and "GPU" not in rows["ram"]

    status = harborctl(daemon, "status")
    assert status.returncode == 0, status.stdout + status.stderr  # 0: every backend up
    text = status.stdout
    assert "3 of 3 up" in text
    for name, kind in zip(NAMES, ["gpu", "gpu", "cpu"], strict=True):
        assert re.search(rf"^{name}\s+{kind}\s+up\b", text, re.M), text
    assert "rtx3060 memory budget 12 GiB (from config" in text
    assert "rtx4090 memory budget 24 GiB (from config" in text
    assert "ram serves 2 at once" in text
    served = re.search(r"served \(([^)]*)\)", text)
    assert served is not None, text
    assert sorted(served[1].split(", ")) == ["ram 2", "rtx3060 1", "rtx4090 1"], text
    as_json = harborctl(daemon, "status", "--json")
    assert as_json.returncode == 0
    assert [b["name"] for b in json.loads(as_json.stdout)["backends"]] == NAMES


# -- memory fit ------------------------------------------------------------------------


def test_a_context_that_fits_only_the_24_gib_card_goes_there(trio: Trio) -> None:
    """An 8B llama at 64k: 4.9 GB + 8 GiB of KV cache + graph and reserve = 19.1 GB, over
    rtx3060's 12 GiB and within rtx4090's 24 GiB. At the default context it fits both
    and goes to the first. A 40 GB model fits neither and goes to the CPU."""
    daemon = trio.daemon

    def memory_seen() -> bool:  # the model's shape arrives from /api/show in the background
        plan = route(daemon, BIG, num_ctx=65536, intent="fast")
        return steps(plan)[-1] == "rtx3060"

    wait_until(memory_seen, bound=10.0, what="the model's facts from /api/show")
    default = route(daemon, BIG, intent="fast")  # 4k fits both: the first card, by order
    assert steps(default) == NAMES and default["rule"] == "order", default
    plan = route(daemon, BIG, num_ctx=65536, intent="fast")
    assert steps(plan) == ["rtx4090", "ram", "rtx3060"], plan
    assert "needs 19.1 GB at 64k context, rtx3060 has 12 GiB (config)" in reasons(plan, "rtx3060")
    estimates = {e["backend"]: e for e in plan["estimates"]}
    assert estimates["rtx4090"]["budget"] == 24 * GIB
    assert estimates["rtx3060"]["budget"] == 12 * GIB
    assert estimates["rtx4090"]["needs"] == estimates["rtx3060"]["needs"] < 24 * GIB
    shown = harborctl(daemon, "route", BIG, "--num-ctx", "65536")
    assert shown.returncode == 0, shown.stderr
    assert "1. rtx4090" in shown.stdout and "3. rtx3060" in shown.stdout
    assert "needs 19.1 GB at 64k context, rtx3060 has 12 GiB" in shown.stdout

    served = chat(daemon, BIG, options={"num_ctx": 65536})
    assert served.headers["X-Harbor-Backend"] == "rtx4090"
    assert "X-Harbor-Fallbacks" not in served.headers
    assert chats(trio.rtx3060, BIG) == []  # never tried there
    with httpx.Client() as client:  # and on the big card it fits: nothing spilled
        loaded = client.get(f"{trio.rtx4090.url}/api/ps").json()["models"]
    assert [(m["size"] == m["size_vram"], m["context_length"]) for m in loaded] == [(True, 65536)]

    # At the default context (4k) it fits the 12 GiB card too; where it was served
    # last (affinity) decides between the cards now.
    default = route(daemon, BIG, intent="fast")
    assert steps(default) == ["rtx4090", "rtx3060", "ram"] and default["rule"] == "affinity"

    # Over both cards' memory: the CPU, with both GPUs after it.
    huge = route(daemon, HUGE, intent="fast")
    assert steps(huge) == ["ram", "rtx3060", "rtx4090"] and huge["rule"] == "memory", huge
    for card in ("rtx3060", "rtx4090"):
        assert "exceeds the" in reasons(huge, card) and "after CPU backends" in reasons(huge, card)
    assert chat(daemon, HUGE).headers["X-Harbor-Backend"] == "ram"
    assert chats(trio.rtx3060, HUGE) == [] and chats(trio.rtx4090, HUGE) == []

    # The 64k request was decided between rtx4090 and ram (intent); the 40 GB one by memory.
    rules = decisions_by_rule(daemon)
    assert rules.get("memory", 0) >= 1 and rules.get("intent", 0) >= 1, rules


# -- out of memory ---------------------------------------------------------------------


def test_an_oom_on_a_gpu_pins_the_model_to_the_cpu(trio: Trio) -> None:
    """rtx3060 answers out of memory: the plan's next step serves this request (the
    other card), and the model is pinned to the CPU backend, by name, for the next."""
    daemon = trio.daemon
    trio.rtx3060.set_faults({"oom_models": [SMALL]})
    first = chat(daemon)
    assert first.headers["X-Harbor-Fallbacks"] == "rtx3060=oom"
    assert first.headers["X-Harbor-Backend"] == "rtx4090"
    pin = daemon.status()["pins"][SMALL]
    assert pin["backend"] == "ram" and pin["source"] == "oom"
    assert "out of memory on rtx3060" in pin["reason"]

    plan = route(daemon, SMALL, intent="fast")
    assert plan["rule"] == "pin" and steps(plan)[0] == "ram", plan
    shown = harborctl(daemon, "status")
    assert f"{SMALL} → ram" in shown.stdout, shown.stdout
    after = chat(daemon)
    assert after.headers["X-Harbor-Backend"] == "ram"
    assert "X-Harbor-Fallbacks" not in after.headers
    assert len(chats(trio.rtx3060, SMALL)) == 1  # the failed one only
    assert len(chats(trio.rtx4090, SMALL)) == 1


# -- pass-through ----------------------------------------------------------------------


def test_an_unknown_path_passes_through_by_its_model(trio: Trio) -> None:
    """A path harbord does not know goes where a request for its model would: the
    backend's own answer (here the fake's 404) is relayed as it is."""
    daemon = trio.daemon
    path = "/api/experimental/thing"

    def send(model: str, **headers: str) -> httpx.Response:
        with daemon.client() as client:
            return client.post(path, json={"model": model, "x": 1}, headers=headers)

    cases = [
        (SMALL, {}, "rtx3060"),
        (SMALL, {"X-Harbor-Intent": "heavy"}, "ram"),
        (SMALL, {"X-Harbor-Backend": "rtx4090"}, "rtx4090"),
        (HUGE, {}, "ram"),  # memory: over both cards
        (CODER, {}, "rtx4090"),  # inventory: the only GPU that lists it
    ]
    for model, headers, expected in cases:
        answer = send(model, **headers)
        assert answer.status_code == 404, answer.text
        assert answer.text == "404 page not found"
        assert answer.headers["X-Harbor-Backend"] == expected, (model, headers)
    got = {name: [r["model"] for r in trio.fake(name).requests(path)] for name in NAMES}
    assert got == {"rtx3060": [SMALL], "rtx4090": [SMALL, CODER], "ram": [SMALL, HUGE]}

    # Without a model: the first healthy backend in configuration order.
    with daemon.client() as client:
        plain = client.get("/api/experimental/status")
    assert plain.headers["X-Harbor-Backend"] == "rtx3060"


# -- unload ----------------------------------------------------------------------------


def test_unload_reaches_every_backend_that_lists_the_model(trio: Trio) -> None:
    daemon = trio.daemon
    for name in NAMES:  # load it everywhere
        assert chat(daemon, headers={"X-Harbor-Backend": name}).status_code == 200
    assert chat(daemon, CODER, headers={"X-Harbor-Backend": "rtx4090"}).status_code == 200
    assert chat(daemon, CODER, headers={"X-Harbor-Backend": "ram"}).status_code == 200
    everywhere = {"rtx3060": {SMALL}, "rtx4090": {SMALL, CODER}, "ram": {SMALL, CODER}}
    wait_until(
        lambda: {name: set(models) for name, models in loaded_where(daemon).items()} == everywhere,
        bound=10.0,
        what="harbord to see what is loaded where",
    )

    def unload(model: str) -> httpx.Response:
        with daemon.client() as client:
            body = {"model": model, "prompt": "", "keep_alive": 0, "stream": False}
            answer = client.post("/api/generate", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["done_reason"] == "unload"
        return answer

    # CODER is listed by rtx4090 and ram only: rtx3060 is not asked.
    assert unload(CODER).headers["X-Harbor-Backend"] == "rtx4090,ram"
    assert unload(SMALL).headers["X-Harbor-Backend"] == "rtx3060,rtx4090,ram"
    unloads = {
        name: [
            r["model"]
            for r in trio.fake(name).requests("/api/generate")
            if r["body"].get("keep_alive") == 0
        ]
        for name in NAMES
    }
    assert {k: sorted(v) for k, v in unloads.items()} == {
        "rtx3060": [SMALL],
        "rtx4090": sorted([CODER, SMALL]),
        "ram": sorted([CODER, SMALL]),
    }
    for name in NAMES:  # each fake really unloaded them
        with httpx.Client() as client:
            assert client.get(f"{trio.fake(name).url}/api/ps").json()["models"] == [], name
    # harbord looks again at once (an unload changes what is loaded): ps shows nothing.
    wait_until(
        lambda: loaded_where(daemon) == {name: [] for name in NAMES},
        bound=10.0,
        what="harbord to see the unloads",
    )
    table = harborctl(daemon, "ps")
    assert table.returncode == 0 and "no model is loaded on any backend" in table.stdout


# -- busy spill over two GPUs ------------------------------------------------------------

PROMPT_S = 0.6  # a request's time on either card, one at a time each


def test_a_saturated_first_gpu_spills_to_the_second_idle_gpu(tmp_path: Path) -> None:
    """Three `fast` requests at once; rtx3060 serves one at a time. With rtx4090 idle and
    as quick, waiting behind rtx3060 is the slower choice: some go to rtx4090. (Today
    the busy spill compares the first GPU with the CPU backends only.)"""
    gpu_args = ["--parallel", "1", "--prompt-delay", str(PROMPT_S)]
    cpu_args = ["--parallel", "1", "--prompt-delay", str(PROMPT_S * 20)]
    with running_trio(tmp_path, gpu_args, cpu_args) as started:
        daemon = started.daemon
        # Service-time history on both cards (rtx4090's through a forced request, which
        # teaches the service time but no affinity).
        assert chat(daemon).headers["X-Harbor-Backend"] == "rtx3060"
        forced = chat(daemon, headers={"X-Harbor-Backend": "rtx4090"})
        assert forced.headers["X-Harbor-Backend"] == "rtx4090"
        for name in ("rtx3060", "rtx4090"):
            assert SMALL in daemon.backend(name)["service_ms"], name

        served: list[str] = []
        errors: list[BaseException] = []
        gate = threading.Barrier(3)

        def one() -> None:
            try:
                gate.wait()
                served.append(chat(daemon).headers["X-Harbor-Backend"])
            except BaseException as err:  # reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert len(served) == 3
        assert "rtx4090" in served and "rtx3060" in served, served
        assert "ram" not in served, served
        rules = decisions_by_rule(daemon)
        assert rules.get("busy-spill", 0) + rules.get("busy", 0) >= 1, rules
        # A moment's load, not where the model lives: affinity stays on the first card.
        assert get_json(daemon, "/harbor/affinity")[SMALL]["backend"] == "rtx3060"
