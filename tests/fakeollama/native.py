"""Ollama's native API: chat, generate, embed, embeddings, show, tags, ps, version."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

from .generation import Generation, Plan
from .models import ModelInfo, embed_vector
from .plumbing import Ctx, Reply
from .wire import (
    NDJSON,
    _dumpb,
    _iso_at,
    _now_iso,
    _words,
)


class NativeAPI(Generation):
    """Ollama's own endpoints for generation, embeddings and listing."""

    # ---- native chat / generate -------------------------------------------------------

    def _native_error_chunk(self, text: str) -> bytes:
        return _dumpb({"error": text}) + b"\n"

    def _chat_chunks(self, plan: Plan) -> Iterator[bytes]:
        pre = b'{"model":' + _dumpb(plan.model) + b',"created_at":"'
        if plan.thinking is not None:
            yield (
                pre
                + _now_iso().encode()
                + b'","message":{"role":"assistant","content":"","thinking":'
                + _dumpb(plan.thinking)
                + b'},"done":false}\n'
            )
        mid = b'","message":{"role":"assistant","content":'
        end = b'},"done":false}\n'
        for pj in plan.piece_json:
            yield pre + _now_iso().encode() + mid + pj + end
        if plan.tool_calls is not None:
            msg = {"role": "assistant", "content": "", "tool_calls": plan.tool_calls}
            yield pre + _now_iso().encode() + b'","message":' + _dumpb(msg) + b',"done":false}\n'

    def _chat_final(self, plan: Plan, whole: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": plan.text if whole else ""}
        if whole and plan.thinking is not None:
            message["thinking"] = plan.thinking
        if whole and plan.tool_calls is not None:
            message["tool_calls"] = plan.tool_calls
        out: dict[str, Any] = {
            "model": plan.model,
            "created_at": _now_iso(),
            "message": message,
            "done": True,
            "done_reason": plan.done_reason,
        }
        out.update(plan.stats())
        return out

    def _generate_chunks(self, plan: Plan) -> Iterator[bytes]:
        pre = b'{"model":' + _dumpb(plan.model) + b',"created_at":"'
        if plan.thinking is not None:
            yield (
                pre
                + _now_iso().encode()
                + b'","response":"","thinking":'
                + _dumpb(plan.thinking)
                + b',"done":false}\n'
            )
        mid = b'","response":'
        end = b',"done":false}\n'
        for pj in plan.piece_json:
            yield pre + _now_iso().encode() + mid + pj + end

    def _generate_final(self, plan: Plan, whole: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": plan.model,
            "created_at": _now_iso(),
            "response": plan.text if whole else "",
        }
        if whole and plan.thinking is not None:
            out["thinking"] = plan.thinking
        out["done"] = True
        out["done_reason"] = plan.done_reason
        out["context"] = [1, 2, 3]
        out.update(plan.stats())
        return out

    def _load_reply(
        self, ctx: Ctx, model: str, generate: bool, unload: bool, info: ModelInfo
    ) -> web.Response:
        if unload:
            self.unload(info.key)
        out: dict[str, Any] = {"model": model, "created_at": _now_iso()}
        if generate:
            out["response"] = ""
        else:
            out["message"] = {"role": "assistant", "content": ""}
        out["done"] = True
        out["done_reason"] = "unload" if unload else "load"
        ctx.rec.chunks_sent = 1
        return self._json(out)

    async def _chat(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        keep_alive = self._keep_alive(ctx, body)
        messages = body.get("messages") or []
        if not messages:
            if keep_alive == 0:
                return self._load_reply(ctx, model, False, True, info)
            await self._load(ctx, info, model, body, keep_alive)
            return self._load_reply(ctx, model, False, False, info)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        opts = body.get("options") or {}
        last = messages[-1] if isinstance(messages[-1], Mapping) else {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=opts.get("num_predict"),
            think=body.get("think"),
            fmt=body.get("format"),
            tools=body.get("tools"),
            last_role=last.get("role") if isinstance(last.get("role"), str) else None,
            prompt_tokens=max(
                1, sum(_words(m.get("content")) for m in messages if isinstance(m, Mapping))
            ),
            t0=t0,
            load_ns=load_ns,
        )
        if body.get("stream") is False:
            return await self._whole(ctx, plan, lambda: self._chat_final(plan, True))
        return await self._stream(
            ctx,
            plan,
            NDJSON,
            self._chat_chunks(plan),
            lambda: _dumpb(self._chat_final(plan, False)) + b"\n",
            self._native_error_chunk,
        )

    async def _generate(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support generate'))
        keep_alive = self._keep_alive(ctx, body)
        prompt = body.get("prompt") or ""
        if not prompt:
            if keep_alive == 0:
                return self._load_reply(ctx, model, True, True, info)
            await self._load(ctx, info, model, body, keep_alive)
            return self._load_reply(ctx, model, True, False, info)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        opts = body.get("options") or {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=opts.get("num_predict"),
            think=body.get("think"),
            fmt=body.get("format"),
            tools=None,
            last_role=None,
            prompt_tokens=max(1, _words(prompt) + _words(body.get("system"))),
            t0=t0,
            load_ns=load_ns,
        )
        if body.get("stream") is False:
            return await self._whole(ctx, plan, lambda: self._generate_final(plan, True))
        return await self._stream(
            ctx,
            plan,
            NDJSON,
            self._generate_chunks(plan),
            lambda: _dumpb(self._generate_final(plan, False)) + b"\n",
            self._native_error_chunk,
        )

    # ---- embeddings -------------------------------------------------------------------

    async def _embed(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        _, load_ns = await self._embed_common(ctx, body, model)
        raw = body.get("input")
        if raw is None or raw == "":
            inputs: list[str] = []
        elif isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        else:
            raise Reply(self._err(ctx, 400, "invalid input type"))
        dim = self._dims(body.get("dimensions"))
        out = {
            "model": model,
            "embeddings": [embed_vector(t, dim) for t in inputs],
            "total_duration": max(time.perf_counter_ns() - t0, 1),
            "load_duration": max(load_ns, 1),
            "prompt_eval_count": sum(max(1, _words(t)) for t in inputs),
        }
        ctx.rec.chunks_sent = 1
        return self._json(out)

    async def _embeddings(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or ""
        await self._embed_common(ctx, body, model)
        prompt = body.get("prompt") or ""
        ctx.rec.chunks_sent = 1
        return self._json({"embedding": embed_vector(prompt) if prompt else []})

    async def _show(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or body.get("name") or ""
        info = await self._gate(ctx, body, model)
        fam = info.family
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
        params = 'stop                           "<|eot_id|>"\ntemperature                    0.7'
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {info.name}\n\n"
            f"FROM {info.blob_path}\n"
            f'TEMPLATE """{template}"""\n'
            'PARAMETER stop "<|eot_id|>"\n'
            "PARAMETER temperature 0.7\n"
        )
        param_count = int(info.size / (2.0 if info.embedding else 0.6))
        out = {
            "license": "Fake license for tests.",
            "modelfile": modelfile,
            "parameters": params,
            "template": template,
            "details": info.details(),
            "model_info": {
                "general.architecture": fam,
                "general.basename": info.name.split(":", 1)[0],
                "general.file_type": 1 if info.embedding else 15,
                "general.parameter_count": param_count,
                "general.quantization_version": 2,
                f"{fam}.context_length": info.arch.context_length,
                f"{fam}.embedding_length": info.arch.embedding_length,
                f"{fam}.block_count": info.arch.block_count,
                f"{fam}.attention.head_count": info.arch.head_count,
                f"{fam}.attention.head_count_kv": info.arch.head_count_kv,
            },
            "tensors": [],
            "capabilities": info.capabilities,
            "modified_at": info.modified_at,
        }
        extra = self.show_info.get(info.key)
        if extra:
            general = {k: v for k, v in out["model_info"].items() if k.startswith("general.")}
            out["model_info"] = {**general, **extra}
        ctx.rec.chunks_sent = 1
        return self._json(out)

    # ---- listing ----------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return self._json({"version": self.version})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        return self._json({"models": [m.tag_entry() for m in self._visible_models()]})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        hidden = self.faults.missing_models
        out = []
        for ld in self.listed():
            key = ld.info.key
            if key in hidden or key not in self.models:
                continue
            info = ld.info
            out.append(
                {
                    "name": info.name,
                    "model": info.name,
                    "size": ld.size,
                    "digest": info.digest,
                    "details": info.details(),
                    "expires_at": _iso_at(ld.expires),
                    "size_vram": ld.size_vram,
                    "context_length": ld.context_length,
                }
            )
        return self._json({"models": out})
