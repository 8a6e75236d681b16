"""harbord's own endpoints (/harbor/* and /metrics) as one typed table.

Each entry says the method, the path template, the query parameters, the body's type
and the answer's type, and carries the wire format both sides use: harbor_api
registers a route per entry and encodes what its handler returns with it; the client
library (harbord.client) builds its requests from it and decodes the answers;
harborctl goes through the client.

Adding an endpoint: an entry here (and in ENDPOINTS), a handler in harbor_api marked
`@handles(ENTRY)`, and a method on HarborClient and AsyncHarborClient that calls it.
tests/test_harbor_endpoints.py checks that the three agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import quote

import msgspec

from harbord.schemas import (
    Affinity,
    CheckEntry,
    Decision,
    Inventory,
    Pin,
    PinRequest,
    Plan,
    Status,
)

Body = TypeVar("Body")
Answer = TypeVar("Answer")
Method = Literal["GET", "PUT", "POST", "DELETE"]
# A path or query parameter as a caller gives it; None leaves a query parameter out.
Param = str | int | float | None
JSON = "application/json"
# aiohttp's path parameters: {name}, or {name:regex} for one that may hold a '/'.
_PATH_PARAM = re.compile(r"\{(\w+)(?::[^{}]*)?\}")

try:  # the daemon serves the text format of the prometheus_client it renders with
    from prometheus_client import CONTENT_TYPE_LATEST as METRICS_TYPE
except ImportError:  # harborctl alone (a package build making completions) needs none
    METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Unpinned(msgspec.Struct):
    unpinned: str  # the model name, normalised


class AffinityReset(msgspec.Struct):
    reset: list[str]  # the models whose affinity was forgotten, normalised


class Restarted(msgspec.Struct):
    backend: str
    restarted: bool
    message: str = "restarted"


@dataclass(frozen=True)
class Endpoint(Generic[Body, Answer]):
    """One endpoint. `Body` is None for one that takes no body. An answer of type `str`
    goes as text with `content_type`; anything else as JSON."""

    name: str  # also in the 400 for an undecodable body: "invalid pin request: ..."
    method: Method
    path: str  # aiohttp's template, e.g. "/harbor/pins/{model:.+}"
    answer: type[Answer]
    body: type[Body] | None = None
    query: tuple[str, ...] = ()  # the query parameters the handler reads
    content_type: str = JSON

    @property
    def template(self) -> str:
        """The path as aiohttp's canonical form shows it: "/harbor/pins/{model}"."""
        return _PATH_PARAM.sub(r"{\1}", self.path)

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(_PATH_PARAM.findall(self.path))

    def target(self, params: Mapping[str, Param]) -> tuple[str, dict[str, str]]:
        """The path with its parameters filled in, each quoted as one segment (':', '/'
        and '%' escaped), and the query. TypeError for a parameter it does not take or a
        missing path parameter: a caller's mistake, not harbord's."""
        unknown = set(params) - set(self.path_params) - set(self.query)
        if unknown:
            raise TypeError(f"{self.name} takes no parameter {', '.join(sorted(unknown))}")

        def fill(match: re.Match[str]) -> str:
            value = params.get(match[1])
            if value is None:
                raise TypeError(f"{self.name} needs the path parameter {match[1]}")
            return quote(str(value), safe="")

        path = _PATH_PARAM.sub(fill, self.path)
        query = {k: str(params[k]) for k in self.query if params.get(k) is not None}
        return path, query

    # --- the wire format, the same on both sides ---------------------------------------

    @cached_property
    def _answer_decoder(self) -> msgspec.json.Decoder[Answer]:
        return msgspec.json.Decoder(self.answer)

    @cached_property
    def _body_decoder(self) -> msgspec.json.Decoder[Body] | None:
        return None if self.body is None else msgspec.json.Decoder(self.body)

    @property
    def is_text(self) -> bool:
        return self.answer is str and self.content_type != JSON

    def encode_answer(self, value: Answer) -> bytes:
        if self.is_text:
            return cast(str, value).encode()
        return msgspec.json.encode(value)

    def decode_answer(self, raw: bytes) -> Answer:
        """msgspec.DecodeError (ValidationError is one) when it does not fit the type."""
        if self.is_text:
            return msgspec.convert(raw.decode(errors="replace"), self.answer)
        return self._answer_decoder.decode(raw)

    def encode_body(self, body: Body) -> bytes:
        return msgspec.json.encode(body)

    def decode_body(self, raw: bytes) -> Body:
        """None for an endpoint without a body; schemas.UNDECODABLE when it does not fit."""
        if self._body_decoder is None:
            return cast(Body, None)
        return self._body_decoder.decode(raw)


METRICS: Endpoint[None, str] = Endpoint(
    "metrics", "GET", "/metrics", str, content_type=METRICS_TYPE
)
STATUS: Endpoint[None, Status] = Endpoint("status", "GET", "/harbor/status", Status)
# Per-backend health in the seed's shape.
CHECK: Endpoint[None, dict[str, CheckEntry]] = Endpoint(
    "check", "GET", "/harbor/check", dict[str, CheckEntry]
)
MODELS: Endpoint[None, Inventory] = Endpoint("models", "GET", "/harbor/models", Inventory)
# The active pins, by model.
PINS: Endpoint[None, dict[str, Pin]] = Endpoint("pins", "GET", "/harbor/pins", dict[str, Pin])
# Answers {normalised model name: the pin}.
PIN: Endpoint[PinRequest, dict[str, Pin]] = Endpoint(
    "pin", "PUT", "/harbor/pins/{model:.+}", dict[str, Pin], body=PinRequest
)
UNPIN: Endpoint[None, Unpinned] = Endpoint("unpin", "DELETE", "/harbor/pins/{model:.+}", Unpinned)
# The dry-run routing decision for a request with this model, intent and options.num_ctx.
ROUTE: Endpoint[None, Plan] = Endpoint(
    "route", "GET", "/harbor/route", Plan, query=("model", "intent", "num_ctx")
)
# Where each model last ran (affinity), by model; expired entries left out.
AFFINITY: Endpoint[None, dict[str, Affinity]] = Endpoint(
    "affinity", "GET", "/harbor/affinity", dict[str, Affinity]
)
RESET_AFFINITY: Endpoint[None, AffinityReset] = Endpoint(
    "reset affinity", "DELETE", "/harbor/affinity", AffinityReset
)
RESET_MODEL_AFFINITY: Endpoint[None, AffinityReset] = Endpoint(
    "reset model affinity", "DELETE", "/harbor/affinity/{model:.+}", AffinityReset
)
# The recent routing decisions, newest first; limit defaults to 20.
DECISIONS: Endpoint[None, list[Decision]] = Endpoint(
    "decisions", "GET", "/harbor/decisions", list[Decision], query=("limit",)
)
DECISION: Endpoint[None, Decision] = Endpoint("decision", "GET", "/harbor/decisions/{id}", Decision)
RESTART: Endpoint[None, Restarted] = Endpoint(
    "restart", "POST", "/harbor/backends/{name}/restart", Restarted
)

ENDPOINTS: tuple[Endpoint[Any, Any], ...] = (
    METRICS,
    STATUS,
    CHECK,
    MODELS,
    PINS,
    PIN,
    UNPIN,
    ROUTE,
    AFFINITY,
    RESET_AFFINITY,
    RESET_MODEL_AFFINITY,
    DECISIONS,
    DECISION,
    RESTART,
)
