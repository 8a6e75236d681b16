"""The endpoint table (harbord.harbor_endpoints) against its three users: the routes
harbor_api registers, the handlers behind them, and both clients' methods."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
import respx
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from harbord import harbor_api
from harbord import harbor_endpoints as api
from harbord.client import AsyncHarborClient, HarborClient, HarborError
from harbord.harbor import HARBOR, Harbor
from harbord.harbor_endpoints import Endpoint
from harbord.schemas import (
    Affinity,
    CheckEntry,
    Counters,
    Decision,
    Inventory,
    Pin,
    Plan,
    PlanStep,
    Status,
)
from harbord.server import problems

PLAN = Plan(model="m:1", intent="fast", intent_source="default", steps=[PlanStep("gpu", ["up"])])
DECISION = Decision(
    id="ab/1", time=1.0, method="POST", path="/api/chat", model="m:1", intent="fast", plan=PLAN
)
STATUS = Status(
    version="0.1", pid=1, started_at=0.0, uptime_s=1.0, socket="/s", backends=[], pins={},
    affinity={}, counters=Counters(), in_flight=0,
)  # fmt: skip
PIN = Pin(backend="cpu", reason="r", since=1.0)
AFFINITY = Affinity(backend="gpu", since=1.0, last_served=2.0)

# Each endpoint: the client method that calls it, its arguments, the parameters that
# method must send, and an answer of the endpoint's type.
CLIENT_CALLS: dict[Endpoint[Any, Any], tuple[str, tuple[Any, ...], dict[str, Any], Any]] = {
    api.METRICS: ("metrics", (), {}, "# HELP x\n"),
    api.STATUS: ("status", (), {}, STATUS),
    api.CHECK: ("check", (), {}, {"gpu": CheckEntry("healthy", "0.1", "u", True)}),
    api.MODELS: ("models", (), {}, Inventory({"gpu": ["m:1"]}, {"m:1": ["gpu"]})),
    api.PINS: ("pins", (), {}, {"m:1": PIN}),
    api.PIN: ("pin", ("hf.co/o/m:1", "cpu"), {"model": "hf.co/o/m:1"}, {"hf.co/o/m:1": PIN}),
    api.UNPIN: ("unpin", ("m:1",), {"model": "m:1"}, api.Unpinned("m:1")),
    api.ROUTE: (
        "route",
        ("m:1", "heavy", 65536),
        {"model": "m:1", "intent": "heavy", "num_ctx": 65536},
        PLAN,
    ),
    api.AFFINITY: ("affinity", (), {}, {"m:1": AFFINITY}),
    api.RESET_AFFINITY: ("reset_affinity", (), {}, api.AffinityReset(["m:1", "n:2"])),
    api.RESET_MODEL_AFFINITY: (
        "reset_affinity",
        ("hf.co/o/m:1",),
        {"model": "hf.co/o/m:1"},
        api.AffinityReset(["hf.co/o/m:1"]),
    ),
    api.DECISIONS: ("decisions", (5,), {"limit": 5}, [DECISION]),
    api.DECISION: ("decision", ("ab/1",), {"id": "ab/1"}, DECISION),
    api.RESTART: ("restart", ("gpu",), {"name": "gpu"}, api.Restarted("gpu", True, "done")),
}


def registered_routes() -> set[tuple[str, str]]:
    app = web.Application()
    harbor_api.add_routes(app.router)
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"  # aiohttp adds HEAD to each GET
    }


def test_the_app_registers_exactly_the_tables_routes() -> None:
    assert registered_routes() == {(e.method, e.template) for e in api.ENDPOINTS}
    assert len({(e.method, e.template) for e in api.ENDPOINTS}) == len(api.ENDPOINTS)


def test_every_entry_has_one_handler_and_every_handler_an_entry() -> None:
    assert set(harbor_api.HANDLERS) == set(api.ENDPOINTS)
    assert len({e.name for e in api.ENDPOINTS}) == len(api.ENDPOINTS)


def test_every_entry_has_a_client_method_and_both_clients_have_the_same_ones() -> None:
    assert set(CLIENT_CALLS) == set(api.ENDPOINTS)
    for name, *_ in CLIENT_CALLS.values():
        assert inspect.iscoroutinefunction(getattr(AsyncHarborClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(HarborClient, name)), name
    sync = {n for n in dir(HarborClient) if not n.startswith("_")}
    async_ = {n for n in dir(AsyncHarborClient) if not n.startswith("_")}
    assert sync - {"close"} == async_ - {"aclose"}


def test_target_fills_and_quotes_path_parameters_and_drops_unset_query() -> None:
    assert api.PIN.target({"model": "hf.co/o/m:Q4"}) == ("/harbor/pins/hf.co%2Fo%2Fm%3AQ4", {})
    assert api.ROUTE.target({"model": "m", "intent": None}) == ("/harbor/route", {"model": "m"})
    assert api.ROUTE.target({"model": "m", "num_ctx": 8192}) == (
        "/harbor/route", {"model": "m", "num_ctx": "8192"},
    )  # fmt: skip
    assert api.RESET_MODEL_AFFINITY.template == "/harbor/affinity/{model}"
    assert api.DECISIONS.target({"limit": 3}) == ("/harbor/decisions", {"limit": "3"})
    assert api.PIN.template == "/harbor/pins/{model}"
    assert api.RESTART.path_params == ("name",)
    with pytest.raises(TypeError, match="takes no parameter"):
        api.STATUS.target({"model": "m"})
    with pytest.raises(TypeError, match="needs the path parameter model"):
        api.UNPIN.target({})


def test_answers_round_trip_through_the_wire_format() -> None:
    for endpoint, (*_, answer) in CLIENT_CALLS.items():
        raw = endpoint.encode_answer(answer)
        assert endpoint.decode_answer(raw) == answer, endpoint.name
    assert api.METRICS.encode_answer("x 1\n") == b"x 1\n"  # text, not a JSON string


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[respx.MockRouter]:
    monkeypatch.setenv("HARBOR_SOCKET", str(tmp_path / "harbor.sock"))
    with respx.mock(base_url="http://harbor", assert_all_called=True) as router:
        yield router


async def test_each_client_method_sends_its_entrys_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HARBOR_SOCKET", str(tmp_path / "harbor.sock"))
    for endpoint, (name, args, params, answer) in CLIENT_CALLS.items():
        path, query = endpoint.target(params)
        with respx.mock(base_url="http://harbor") as mocked:
            route = mocked.route(method=endpoint.method).respond(
                200, content=endpoint.encode_answer(answer)
            )
            with HarborClient() as sync:
                assert getattr(sync, name)(*args) is not None
            async with AsyncHarborClient() as harbor:
                assert await getattr(harbor, name)(*args) is not None
        assert route.call_count == 2, name
        for call in route.calls:
            assert call.request.url.raw_path.split(b"?")[0] == path.encode(), name
            assert dict(call.request.url.params) == query, name


def test_a_missing_or_extra_body_is_the_callers_mistake(mocked: respx.MockRouter) -> None:
    with HarborClient() as harbor:
        with pytest.raises(TypeError, match="pin needs a body"):
            harbor.call(api.PIN, model="m")
        with pytest.raises(TypeError, match="status takes no body"):
            harbor.call(api.STATUS, api.Unpinned("m"))  # type: ignore[arg-type]


# --- the real handlers, behind a real socket, with a stand-in for the Harbor ----------


class FakeState(SimpleNamespace):
    """The StateStore's side of the handlers: pins and affinity."""

    def __init__(self) -> None:
        super().__init__(pins={}, affinity={"m:1": AFFINITY, "n:2": AFFINITY})

    def active_affinity(self) -> dict[str, Affinity]:
        return dict(self.affinity)

    def reset_affinity(self, model: str | None = None) -> list[str]:
        models = list(self.affinity) if model is None else [model]
        return [m for m in models if self.affinity.pop(m, None) is not None]

    def pin(self, model: str, backend: str, reason: str, for_seconds: float | None,
            source: str) -> Pin:  # fmt: skip
        self.pins[model] = Pin(backend=backend, reason=reason, since=time.time())
        return cast(Pin, self.pins[model])

    def unpin(self, model: str) -> bool:
        return self.pins.pop(model, None) is not None


class FakeHarbor(SimpleNamespace):
    def __init__(self) -> None:
        registry = CollectorRegistry()
        Gauge("harbor_test_value", "a value", registry=registry).set(3)
        super().__init__(
            backends={"gpu": SimpleNamespace(models=["m:1"]), "cpu": SimpleNamespace(models=[])},
            ledger=SimpleNamespace(decisions={DECISION.id: DECISION}),
            state=FakeState(),
            registry=registry,
            restart_backend=None,
            planned=[],
        )
        self.scheduler = SimpleNamespace(preview=self.preview)

    def preview(self, request: Any) -> Plan:
        self.planned.append(request)
        return PLAN


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[AsyncHarborClient]:
    app = web.Application(middlewares=[problems])  # renders the handlers' Problems
    app[HARBOR] = cast(Harbor, FakeHarbor())
    harbor_api.add_routes(app.router)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = tmp_path / "h.sock"
    await web.UnixSite(runner, str(socket)).start()
    try:
        async with AsyncHarborClient(socket, timeout=10) as client:
            yield client
    finally:
        await runner.cleanup()


async def test_client_and_handlers_agree_through_the_table(served: AsyncHarborClient) -> None:
    assert (await served.models()).models == {"m:1": ["gpu"]}
    assert (await served.pin("m:1", "cpu", reason="why"))["m:1"].reason == "why"
    assert list(await served.pins()) == ["m:1"]
    assert await served.unpin("m:1") == "m:1"
    assert await served.decisions(limit=5) == [DECISION]
    assert await served.decision("ab/1") == DECISION  # the '/' goes quoted
    assert "harbor_test_value 3.0" in await served.metrics()
    reply = await served.fetch(api.MODELS)
    assert msgspec.json.decode(reply.raw) == msgspec.to_builtins(reply.value)


async def test_affinity_is_listed_and_reset_through_the_table(served: AsyncHarborClient) -> None:
    assert await served.affinity() == {"m:1": AFFINITY, "n:2": AFFINITY}
    assert await served.reset_affinity("m:1") == ["m:1"]
    assert list(await served.affinity()) == ["n:2"]
    assert await served.reset_affinity() == ["n:2"]
    assert await served.affinity() == {}
    assert await served.reset_affinity() == []  # nothing to forget is no error


async def test_route_passes_num_ctx_to_the_plan(tmp_path: Path) -> None:
    harbor = FakeHarbor()
    app = web.Application()
    app[HARBOR] = cast(Harbor, harbor)
    harbor_api.add_routes(app.router)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "h.sock")).start()
    try:
        async with AsyncHarborClient(tmp_path / "h.sock", timeout=10) as client:
            assert await client.route("m:1", "heavy", num_ctx=65536) == PLAN
            await client.route("m:1")
    finally:
        await runner.cleanup()
    assert [(r.model, r.intent_header, r.num_ctx) for r in harbor.planned] == [
        ("m:1", "heavy", 65536),
        ("m:1", None, None),
    ]


@pytest.mark.parametrize(
    ("endpoint", "body", "params", "status", "message"),
    [
        (api.PIN, b"{", {"model": "m:1"}, 400, "invalid pin request: "),
        (api.PIN, b'{"backend": "tpu"}', {"model": "m:1"}, 400, "unknown backend 'tpu'"),
        (api.PIN, b'{"backend": "cpu"}', {"model": "$(id)"}, 400, "invalid model name"),
        (api.UNPIN, None, {"model": "m:1"}, 404, "m:1 is not pinned"),
        (api.DECISIONS, None, {"limit": "many"}, 400, "limit must be an integer"),
        (api.DECISION, None, {"id": "zz"}, 404, "no recent request with id 'zz'"),
        (api.RESTART, None, {"name": "gpu"}, 501, "need systemd supervision"),
        (api.RESTART, None, {"name": "tpu"}, 404, "no backend named 'tpu'"),
        (api.RESET_MODEL_AFFINITY, None, {"model": "x:1"}, 404, "x:1 has no affinity"),
        (api.RESET_MODEL_AFFINITY, None, {"model": "$(id)"}, 400, "invalid model name"),
        (api.ROUTE, None, {"model": "m:1", "num_ctx": "lots"}, 400, "num_ctx must be"),
        (api.ROUTE, None, {"model": "m:1", "num_ctx": "0"}, 400, "num_ctx must be"),
    ],
)
async def test_refusals_keep_their_status_and_text(
    served: AsyncHarborClient,
    endpoint: Endpoint[Any, Any],
    body: bytes | None,
    params: dict[str, str],
    status: int,
    message: str,
) -> None:
    path, query = endpoint.target(params)
    with pytest.raises(HarborError) as caught:
        await served.request(endpoint.method, path, params=query, content=body)
    assert caught.value.status == status
    assert message in caught.value.message


# An endpoint that is not in the table: what adding one takes, and what its handler sees.
ECHO: Endpoint[None, dict[str, str]] = Endpoint(
    "echo", "GET", "/harbor/echo/{word}", dict[str, str], query=("a",)
)


async def echo(call: harbor_api.Call[None]) -> dict[str, str]:
    return {**call.path, **call.query}


async def test_a_new_entry_and_its_handler_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "ENDPOINTS", (*api.ENDPOINTS, ECHO))
    monkeypatch.setitem(harbor_api.HANDLERS, ECHO, echo)
    app = web.Application()
    app[HARBOR] = cast(Harbor, FakeHarbor())
    harbor_api.add_routes(app.router)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "h.sock")).start()
    try:
        async with AsyncHarborClient(tmp_path / "h.sock", timeout=10) as client:
            # Only the query parameters the entry names reach the handler.
            sent = await client.request("GET", "/harbor/echo/hi", params={"a": "1", "b": "2"})
            assert msgspec.json.decode(sent.content) == {"word": "hi", "a": "1"}
            assert await client.call(ECHO, word="a b", a=None) == {"word": "a b"}
    finally:
        await runner.cleanup()
