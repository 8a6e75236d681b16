"""Model management: pull, push, create, copy, delete and blobs."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web

from .models import _key, _make_model, normalize_name
from .plumbing import Ctx, Reply
from .scheduler import Residency
from .wire import (
    DEFAULT_MODEL_SIZE,
    NDJSON,
    _dumpb,
)


class ManagementAPI(Residency):
    """Endpoints that change the model catalogue."""

    @staticmethod
    def _admin_model(ctx: Ctx, body: Mapping[str, Any]) -> str:
        model = str(body.get("model") or body.get("name") or "")
        ctx.rec.model = model
        return model

    async def _progress(
        self, ctx: Ctx, stream: bool, lines: Iterable[dict[str, Any]], on_done: Callable[[], None]
    ) -> web.StreamResponse:
        """Write progress objects one per line (or only the last one, non-streaming)."""
        delay = self._delay()
        if not stream:
            last: dict[str, Any] = {}
            for i, line in enumerate(lines):
                if "error" in line:
                    raise Reply(self._err(ctx, 500, str(line["error"])))
                if delay > 0.0 and i:
                    await asyncio.sleep(delay)
                last = line
            on_done()
            ctx.rec.chunks_sent = 1
            return self._json(last)
        resp = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        for sent, line in enumerate(lines, 1):
            if delay > 0.0 and sent > 1:
                await asyncio.sleep(delay)
            await resp.write(_dumpb(line) + b"\n")
            ctx.rec.chunks_sent = sent
            if "error" in line:
                ctx.rec.finish("failed", 200)
                return resp
        on_done()
        return resp

    async def _pull(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        f = self.faults
        total = f.pull_total
        existing = self.models.get(_key(model))
        digest = "sha256:" + hashlib.sha256(normalize_name(model).encode()).hexdigest()
        small = [
            ("sha256:" + hashlib.sha256(f"{model}/{n}".encode()).hexdigest(), size)
            for n, size in (("template", 1429), ("params", 96))
        ]
        pull_error = f.pull_error

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            if pull_error is not None:
                yield {"error": pull_error}
                return
            for step in range(5):
                yield {
                    "status": f"pulling {digest[7:19]}",
                    "digest": digest,
                    "total": total,
                    "completed": total * step // 4,
                }
            for d, size in small:
                yield {
                    "status": f"pulling {d[7:19]}",
                    "digest": d,
                    "total": size,
                    "completed": size,
                }
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        def done() -> None:
            size = existing.size if existing is not None else total + sum(s for _, s in small)
            arch = existing.arch if existing is not None else None
            info = _make_model(model, size, time.time(), arch)
            self.models[info.key] = info
            self.blobs.add(digest)
            if info.key in self.faults.missing_models:
                raw = dict(self.faults_raw)
                raw["missing_models"] = [
                    m for m in raw.get("missing_models", []) if _key(m) != info.key
                ]
                self.set_faults(raw)

        return await self._progress(ctx, body.get("stream") is not False, lines(), done)

    async def _push(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, f"model '{model}' not found"))
        digest = "sha256:" + info.digest
        total = info.size

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "retrieving manifest"}
            for step in range(5):
                yield {
                    "status": f"pushing {info.digest[:12]}",
                    "digest": digest,
                    "total": total,
                    "completed": total * step // 4,
                }
            yield {"status": "pushing manifest"}
            yield {"status": "success"}

        return await self._progress(ctx, body.get("stream") is not False, lines(), lambda: None)

    async def _create(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        src = body.get("from")
        base = self.lookup(src) if isinstance(src, str) and src else None
        size = base.size if base is not None else DEFAULT_MODEL_SIZE
        layer = "sha256:" + (
            base.digest if base is not None else hashlib.sha256(model.encode()).hexdigest()
        )

        def lines() -> Iterator[dict[str, Any]]:
            yield {"status": "gathering model components"}
            yield {"status": f"using existing layer {layer}"}
            if body.get("system") or body.get("template") or body.get("parameters"):
                yield {
                    "status": "creating new layer sha256:"
                    + hashlib.sha256(_dumpb(body)).hexdigest()
                }
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        def done() -> None:
            info = _make_model(model, size, time.time(), base.arch if base is not None else None)
            self.models[info.key] = info

        return await self._progress(ctx, body.get("stream") is not False, lines(), done)

    async def _copy(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        src = body.get("source")
        dst = body.get("destination")
        ctx.rec.model = src if isinstance(src, str) else None
        if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
            raise Reply(self._err(ctx, 400, "source and destination are required"))
        info = self.lookup(src)
        if info is None:
            raise Reply(self._err(ctx, 404, f'model "{src}" not found'))
        new = _make_model(dst, info.size, time.time(), info.arch)
        self.models[new.key] = new
        return web.Response(status=200)

    async def _delete(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = self._admin_model(ctx, body)
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        info = self.lookup(model)
        if info is None:
            raise Reply(self._err(ctx, 404, f"model '{model}' not found"))
        self.models.pop(info.key, None)
        self.unload(info.key)
        return web.Response(status=200)

    async def _blob_head(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def _blob_post(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = await request.read()
        if digest.startswith("sha256:"):
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if got != digest:
                return self._json(
                    {"error": f'digest mismatch, expected "{digest}", got "{got}"'}, 400
                )
        self.blobs.add(digest)
        return web.Response(status=201)
