#!/usr/bin/env python3
"""The benchmark's load generator: raw asyncio protocols (+ uvloop), HTTP/1.1 keep-alive.

No HTTP library on the client side, so the client costs a few microseconds
per request and per chunk and is not what is measured. Speaks to a Unix
socket (`unix:/path`) or TCP (`tcp:127.0.0.1:PORT`). Three modes, each
printing one JSON object on stdout:

  latency  C connections, each sending one request after the other for
           --duration seconds (after --warmup): latency percentiles, throughput.
  stream   --count streams one after the other on one connection: time to the
           first body byte (TTFT), total time, chunks counted, chunks/s.
  many     --count streams held open at once (e.g. slow ones): errors, TTFT,
           how many were open at the same time.

Every mode reports the generator's own CPU time (getrusage), so the run can
show the generator keeps up.

    python3 bench/loadgen.py latency --target unix:/run/harbor.sock --path /api/chat \
        --body '{"model":"llama3.2","stream":false}' --concurrency 32 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from dataclasses import dataclass, field

perf = time.perf_counter


@dataclass
class Result:
    status: int = 0
    t_send: float = 0.0
    t_first: float = 0.0  # first body byte
    t_done: float = 0.0
    payload: int = 0  # body bytes (de-chunked)
    events: int = 0  # delimiter occurrences in the body (NDJSON lines / SSE events)
    tail: bytes = b""  # the body's last bytes
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, delim: bytes) -> None:
        self.delim = delim
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[Result] | None = None
        self.res: Result | None = None
        self.state = 0  # 0 head, 1 content-length body, 2 chunked size line, 3 chunk data, 4 trailer, 5 until close
        self.remaining = 0
        self.lost = False
        self.carry = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.fut is not None and not self.fut.done():
            res = self.res
            assert res is not None
            if self.state == 5:
                res.t_done = perf()
                self.fut.set_result(res)
            else:
                res.error = f"connection lost ({exc or 'EOF'})"
                self.fut.set_result(res)

    def request(self, data: bytes) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        self.fut = loop.create_future()
        self.res = Result()
        self.state = 0
        self.carry = b""
        self.res.t_send = perf()
        if self.lost:
            self.res.error = "connection closed"
            self.fut.set_result(self.res)
            return self.fut
        assert self.transport is not None
        self.transport.write(data)
        return self.fut

    def _body(self, data: bytes | bytearray) -> None:
        res = self.res
        assert res is not None
        if not data:
            return
        if res.payload == 0:
            res.t_first = perf()
        res.payload += len(data)
        d = self.delim
        if len(d) == 1:
            res.events += data.count(d)
        else:
            joined = self.carry + bytes(data)
            res.events += joined.count(d)
            self.carry = joined[-(len(d) - 1):]
        res.tail = (res.tail + bytes(data[-256:]))[-256:]

    def _finish(self) -> None:
        res = self.res
        assert res is not None and self.fut is not None
        res.t_done = perf()
        self.state = 0
        if not self.fut.done():
            self.fut.set_result(res)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        res = self.res
        if res is None:
            return
        while True:
            st = self.state
            if st == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                try:
                    res.status = int(lines[0].split(" ", 2)[1])
                except (IndexError, ValueError):
                    res.error = f"bad status line {lines[0]!r}"
                    self._finish()
                    return
                hdrs = res.headers
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    hdrs[k.strip().lower()] = v.strip()
                if hdrs.get("transfer-encoding", "").lower() == "chunked":
                    self.state = 2
                elif "content-length" in hdrs:
                    self.remaining = int(hdrs["content-length"])
                    self.state = 1
                    if self.remaining == 0:
                        self._finish()
                        return
                else:
                    self.state = 5
            elif st == 1:
                if not buf:
                    return
                take = min(len(buf), self.remaining)
                self._body(buf[:take] if take < len(buf) else buf)
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self._finish()
                return
            elif st == 2:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    self.state = 4
                else:
                    self.remaining = size + 2  # data and its CRLF
                    self.state = 3
            elif st == 3:
                if not buf:
                    return
                take = min(len(buf), self.remaining)
                data_in = min(take, self.remaining - 2)  # the last 2 bytes of `remaining` are the CRLF
                if data_in > 0:
                    self._body(buf[:data_in])
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = 2
            elif st == 4:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                del buf[: eol + 2]
                if eol == 0:
                    self._finish()
                    return
            else:  # until close
                if buf:
                    self._body(buf)
                    buf.clear()
                return


def build_request(method: str, path: str, body: bytes, headers: list[str], host: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: harbord-bench",
             "Accept: */*"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(target: str, delim: bytes) -> Conn:
    loop = asyncio.get_running_loop()
    if target.startswith("unix:"):
        _, proto = await loop.create_unix_connection(lambda: Conn(delim), target[5:])
    else:
        host, port = target.removeprefix("tcp:").rsplit(":", 1)
        transport, proto = await loop.create_connection(lambda: Conn(delim), host, int(port))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proto


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))
    return s[i]


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {
        "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        "min_ms": min(ms) if ms else float("nan"), "max_ms": max(ms) if ms else float("nan"),
    }


def ok(res: Result, expect_events: int | None, done_marker: bytes | None) -> str | None:
    if res.error:
        return res.error
    if res.status != 200:
        return f"HTTP {res.status}"
    if expect_events is not None and res.events != expect_events:
        return f"{res.events} events, expected {expect_events}"
    if done_marker and done_marker not in res.tail:
        return "no final chunk"
    return None


async def run_latency(a: argparse.Namespace, req: bytes) -> dict[str, object]:
    conns = [await connect(a.target, a.delim) for _ in range(a.concurrency)]
    lat: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    stop = False

    reconnects = 0
    sent = 0

    async def worker(i: int) -> None:
        nonlocal reconnects, sent
        c = conns[i]
        while not stop:
            res = await c.request(req)
            sent += 1
            err = ok(res, None, None)
            if measuring:
                if err is None:
                    lat.append(res.t_done - res.t_send)
                else:
                    errors[err] = errors.get(err, 0) + 1
            if c.lost or res.headers.get("connection", "").lower() == "close":
                if c.transport is not None:
                    c.transport.close()
                c = conns[i] = await connect(a.target, a.delim)
                reconnects += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(len(conns))]
    await asyncio.sleep(a.warmup)
    measuring = True
    c0, t0 = cpu_now(), perf()
    await asyncio.sleep(a.duration)
    measuring = False
    t1, c1 = perf(), cpu_now()
    stop = True
    await asyncio.gather(*tasks)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    out: dict[str, object] = {"mode": "latency", "target": a.target, "concurrency": a.concurrency,
                              "count": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
                              "reconnects": reconnects, "requests_all": sent, "wall_s": t1 - t0,
                              "rps": len(lat) / (t1 - t0),
                              "loadgen_cpu_s": c1 - c0, "loadgen_cpu_pct": 100.0 * (c1 - c0) / (t1 - t0)}
    out.update(summary_ms(lat))
    return out


async def run_stream(a: argparse.Namespace, req: bytes) -> dict[str, object]:
    conn = await connect(a.target, a.delim)
    for _ in range(a.warmup_count):
        await conn.request(req)
    ttft: list[float] = []
    total: list[float] = []
    rates: list[float] = []
    events: list[int] = []
    errors: dict[str, int] = {}
    c0, t0 = cpu_now(), perf()
    n = 0
    while (n < a.count) if not a.for_seconds else (perf() - t0 < a.for_seconds):
        n += 1
        res = await conn.request(req)
        err = ok(res, a.expect_events, a.done_marker.encode() if a.done_marker else None)
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
            if conn.lost:
                conn = await connect(a.target, a.delim)
            continue
        ttft.append(res.t_first - res.t_send)
        total.append(res.t_done - res.t_send)
        rates.append(res.events / (res.t_done - res.t_send))
        events.append(res.events)
    t1, c1 = perf(), cpu_now()
    if conn.transport is not None:
        conn.transport.close()
    out: dict[str, object] = {
        "mode": "stream", "target": a.target, "count": len(total), "errors": sum(errors.values()),
        "error_kinds": errors, "events_per_stream": pct([float(e) for e in events], 50),
        "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
        "ttft_min_ms": min(ttft) * 1000 if ttft else float("nan"),
        "total_p50_ms": pct(total, 50) * 1000, "total_min_ms": min(total) * 1000 if total else float("nan"),
        "chunks_per_s_p50": pct(rates, 50), "chunks_per_s_max": max(rates) if rates else float("nan"),
        "wall_s": t1 - t0, "loadgen_cpu_s": c1 - c0, "loadgen_cpu_pct": 100.0 * (c1 - c0) / (t1 - t0),
    }
    return out


async def run_many(a: argparse.Namespace, req: bytes) -> dict[str, object]:
    errors: dict[str, int] = {}
    ttft: list[float] = []
    total: list[float] = []
    open_now = 0
    open_max = 0
    connect_errors = 0
    connect_retries = 0
    marker = a.done_marker.encode() if a.done_marker else None
    all_open = asyncio.Event()
    started = 0

    async def one(i: int) -> None:
        nonlocal open_now, open_max, connect_errors, started
        nonlocal connect_retries
        for attempt in range(a.connect_tries):
            try:
                conn = await connect(a.target, a.delim)
                break
            except BlockingIOError:
                # EAGAIN: the server's listen backlog is full; a patient client retries.
                connect_retries += 1
                await asyncio.sleep(0.01 * (attempt + 1))
            except OSError as err:
                connect_errors += 1
                errors[f"connect: {err}"] = errors.get(f"connect: {err}", 0) + 1
                return
        else:
            connect_errors += 1
            errors["connect: EAGAIN after retries"] = errors.get("connect: EAGAIN after retries", 0) + 1
            return
        fut = conn.request(req)
        started += 1
        open_now += 1
        open_max = max(open_max, open_now)
        if open_now >= a.count:
            all_open.set()
        try:
            res = await fut
        finally:
            open_now -= 1
        err = ok(res, a.expect_events, marker)
        if err is not None:
            errors[err] = errors.get(err, 0) + 1
        else:
            ttft.append(res.t_first - res.t_send)
            total.append(res.t_done - res.t_send)
        if conn.transport is not None:
            conn.transport.close()

    c0, t0 = cpu_now(), perf()
    tasks = []
    for i in range(a.count):
        tasks.append(asyncio.create_task(one(i)))
        if i % a.ramp_batch == a.ramp_batch - 1:
            await asyncio.sleep(a.ramp_pause)
    t_ramp = perf()
    _, pending = await asyncio.wait(tasks, timeout=a.deadline if a.deadline else None)
    for task in pending:
        task.cancel()
    if pending:
        errors["unfinished at the deadline"] = len(pending)
        await asyncio.wait(pending)
    t1, c1 = perf(), cpu_now()
    out: dict[str, object] = {
        "mode": "many", "target": a.target, "count": a.count, "ok": len(total),
        "errors": sum(errors.values()), "error_kinds": errors, "open_max": open_max,
        "connect_retries": connect_retries,
        "ramp_s": t_ramp - t0, "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
        "total_p50_s": pct(total, 50), "total_max_s": max(total) if total else float("nan"),
        "wall_s": t1 - t0, "loadgen_cpu_s": c1 - c0, "loadgen_cpu_pct": 100.0 * (c1 - c0) / (t1 - t0),
    }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["latency", "stream", "many"])
    p.add_argument("--target", required=True, help="unix:/path or tcp:HOST:PORT")
    p.add_argument("--method", default="POST")
    p.add_argument("--path", default="/api/chat")
    p.add_argument("--body", default="")
    p.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--sse", action="store_true", help="count SSE events (blank-line separated), not lines")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--warmup-count", type=int, default=3)
    p.add_argument("--ramp-batch", type=int, default=50, help="many: connections opened per batch")
    p.add_argument("--ramp-pause", type=float, default=0.05, help="many: seconds between batches")
    p.add_argument("--connect-tries", type=int, default=1, help="many: tries per connection on EAGAIN")
    p.add_argument("--for-seconds", type=float, default=0.0, help="stream: run for this long instead of --count")
    p.add_argument("--deadline", type=float, default=0.0, help="many: give up on streams after this many seconds")
    p.add_argument("--expect-events", type=int, default=None)
    p.add_argument("--done-marker", default=None, help="bytes the body's tail must contain")
    a = p.parse_args()
    a.delim = b"\n\n" if a.sse else b"\n"
    host = "localhost" if a.target.startswith("unix:") else a.target.removeprefix("tcp:")
    req = build_request(a.method, a.path, a.body.encode(), a.header, host)
    fn = {"latency": run_latency, "stream": run_stream, "many": run_many}[a.mode]
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = runner(fn(a, req))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
