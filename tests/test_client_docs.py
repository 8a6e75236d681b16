"""docs/clients.md runs: every example marked `# test: NAME` against a real harbord.

The examples are taken from the page as they are (fenced ```python and ```sh
blocks whose first line is `# test: NAME`) and run in a child process with the
variables the page explains: HARBOR_SOCKET, HARBOR_URL and HARBOR_TOKEN, for a
harbord (tests/harness.py) over two fake Ollama servers (tests/fakeproc.py), with
its loopback TCP listener and a token file. The fakes start each answer with
"[gpu]" or "[cpu]", so an example that prints an answer shows who served it.

Claude Code, Codex and Open WebUI are not installed here; the examples that make
their requests (anthropic-tcp: a bearer token and a streamed /v1/messages;
openai-responses: /v1/responses over TCP; ollama-tcp: Ollama's API with the token)
stand for them. LangChain is not installed either: its example runs against a
stand-in `langchain_ollama` (STAND_IN below) that builds the real ollama clients
from the example's arguments the way ChatOllama does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakeproc import FakeOllama, free_port
from tests.harness import ROOT, Harbord, gpu_cpu

PAGE = ROOT / "docs" / "clients.md"
README = ROOT / "README.md"
MODELS = ["llama3.2:latest=2000000000"]
TOKEN = "t0ken-for-the-client-docs-test"
SERVED = re.compile(r"\[(gpu|cpu)\] ")
_BLOCK = re.compile(r"^```(python|sh)\n# test: ([\w-]+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# What each example must print, besides exiting 0.
EXPECTED: dict[str, re.Pattern[str]] = {
    "curl-socket": re.compile(r'"content": ?"\[(gpu|cpu)\] '),
    "curl-tcp": re.compile(r'"name": ?"llama3.2:latest"'),
    "curl-messages": re.compile(r'"type": ?"message".*"text": ?"\[(gpu|cpu)\] ', re.DOTALL),
    "ollama-socket": re.compile(r"^\[(gpu|cpu)\] .*\n\['llama3.2:latest'\]$", re.DOTALL),
    "ollama-tcp": SERVED,
    "ollama-unload": re.compile(r"^unload$"),
    "openai-socket": SERVED,
    "openai-responses": re.compile(r"^\[(gpu|cpu)\] .*\n\[(gpu|cpu)\] .*\nllama3.2", re.DOTALL),
    "anthropic-socket": SERVED,
    "anthropic-tcp": SERVED,
    "langchain-socket": re.compile(r"^\[(gpu|cpu)\] .*\nasync: \[(gpu|cpu)\] ", re.DOTALL),
}
# These reach endpoints another branch adds to harbord (issue 12, items 1 and 2).
NEEDS_ANTHROPIC_AND_RESPONSES = {"curl-messages", "openai-responses", "anthropic-socket",
                                 "anthropic-tcp"}  # fmt: skip

STAND_IN = '''
"""A stand-in for langchain_ollama: ChatOllama's client set-up, nothing else."""
import ollama


class Reply:
    def __init__(self, content):
        self.content = content


class ChatOllama:
    def __init__(self, *, model, base_url=None, client_kwargs=None, sync_client_kwargs=None,
                 async_client_kwargs=None):
        both = dict(client_kwargs or {})
        self.model = model
        self.client = ollama.Client(host=base_url, **{**both, **(sync_client_kwargs or {})})
        self.async_client = ollama.AsyncClient(
            host=base_url, **{**both, **(async_client_kwargs or {})}
        )

    def _messages(self, text):
        return [{"role": "user", "content": text}]

    def invoke(self, text):
        reply = self.client.chat(model=self.model, messages=self._messages(text))
        return Reply(reply.message.content)

    async def ainvoke(self, text):
        reply = await self.async_client.chat(model=self.model, messages=self._messages(text))
        return Reply(reply.message.content)
'''
# Run after the LangChain example: its async client, on its own transport, works too.
ASYNC_TOO = '\nimport asyncio\nprint("async:", asyncio.run(llm.ainvoke("hi")).content)\n'


@dataclass(frozen=True)
class Example:
    language: str
    name: str
    code: str


def examples() -> dict[str, Example]:
    found = [Example(lang, name, code) for lang, name, code in _BLOCK.findall(PAGE.read_text())]
    named = {e.name: e for e in found}
    assert len(named) == len(found), "two examples in docs/clients.md have the same name"
    return named


@dataclass(frozen=True)
class Setup:
    daemon: Harbord
    url: str
    gpu: FakeOllama
    cpu: FakeOllama
    stand_in: Path

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ANTHROPIC_", "OPENAI_", "OLLAMA_", "HARBOR_"))
        }
        env.update(
            HARBOR_SOCKET=str(self.daemon.socket),
            HARBOR_URL=self.url,
            HARBOR_TOKEN=TOKEN,
            PYTHONPATH=os.pathsep.join([str(self.stand_in), str(ROOT)]),
            NO_PROXY="*",
        )
        return env

    def run(self, example: Example) -> subprocess.CompletedProcess[str]:
        code = example.code + (ASYNC_TOO if example.name == "langchain-socket" else "")
        argv = (
            [sys.executable, "-c", code]
            if example.language == "python"
            else ["bash", "-euo", "pipefail", "-c", code]
        )
        return subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), cwd=ROOT, timeout=60
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("clientdocs")
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    stand_in = workdir / "stand-in"
    (stand_in / "langchain_ollama").mkdir(parents=True)
    (stand_in / "langchain_ollama" / "__init__.py").write_text(STAND_IN)
    url = f"http://127.0.0.1:{free_port()}"
    tcp = f'[tcp]\nlisten = "{url.removeprefix("http://")}"\ntoken_file = "{token_file}"\n'
    with (
        FakeOllama.start("gpu", models=MODELS) as gpu,
        FakeOllama.start("cpu", models=MODELS, cpu=True) as cpu,
    ):
        daemon = Harbord.start(workdir, gpu_cpu(gpu, cpu), extra_config=tcp)
        try:
            daemon.wait_for(lambda: _answers(url), what="the TCP listener")
            yield Setup(daemon, url, gpu, cpu, stand_in)
        finally:
            assert daemon.stop() == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=1.0).status_code == 401
    except httpx.TransportError:
        return False


def test_the_page_has_an_example_for_each_client() -> None:
    assert set(examples()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(setup: Setup, name: str) -> None:
    """Examples in NEEDS_ANTHROPIC_AND_RESPONSES need /v1/messages and /v1/responses."""
    result = setup.run(examples()[name])
    assert result.returncode == 0, f"{name} failed:\n{result.stderr}"
    out = result.stdout.strip()
    assert EXPECTED[name].search(out), f"{name} printed:\n{out}"


def test_the_tcp_listener_wants_the_token_and_keeps_it_from_the_backends(setup: Setup) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert httpx.post(f"{setup.url}/api/chat", json=body).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token-at-all"}
    assert httpx.post(f"{setup.url}/api/chat", json=body, headers=wrong).status_code == 401
    ok = httpx.post(
        f"{setup.url}/api/chat", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert ok.status_code == 200 and SERVED.match(ok.json()["message"]["content"])
    result = setup.run(examples()["ollama-tcp"])
    assert result.returncode == 0, result.stderr
    relayed = [r for fake in (setup.gpu, setup.cpu) for r in fake.requests("/api/chat")]
    assert relayed, "no chat reached a backend"
    for record in relayed:
        assert "authorization" not in {h.lower() for h in record["headers"]}


def test_a_missing_model_raises_the_sdks_not_found_error(setup: Setup) -> None:
    """What the anthropic example does with a model nobody has (needs /v1/messages)."""
    code = examples()["anthropic-tcp"].code.replace('model="llama3.2"', 'model="no-such-model"')
    catch = "except anthropic.NotFoundError as err:\n    print('not found:', err.message)\n"
    code = f"import anthropic\ntry:\n{_indent(code)}\n{catch}"
    result = setup.run(Example("python", "anthropic-missing", code))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("not found: ")
    assert "no-such-model" in result.stdout  # harbord's own 404, not one for the path


def _indent(code: str) -> str:
    return "\n".join("    " + line if line else line for line in code.splitlines())


def test_readme_points_at_every_client_on_the_page() -> None:
    readme = README.read_text()
    section = readme.split("\n## Clients\n", 1)[1].split("\n## ", 1)[0]
    assert "docs/clients.md" in section
    for client in ("curl", "ollama", "OpenAI", "Anthropic", "Claude Code", "Codex",
                   "Open WebUI", "LangChain"):  # fmt: skip
        assert client in section, f"README's Clients section does not name {client}"
