"""What a generation answers (Plan) and how it is written: streamed or whole, faults included."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .models import ModelInfo
from .plumbing import Ctx, Reply
from .scheduler import Residency
from .wire import (
    EMBED_DIM,
    _dumpb,
    _encode,
    _mapping,
    _sample_for_schema,
    _sleep_at_least,
)


@dataclass(slots=True)
class Plan:
    """What a generation answers, independent of the wire protocol."""

    model: str  # as the client named it
    piece_json: list[bytes]  # content pieces, JSON-encoded
    text: str  # all content
    thinking: str | None
    tool_calls: list[dict[str, Any]] | None
    done_reason: str
    prompt_tokens: int
    t0: int
    load_ns: int
    prompt_ns: int = 0

    @property
    def n_events(self) -> int:
        return (self.thinking is not None) + len(self.piece_json) + (self.tool_calls is not None)

    @property
    def eval_count(self) -> int:
        return max(len(self.piece_json), 1 if self.tool_calls else 0)

    def stats(self) -> dict[str, int]:
        total = max(time.perf_counter_ns() - self.t0, 3)
        load = min(max(self.load_ns, 1), total - 2)
        gen = total - load
        prompt = min(max(self.prompt_ns, gen // 10, 1), max(gen - 1, 1))
        return {
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": self.eval_count,
            "eval_duration": max(gen - prompt, 1),
        }


class Generation(Residency):
    """Reply planning and the streaming core shared by every API family."""

    # ---- reply planning ---------------------------------------------------------------

    def _pieces(self, n: int) -> tuple[list[bytes], str]:
        while len(self._tok_text) < n:
            t = f"tok{len(self._tok_text)} "
            self._tok_text.append(t)
            self._tok_json.append(_dumpb(t))
        text = self._text_cache.get(n)
        if text is None:
            text = "".join(self._tok_text[:n])
            if len(self._text_cache) < 64:
                self._text_cache[n] = text
        return self._tok_json[:n], text

    def _plan(
        self,
        *,
        model: str,
        body: Mapping[str, Any],
        num_predict: Any,
        think: Any,
        fmt: Any,
        tools: Any,
        last_role: str | None,
        prompt_tokens: int,
        t0: int,
        load_ns: int,
    ) -> Plan:
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
            n, reason = num_predict, "length"
        else:
            n, reason = self.tokens, "stop"
        thinking = (
            f"[{self.name}] thinking about it." if think not in (None, False, "none", "") else None
        )
        if isinstance(tools, list) and tools and last_role != "tool":
            tool = tools[0] if isinstance(tools[0], Mapping) else {}
            fn = _mapping(tool.get("function"))
            params = _mapping(fn.get("parameters"))
            required = params.get("required")
            required = required if isinstance(required, list) else []
            call = {
                "id": "call_" + secrets.token_hex(4),
                "function": {
                    "index": 0,
                    "name": str(fn.get("name", "")),
                    "arguments": {p: "test" for p in required if isinstance(p, str)},
                },
            }
            return Plan(model, [], "", thinking, [call], "stop", prompt_tokens, t0, load_ns)
        if fmt not in (None, "", False):
            if isinstance(fmt, Mapping):
                obj = _sample_for_schema(fmt, self.name)
            else:
                obj = {"backend": self.name, "answer": "test"}
            content = _encode(obj)
            return Plan(
                model,
                [_dumpb(content)],
                content,
                thinking,
                None,
                "stop",
                prompt_tokens,
                t0,
                load_ns,
            )
        pieces, text = self._pieces(n)
        return Plan(model, pieces, text, thinking, None, reason, prompt_tokens, t0, load_ns)

    # ---- streaming core ---------------------------------------------------------------

    def _delay(self) -> float:
        d = self.faults.token_delay
        return self.token_delay if d is None else d

    async def _prompt(self, plan: Plan) -> None:
        """Prompt evaluation: the model's ``prompt_delay`` before the first token."""
        delay = self.prompt_delay(plan.model)
        if delay > 0.0:
            t = time.perf_counter_ns()
            await _sleep_at_least(delay)
            plan.prompt_ns = time.perf_counter_ns() - t

    def _stop_point(self, model: str, n_events: int) -> tuple[int | None, bool]:
        """(chunks before the fault fires or None, True if it is a connection abort)."""
        f = self.faults
        if not f.applies(model):
            return None, False
        die, err = f.die_after_chunks, f.error_after_chunks
        if die is None and err is None:
            return None, False
        if err is None or (die is not None and die <= err):
            return min(die if die is not None else 0, n_events), True
        return min(err, n_events), False

    async def _stream(
        self,
        ctx: Ctx,
        plan: Plan,
        content_type: str,
        chunks: Iterator[bytes],
        final: Callable[[], bytes],
        error_chunk: Callable[[str], bytes],
    ) -> web.StreamResponse:
        await self._prompt(plan)
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        rec = ctx.rec
        delay = self._delay()
        stop_at, abort = self._stop_point(plan.model, plan.n_events)
        sent = 0
        write = resp.write
        for chunk in chunks:
            if sent == stop_at:
                break
            if delay > 0.0:
                if sent:
                    await _sleep_at_least(delay)
            elif sent & 255 == 255:
                await asyncio.sleep(0)
            await write(chunk)
            sent += 1
            rec.chunks_sent = sent
        if stop_at is not None:
            if abort:
                rec.finish("failed", 200)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                return resp
            if delay > 0.0 and sent:
                await _sleep_at_least(delay)
            await write(error_chunk(self.faults.error_text))
            rec.chunks_sent = sent + 1
            rec.finish("failed", 200)
            return resp
        if delay > 0.0 and sent:
            await _sleep_at_least(delay)
        await write(final())
        rec.chunks_sent = sent + 1
        return resp

    async def _whole(self, ctx: Ctx, plan: Plan, build: Callable[[], Any]) -> web.StreamResponse:
        """A non-streaming reply: wait as long as generating would take, then answer."""
        await self._prompt(plan)
        delay = self._delay()
        stop_at, abort = self._stop_point(plan.model, plan.n_events)
        steps = plan.n_events if stop_at is None else stop_at
        if delay > 0.0 and steps:
            await _sleep_at_least(delay * steps)
        if stop_at is not None:
            if abort:
                ctx.rec.finish("failed", None)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                return web.Response(status=500)
            raise Reply(self._err(ctx, 500, self.faults.error_text))
        resp = self._json(build())
        ctx.rec.chunks_sent = 1
        return resp

    async def _embed_common(
        self, ctx: Ctx, body: Mapping[str, Any], model: str
    ) -> tuple[ModelInfo, int]:
        info = await self._gate(ctx, body, model)
        keep_alive = self._keep_alive(ctx, body)
        load_ns = await self._load(ctx, info, model, body, keep_alive)
        seconds = self.embed_time(model)  # the model's service time for an embedding
        if seconds > 0.0:
            await _sleep_at_least(seconds)
        stop_at, abort = self._stop_point(model, 1)
        if stop_at is not None:
            if abort:
                ctx.rec.finish("failed", None)
                transport = ctx.request.transport
                if transport is not None:
                    transport.abort()
                raise Reply(web.Response(status=500))
            raise Reply(self._err(ctx, 500, self.faults.error_text))
        return info, load_ns

    @staticmethod
    def _dims(raw: Any) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < EMBED_DIM:
            return raw
        return EMBED_DIM

    def _cap(self, raw: Any) -> int | None:
        """A client's token limit as num_predict: only when it cuts the reply short."""
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < self.tokens:
            return raw
        return None
