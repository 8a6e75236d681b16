"""Anthropic compatibility: /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

from .generation import Generation, Plan
from .plumbing import Ctx, Reply
from .wire import (
    SSE,
    _dumpb,
    _encode,
    _mapping,
    _words,
)


class AnthropicAPI(Generation):
    """Ollama's Anthropic-compatible endpoints."""

    # ---- Anthropic Messages (/v1/messages) --------------------------------------------

    @staticmethod
    def _anthropic_tools(raw: Any) -> list[dict[str, Any]] | None:
        """Anthropic tool definitions in the native ``function`` form _plan reads."""
        if not isinstance(raw, list) or not raw:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "parameters": _mapping(t.get("input_schema")),
                },
            }
            for t in raw
            if isinstance(t, Mapping)
        ]

    @staticmethod
    def _anthropic_text(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(b.get("text", ""))
                for b in content
                if isinstance(b, Mapping) and b.get("type") == "text"
            )
        return ""

    @staticmethod
    def _stop_reason(plan: Plan) -> str:
        if plan.tool_calls:
            return "tool_use"
        return {"stop": "end_turn", "length": "max_tokens"}.get(plan.done_reason, "stop_sequence")

    def _anthropic_error_chunk(self, text: str) -> bytes:
        if self.silent_sse_errors:
            return b""
        err = {"type": "error", "error": {"type": "api_error", "message": text}}
        return b"event: error\ndata: " + _dumpb(err) + b"\n\n"

    async def _messages(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        ctx.rec.model = model
        max_tokens = body.get("max_tokens")
        messages = body.get("messages") or []
        # the middleware checks these before the chat handler sees the request
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise Reply(self._err(ctx, 400, "max_tokens is required and must be positive"))
        if not messages:
            raise Reply(self._err(ctx, 400, "messages is required"))
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        load_ns = await self._load(ctx, info, model, body, None)
        last = messages[-1] if isinstance(messages[-1], Mapping) else {}
        content = last.get("content")
        last_blocks: list[Any] = content if isinstance(content, list) else []
        answered = any(
            isinstance(b, Mapping) and b.get("type") == "tool_result" for b in last_blocks
        )
        thinking = _mapping(body.get("thinking"))
        system = self._anthropic_text(body.get("system"))
        plan = self._plan(
            model=model,
            body=body,
            num_predict=self._cap(max_tokens),
            think=thinking.get("type") == "enabled" or None,
            fmt=None,
            tools=self._anthropic_tools(body.get("tools")),
            last_role="tool" if answered else None,
            prompt_tokens=max(
                1,
                _words(system)
                + sum(
                    _words(self._anthropic_text(m.get("content")))
                    for m in messages
                    if isinstance(m, Mapping)
                ),
            ),
            t0=t0,
            load_ns=load_ns,
        )
        mid = "msg_" + secrets.token_hex(12)
        if not body.get("stream"):

            def build() -> dict[str, Any]:
                content: list[dict[str, Any]] = []
                if plan.thinking is not None:
                    content.append({"type": "thinking", "thinking": plan.thinking})
                if plan.text:
                    content.append({"type": "text", "text": plan.text})
                for tc in plan.tool_calls or []:
                    fn = tc["function"]
                    content.append(
                        {
                            "type": "tool_use",
                            "id": tc["id"],
                            "name": fn["name"],
                            "input": fn["arguments"],
                        }
                    )
                return {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": self._stop_reason(plan),
                    "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.eval_count},
                }

            return await self._whole(ctx, plan, build)
        index = [0]  # the current content block
        open_kind = [""]  # the open content block's kind, if any

        def sse(event: str, data: Any) -> bytes:
            return b"event: " + event.encode() + b"\ndata: " + _dumpb(data) + b"\n\n"

        def start() -> bytes:
            message: dict[str, Any] = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0},
            }
            return sse("message_start", {"type": "message_start", "message": message})

        def close_block() -> bytes:
            if not open_kind[0]:
                return b""
            out = sse("content_block_stop", {"type": "content_block_stop", "index": index[0]})
            index[0] += 1
            open_kind[0] = ""
            return out

        def open_block(kind: str, block: dict[str, Any]) -> bytes:
            out = b""
            if open_kind[0] != kind:
                out = close_block()
                out += sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index[0],
                        "content_block": block,
                    },
                )
                open_kind[0] = kind
            return out

        def chunks() -> Iterator[bytes]:
            head = start()
            if plan.thinking is not None:
                yield (
                    head
                    + open_block("thinking", {"type": "thinking", "thinking": ""})
                    + sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index[0],
                            "delta": {"type": "thinking_delta", "thinking": plan.thinking},
                        },
                    )
                )
                head = b""
            for pj in plan.piece_json:
                yield (
                    head
                    + open_block("text", {"type": "text", "text": ""})
                    + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                    + str(index[0]).encode()
                    + b',"delta":{"type":"text_delta","text":'
                    + pj
                    + b"}}\n\n"
                )
                head = b""
            for tc in plan.tool_calls or []:
                fn = tc["function"]
                block = {"type": "tool_use", "id": tc["id"], "name": fn["name"], "input": {}}
                delta = {"type": "input_json_delta", "partial_json": _encode(fn["arguments"])}
                out = head + close_block() + open_block("tool_use", block)
                out += sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index[0], "delta": delta},
                )
                yield out + close_block()
                head = b""

        def final() -> bytes:
            usage = {"input_tokens": plan.prompt_tokens, "output_tokens": plan.eval_count}
            return (
                (start() if plan.n_events == 0 else b"")
                + close_block()
                + sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": self._stop_reason(plan)},
                        "usage": usage,
                    },
                )
                + sse("message_stop", {"type": "message_stop"})
            )

        return await self._stream(ctx, plan, SSE, chunks(), final, self._anthropic_error_chunk)

    async def _count_tokens(self, ctx: Ctx) -> web.StreamResponse:
        """Ollama estimates, it does not tokenize: a quarter of the characters."""
        body = await self._body(ctx)
        model = body.get("model") or ""
        ctx.rec.model = model
        if not model:
            raise Reply(self._err(ctx, 400, "model is required"))
        chars = len(self._anthropic_text(body.get("system")))
        for m in body.get("messages") or []:
            if isinstance(m, Mapping):
                chars += len(str(m.get("role", ""))) + len(self._anthropic_text(m.get("content")))
        for t in body.get("tools") or []:
            if isinstance(t, Mapping):
                chars += len(str(t.get("name", ""))) + len(str(t.get("description", "")))
                chars += len(_encode(t.get("input_schema") or {}))
        tokens = chars // 4 or (1 if body.get("messages") or body.get("system") else 0)
        ctx.rec.chunks_sent = 1
        return self._json({"input_tokens": tokens})
