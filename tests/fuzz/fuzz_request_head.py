"""
Fuzz the client-facing request handling: the bytes are what a client
sends, in pieces, to the real balancer (L{rrbalancer.service.makeService}
on a memory reactor, as L{tests.support.MemoryBalancer} builds it), with
one backend that answers every request it gets.

The balancer's limits are lowered for inputs of a few KiB to reach them:
64 bytes of body, 512 a head line, 1 KiB and 20 lines a head.

Invariants: nothing raises out of the channel and nothing is logged as an
error; what the client receives is a sequence of well-formed HTTP/1.1
responses (L{tests.support.parseResponse}, strict), one for each request
the balancer handled, and at most one refusal after them, on a connection
then closed; whatever reaches the backend is a sequence of clean request
heads (no NUL, no CR or LF inside a line, tokens for names, one Host, at
most one Content-Length, never Transfer-Encoding), each framed so that the
backend reads exactly the body the balancer meant.

Choices (see L{tests.fuzz._common.split}):
 - bits 0-1: how the backend answers: with a Content-Length, chunked,
   204 No Content, or with a body up to its closing the connection;
 - bit 2: 4 seconds pass after each piece (the head must arrive within
   10, a body may pause for 20 between reads);
 - bit 3: the backend holds its answers until the client has sent
   everything (the balancer's backend timeout is 30 seconds);
 - bit 4: the client leaves right after its last piece.

Run it as a fuzzer with C{tests/fuzz/run.sh request_head}.
"""

import sys
from typing import Dict, List, Tuple

from tests.fuzz._common import LoggedErrors, command, instrumentModules, instrumented, split

with instrumented(__name__):
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from twisted.python.failure import Failure

    from rrbalancer.site import BalancerRequest

    from tests.support import FramingError, MemoryBalancer, parseResponse

_TOKEN = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

# What the backend answers, by choice; a HEAD is answered without the body.
ANSWERS = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"ok"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", b"2\r\nok\r\n0\r\n\r\n"),
    (b"HTTP/1.1 204 No Content\r\n", b""),
    (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:8081/next\r\n"
     b"Connection: close\r\n", b"until close"),
]
CLOSES = 3
# The head's limits, lowered from Twisted's (16 KiB a line and a head, 500
# headers) so that the fuzzer's inputs reach them; the body's limit is 64.
LINE_LIMIT = 512
HEAD_LIMIT = 1024
HEADERS_LIMIT = 20


class _RecordingRequest(BalancerRequest):
    """
    Notes the method of every request the balancer handles, in order.
    """

    def process(self):
        self.channel.site.fuzzHandled.append(self.method)
        return BalancerRequest.process(self)


def _checkForwardedHead(head: bytes) -> Tuple[bytes, int]:
    """
    A request head as the balancer sent it must leave a backend no choice
    in how to read it.  Returns its method and body length.
    """
    assert b"\x00" not in head, f"NUL forwarded: {head!r}"
    lines = head.split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, f"bare CR or LF forwarded: {line!r}"
    parts = lines[0].split(b" ")
    assert len(parts) == 3, f"malformed request line forwarded: {lines[0]!r}"
    method, target, version = parts
    assert method and _TOKEN.issuperset(method), f"bad method forwarded: {lines[0]!r}"
    assert target, f"empty target forwarded: {lines[0]!r}"
    assert version == b"HTTP/1.1", f"forwarded as {version!r}"
    names = []
    length = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and name and _TOKEN.issuperset(name), f"bad header line forwarded: {line!r}"
        # "Name: value", the value as the client's parser stripped it
        # (and possibly empty).
        assert value[:1] == b" ", f"odd spacing: {line!r}"
        assert value[1:] == value[1:].strip(b" \t"), f"blanks around a value forwarded: {line!r}"
        names.append(name.lower())
        if name.lower() == b"content-length":
            assert value.strip().isdigit(), f"bad Content-Length forwarded: {line!r}"
            length = int(value)
    assert names.count(b"host") == 1, f"not exactly one Host forwarded: {head!r}"
    assert names.count(b"content-length") <= 1, f"several Content-Length forwarded: {head!r}"
    assert b"transfer-encoding" not in names, f"Transfer-Encoding forwarded: {head!r}"
    return method, length or 0


class _Backend:
    """
    The backend's side of every connection the balancer opened: reads
    what it was sent and answers each whole request.
    """

    def __init__(self, balancer: MemoryBalancer, answer: int) -> None:
        self.balancer = balancer
        self.answer = answer
        self.read: Dict[int, int] = {}
        self.lost = set()
        self.requests: List[bytes] = []

    def serve(self, answering: bool = True) -> None:
        # An answer may send the next request at once (a pipelined one, on
        # the kept connection): go round until nothing moves.
        for _ in range(1000):
            moved = False
            for connections in self.balancer.opened.values():
                for protocol, transport in connections:
                    moved = self._serve(protocol, transport, answering) or moved
            if not moved:
                return
        raise AssertionError("the backend is never done answering")

    def _serve(self, protocol, transport, answering: bool) -> bool:
        key = id(transport)
        if key in self.lost:
            return False
        if transport.disconnecting:
            # The reactor would tell the protocol that its connection ended.
            self.lost.add(key)
            protocol.connectionLost(Failure(ConnectionDone()))
            return True
        data = transport.value()
        at = self.read.get(key, 0)
        while answering:
            end = data.find(b"\r\n\r\n", at)
            if end == -1:
                break
            method, length = _checkForwardedHead(data[at:end])
            if len(data) < end + 4 + length:
                break
            at = end + 4 + length
            self.requests.append(method)
            head, body = ANSWERS[self.answer]
            protocol.dataReceived(head + b"\r\n" + (b"" if method == b"HEAD" else body))
            if self.answer == CLOSES:
                transport.loseConnection()
                self.lost.add(key)
                protocol.connectionLost(Failure(ConnectionDone()))
                break
        moved = at != self.read.get(key, 0)
        self.read[key] = at
        return moved


def _responses(out: bytes, handled: List[bytes], closed: bool, clientLeft: bool):
    """
    Parse what the client received; return the final responses.
    """
    finals = []
    rest = out
    while rest:
        method = handled[len(finals)] if len(finals) < len(handled) else b"GET"
        try:
            parsed = parseResponse(rest, method, closed=closed and not clientLeft)
        except FramingError as e:
            raise AssertionError(f"malformed response to the client: {e}; all: {out!r}") from e
        if parsed is None:
            assert clientLeft, f"an unfinished response to the client: {rest!r}; all: {out!r}"
            break
        response, rest = parsed
        if response.code >= 200:
            finals.append(response)
        elif closed and not rest:
            raise AssertionError(f"closed after an interim response: {out!r}")
    return finals


def check(data: bytes) -> None:
    choices, pieces = split(data)
    answer = choices & 3
    advance = bool(choices & 4)
    hold = bool(choices & 8)
    leave = bool(choices & 16)

    with LoggedErrors() as logged:
        balancer = MemoryBalancer(maxBodySize=64, bodyTimeout=20.0, backendTimeout=30.0)
        balancer.site.requestFactory = _RecordingRequest
        balancer.site.fuzzHandled = handled = []
        backend = _Backend(balancer, answer)
        channel, transport = balancer.client()
        # Limits small enough for inputs of a few KiB to pass them.
        channel.MAX_LENGTH = LINE_LIMIT
        channel.totalHeadersSize = HEAD_LIMIT
        channel.maxHeaders = HEADERS_LIMIT
        state = {"closed": False, "lost": False}

        def settle(answering: bool = True) -> None:
            backend.serve(answering)
            if transport.disconnecting and not state["lost"]:
                # The balancer closed the client's connection; a client that
                # reads would have had everything, and the reactor says so.
                state["closed"] = state["lost"] = True
                try:
                    channel.connectionLost(Failure(ConnectionDone()))
                except Exception as e:
                    raise AssertionError(f"connectionLost raised {e!r}") from e
                backend.serve(answering)

        def wait(seconds: float, answering: bool = True) -> None:
            # One timer at a time, so that the reactor's part (the
            # connection lost after a close) comes between two timers.
            clock = balancer.clock
            until = clock.seconds() + seconds
            for _ in range(1000):
                due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= until]
                if not due:
                    break
                clock.advance(max(min(due) - clock.seconds(), 0))
                settle(answering)
            else:
                raise AssertionError(f"timers keep firing: {clock.getDelayedCalls()}")
            clock.advance(until - clock.seconds())
            settle(answering)

        for piece in pieces:
            if state["lost"]:
                break
            try:
                channel.dataReceived(piece)
            except Exception as e:
                raise AssertionError(f"dataReceived raised {e!r}") from e
            settle(not hold)
            if advance:
                wait(4, not hold)
        clientLeft = leave and not state["lost"]
        if clientLeft:
            state["lost"] = True
            channel.connectionLost(Failure(ConnectionLost()))
        # Let everything finish: the backend answers, every timer fires
        # (an idle client connection is closed after 60 seconds).
        settle()
        wait(200)
        closed = state["closed"]
        if not state["lost"]:
            # Still open, idle: the client closes.
            state["lost"] = True
            channel.connectionLost(Failure(ConnectionDone()))
            wait(61)
    logged.check()

    out = transport.value()
    finals = _responses(out, handled, closed, clientLeft)
    if not clientLeft:
        assert len(finals) >= len(handled), (
            f"{len(handled)} requests handled, {len(finals)} answered: {out!r}"
        )
        assert len(finals) <= len(handled) + 1, (
            f"{len(handled)} requests handled, {len(finals)} answered: {out!r}"
        )
        if len(finals) > len(handled):
            assert 400 <= finals[-1].code < 500 and closed, (
                f"an answer to no request, or not closed after it: {out!r}"
            )
    assert balancer.site.inFlight == 0, f"{balancer.site.inFlight} requests still in flight"


if __name__ == "__main__":
    import atheris
    from twisted.protocols import basic
    from twisted.web import http, server

    instrumentModules(basic, http, server)
    sys.argv[0] = command(__spec__, __file__)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
