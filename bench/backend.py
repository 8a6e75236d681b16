#!/usr/bin/env python3
"""A lean fake Ollama backend for the benchmarks: raw asyncio (+ uvloop), no framework.

It answers what harbord and LiteLLM ask of an Ollama server, with Ollama's
shapes: `GET /`, `/api/version`, `/api/tags`, `/api/ps`, `POST /api/chat`
(NDJSON stream, or one JSON body with `"stream": false`), `/api/generate`
and `POST /v1/chat/completions` (SSE or one body). `options.num_predict`
(or `max_tokens` on /v1) sets the reply length; every token is its own
chunk, written with its own `send()` (HTTP/1.1 chunked, as Ollama does).
The delay between tokens is `--token-delay`, or the request header
`X-Bench-Token-Delay: SECONDS`.

It exists because `tests/fakeollama.py` is faithful but costs more CPU per
request and per chunk than harbord itself, so it would be the bottleneck
(bench/run.py measures both and shows it).

    python3 bench/backend.py --port 11434 [--name gpu] [--tokens 8] [--token-delay 0]

Prints `PORT\\n` on stdout once listening (useful with --port 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time

import msgspec

VERSION = b'{"version":"0.14.3"}'
MODELS = (("llama3.2:latest", 2_019_393_189), ("qwen2.5-coder:7b", 4_683_087_332))
DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"


def _tags() -> bytes:
    models = [
        {
            "name": name, "model": name, "modified_at": "2025-01-01T00:00:00.000000000Z",
            "size": size, "digest": DIGEST,
            "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                        "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
        }
        for name, size in MODELS
    ]
    return msgspec.json.encode({"models": models})


TAGS = _tags()
SIZES = dict(MODELS)


def _ps(loaded: set[str]) -> bytes:
    """/api/ps as Ollama answers it once the models served stay loaded (the default
    keep-alive): each listed with its size, context and an expiry ahead. Listing none
    would tell a router every answer loaded its model anew (keep_alive 0)."""
    expires = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(time.time() + 86400))
    models = [
        {"name": name, "model": name, "size": SIZES[name], "digest": DIGEST, "details": {},
         "expires_at": expires, "size_vram": SIZES[name], "context_length": 4096}
        for name in sorted(loaded)
    ]
    return msgspec.json.encode({"models": models})


class Options(msgspec.Struct):
    num_predict: int | None = None


class Message(msgspec.Struct):
    role: str = "user"
    content: str = ""


class ChatRequest(msgspec.Struct):
    model: str = ""
    stream: bool | None = None  # Ollama's default: stream; OpenAI's: not
    options: Options | None = None
    max_tokens: int | None = None
    messages: list[Message] = []
    prompt: str | None = None


_decode_chat = msgspec.json.Decoder(ChatRequest)
_enc = msgspec.json.encode


def _http_date() -> bytes:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()


def _iso_now() -> bytes:
    t = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z").encode()


_TOKENS: list[bytes] = []


def _token(i: int) -> bytes:
    while len(_TOKENS) <= i:
        _TOKENS.append(_enc(f"tok{len(_TOKENS)} "))
    return _TOKENS[i]


def _stats(n: int) -> bytes:
    return (b',"total_duration":%d,"load_duration":1000000,"prompt_eval_count":12,'
            b'"prompt_eval_duration":2000000,"eval_count":%d,"eval_duration":%d' % (n * 1000 + 3000000, n, n * 1000))


class Server:
    def __init__(self, name: str, tokens: int, token_delay: float) -> None:
        self.name = name
        self.tokens = tokens
        self.token_delay = token_delay
        self.requests = 0
        self.loaded: set[str] = set()  # models served, as Ollama keeps them loaded
        self.ps = _ps(self.loaded)

    def serve(self, model: str) -> None:
        if model not in self.loaded:
            name = model if ":" in model else f"{model}:latest"
            if name in SIZES:
                self.loaded.add(model)
                self.loaded.add(name)
                self.ps = _ps(self.loaded & SIZES.keys())


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. Requests are handled one at a time."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a streaming reply is being written
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.gap = 0.0  # pause after the first token (to time the first token on its own)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        buf = self.buf
        while not self.busy and not self.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self._send_simple(400, b'{"error":"bad request"}')
                self.transport.close()  # type: ignore[union-attr]
                return
            length = 0
            headers: dict[str, str] = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                length = int(headers["content-length"])
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body_end = buf.find(b"\r\n0\r\n\r\n", end + 4)
                if body_end < 0:
                    return
                body = _dechunk(bytes(buf[end + 4: body_end + 7]))
                del buf[: body_end + 7]
                self._handle(method, target, headers, body)
                continue
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4: end + 4 + length])
            del buf[: end + 4 + length]
            self._handle(method, target, headers, body)

    # -- answers ---------------------------------------------------------------

    def _send_simple(self, status: int, body: bytes, ctype: bytes = b"application/json; charset=utf-8") -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"OK")
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason, ctype, _http_date(), len(body), body)
        )

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        path = target.split("?", 1)[0]
        srv = self.server
        srv.requests += 1
        if method in ("GET", "HEAD"):
            if path == "/api/version":
                return self._send_simple(200, VERSION)
            if path == "/api/tags":
                return self._send_simple(200, TAGS)
            if path == "/api/ps":
                return self._send_simple(200, srv.ps)
            if path == "/":
                return self._send_simple(200, b"Ollama is running", b"text/plain; charset=utf-8")
            return self._send_simple(404, b"404 page not found", b"text/plain")
        if path not in ("/api/chat", "/api/generate", "/v1/chat/completions"):
            return self._send_simple(404, b"404 page not found", b"text/plain")
        try:
            req = _decode_chat.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return self._send_simple(400, _enc({"error": str(err)}))
        if req.stream is None:
            req.stream = path != "/v1/chat/completions"
        n = srv.tokens
        if req.options is not None and req.options.num_predict is not None:
            n = req.options.num_predict
        elif req.max_tokens is not None:
            n = req.max_tokens
        delay = float(headers.get("x-bench-token-delay", srv.token_delay))
        gap = 0.0
        text = req.messages[-1].content if req.messages else (req.prompt or "")
        if "bench:" in text:  # directives any proxy passes through: bench:delay=S bench:gap=S
            for word in text.split():
                key, _, value = word.partition("=")
                if key == "bench:delay":
                    delay = float(value)
                elif key == "bench:gap":
                    gap = float(value)
        self.gap = gap
        srv.serve(req.model or "llama3.2")
        model = _enc(req.model or "llama3.2")
        if path == "/v1/chat/completions":
            return self._openai(model, n, req.stream, delay)
        chat = path == "/api/chat"
        if not req.stream:
            text = b"".join(_token(i)[1:-1] for i in range(n))
            content = (b'"message":{"role":"assistant","content":"%s"}' % text) if chat else (
                b'"response":"%s"' % text)
            reply = (b'{"model":%s,"created_at":"%s",%s,"done":true,"done_reason":"%s"%s}'
                     % (model, _iso_now(), content, b"length" if n != srv.tokens else b"stop", _stats(n)))
            return self._send_simple(200, reply)
        ts = _iso_now()
        if chat:
            pre = b'{"model":%s,"created_at":"%s","message":{"role":"assistant","content":' % (model, ts)
            post = b'},"done":false}\n'
            final = (b'{"model":%s,"created_at":"%s","message":{"role":"assistant","content":""},'
                     b'"done":true,"done_reason":"stop"%s}\n' % (model, ts, _stats(n)))
        else:
            pre = b'{"model":%s,"created_at":"%s","response":' % (model, ts)
            post = b',"done":false}\n'
            final = b'{"model":%s,"created_at":"%s","response":"","done":true,"done_reason":"stop"%s}\n' % (
                model, ts, _stats(n))
        self._stream(b"application/x-ndjson", [pre + _token(i) + post for i in range(n)], final, delay)

    def _openai(self, model: bytes, n: int, stream: bool, delay: float) -> None:
        created = int(time.time())
        cid = b"chatcmpl-%d" % self.server.requests
        if not stream:
            text = b"".join(_token(i)[1:-1] for i in range(n))
            reply = (b'{"id":"%s","object":"chat.completion","created":%d,"model":%s,"system_fingerprint":"fp_ollama",'
                     b'"choices":[{"index":0,"message":{"role":"assistant","content":"%s"},"finish_reason":"stop"}],'
                     b'"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}'
                     % (cid, created, model, text, n, n + 12))
            return self._send_simple(200, reply)
        pre = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
               b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":'
               % (cid, created, model))
        post = b'},"finish_reason":null}]}\n\n'
        final = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                 b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                 b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n' % (cid, created, model))
        self._stream(b"text/event-stream", [pre + _token(i) + post for i in range(n)], final, delay)

    def _stream(self, ctype: bytes, chunks: list[bytes], final: bytes, delay: float) -> None:
        t = self.transport
        assert t is not None
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nDate: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                % (ctype, _http_date()))
        chunks.append(final)
        gap, self.gap = self.gap, 0.0
        if delay <= 0 and gap <= 0:
            write = t.write
            for c in chunks:  # one send() per token, as Ollama flushes each one
                write(b"%x\r\n%s\r\n" % (len(c), c))
            write(b"0\r\n\r\n")
            return
        # Paced stream: one timer per token, no task per stream.
        self.busy = True
        loop = asyncio.get_running_loop()
        it = iter(chunks)

        def finish() -> None:
            t.write(b"0\r\n\r\n")
            self.busy = False
            if self.buf:
                self._process()

        def step() -> None:
            self.timer = None
            if self.closed:
                return
            if delay <= 0:  # after the gap: the rest at once
                for c in it:
                    t.write(b"%x\r\n%s\r\n" % (len(c), c))
                finish()
                return
            c = next(it, None)
            if c is None:
                finish()
                return
            t.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.timer = loop.call_later(delay, step)

        first = next(it)  # the first token now, then the gap (or the delay)
        t.write(b"%x\r\n%s\r\n" % (len(first), first))
        self.timer = loop.call_later(gap if gap > 0 else delay, step)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2: eol + 2 + size]
        pos = eol + 2 + size + 2


async def serve(port: int, server: Server, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Conn(server), host, port, backlog=4096, reuse_address=True)
    actual = srv.sockets[0].getsockname()[1]
    print(actual, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="gpu")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--token-delay", type=float, default=0.0)
    a = p.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(a.port, Server(a.name, a.tokens, a.token_delay), a.host))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
