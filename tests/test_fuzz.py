"""Property-based fuzzing of the socket API (hypothesis).

Requests are drawn from harbord's real route table (plus paths and methods it
does not have), with JSON-ish and binary bodies, query strings and odd header
values (X-Harbor-Intent, X-Harbor-Backend, Content-Type ...). Property: every
request gets a well-formed HTTP response, never harbord's own 500 (a backend's
500 for a request it could not take comes back as Ollama's would), errors are
JSON with an "error" field (but for a backend's own 404 of a path harbord passes
through, which is Ollama's text, never for /harbor/* or /metrics), and the daemon
stays up with nothing in its log that says "internal error" or "Traceback".

One daemon and two fake backends for the module. HARBOR_FUZZ_EXAMPLES sets
the number of examples (default 200).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harbord import harbor_api, ollama_api
from harbord.server import ROUTED_PATHS
from tests.fakeproc import FakeOllama
from tests.harness import Harbord, gpu_cpu

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("HARBOR_FUZZ_EXAMPLES", "200"))
seen: dict[str, int] = {"requests": 0}


def route_table() -> list[tuple[str, str]]:
    """(method, path template) for every route, exactly as make_app builds them."""
    app = web.Application()
    for path in ROUTED_PATHS:
        app.router.add_post(path, _never)
    ollama_api.add_routes(app.router)
    harbor_api.add_routes(app.router)
    return sorted({(r.method, r.resource.canonical) for r in app.router.routes() if r.resource})


async def _never(request: web.Request) -> web.StreamResponse:
    raise AssertionError("not served")


ROUTES = route_table()
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]
MODELS = [
    "llama3.2",
    "llama3.2:latest",
    "qwen2.5-coder:7b",
    "nomic-embed-text",
    "no-such-model",
    "library/llama3.2",
    "hf.co/x/y:Q4",
    "",
    "../../etc/passwd",
    "$(id)",
    "a b",
    "x" * 300,
    "-rf",
    "ll\u00e4ma",
    "llama3.2\n",
    "%2F",
]
HEADER_VALUES = [
    "fast",
    "heavy",
    "gpu",
    "cpu",
    "",
    "FAST",
    "turbo",
    "tpu",
    "gpu,cpu",
    "../gpu",
    "$(id)",
    "\u00e9",
    "x" * 2000,
]

# Header values: printable Latin-1, as an HTTP client can send them (no CR, LF, NUL).
header_text = st.one_of(
    st.sampled_from(HEADER_VALUES),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
        max_size=40,
    ).map(str.strip),
)
segment = st.one_of(
    st.sampled_from(MODELS),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=30),
)
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
request_object = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(MODELS), json_value, st.text(max_size=20)),
        "name": st.one_of(st.sampled_from(MODELS), json_value),
        "stream": st.one_of(st.booleans(), json_value),
        "intent": st.one_of(st.sampled_from(HEADER_VALUES), json_value),
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_value),
        "prompt": st.one_of(st.just("hi"), json_value),
        "input": st.one_of(st.just(["a", "b"]), json_value),
        "options": st.one_of(st.just({"num_predict": 2}), json_value),
        "backend": st.one_of(st.sampled_from(HEADER_VALUES), json_value, st.text(max_size=10)),
        "for_seconds": st.one_of(st.floats(allow_nan=False, allow_infinity=False), json_value),
        "keep_alive": st.one_of(st.just("1m"), json_value),
    },
)
body_bytes = st.one_of(
    st.none(),
    request_object.map(lambda obj: json.dumps(obj).encode()),
    json_value.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    request_object.map(lambda obj: json.dumps(obj).encode()[:-1]),  # cut short
    # Not UTF-8: the JSON text with its non-ASCII characters in Latin-1.
    request_object.map(
        lambda obj: json.dumps(obj, ensure_ascii=False).encode("latin-1", "replace")
    ),
    st.tuples(st.sampled_from(MODELS[:3]), st.integers(1, 3000)).map(  # deeply nested
        lambda mn: (
            b'{"model": "%s", "messages": %s}' % (mn[0].encode(), b"[" * mn[1] + b"]" * mn[1])
        )
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) < 8:
        method, template = draw(st.sampled_from(ROUTES))
        if draw(st.integers(0, 9)) == 0:
            method = draw(st.sampled_from(METHODS))
        path = template
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            value = urllib.parse.quote(draw(segment), safe="")
            path = path[:start] + value + path[end + 1 :]
    else:
        method = draw(st.sampled_from(METHODS))
        path = "/" + "/".join(
            urllib.parse.quote(s, safe="") for s in draw(st.lists(segment, min_size=0, max_size=3))
        )
    params = draw(
        st.dictionaries(
            st.sampled_from(["model", "intent", "limit", "x"]),
            st.one_of(st.sampled_from(MODELS), header_text),
            max_size=3,
        )
    )
    headers = draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "X-Harbor-Intent",
                    "X-Harbor-Backend",
                    "Content-Type",
                    "Accept",
                    "Authorization",
                    "X-Odd",
                    "User-Agent",
                    "Accept-Encoding",
                ]
            ),
            header_text,
            max_size=4,
        )
    )
    return {
        "method": method,
        "path": path,
        "params": params,
        "headers": headers,
        "body": draw(body_bytes),
    }


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harbord]:
    with FakeOllama.start("gpu") as gpu, FakeOllama.start("cpu", cpu=True) as cpu:
        daemon = Harbord.start(
            tmp_path_factory.mktemp("fuzz"),
            gpu_cpu(gpu, cpu),
            extra_config='max_body_size = "64KiB"\n',
        )
        try:
            yield daemon
        finally:
            log = daemon.log()
            code = daemon.stop()
        print(f"fuzz: {seen['requests']} requests; statuses {dict(sorted(seen.items()))}")
        assert code == 0
        assert "internal error" not in log
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def client(daemon: Harbord) -> Iterator[httpx.Client]:
    with daemon.client(timeout=15.0) as client:
        yield client


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(req=requests())
def test_every_request_gets_a_well_formed_answer(
    daemon: Harbord, client: httpx.Client, req: dict[str, Any]
) -> None:
    response = client.request(
        req["method"],
        req["path"],
        params=req["params"],
        headers={k: v.encode("latin-1") for k, v in req["headers"].items()},
        content=req["body"],
    )
    response.read()
    seen["requests"] += 1
    seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
    assert 100 <= response.status_code < 600
    if response.status_code == 500:
        # Only a backend's own 500 may come back as one (Ollama answers 500 for a failed
        # load; harbord keeps its status): never harbord's own internal error.
        assert "internal error in harbord" not in response.text
        assert response.text.startswith(('{"error":"gpu: ', '{"error":"cpu: ')), (
            req,
            response.text,
        )
        seen["500 relayed from a backend"] = seen.get("500 relayed from a backend", 0) + 1
    passed_through = response.headers.get("Content-Type", "").startswith("text/plain")
    if passed_through and response.status_code == 404:
        # A path harbord does not know goes to a backend, whose own 404 (Gin's text) comes
        # back as it is; never for harbord's own namespace.
        assert response.text == "404 page not found" or req["method"] == "HEAD", response.text
        assert response.headers["X-Harbor-Backend"] in ("gpu", "cpu"), (req, response.headers)
        assert not req["path"].startswith("/harbor/") and req["path"] not in ("/harbor", "/metrics")
        seen["404 passed through"] = seen.get("404 passed through", 0) + 1
    elif response.status_code >= 400 and req["method"] != "HEAD":
        assert response.headers.get("Content-Type", "").startswith("application/json"), (
            req,
            response.headers,
            response.text[:300],
        )
        error = response.json()["error"]
        assert isinstance(error, str | dict) and error, (req, response.text[:300])
    assert daemon.proc is not None and daemon.proc.poll() is None, "harbord died"
