"""The request log, the reply exception, each request's context, and the shared request plumbing."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .faults import Faults
from .models import ModelInfo, _key, normalize_name
from .wire import (
    _ANTHROPIC_ERRORS,
    _ANTHROPIC_KINDS,
    _FIELD_TYPES,
    _GENERATION_KINDS,
    _GO_REQUEST_TYPES,
    JSON_CT,
    NDJSON,
    SSE,
    Handler,
    _dumpb,
    _go_type,
    _now_iso,
    go_json_error,
    parse_keep_alive,
)

if TYPE_CHECKING:
    from .scheduler import Loaded, PerModel, Scheduler, Tally


# --------------------------------------------------------------------------------------
# Request log


class Record:
    """One request on a model endpoint, as ``GET /_fake/requests`` shows it."""

    __slots__ = (
        "admitted_seq",
        "body",
        "chunks_sent",
        "finished",
        "finished_seq",
        "headers",
        "id",
        "method",
        "model",
        "path",
        "started",
        "state",
        "status",
    )

    def __init__(self, rid: int, request: web.Request) -> None:
        self.id = rid
        self.path = request.path
        self.method = request.method
        self.headers = dict(request.headers)
        self.body: Any = None
        self.model: str | None = None
        self.state = "running"
        self.status: int | None = None
        self.chunks_sent = 0
        self.started = time.time()
        self.finished: float | None = None
        # positions in the server's event order: when a slot was granted, when it ended
        self.admitted_seq: int | None = None
        self.finished_seq: int | None = None

    def finish(self, state: str, status: int | None) -> None:
        if self.state == "running":
            self.state = state
            self.status = status
            self.finished = time.time()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "method": self.method,
            "headers": self.headers,
            "body": self.body,
            "model": self.model,
            "state": self.state,
            "status": self.status,
            "chunks_sent": self.chunks_sent,
            "started": self.started,
            "finished": self.finished,
            "admitted_seq": self.admitted_seq,
            "finished_seq": self.finished_seq,
        }


class Reply(Exception):
    """Raised inside a handler to answer at once with ``response``."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class Ctx:
    __slots__ = ("kind", "rec", "request", "resp", "slot", "unload", "v1")

    def __init__(self, request: web.Request, rec: Record, kind: str) -> None:
        self.request = request
        self.rec = rec
        self.kind = kind
        self.v1 = kind.startswith("v1")
        self.resp: web.StreamResponse | None = None
        self.unload: str | None = None
        self.slot: str | None = None  # model key whose parallel slot this request holds


class Base:
    """State shared by the API families, and the request plumbing they all use."""

    name: str
    version: str
    vram: int | None
    cpu: bool
    tokens: int
    token_delay: float
    context_length: int
    started: float
    models: dict[str, ModelInfo]
    show_info: dict[str, dict[str, Any]]  # raw /api/show model_info per model (--show-info)
    sched: Scheduler
    ram: int | None
    load_time: PerModel
    prompt_delay: PerModel
    embed_time: PerModel
    tally: Tally
    silent_sse_errors: bool
    loaded: dict[str, Loaded]
    blobs: set[str]
    log: deque[Record]
    counts: dict[str, int]
    _next_id: int
    _hang_clear: asyncio.Event
    _hang_gen_clear: asyncio.Event
    faults: Faults
    faults_raw: dict[str, Any]
    _tok_text: list[str]
    _tok_json: list[bytes]
    _text_cache: dict[int, str]
    _name_b: bytes
    app: web.Application

    def set_faults(self, raw: Mapping[str, Any]) -> Faults:
        """Replace the fault set (raises ValueError if it does not parse)."""
        faults = Faults.parse(raw)
        self.faults = faults
        self.faults_raw = dict(raw)
        # wake every waiter so it re-checks the new fault set, then re-arm
        for flag, event in (
            (faults.hang, self._hang_clear),
            (faults.hang_generation, self._hang_gen_clear),
        ):
            event.set()
            if flag:
                event.clear()
        return faults

    def _finish(self, ctx: Ctx) -> None:
        """Release what the request held in the scheduler (Residency does it)."""
        raise NotImplementedError

    async def _wait_hang(self) -> None:
        while self.faults.hang:
            await self._hang_clear.wait()

    async def _wait_hang_generation(self, model: str) -> None:
        while self.faults.hang_generation and self.faults.applies(model):
            await self._hang_gen_clear.wait()

    # ---- response helpers -------------------------------------------------------------

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=_dumpb(obj), headers={"Content-Type": JSON_CT})

    def _err(self, ctx: Ctx | None, status: int, message: str) -> web.Response:
        if ctx is not None and ctx.kind in _ANTHROPIC_KINDS:
            etype = _ANTHROPIC_ERRORS.get(status, "api_error")
            body = {
                "type": "error",
                "error": {"type": etype, "message": message},
                "request_id": "req_" + secrets.token_hex(12),
            }
            return self._json(body, status)
        if ctx is not None and ctx.v1:
            etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
            return self._json(body, status)
        return self._json({"error": message}, status)

    def _wrap(self, kind: str, fn: Callable[[Ctx], Awaitable[web.StreamResponse]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            rec = Record(self._next_id, request)
            self._next_id += 1
            self.log.append(rec)
            ctx = Ctx(request, rec, kind)
            try:
                resp = await fn(ctx)
            except Reply as reply:
                resp = reply.response
                rec.finish(
                    "failed" if resp.status >= 400 or self._is_garbage() else "completed",
                    resp.status,
                )
            except asyncio.CancelledError:
                rec.finish("cancelled", 499)
                raise
            except ConnectionError:
                rec.finish("cancelled", 499)
                return ctx.resp if ctx.resp is not None else web.Response(status=499)
            except Exception:
                rec.finish("failed", 500)
                raise
            else:
                rec.finish("completed" if resp.status < 400 else "failed", resp.status)
            finally:
                self._finish(ctx)
                rec.finished_seq = self.sched.tick()
            return resp

        return handler

    def _is_garbage(self) -> bool:
        return self.faults.garbage is not None

    async def _body(self, ctx: Ctx) -> dict[str, Any]:
        """Read and decode the request body, answering 400 as Ollama does when it is bad.

        A hung server (faults ``hang``/``hang_generation``) stops here, after reading
        the request and before answering anything, bad requests included.
        """
        raw = await ctx.request.read()
        doc = raw.decode("utf-8", "replace").lstrip()
        body: Any = None
        error: str | None = None
        if not doc.strip():
            error = "EOF" if ctx.v1 or ctx.kind in _ANTHROPIC_KINDS else "missing request body"
        else:
            try:
                # Go's decoder reads one value and ignores what follows it
                body, _ = json.JSONDecoder().raw_decode(doc)
            except json.JSONDecodeError as exc:
                error = go_json_error(doc, exc)
        ctx.rec.body = body
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str):
            ctx.rec.model = model
        if self.faults.hang:
            await self._wait_hang()
        if ctx.kind in _GENERATION_KINDS:
            await self._wait_hang_generation(model if isinstance(model, str) else "")
        if error is not None:
            raise Reply(self._err(ctx, 400, error))
        if body is None:
            body = {}
        gotype = _GO_REQUEST_TYPES.get(ctx.kind, "api.Request")
        if not isinstance(body, dict):
            msg = f"json: cannot unmarshal {_go_type(body)} into Go value of type {gotype}"
            raise Reply(self._err(ctx, 400, msg))
        for fname, value in body.items():
            spec = _FIELD_TYPES.get(fname)
            if spec is None or value is None:
                continue
            types, goname = spec
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                struct_name = gotype.split(".", 1)[1]
                msg = (
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                    f"{struct_name}.{fname} of type {goname}"
                )
                raise Reply(self._err(ctx, 400, msg))
        return body

    def lookup(self, model: str) -> ModelInfo | None:
        key = _key(model)
        if key in self.faults.missing_models:
            return None
        return self.models.get(key)

    def _visible_models(self) -> list[ModelInfo]:
        hidden = self.faults.missing_models
        infos = [m for k, m in self.models.items() if k not in hidden]
        infos.sort(key=lambda m: (m.modified_at, m.name), reverse=True)
        return infos

    def _missing_text(self, ctx: Ctx, model: str) -> str:
        if ctx.kind == "embeddings":
            return f'model "{model}" not found, try pulling it first'
        if ctx.kind == "show":
            return f"model '{normalize_name(model)}' not found"
        return f"model '{model}' not found"

    async def _gate(self, ctx: Ctx, body: Mapping[str, Any], model: str) -> ModelInfo:
        """Hang, status/garbage faults, model presence: the common request prelude."""
        ctx.rec.model = model
        f = self.faults
        if f.applies(model):
            if f.status is not None:
                raise Reply(self._err(ctx, f.status[0], f.status[1]))
            if f.garbage is not None:
                raise Reply(await self._garbage(ctx, f.garbage, model))
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, self._missing_text(ctx, model)))
        return info

    def _keep_alive(self, ctx: Ctx, body: Mapping[str, Any]) -> float | None:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise Reply(self._err(ctx, 400, str(exc))) from None

    async def _garbage(self, ctx: Ctx, kind: str, model: str) -> web.StreamResponse:
        if kind == "nonjson":
            return web.Response(
                status=200, body=b"not json at all", headers={"Content-Type": JSON_CT}
            )
        if kind == "html":
            return web.Response(
                status=502,
                body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                headers={"Content-Type": "text/html"},
            )
        if kind == "error200":
            return self._json({"error": "something went wrong"})
        if kind == "wrong_ctype":
            obj = {
                "model": model,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": self._tok_text[0]},
                "done": True,
                "done_reason": "stop",
            }
            return web.Response(
                status=200, body=_dumpb(obj), headers={"Content-Type": "text/plain; charset=utf-8"}
            )
        # truncated: a 200 stream whose first line stops mid-object
        sse = ctx.v1 or ctx.kind in _ANTHROPIC_KINDS
        resp = web.StreamResponse(status=200, headers={"Content-Type": SSE if sse else NDJSON})
        resp.force_close()
        ctx.resp = resp
        await resp.prepare(ctx.request)
        if sse:
            partial = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choi'
        else:
            partial = (
                b'{"model":'
                + _dumpb(model)
                + b',"created_at":"'
                + _now_iso().encode()
                + b'","message":{"role":"assis'
            )
        await resp.write(partial)
        ctx.rec.chunks_sent = 1
        return resp


_LOGGED_PREFIXES: Final = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/show",
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
)


def _is_logged(path: str) -> bool:
    return path.startswith(_LOGGED_PREFIXES)
