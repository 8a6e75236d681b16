"""OpenAI compatibility: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

from .generation import Generation, Plan
from .models import ModelInfo, embed_vector
from .plumbing import Ctx, Reply
from .wire import (
    SSE,
    _dumpb,
    _encode,
    _v1_text,
    _words,
)


class OpenAIAPI(Generation):
    """Ollama's OpenAI-compatible endpoints."""

    # ---- OpenAI compatibility ---------------------------------------------------------

    def _v1_model_obj(self, info: ModelInfo) -> dict[str, Any]:
        name = info.name
        owner = name.split("/", 1)[0] if "/" in name.split(":", 1)[0] else "library"
        return {
            "id": name,
            "object": "model",
            "created": int(self.started - 86400),
            "owned_by": owner,
        }

    async def _v1_models(self, request: web.Request) -> web.StreamResponse:
        data = [self._v1_model_obj(m) for m in self._visible_models()]
        return self._json({"object": "list", "data": data or None})

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        info = self.lookup(model)
        if info is None:
            body = {
                "error": {
                    "message": f"model '{model}' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            }
            return self._json(body, 404)
        obj = self._v1_model_obj(info)
        obj["id"] = model
        return self._json(obj)

    @staticmethod
    def _v1_usage(plan: Plan) -> dict[str, int]:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.eval_count,
            "total_tokens": plan.prompt_tokens + plan.eval_count,
        }

    @staticmethod
    def _v1_error_chunk(text: str) -> bytes:
        err = {"error": {"message": text, "type": "api_error", "param": None, "code": None}}
        return b"data: " + _dumpb(err) + b"\n\n"

    @staticmethod
    def _v1_tool_calls(plan: Plan) -> list[dict[str, Any]]:
        return [
            {
                "id": tc["id"],
                "index": tc["function"]["index"],
                "type": "function",
                "function": {
                    "name": tc["function"]["name"],
                    "arguments": json.dumps(
                        tc["function"]["arguments"], separators=(",", ":"), sort_keys=True
                    ),
                },
            }
            for tc in plan.tool_calls or []
        ]

    def _v1_finish(self, plan: Plan) -> str:
        return "tool_calls" if plan.tool_calls else plan.done_reason

    async def _v1_chat(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        messages = body.get("messages") or []
        load_ns = await self._load(ctx, info, model, body, None)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        rf = body.get("response_format")
        fmt: Any = None
        if isinstance(rf, Mapping):
            if rf.get("type") == "json_object":
                fmt = "json"
            elif rf.get("type") == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, Mapping) else None
                fmt = schema if isinstance(schema, Mapping) else "json"
        reasoning = body.get("reasoning")
        think = body.get("reasoning_effort")
        if think is None and isinstance(reasoning, Mapping):
            think = reasoning.get("effort")
        last = messages[-1] if messages and isinstance(messages[-1], Mapping) else {}
        plan = self._plan(
            model=model,
            body=body,
            num_predict=max_tokens,
            think=think,
            fmt=fmt,
            tools=body.get("tools"),
            last_role=last.get("role") if isinstance(last.get("role"), str) else None,
            prompt_tokens=max(
                1,
                sum(
                    len(_v1_text(m.get("content")).split())
                    for m in messages
                    if isinstance(m, Mapping)
                ),
            ),
            t0=t0,
            load_ns=load_ns,
        )
        cid = f"chatcmpl-{secrets.randbelow(1000)}"
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": plan.text}
                if plan.thinking is not None:
                    message["reasoning"] = plan.thinking
                if plan.tool_calls:
                    message["tool_calls"] = self._v1_tool_calls(plan)
                return {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": self._v1_finish(plan)}
                    ],
                    "usage": self._v1_usage(plan),
                }

            return await self._whole(ctx, plan, build)
        so = body.get("stream_options")
        include_usage = isinstance(so, Mapping) and bool(so.get("include_usage"))
        head = b'data: {"id":"' + cid.encode() + b'","object":"chat.completion.chunk","created":'
        model_b = (
            b',"model":'
            + _dumpb(model)
            + b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":'
        )

        def chunks() -> Iterator[bytes]:
            if plan.thinking is not None:
                delta: dict[str, Any] = {
                    "role": "assistant",
                    "content": "",
                    "reasoning": plan.thinking,
                }
                yield (
                    head
                    + str(int(time.time())).encode()
                    + model_b
                    + _dumpb(delta)
                    + b',"finish_reason":null}]}\n\n'
                )
            mid = b'{"role":"assistant","content":'
            end = b'},"finish_reason":null}]}\n\n'
            for pj in plan.piece_json:
                yield head + str(int(time.time())).encode() + model_b + mid + pj + end
            if plan.tool_calls is not None:
                delta = {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": self._v1_tool_calls(plan),
                }
                yield (
                    head
                    + str(int(time.time())).encode()
                    + model_b
                    + _dumpb(delta)
                    + b',"finish_reason":null}]}\n\n'
                )

        def final() -> bytes:
            now = str(int(time.time())).encode()
            last_chunk = (
                head
                + now
                + model_b
                + b'{"role":"assistant","content":""},"finish_reason":'
                + _dumpb(self._v1_finish(plan))
                + b"}]}\n\n"
            )
            if include_usage:
                usage: dict[str, Any] = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": self._v1_usage(plan),
                }
                last_chunk += b"data: " + _dumpb(usage) + b"\n\n"
            return last_chunk + b"data: [DONE]\n\n"

        return await self._stream(ctx, plan, SSE, chunks(), final, self._v1_error_chunk)

    async def _v1_completions(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support generate'))
        load_ns = await self._load(ctx, info, model, body, None)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        plan = self._plan(
            model=model,
            body=body,
            num_predict=body.get("max_tokens"),
            think=None,
            fmt=None,
            tools=None,
            last_role=None,
            prompt_tokens=max(1, _words(prompt)),
            t0=t0,
            load_ns=load_ns,
        )
        cid = f"cmpl-{secrets.randbelow(1000)}"
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": plan.text, "index": 0, "finish_reason": plan.done_reason}],
                    "usage": self._v1_usage(plan),
                }

            return await self._whole(ctx, plan, build)
        so = body.get("stream_options")
        include_usage = isinstance(so, Mapping) and bool(so.get("include_usage"))
        head = b'data: {"id":"' + cid.encode() + b'","object":"text_completion","created":'
        tail = b',"model":' + _dumpb(model) + b',"system_fingerprint":"fp_ollama"}\n\n'

        def chunks() -> Iterator[bytes]:
            for pj in plan.piece_json:
                yield (
                    head
                    + str(int(time.time())).encode()
                    + b',"choices":[{"text":'
                    + pj
                    + b',"index":0,"finish_reason":null}]'
                    + tail
                )

        def final() -> bytes:
            out = (
                head
                + str(int(time.time())).encode()
                + b',"choices":[{"text":"","index":0,"finish_reason":'
                + _dumpb(plan.done_reason)
                + b"}]"
                + tail
            )
            if include_usage:
                usage: dict[str, Any] = {
                    "id": cid,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "choices": [],
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "usage": self._v1_usage(plan),
                }
                out += b"data: " + _dumpb(usage) + b"\n\n"
            return out + b"data: [DONE]\n\n"

        return await self._stream(ctx, plan, SSE, chunks(), final, self._v1_error_chunk)

    async def _v1_embeddings(self, ctx: Ctx) -> web.StreamResponse:
        body = await self._body(ctx)
        model = body.get("model") or ""
        await self._embed_common(ctx, body, model)
        raw = body.get("input")
        if isinstance(raw, str) and raw:
            inputs = [raw]
        elif isinstance(raw, list) and raw:
            inputs = [x if isinstance(x, str) else _encode(x) for x in raw]
        else:
            raise Reply(self._err(ctx, 400, "invalid input"))
        dim = self._dims(body.get("dimensions"))
        b64 = str(body.get("encoding_format", "")).lower() == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = embed_vector(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = sum(max(1, _words(t)) for t in inputs)
        ctx.rec.chunks_sent = 1
        return self._json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
