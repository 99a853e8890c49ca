"""
Fuzz the upstream client's response parser: the bytes are a backend's
answer to a request on a L{BackendConnection}, delivered in pieces.  When
a response leaves the connection in the pool, the next request (up to 8)
takes it before the next piece, and the bytes after are its response.

Invariants, for every exchange: nothing raises out of the protocol and
nothing is logged as an error; the receiver hears C{responseHead} at
most once and before any body, then exactly one of C{responseDone} or
C{responseFailed} once the connection has closed, and nothing after it;
a body that is done is the one its framing says (Content-Length,
chunked, or up to a clean close); a connection kept for the next request
had a response whose end was certain.

Choices (see L{tests.fuzz._common.split}, one extra byte):
 - bit 0: the request was a HEAD;
 - bit 1: the backend's close is a reset, not a clean close;
 - bit 2: the connection is TLS (a close without close_notify ends a body);
 - bit 3: the receiver pauses the connection at each body piece (the
   client is slow), and it is resumed before the next piece;
 - bit 4: 20 seconds pass after each piece (the timeout is 30), and 30
   after the last;
 - bit 5: the receiver gives up (the client left) at its first body piece;
 - bit 6: the receiver gives up at the head;
 - bit 7: the request has a body too large to go out with the head, so
   that it is still being sent when the response comes.

Run it as a fuzzer with C{tests/fuzz/run.sh response}.
"""

import sys
from io import BytesIO

from tests.fuzz._common import LoggedErrors, command, instrumentModules, instrumented, split

with instrumented(__name__):
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from twisted.internet.interfaces import ISSLTransport
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from zope.interface import directlyProvides

    from rrbalancer.client import INLINE_BODY_SIZE, ConnectionPool

    from tests.support import FramingError, _dechunk

REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
TIMEOUT = 30.0
MAX_EXCHANGES = 8


class Recorder:
    """
    A receiver that records the calls it gets and checks their order as
    they come.
    """

    def __init__(self, pool: ConnectionPool, pauseAtBody: bool, abortAtBody: bool, abortAtHead: bool):
        self.pool = pool
        self.connection = None
        self.pauseAtBody = pauseAtBody
        self.abortAtBody = abortAtBody
        self.abortAtHead = abortAtHead
        self.events = []
        self.head = None
        self.body = b""
        self.gaveUp = False
        self.keptAtDone = False

    def _event(self, name: str) -> None:
        assert not self.gaveUp, f"{name} after the receiver gave up: {self.events}"
        ends = [e for e in self.events if e in ("done", "failed")]
        assert not ends, f"{name} after {ends[0]}: {self.events}"
        self.events.append(name)

    def _giveUp(self) -> None:
        self.gaveUp = True
        self.connection.abort()

    def responseHead(self, code, reason, headers, contentLength) -> None:
        self._event("head")
        assert self.events.count("head") == 1, f"a second head: {self.events}"
        assert 200 <= code <= 999, f"status {code} handed on as final"
        self.head = (code, reason, headers, contentLength)
        if self.abortAtHead:
            self._giveUp()

    def responseBody(self, data: bytes) -> None:
        self._event("body")
        assert self.head is not None, f"body before the head: {self.events}"
        assert data, "an empty body piece"
        self.body += data
        if self.abortAtBody:
            self._giveUp()
        elif self.pauseAtBody:
            self.connection.pauseProducing()

    def responseDone(self) -> None:
        self._event("done")
        assert self.head is not None, "done without a head"
        # The pool takes a reusable connection back before saying done.
        self.keptAtDone = self.pool.idleCount > 0

    def responseFailed(self, error) -> None:
        self._event("failed")


def _finalHead(stream: bytes):
    """
    Where the final (non-1xx) response's body starts in C{stream}, and its
    status line; None if there is no such head.
    """
    at = 0
    while True:
        end = stream.find(b"\r\n\r\n", at)
        if end == -1:
            return None
        statusLine = stream[at:end].split(b"\r\n", 1)[0]
        parts = statusLine.split(b" ", 2)
        at = end + 4
        if len(parts) >= 2 and parts[1][:1] != b"1":
            return at, statusLine


def _tokens(headers, name: bytes):
    return [
        t.strip().lower()
        for k, v in headers
        if k.lower() == name
        for t in v.split(b",")
        if t.strip()
    ]


def _checkBody(receiver: Recorder, stream: bytes, isHead: bool) -> None:
    """
    A response that is done carries the body its framing says, and a
    connection kept after it had a response with a certain end.
    """
    code, reason, headers, contentLength = receiver.head
    found = _finalHead(stream)
    assert found is not None, "done, but no final head in the stream"
    bodyStart, statusLine = found
    rest = stream[bodyStart:]
    noBody = isHead or code in (204, 304)
    codings = _tokens(headers, b"transfer-encoding")
    if noBody:
        assert receiver.body == b"", f"a body for a response without one: {receiver.body!r}"
        framing = "none"
    elif codings:
        framing = "chunked"
        try:
            decoded = _dechunk(rest)
        except FramingError:
            decoded = None  # the strict decoder is stricter; no comparison
        if decoded is not None:
            assert receiver.body == decoded[0], (receiver.body, decoded[0])
    elif contentLength is not None:
        framing = "length"
        assert len(receiver.body) == contentLength, (len(receiver.body), contentLength)
        assert receiver.body == rest[:contentLength]
    else:
        framing = "close"
        assert receiver.body == rest, (receiver.body, rest)
    if receiver.keptAtDone:
        assert framing != "close", "kept a connection whose body ended at a close"
        assert b"close" not in _tokens(headers, b"connection"), "kept after Connection: close"
        if statusLine.startswith(b"HTTP/1.0"):
            assert b"keep-alive" in _tokens(headers, b"connection"), "kept an HTTP/1.0 connection"
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        assert not (codings and lengths), "kept after both Transfer-Encoding and Content-Length"


def check(data: bytes) -> None:
    choices, pieces = split(data, extra=1)
    isHead = bool(choices & 1)
    reset = bool(choices & 2)
    tls = bool(choices & 4)
    pause = bool(choices & 8)
    advance = bool(choices & 16)

    clock = Clock()

    def connect(pool):
        raise AssertionError("the harness opens its connection itself")

    pool = ConnectionPool(connect, clock, maxIdle=4, idleTimeout=60)
    protocol = pool.buildProtocol()
    transport = StringTransport()
    reason = Failure(ConnectionLost() if reset else ConnectionDone())
    # Each exchange: its receiver and the bytes that arrived while it was
    # the one under way.
    exchanges = []

    def start() -> None:
        receiver = Recorder(pool, pause, bool(choices & 32), bool(choices & 64))
        receiver.connection = protocol
        exchanges.append((receiver, []))
        if choices & 128 and len(exchanges) == 1:
            size = INLINE_BODY_SIZE + 1
            protocol.request(REQUEST, BytesIO(b"x" * size), size, isHead, receiver, TIMEOUT)
        else:
            protocol.request(REQUEST, None, 0, isHead, receiver, TIMEOUT)

    with LoggedErrors() as logged:
        protocol.makeConnection(transport)
        if tls:
            directlyProvides(transport, ISSLTransport)
        start()
        for piece in pieces:
            if transport.disconnecting:
                # A transport being closed reads nothing more.
                break
            if exchanges[-1][0].keptAtDone and len(exchanges) < MAX_EXCHANGES:
                # The connection went back to the pool: the next request
                # takes it, and what follows is its response.
                assert pool.idleConnection() is protocol, "kept, but not in the pool"
                start()
            if transport.producerState == "paused":
                protocol.resumeProducing()
            try:
                protocol.dataReceived(piece)
            except Exception as e:
                raise AssertionError(f"dataReceived raised {e!r}") from e
            exchanges[-1][1].append(piece)
            if advance:
                clock.advance(20)
        if advance:
            # A silence as long as the timeout, before the backend closes.
            clock.advance(TIMEOUT)
        # Whatever happened, the connection ends: the backend closes it,
        # or the protocol had closed it itself.
        try:
            protocol.connectionLost(reason)
        except Exception as e:
            raise AssertionError(f"connectionLost raised {e!r}") from e
        clock.advance(3600)
    logged.check()

    for receiver, received in exchanges:
        events = receiver.events
        ends = [e for e in events if e in ("done", "failed")]
        if receiver.gaveUp:
            assert not ends, f"an end for a receiver that gave up: {events}"
        else:
            assert len(ends) == 1, f"not exactly one end: {events}"
        assert events.count("head") <= 1, events
        if "done" in events:
            _checkBody(receiver, b"".join(received), isHead)
    assert pool.idleCount == 0, "a closed connection still kept"
    assert not clock.getDelayedCalls(), f"timers left: {clock.getDelayedCalls()}"


if __name__ == "__main__":
    import atheris
    from twisted.web import http

    instrumentModules(http)
    sys.argv[0] = command(__spec__, __file__)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
