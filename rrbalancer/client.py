"""
The client side of the proxy: HTTP/1.1 to backends, over kept-alive
connections.

L{twisted.web.client.Agent} is correct but costs as much per request as the
connections its pool saves; L{twisted.web.proxy.ProxyClient} is cheap but
speaks HTTP/1.0 with a connection per request and misreads several
responses.  This module is the small thing in between: one exchange at a
time per connection, a response head parsed once into plain values, the
body handed on as it arrives, and connections handed back to a
L{ConnectionPool} when the exchange leaves them clean.

Whoever starts an exchange gives a I{receiver} with four methods, called in
this order: C{responseHead(code, reason, headers, contentLength)} once,
C{responseBody(data)} any number of times, then exactly one of
C{responseDone()} or C{responseFailed(error)} (C{responseFailed} may also
come before any head).

A request that offers an upgrade (WebSocket, or any other protocol) may
instead be answered C{101 Switching Protocols}: then the receiver's
C{responseSwitched(reason, headers, rest)} is called, and nothing else.  The
connection has left HTTP; the receiver either makes it one end of a tunnel
with L{BackendConnection.startTunnel} (C{rest} being the bytes that came
after the head) or aborts it.  Such a connection never goes back to its
pool, whatever the answer.
"""

import re
from collections import deque
from typing import Callable, Deque, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ._twisted import readStamped, writeNow
from .headers import TOKEN_CHARS
from .memory import readLightly

# A response head larger than this is refused (NGINX's default buffers
# allow 4-8 KiB; be generous, but bounded).
MAX_HEAD_SIZE = 64 * 1024
# Request bodies up to this size go out in the same write as the head.
INLINE_BODY_SIZE = 64 * 1024
BODY_CHUNK_SIZE = 64 * 1024

_NO_BODY_STATUS = (204, 304)
# How far (seconds) before the clock's now a kernel's stamp of arrival may
# be, and be taken for the same clock's (a test's fake clock is not).
_STAMP_TRUSTED = 60.0


class BackendError(Exception):
    """
    An exchange with a backend did not complete.

    @ivar requestSent: the request may have reached the backend, so the
        backend may have acted on it.
    @ivar responseStarted: part of the response was already handed on.
    @ivar gotBytes: the backend had sent something (if only an interim
        response), so it has certainly seen the request.
    @ivar reused: the exchange ran on a connection kept from an earlier one.
    """

    requestSent = True
    responseStarted = False
    gotBytes = False
    reused = False

    def __init__(self, message: str, **flags) -> None:
        super().__init__(message)
        for name, value in flags.items():
            setattr(self, name, value)


class ConnectError(BackendError):
    """
    No connection could be opened: nothing was sent.
    """

    requestSent = False


class BackendBusy(ConnectError):
    """
    The backend has its C{maxConnections} in use and its queue is full, or
    the wait for a connection was too long: nothing was sent.
    """


class ProtocolError(BackendError):
    """
    The backend broke HTTP/1.1: a malformed or oversized head, bad framing.
    Nothing from after the fault is passed on, and the connection is not
    used again.
    """


class ResponseTimeout(BackendError):
    """
    The backend did not answer in time.
    """


Headers = List[Tuple[bytes, bytes]]


_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _parseHead(head: bytes) -> Tuple[bytes, int, bytes, Headers]:
    """
    Parse a response head (status line and header lines, CRLF-separated,
    without the blank line).

    @raise ValueError: the head is not one a proxy can pass on safely.
    """
    statusLine, sep, block = head.partition(b"\r\n")
    parts = statusLine.split(b" ", 2)
    if len(parts) < 2:
        raise ValueError("malformed status line")
    version, code = parts[0], parts[1]
    reason = parts[2] if len(parts) == 3 else b""
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError("unsupported HTTP version")
    if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
        raise ValueError("malformed status code")
    if _BAD_REASON.search(reason) is not None:
        # A bare CR would end the status line for some clients.
        raise ValueError("malformed reason phrase")
    if not sep:
        return version, int(code), reason, []
    lines = block.split(b"\r\n")
    bare = block.replace(b"\r\n", b"")
    if b"\r" in bare or b"\n" in bare or b"\x00" in bare:
        # Some value is malformed, or a line is: which, and where, as
        # _headerLines finds it.
        return version, int(code), reason, _headerLines(lines)
    # No value can be malformed now: only a name can, and the first line
    # whose name is not a token is the one _headerLines would refuse.
    # (Split and searched rather than matched with patterns: those took a
    # third longer on CPython and seven times as long on PyPy, where
    # parsing a check's answer was then a quarter of what a check cost.
    # Nothing here backtracks: the time is linear in the head's size.)
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TOKEN_CHARS):
            raise ValueError("malformed header line")
        headers.append((name, value.strip(b" \t")))
    return version, int(code), reason, headers


def _headerLines(lines: List[bytes]) -> Headers:
    """
    Header lines one by one, for the exact reason a head is refused.
    """
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, TOKEN_CHARS):
            # Also refuses obsolete line folding (RFC 9112 section 5.2).
            raise ValueError("malformed header line")
        value = value.strip(b" \t")
        if b"\n" in value or b"\x00" in value or b"\r" in value:
            raise ValueError("malformed header value")
        headers.append((name, value))
    return headers


def _framing(headers: Headers) -> Tuple[List[bytes], List[bytes], List[bytes]]:
    """
    The response's C{Connection} options and transfer codings (lowercased
    tokens) and its C{Content-Length} values, in one pass over the headers.
    """
    connection: List[bytes] = []
    codings: List[bytes] = []
    lengths: List[bytes] = []
    for key, value in headers:
        key = key.lower()
        if key == b"content-length":
            lengths.append(value)
        elif key == b"connection" or key == b"transfer-encoding":
            tokens = connection if key == b"connection" else codings
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.append(token)
    return connection, codings, lengths


def _protocolNames(values: List[bytes]) -> Set[bytes]:
    names = set()
    for value in values:
        for item in value.split(b","):
            name = item.strip().split(b"/", 1)[0].strip().lower()
            if name:
                names.add(name)
    return names


def upgradeAccepted(offered: bytes, chosen: List[bytes]) -> bool:
    """
    Does a C{101}'s C{Upgrade} (C{chosen}, its values) switch only to
    protocols the request offered?  (Names compared without their
    versions and case: C{WebSocket} answers C{websocket}.)
    """
    names = _protocolNames(chosen)
    return bool(names) and names <= _protocolNames([offered])


def describeTLSFailure(reason) -> Optional[str]:
    """
    A TLS failure in words (OpenSSL gives a list of tuples), or None when
    C{reason} is no TLS failure.
    """
    if not isinstance(reason, Failure):
        return None
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(VerificationError):
        return "the certificate does not name the backend"
    if reason.check(SSL.Error):
        errors = reason.value.args[0] if reason.value.args else []
        # The stack ends with the summary ("certificate verify failed");
        # what comes before it is OpenSSL's own detail.
        words = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
        return words[-1] if words else "handshake failed"
    return None


class BackendConnection(Protocol):
    """
    One connection to a backend, carrying one exchange at a time.

    It is also the push producer of the response body: a consumer that
    cannot keep up pauses it, which stops reading from the backend, so that
    a slow client holds back a fast backend instead of filling memory.
    """

    reused = False
    # The whole response is in the bytes at hand as its head is handed on:
    # its body and its end follow before responseHead's caller returns.
    responseInHand = False
    # When the response's first bytes reached this host (as the reactor's
    # clock counts): see _arrival.
    responseArrived = 0.0
    _stamp = None
    _receiver = None
    _decoder = None
    _producer = None
    _responseStarted = False
    _paused = False
    _timeoutCall = None
    _timeout: Optional[float] = None
    _upgrade = None
    _tunnel = None
    _inLoad = False
    _unread = None

    def __init__(self, pool: "ConnectionPool", clock: IReactorTime) -> None:
        self.pool = pool
        self._clock = clock
        self._buffer = b""
        self._open = False
        self.idleSince = 0.0

    # -- Protocol -----------------------------------------------------------

    def connectionMade(self) -> None:
        self._open = True
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self.readAsAsked()

    def readAsAsked(self) -> None:
        """
        Read as the pool asks now: with the kernel's stamps or not, and
        watched for answers waiting unread or not (see L{ConnectionPool}).
        """
        transport = self.transport
        # The endpoint's wrapper around this protocol only passes bytes on:
        # reads skip it.
        receive = self.dataReceived
        pool = self.pool
        if not (pool.stampArrivals and readStamped(transport, self._arrival, receive)):
            readLightly(transport, receive)
        unread = pool.unread
        if unread is not self._unread:
            if self._unread is not None:
                self._unread.forget(self)
            self._unread = unread
            if unread is not None:
                unread.watch(self)

    def _arrival(self, seconds: float) -> None:
        """
        The bytes about to be read reached this host at C{seconds}, by the
        kernel's stamp (see L{ConnectionPool.stampArrivals}).
        """
        self._stamp = seconds

    def dataReceived(self, data: bytes) -> None:
        stamp = self._stamp
        self._stamp = None
        if self._receiver is None:
            if self._tunnel is not None:
                self._tunnel.dataReceived(data)
                return
            # Nothing is being asked: bytes now mean the backend is
            # confused or closing; either way the connection is spent.
            self._open = False
            self.transport.abortConnection()
            return
        if not self._responseStarted:
            self._responseStarted = True
            if self._unread is not None:
                self._unread.settled(self)
            now = self._clock.seconds()
            # A stamp is trusted only on the clock's own scale.
            self.responseArrived = (
                stamp if stamp is not None and now - _STAMP_TRUSTED <= stamp <= now else now
            )
        if self._timeoutCall is not None and self._timeout is not None:
            self._timeoutCall.reset(self._timeout)
        if self._decoder is None:
            self._buffer += data
            self._readHead()
        else:
            self._decoder(data)

    def connectionLost(self, reason=ConnectionDone) -> None:
        self._open = False
        self.pool.lost(self)
        if self._unread is not None:
            self._unread.forget(self)
        if self._receiver is None:
            self._cancelTimeout()
            tunnel, self._tunnel = self._tunnel, None
            if tunnel is not None:
                tunnel.connectionLost(reason)
            return
        tls = describeTLSFailure(reason)
        if tls is not None and not self._responseStarted:
            # The handshake failed: nothing reached the backend.
            self._fail(ConnectError(f"TLS with the backend failed: {tls}", reused=self.reused))
            return
        if self._decoder == self._readToClose:
            # Only a clean close ends such a body; a reset cut it short.
            # (Over TLS, a close without close_notify looks like a reset, and
            # is taken for an end, as NGINX does.)
            if (
                reason is ConnectionDone
                or (isinstance(reason, Failure) and reason.check(ConnectionDone))
                or ISSLTransport.providedBy(self.transport)
            ):
                self._finish()
                return
            message = "backend connection broke in the middle of the body"
        elif self._decoder is not None:
            message = "backend closed the connection in the middle of the body"
        else:
            message = "backend closed the connection before a complete response"
        self._fail(BackendError(message, reused=self.reused))

    # -- IPushProducer, for the response body --------------------------------

    def pauseProducing(self) -> None:
        if not self._paused and self._open:
            self._paused = True
            self.transport.pauseProducing()
            # From now on the wait is the client's: the same timeout runs
            # on its reading, as NGINX's send_timeout does.
            self._restartTimeout()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            if self._open:
                self.transport.resumeProducing()
                self._restartTimeout()

    def _startTimer(self, timeout: float) -> None:
        call = self._timeoutCall
        if call is not None and call.active():
            # The last exchange's timer, left running: moving a timer later
            # costs less than a new one (see _finish).  Moving one sooner
            # does not: the reactor then searches its whole heap of timers
            # for it, one per kept connection, so it is replaced instead.
            if call.getTime() <= self._clock.seconds() + timeout:
                call.reset(timeout)
                return
            call.cancel()
        self._timeoutCall = self._clock.callLater(timeout, self._timedOut)

    def _restartTimeout(self) -> None:
        call = self._timeoutCall
        if call is not None and self._timeout is not None and call.active():
            call.reset(self._timeout)

    def stopProducing(self) -> None:
        self.abort()

    # -- the exchange -------------------------------------------------------

    @property
    def isOpen(self) -> bool:
        return self._open

    @property
    def awaitingAnswer(self) -> bool:
        """
        An exchange that counts in its backend's load waits for its
        answer's first bytes (see L{rrbalancer._unread}).
        """
        return self._inLoad and self._receiver is not None and not self._responseStarted

    def request(
        self,
        head: bytes,
        body,
        bodyLength: int,
        isHead: bool,
        receiver,
        timeout: Optional[float],
        upgrade: Optional[bytes] = None,
        inLoad: bool = False,
    ) -> None:
        """
        Send a request and hand its response to C{receiver}.

        @param head: the request line and headers, framing included, ending
            with the blank line.
        @param body: a file positioned at the start of the body, or L{None}.
        @param timeout: how long to wait for each read of the response; or
            None for no timer at all, where the caller keeps a deadline of
            its own and calls L{abort} when it passes (health checks do, a
            timer per check being what thousands of them cannot afford).
        @param upgrade: the protocols the request offers in its C{Upgrade}
            header, when it offers any: a C{101} naming one of them is then
            a protocol switch, not an error, and the connection is closed
            after any other answer rather than kept (a backend may take an
            upgrade it refused as the end of its connection's HTTP).
        @param inLoad: the exchange counts in its backend's load (a
            client's request, not a health check).
        """
        self._receiver = receiver
        self._inLoad = inLoad
        self._isHead = isHead
        self._decoder = None
        self._buffer = b""
        self._keepAlive = upgrade is None
        self._upgrade = upgrade
        self._responseStarted = False
        self._timeout = timeout
        # Without a timeout, the last exchange's timer, if any, is left
        # running and fires unheeded (see _timedOut): cancelled for each
        # health check between two requests, it would be a cancelled timer
        # a check in the reactor's heap, which keeps them a while.
        if timeout is not None:
            self._startTimer(timeout)
        self._bodySent = body is None or bodyLength == 0
        if self._bodySent:
            writeNow(self.transport, head)
        elif bodyLength <= INLINE_BODY_SIZE:
            writeNow(self.transport, head + body.read(bodyLength))
            self._bodySent = True
        else:
            self.transport.write(head)
            self._producer = _BodyProducer(self, body, bodyLength)
            self.transport.registerProducer(self._producer, False)

    def _bodyDone(self) -> None:
        self._bodySent = True
        self._stopBody()

    def _stopBody(self) -> None:
        """
        Stop sending the request body (it is all sent, or the exchange is
        over: a backend may answer before it has read the body).  The
        spooled body may be closed from now on.
        """
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
            self.transport.unregisterProducer()

    def abort(self) -> None:
        """
        Give up the exchange (the client went away): the connection cannot
        be reused, since the rest of the response would still arrive on it.
        """
        self._receiver = None
        if self._unread is not None:
            self._unread.settled(self)
        self._cancelTimeout()
        self._stopBody()
        if self._open:
            self._open = False
            self.transport.abortConnection()

    def _timedOut(self) -> None:
        self._timeoutCall = None
        receiver = self._receiver
        if receiver is None or self._timeout is None:
            # A timer left running after an exchange, with no timed one
            # since.
            return
        stalled = self._paused
        self.abort()
        if receiver is not None:
            receiver.responseFailed(
                ResponseTimeout(
                    "the client stopped reading"
                    if stalled
                    else "backend did not answer in time",
                    responseStarted=self._decoder is not None,
                    gotBytes=self._responseStarted,
                    reused=self.reused,
                )
            )

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None:
            if self._timeoutCall.active():
                self._timeoutCall.cancel()
            self._timeoutCall = None

    def _fail(self, error: BackendError) -> None:
        receiver = self._receiver
        error.responseStarted = self._decoder is not None
        error.gotBytes = self._responseStarted
        self.abort()
        if receiver is not None:
            receiver.responseFailed(error)

    def _readHead(self) -> None:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end == -1 or end > self.pool.maxHeadSize:
                if end != -1 or len(self._buffer) > self.pool.maxHeadSize:
                    self._fail(ProtocolError("response head too large"))
                return
            head = self._buffer[:end]
            rest = self._buffer[end + 4 :]
            try:
                version, code, reason, headers = _parseHead(head)
            except ValueError as e:
                self._fail(ProtocolError(f"invalid response: {e}"))
                return
            if code < 200:
                if code == 101:
                    self._switch(reason, headers, rest)
                    return
                # An interim answer (100 Continue, 103 Early Hints): the
                # final one follows on the same connection.
                self._buffer = rest
                continue
            self._buffer = b""
            self._startBody(version, code, reason, headers, rest)
            return

    def _switch(self, reason: bytes, headers: Headers, rest: bytes) -> None:
        """
        A C{101}: the end of HTTP on this connection, if the request asked
        for it and the answer names a protocol it offered (RFC 9110 section
        15.2.2).
        """
        if self._upgrade is None:
            self._fail(ProtocolError("unexpected protocol switch"))
            return
        if not self._bodySent:
            self._fail(ProtocolError("protocol switch before the request body was sent"))
            return
        chosen = [value for name, value in headers if name.lower() == b"upgrade"]
        if not chosen:
            self._fail(ProtocolError("protocol switch without Upgrade"))
            return
        if not upgradeAccepted(self._upgrade, chosen):
            self._fail(ProtocolError("protocol switch to a protocol not offered"))
            return
        receiver = self._receiver
        self._receiver = None
        self._buffer = b""
        self._cancelTimeout()
        receiver.responseSwitched(reason, headers, rest)

    def startTunnel(self, end) -> None:
        """
        After a C{101}: every byte read from now on goes to C{end} (a
        L{rrbalancer.tunnel.TunnelEnd}), and so does the connection's loss.
        """
        self._tunnel = end

    def _startBody(self, version, code, reason, headers, rest: bytes) -> None:
        connection, transferCodings, lengths = _framing(headers)
        if b"close" in connection or (
            version == b"HTTP/1.0" and b"keep-alive" not in connection
        ):
            self._keepAlive = False
        if transferCodings and lengths:
            # Transfer-Encoding wins (RFC 9112 section 6.3), but the
            # response may be an attempt at splitting: use the connection
            # no more.
            self._keepAlive = False
        contentLength = None
        if len(lengths) == 1 and not transferCodings and lengths[0].isdigit():
            contentLength = int(lengths[0])
        elif lengths and not transferCodings:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                self._fail(ProtocolError("invalid Content-Length"))
                return
            contentLength = int(values.pop())

        receiver = self._receiver
        if self._isHead or code in _NO_BODY_STATUS:
            self._decoder = self._noBody
            self.responseInHand = True
            receiver.responseHead(code, reason, headers, contentLength)
            if self._receiver is receiver:
                self._finish(extra=rest)
            return
        if transferCodings:
            if transferCodings != [b"chunked"]:
                # Any other coding would reach the client still applied,
                # without the (hop-by-hop) header that names it.
                self._fail(ProtocolError("unsupported transfer coding"))
                return
            chunked = ChunkedDecoder(self._deliver, self._chunkedDone)
            self._decoder = self._dechunker(chunked)
        elif contentLength is not None:
            self._remaining = contentLength
            self._decoder = self._readLength
        else:
            self._decoder = self._readToClose
            self._keepAlive = False
        self.responseInHand = contentLength is not None and len(rest) >= contentLength
        receiver.responseHead(code, reason, headers, contentLength)
        if self._receiver is not receiver:
            return
        if contentLength == 0 and self._decoder == self._readLength:
            self._finish(extra=rest)
        elif rest:
            self._decoder(rest)

    def _deliver(self, data: bytes) -> None:
        if data and self._receiver is not None:
            self._receiver.responseBody(data)

    def _noBody(self, data: bytes) -> None:
        raise AssertionError("no exchange is reading a body")  # pragma: no cover

    def _readLength(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self._deliver(data)
            return
        self._remaining = 0
        receiver = self._receiver
        if remaining and receiver is not None:
            receiver.responseBody(data[:remaining])
        if self._receiver is not None:
            self._finish(extra=data[remaining:])

    def _readToClose(self, data: bytes) -> None:
        self._deliver(data)

    def _dechunker(self, chunked: "ChunkedDecoder") -> Callable[[bytes], None]:
        def decode(data: bytes) -> None:
            try:
                chunked.dataReceived(data)
            except ValueError as e:
                self._fail(ProtocolError(f"invalid chunked body: {e}"))

        return decode

    def _chunkedDone(self, extra: bytes) -> None:
        if self._receiver is not None:
            self._finish(extra=extra)

    def _finish(self, extra: bytes = b"") -> None:
        receiver = self._receiver
        self._receiver = None
        self._decoder = None
        if self._producer is not None:
            self._stopBody()
        reusable = self._keepAlive and self._bodySent and not extra and self._open
        if reusable:
            # The timer is left running for the next exchange on this
            # connection, which moves it; if none comes, it fires unheeded.
            if self._paused:
                self.resumeProducing()
            self.pool.release(self)
        else:
            self._cancelTimeout()
            if self._open:
                self._open = False
                self.transport.loseConnection()
        if receiver is not None:
            receiver.responseDone()


class ChunkedDecoder:
    """
    A strict decoder of a chunked body (RFC 9112 section 7.1), written here
    rather than borrowed so that its limits are the balancer's: a chunk
    size of at most 16 hex digits, size and trailer lines of bounded
    length, and the CRLF after each chunk required.  Data is handed on
    only once the line that announced it was valid; an error is a
    L{ValueError} and nothing after the fault is delivered.

    @param deliver: called with the data of each chunk, as it arrives.
    @param done: called with the bytes after the body, once it ended.
    """

    MAX_LINE = 4096
    MAX_TRAILERS = 64 * 1024

    def __init__(self, deliver: Callable[[bytes], None], done: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._done = done
        self._buffer = b""
        self._state = "size"
        self._left = 0
        self._trailers = 0

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        self._buffer = b""
        while buffer:
            state = self._state
            if state == "data":
                piece, buffer = buffer[: self._left], buffer[self._left :]
                self._left -= len(piece)
                if self._left == 0:
                    self._state = "crlf"
                self._deliver(piece)
                continue
            if state == "crlf":
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                buffer = buffer[2:]
                self._state = "size"
                continue
            end = buffer.find(b"\r\n")
            if end == -1:
                if len(buffer) > self.MAX_LINE:
                    raise ValueError("chunk line too long")
                break
            line, buffer = buffer[:end], buffer[end + 2 :]
            if state == "size":
                self._size(line)
            else:
                self._trailers += len(line) + 2
                if self._trailers > self.MAX_TRAILERS:
                    raise ValueError("trailers too large")
                if not line:
                    self._state = "done"
                    self._done(buffer)
                    return
        self._buffer = buffer

    def _size(self, line: bytes) -> None:
        if len(line) > self.MAX_LINE:
            raise ValueError("chunk line too long")
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not 0 < len(size) <= 16 or not _HEX.issuperset(size):
            raise ValueError("invalid chunk size")
        self._left = int(size, 16)
        self._state = "data" if self._left else "trailer"


_HEX = frozenset(b"0123456789abcdefABCDEF")


class _BodyProducer:
    """
    Pulls a large request body from its spool file as the backend takes it.
    """

    def __init__(self, connection: BackendConnection, body, length: int) -> None:
        self._connection = connection
        self._body = body
        self._left = length

    def resumeProducing(self) -> None:
        if self._left <= 0:
            return
        try:
            chunk = self._body.read(min(BODY_CHUNK_SIZE, self._left))
        except ValueError:
            # The spool was closed under us (the client went away).
            chunk = b""
        if not chunk:
            self._left = 0
            self._connection.abort()
            return
        self._left -= len(chunk)
        self._connection.transport.write(chunk)
        if self._left <= 0:
            self._connection._bodyDone()

    def stopProducing(self) -> None:
        self._left = 0


_NO_WAITERS: Deque = deque(maxlen=0)


class ConnectionPool:
    """
    Connections to one backend, kept alive between exchanges.

    Idle connections are reused most-recently-used first (the warmest, and
    the least likely to have been closed by the backend's idle timer), at
    most C{maxIdle} are kept, and none longer than C{idleTimeout} seconds.
    A kept connection that the backend closes is dropped at once, since
    L{BackendConnection.connectionLost} reports it here.

    With C{maxConnections} set, no more connections than that are open at
    once; an exchange that finds them all busy waits in a queue of at most
    C{queueSize} for one to be released, for at most C{queueTimeout}
    seconds, and fails with L{BackendBusy} otherwise.

    @param connect: opens a new connection; fires with a connected
        L{BackendConnection} made by L{buildProtocol}.

    @ivar stampArrivals: whether connections opened from now on (and
        those open, after L{readAsAsked}) read with the kernel's stamp of
        each read's arrival (Linux's C{SO_TIMESTAMPNS}, see
        L{rrbalancer._twisted.readStamped}), for a balancing policy that
        times answers: a busy balancer reads an answer a turn of its loop
        or more after it came, and timed when read, every backend would
        look as slow as the balancer is busy.
    @ivar unread: the L{rrbalancer._unread.UnreadAnswers} that connections
        opened from now on join (and those open, after L{readAsAsked}),
        for a policy that weighs the load free of the balancer's own delay
        in reading; or None.
    """

    stampArrivals = False
    unread = None

    def __init__(
        self,
        connect: Callable[["ConnectionPool"], Deferred],
        clock: IReactorTime,
        maxIdle: int = 32,
        idleTimeout: float = 60.0,
        maxConnections: int = 0,
        queueSize: int = 100,
        queueTimeout: float = 5.0,
        maxHeadSize: int = MAX_HEAD_SIZE,
    ) -> None:
        self._connect = connect
        self.maxHeadSize = maxHeadSize
        self.peakWaiting = 0
        self._clock = clock
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self.maxConnections = maxConnections
        self.queueSize = queueSize
        self.queueTimeout = queueTimeout
        self._idle: List[BackendConnection] = []
        self._open: Set[BackendConnection] = set()
        self._connecting = 0
        # A queue only with a connection limit, made when first needed:
        # most pools never queue anyone.
        self._waiting: Deque[Tuple[Deferred, object]] = _NO_WAITERS
        self._sweepCall = None
        self._retired = False
        self.opened = 0

    def buildProtocol(self) -> BackendConnection:
        return BackendConnection(self, self._clock)

    @property
    def openCount(self) -> int:
        """
        Connections open or being opened.
        """
        return len(self._open) + self._connecting

    @property
    def waitingCount(self) -> int:
        return len(self._waiting)

    def _full(self) -> bool:
        return bool(self.maxConnections) and self.openCount >= self.maxConnections

    def idleConnection(self) -> Optional[BackendConnection]:
        """
        A kept connection, if one is open now (the common case, taken
        without a Deferred).
        """
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection._open:
                connection.reused = True
                return connection
        return None

    def acquire(self) -> Deferred:
        """
        A connection for one exchange: a kept one if any, else a new one,
        else (at the connection limit) the next one released.
        """
        connection = self.idleConnection()
        if connection is not None:
            return succeed(connection)
        if self._full():
            return self._wait()
        return self.connect()

    def acquireFresh(self) -> Deferred:
        """
        A connection no exchange has used, for one whose connection will not
        come back (an upgrade): a new one, or at the connection limit the
        next one released, which is then out of the pool for good.
        """
        if self._full():
            return self._wait()
        return self.connect()

    def connect(self) -> Deferred:
        """
        A new connection, never a kept one (for retrying after a kept
        connection turned out to be closed).
        """
        self.opened += 1
        self._connecting += 1

        def connected(connection):
            self._connecting -= 1
            self._open.add(connection)
            return connection

        def failed(failure):
            self._connecting -= 1
            self._serveWaiters()
            raise ConnectError(
                f"cannot connect: {failure.getErrorMessage()}"
            )

        return self._connect(self).addCallbacks(connected, failed)

    def _wait(self) -> Deferred:
        if len(self._waiting) >= self.queueSize:
            return fail(BackendBusy("backend busy: its queue is full"))

        def cancel(d):
            self._forget(d)

        d = Deferred(cancel)
        timer = self._clock.callLater(self.queueTimeout, self._waitedTooLong, d)
        if self._waiting is _NO_WAITERS:
            self._waiting = deque()
        self.peakWaiting = max(self.peakWaiting, len(self._waiting) + 1)
        self._waiting.append((d, timer))
        return d

    def _forget(self, d: Deferred) -> None:
        for entry in self._waiting:
            if entry[0] is d:
                self._waiting.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return

    def stopWaiting(self, d: Deferred) -> None:
        """
        Take C{d}, from L{acquire}, out of the queue if it is waiting there
        (it then fails with L{CancelledError}).
        """
        if any(entry[0] is d for entry in self._waiting):
            d.cancel()

    def _waitedTooLong(self, d: Deferred) -> None:
        self._forget(d)
        d.errback(BackendBusy("backend busy: no connection came free in time"))

    def _nextWaiter(self) -> Optional[Deferred]:
        if not self._waiting:
            return None
        d, timer = self._waiting.popleft()
        if timer.active():
            timer.cancel()
        return d

    def _serveWaiters(self) -> None:
        """
        Room was made under the limit: open connections for the waiters.
        """
        while self._waiting and not self._full():
            self.connect().chainDeferred(self._nextWaiter())

    def release(self, connection: BackendConnection) -> None:
        waiter = self._nextWaiter() if self._waiting else None
        if waiter is not None:
            connection.reused = True
            waiter.callback(connection)
            return
        if self._retired or len(self._idle) >= self.maxIdle:
            connection.abort()
            return
        connection.idleSince = self._clock.seconds()
        self._idle.append(connection)
        if self._sweepCall is None:
            self._sweepCall = self._clock.callLater(self.idleTimeout, self._sweep)

    def readAsAsked(self) -> None:
        """
        Have the connections open now read as those opened from now on
        will (C{stampArrivals}, C{unread}): a reload to a policy that
        times answers reaches the connections it keeps.
        """
        for connection in list(self._open):
            connection.readAsAsked()

    def lost(self, connection: BackendConnection) -> None:
        self._open.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass
        self._serveWaiters()

    def _sweep(self) -> None:
        self._sweepCall = None
        cutoff = self._clock.seconds() - self.idleTimeout
        for connection in [c for c in self._idle if c.idleSince <= cutoff]:
            self._idle.remove(connection)
            connection.abort()
        if self._idle:
            oldest = min(c.idleSince for c in self._idle)
            self._sweepCall = self._clock.callLater(
                max(oldest + self.idleTimeout - self._clock.seconds(), 0.01), self._sweep
            )

    def closeIdle(self, close: Optional[Callable[[List[BackendConnection]], None]] = None) -> None:
        """
        Close every kept connection (the backend is being removed, or the
        balancer is stopping): at once, or by C{close} (a
        L{PacedCloser.close}).
        """
        idle, self._idle = self._idle, []
        if close is not None:
            close(idle)
        else:
            for connection in idle:
                connection.abort()
        if self._sweepCall is not None and self._sweepCall.active():
            self._sweepCall.cancel()
        self._sweepCall = None

    def retire(self, close: Optional[Callable[[List[BackendConnection]], None]] = None) -> None:
        """
        The backend left the group: close what is kept (at once, or by
        C{close}), and from now on every connection an exchange gives back
        (a request or a check that was still running).
        """
        self._retired = True
        self.closeIdle(close)

    @property
    def idleCount(self) -> int:
        return len(self._idle)


class PacedCloser:
    """
    Closes connections a batch per turn of the reactor's loop.

    Removing ten thousand backends in one call would otherwise close their
    kept connections in one turn, and each closed connection's loss is
    handled in the next: a second in which no client is served.  The first
    C{perTurn} asked for in a turn close at once (one backend's removal is
    not delayed); the rest wait for the turns after, in order.
    """

    def __init__(self, clock: IReactorTime, perTurn: int = 200) -> None:
        self._clock = clock
        self.perTurn = perTurn
        self._waiting: Deque[BackendConnection] = deque()
        self._left = 0
        self._turn = None

    def close(self, connections) -> None:
        self._waiting.extend(connections)
        if self._turn is None:
            self._nextTurn()
        else:
            self._closeSome()

    def _nextTurn(self) -> None:
        self._turn = None
        if self._waiting:
            self._left = self.perTurn
            self._turn = self._clock.callLater(0, self._nextTurn)
            self._closeSome()

    def _closeSome(self) -> None:
        waiting = self._waiting
        while waiting and self._left > 0:
            self._left -= 1
            waiting.popleft().abort()

    def closeAll(self) -> None:
        """
        Close every connection still waiting, now (the balancer is
        stopping).
        """
        if self._turn is not None and self._turn.active():
            self._turn.cancel()
        self._turn = None
        waiting, self._waiting = self._waiting, deque()
        for connection in waiting:
            connection.abort()

    def __len__(self) -> int:
        return len(self._waiting)


class _PoolFactory(Factory):
    noisy = False

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> BackendConnection:
        return self.pool.buildProtocol()


def connectorFor(endpoint) -> Callable[[ConnectionPool], Deferred]:
    """
    The C{connect} argument of L{ConnectionPool} for a client endpoint.
    """

    def connect(pool: ConnectionPool) -> Deferred:
        return endpoint.connect(_PoolFactory(pool))

    return connect
