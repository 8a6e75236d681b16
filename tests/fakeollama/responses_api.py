"""OpenAI Responses compatibility: /v1/responses."""

from __future__ import annotations

import json
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


class ResponsesAPI(Generation):
    """Ollama's OpenAI Responses endpoint."""

    # ---- OpenAI Responses (/v1/responses) ---------------------------------------------

    @staticmethod
    def _responses_input(raw: Any) -> tuple[int, str | None]:
        """(prompt words, the last item's role) of a Responses ``input``."""
        if isinstance(raw, str):
            return _words(raw), "user"
        words, role = 0, None
        for item in raw if isinstance(raw, list) else []:
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type") or ("message" if item.get("role") else "")
            if kind == "function_call_output":
                role = "tool"
                words += _words(item.get("output"))
            elif kind == "message":
                role = str(item.get("role") or "user")
                content = item.get("content")
                if isinstance(content, list):
                    words += sum(_words(p.get("text")) for p in content if isinstance(p, Mapping))
                else:
                    words += _words(content)
        return words, role

    def _response_obj(
        self, rid: str, model: str, body: Mapping[str, Any], status: str, output: list[Any]
    ) -> dict[str, Any]:
        instructions = body.get("instructions") or None
        text = _mapping(body.get("text"))
        reasoning = _mapping(body.get("reasoning"))
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": model,
            "previous_response_id": None,
            "instructions": instructions,
            "output": output,
            "error": None,
            "tools": body.get("tools") or [],
            "tool_choice": "auto",
            "truncation": body.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": _mapping(text.get("format")) or {"type": "text"}},
            "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
            if reasoning
            else None,
            "usage": None,
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": bool(body.get("background")),
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    @staticmethod
    def _responses_usage(plan: Plan) -> dict[str, Any]:
        return {
            "input_tokens": plan.prompt_tokens,
            "output_tokens": plan.eval_count,
            "total_tokens": plan.prompt_tokens + plan.eval_count,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    @staticmethod
    def _output_text(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    async def _responses(self, ctx: Ctx) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        body = await self._body(ctx)
        model = body.get("model") or ""
        info = await self._gate(ctx, body, model)
        if info.embedding:
            raise Reply(self._err(ctx, 400, f'"{model}" does not support chat'))
        reasoning = _mapping(body.get("reasoning"))
        effort = reasoning.get("effort")
        if effort not in (None, "", "none", "low", "medium", "high", "max"):
            msg = (
                f'invalid reasoning value: "{effort}" '
                '(must be "high", "medium", "low", "max", or "none")'
            )
            raise Reply(self._err(ctx, 400, msg))
        load_ns = await self._load(ctx, info, model, body, None)
        words, last_role = self._responses_input(body.get("input"))
        raw_tools = body.get("tools")
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "parameters": _mapping(t.get("parameters")),
                },
            }
            for t in (raw_tools if isinstance(raw_tools, list) else [])
            if isinstance(t, Mapping) and t.get("type") == "function"
        ]
        plan = self._plan(
            model=model,
            body=body,
            num_predict=self._cap(body.get("max_output_tokens")),
            think=effort if effort not in ("", "none") else None,
            fmt=None,
            tools=tools or None,
            last_role=last_role,
            prompt_tokens=max(1, words + _words(body.get("instructions"))),
            t0=t0,
            load_ns=load_ns,
        )
        rid = f"resp_{secrets.randbelow(999999)}"
        item_id = f"msg_{secrets.randbelow(999999)}"
        rs_id = f"rs_{secrets.randbelow(999999)}"
        calls = [
            {
                "id": f"fc_{secrets.randbelow(999999)}_{i}",
                "type": "function_call",
                "status": "completed",
                "call_id": tc["id"],
                "name": tc["function"]["name"],
                "arguments": _encode(tc["function"]["arguments"]),
            }
            for i, tc in enumerate(plan.tool_calls or [])
        ]

        def reasoning_item() -> dict[str, Any]:
            summary = [{"type": "summary_text", "text": plan.thinking}]
            return {
                "id": rs_id,
                "type": "reasoning",
                "summary": summary,
                "encrypted_content": plan.thinking,
            }

        def message_item() -> dict[str, Any]:
            return {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [self._output_text(plan.text)],
            }

        def output() -> list[Any]:
            out: list[Any] = [reasoning_item()] if plan.thinking is not None else []
            return out + (calls if calls else [message_item()] if plan.text else [])

        if not body.get("stream"):

            def build() -> dict[str, Any]:
                obj = self._response_obj(rid, model, body, "completed", output())
                obj["completed_at"] = int(time.time())
                obj["usage"] = self._responses_usage(plan)
                return obj

            return await self._whole(ctx, plan, build)
        seq = [0]
        out_index = [0]

        def ev(event: str, data: dict[str, Any]) -> bytes:
            data = {"type": event, **data, "sequence_number": seq[0]}
            seq[0] += 1
            return b"event: " + event.encode() + b"\ndata: " + _dumpb(data) + b"\n\n"

        def head() -> bytes:
            obj = self._response_obj(rid, model, body, "in_progress", [])
            return ev("response.created", {"response": obj}) + ev(
                "response.in_progress", {"response": obj}
            )

        def finish_reasoning() -> bytes:
            if plan.thinking is None or out_index[0] > 0:
                return b""
            out = ev(
                "response.reasoning_summary_text.done",
                {"item_id": rs_id, "output_index": 0, "summary_index": 0, "text": plan.thinking},
            )
            out += ev("response.output_item.done", {"output_index": 0, "item": reasoning_item()})
            out_index[0] = 1
            return out

        def chunks() -> Iterator[bytes]:
            first = head()
            if plan.thinking is not None:
                item = {"id": rs_id, "type": "reasoning", "summary": []}
                yield (
                    first
                    + ev("response.output_item.added", {"output_index": 0, "item": item})
                    + ev(
                        "response.reasoning_summary_text.delta",
                        {
                            "item_id": rs_id,
                            "output_index": 0,
                            "summary_index": 0,
                            "delta": plan.thinking,
                        },
                    )
                )
                first = b""
            for i, pj in enumerate(plan.piece_json):
                out = first + finish_reasoning()
                if i == 0:
                    added = {
                        "id": item_id,
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                    out += ev(
                        "response.output_item.added", {"output_index": out_index[0], "item": added}
                    )
                    out += ev(
                        "response.content_part.added",
                        {
                            "item_id": item_id,
                            "output_index": out_index[0],
                            "content_index": 0,
                            "part": self._output_text(""),
                        },
                    )
                delta = json.loads(pj)
                out += ev(
                    "response.output_text.delta",
                    {
                        "item_id": item_id,
                        "output_index": out_index[0],
                        "content_index": 0,
                        "delta": delta,
                        "logprobs": [],
                    },
                )
                yield out
                first = b""
            if calls:
                out = first + finish_reasoning()
                for i, call in enumerate(calls):
                    idx = out_index[0] + i
                    added = {**call, "status": "in_progress", "arguments": ""}
                    out += ev("response.output_item.added", {"output_index": idx, "item": added})
                    out += ev(
                        "response.function_call_arguments.delta",
                        {"item_id": call["id"], "output_index": idx, "delta": call["arguments"]},
                    )
                    out += ev(
                        "response.function_call_arguments.done",
                        {
                            "item_id": call["id"],
                            "output_index": idx,
                            "arguments": call["arguments"],
                        },
                    )
                    out += ev("response.output_item.done", {"output_index": idx, "item": call})
                yield out

        def final() -> bytes:
            out = (head() if plan.n_events == 0 else b"") + finish_reasoning()
            if not calls and plan.piece_json:
                where = {"item_id": item_id, "output_index": out_index[0], "content_index": 0}
                out += ev("response.output_text.done", {**where, "text": plan.text, "logprobs": []})
                out += ev(
                    "response.content_part.done", {**where, "part": self._output_text(plan.text)}
                )
                out += ev(
                    "response.output_item.done",
                    {"output_index": out_index[0], "item": message_item()},
                )
            obj = self._response_obj(rid, model, body, "completed", output())
            obj["completed_at"] = int(time.time())
            obj["usage"] = self._responses_usage(plan)
            return out + ev("response.completed", {"response": obj})

        def error_chunk(text: str) -> bytes:
            if self.silent_sse_errors:
                return b""
            obj = self._response_obj(rid, model, body, "failed", [])
            obj["error"] = {"code": "server_error", "message": text}
            return ev("response.failed", {"response": obj})

        return await self._stream(ctx, plan, SSE, chunks(), final, error_chunk)
