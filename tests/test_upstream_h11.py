"""harbord.upstream's parser against h11, on random well-formed and malformed answers.

Each answer is fed to the real protocol (`Conn.data_received`, fake transport) split at
random points, and to h11 as a client that sent the request. Both must agree: accepted
with the same status and body, or rejected; where h11 rejects for a syntax error (not for
an answer cut short), upstream raises BadResponse.

Where we are deliberately stricter than h11, the generator marks the case with the reason,
and upstream must raise BadResponse whatever h11 says:
- obs-fold (a field line starting with SP/HTAB): h11 unfolds it; RFC 9112 §5.2 lets a
  client reject it, and no backend of ours sends it;
- control characters in a field value or the reason phrase: h11 takes anything but NUL
  and whitespace; RFC 9110 §5.5 allows only VCHAR, obs-text, SP and HTAB;
- an HTTP version other than 1.0 or 1.1 (h11 takes any digit.digit);
- bare LF line ends in the head (h11 tolerates them): CRLF only;
- a chunk-size line with whitespace before its CRLF, more than 16 hex digits (h11: 20),
  or a bare CR in an extension: RFC 9112 §7.1's grammar has none of them;
- a Content-Length of more than 18 digits (h11: 20): more than an exabyte is not an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harbord.upstream import BadResponse, Disconnected
from tests.test_upstream_parser import Fed


@dataclass
class Case:
    method: str
    wire: bytes
    splits: list[int]
    stricter: list[str] = field(default_factory=list)


VERSIONS = ["1.1"] * 30 + ["1.0", "2.0", "1.2", "0.9"]
STATUSES = ["200", "200", "201", "204", "304", "400", "404", "500", "503", "299", "999"]
BAD_STATUSES = ["20", "2000", "2x0", "-20", " 200", "099", "101"]
REASONS = ["OK", "OK", "", "Not Found", "a\tb c", "\xe9t\xe9"]
PLAIN_FIELDS = [
    b"Content-Type: application/json",
    b"Content-Type: application/x-ndjson; charset=utf-8",
    b"X-Foo: bar  baz",
    b"X-Empty:",
    b"X-Tab:\tv\t",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Date: Wed, 02 Dec 2026 12:00:00 GMT",
    b"X-Obs: caf\xc3\xa9",
]
BAD_FIELDS = [b"X Foo: bar", b"X-Foo : bar", b": bar", b"X@Y: z", b"no colon", b"X-N: a\x00b"]
TE_GOOD = [b"chunked", b"Chunked", b"CHUNKED", b" chunked "]
TE_BAD = [b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked, chunked", b"", b"chunk"]
HEX = "0123456789abcdefABCDEF"


@st.composite
def chunk_size_line(draw: st.DrawFn, size: int, stricter: list[str]) -> bytes:
    digits = format(size, draw(st.sampled_from(["x", "X"])))
    zeros = draw(st.sampled_from([0] * 30 + [1, 3, 15, 18]))
    digits = "0" * zeros + digits
    if len(digits) > 16:
        stricter.append("more than 16 hex digits in a chunk size")
    ext = draw(st.sampled_from([b"", b"", b"", b";a=b", b";x", b';n="q v"', b";"]))
    line = digits.encode() + ext
    mangle = draw(st.sampled_from(["none"] * 80 + ["0x", "+", "_", "space", "ows", "cr"]))
    if mangle == "0x":
        line = b"0x" + line
    elif mangle == "+":
        line = b"+" + line
    elif mangle == "_" and len(digits) > 1:
        line = digits[:1].encode() + b"_" + digits[1:].encode() + ext
    elif mangle == "space":
        line = b" " + line
    elif mangle == "ows":
        line += b" "
        if not ext:  # after an extension, a space is part of it
            stricter.append("whitespace before a chunk-size line's CRLF")
    elif mangle == "cr":
        line += b";a\rb"
        stricter.append("bare CR in a chunk extension")
    return line + b"\r\n"


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes, stricter: list[str]) -> bytes:
    out = []
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        out.append(draw(chunk_size_line(size, stricter)))
        out.append(body[pos : pos + size])
        out.append(draw(st.sampled_from([b"\r\n"] * 60 + [b"\n", b"XX", b""])))
        pos += size
    out.append(draw(chunk_size_line(0, stricter)))
    trailers = draw(st.lists(st.sampled_from(PLAIN_FIELDS * 3 + [b"bad trailer"]), max_size=2))
    out.extend(t + b"\r\n" for t in trailers)
    out.append(b"\r\n")
    return b"".join(out)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    stricter: list[str] = []
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD"]))
    version = draw(st.sampled_from(VERSIONS))
    if version not in ("1.0", "1.1"):
        stricter.append("HTTP version other than 1.0/1.1")
    status = draw(st.sampled_from(STATUSES * 4 + BAD_STATUSES))
    reason = draw(st.sampled_from([*REASONS * 4, None, "O\x01K"]))
    if reason == "O\x01K":
        stricter.append("control character in the reason phrase")
    status_line = f"HTTP/{version} {status}" + ("" if reason is None else f" {reason}")
    head = [status_line.encode("latin-1")]
    head += draw(st.lists(st.sampled_from(PLAIN_FIELDS), max_size=4))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close", "both"]))
    if framing in ("length", "both"):
        length = draw(
            st.sampled_from(
                [str(len(body))] * 30
                + ["0" + str(len(body)), f"{len(body)}, {len(body)}", str(len(body) + 3)]
                + [str(max(0, len(body) - 2)), f"{len(body)}, 1", "-1", "+1", "0x1", ""]
                + ["1" * 19, "\u00b2", "1 2"]
            )
        )
        if len(length) == 19:
            stricter.append("Content-Length over 18 digits")
        head.append(b"Content-Length: " + length.encode())
        if draw(st.integers(0, 9)) == 0:
            head.append(b"Content-Length: " + draw(st.sampled_from([length, "7"])).encode())
    if framing in ("chunked", "both"):
        head.append(b"Transfer-Encoding: " + draw(st.sampled_from(TE_GOOD * 8 + TE_BAD)))
        if draw(st.integers(0, 9)) == 0:
            head.append(b"Transfer-Encoding: chunked")
        in_body: list[str] = []
        payload = draw(chunked_body(body, in_body))
        if method != "HEAD" and status not in ("204", "304"):
            stricter += in_body  # a body that is not read cannot be refused
    else:
        payload = body
    oddity = draw(st.sampled_from(["none"] * 30 + ["bad", "fold", "ctl", "lf"]))
    if oddity == "bad":
        head.insert(1, draw(st.sampled_from(BAD_FIELDS)))
    elif oddity == "fold" and len(head) > 1:
        head.insert(2, b" folded")
        stricter.append("obs-fold")
    elif oddity == "ctl":
        head.insert(1, b"X-Ctl: a\x01b")
        stricter.append("control character in a field value")
    elif oddity == "lf" and len(head) > 2:
        head[1] += b"\n" + head.pop(2)
        stricter.append("bare LF line end")
    wire = b"\r\n".join(head) + b"\r\n\r\n" + payload
    if draw(st.integers(0, 7)) == 0:
        wire = b"HTTP/1.1 100 Continue\r\n\r\n" + wire
    if not stricter and draw(st.integers(0, 4)) == 0:
        wire = wire[: draw(st.integers(0, len(wire)))]  # cut short
    splits = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    return Case(method, wire, splits, stricter)


@dataclass
class Verdict:
    ok: bool
    status: int = 0
    body: bytes = b""
    error: str = ""


def h11_verdict(case: Case) -> Verdict:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.send(h11.Request(method=case.method, target="/", headers=[("Host", "backend")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(case.wire)
    conn.receive_data(b"")
    status, body = 0, b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Verdict(True, status, body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                return Verdict(False, error="peer closed connection early")
    except h11.RemoteProtocolError as err:
        return Verdict(False, error=str(err))


def cut_short(error: str) -> bool:
    """h11's words for an answer the connection's end cut short (not a syntax error)."""
    return "closed connection" in error or "ConnectionClosed" in error


async def upstream_verdict(case: Case) -> Fed:
    bounds = [0, *case.splits, len(case.wire)]
    pieces = [case.wire[a:b] for a, b in pairwise(bounds) if b > a]
    return await Fed(pieces, head_only=case.method == "HEAD").run()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
async def test_agrees_with_h11(case: Case) -> None:
    theirs = h11_verdict(case)
    ours = await upstream_verdict(case)
    if case.stricter:
        assert isinstance(ours.error, BadResponse), (case.stricter, ours.error)
    elif theirs.ok:
        assert ours.error is None, (theirs, ours.error)
        assert (ours.status, ours.body) == (theirs.status, theirs.body)
    elif cut_short(theirs.error):
        assert isinstance(ours.error, (Disconnected, BadResponse)), (theirs, ours.error)
    else:
        assert isinstance(ours.error, BadResponse), (theirs, ours.error, ours.body)


async def test_the_generator_reaches_both_verdicts() -> None:
    """A differential test that only ever sees one verdict proves little: count them."""
    seen: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, database=None)
    @given(case=cases())
    def sample(case: Case) -> None:
        theirs = h11_verdict(case)
        kind = (
            "stricter"
            if case.stricter
            else "ok"
            if theirs.ok
            else "cut"
            if cut_short(theirs.error)
            else "bad"
        )
        seen[kind] = seen.get(kind, 0) + 1

    sample()
    assert all(seen.get(kind, 0) >= 10 for kind in ("ok", "bad", "cut", "stricter")), seen
