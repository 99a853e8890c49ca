"""
The proxying resources.

L{BalancerResource} is what a site serves: for each request it asks its
picker (the L{BackendGroup}) for the next backend and hands the request to
that backend's L{BackendProxyResource}, a L{ReverseProxyResource}.  If the
backend cannot be used and trying another one is safe, the request moves
on to the next backend, at most once per backend.

Both resources can be mounted anywhere in a twisted.web resource tree.
Under a prefix, the backend receives the rest of the path (as the stock
L{ReverseProxyResource} does), told the prefix in C{X-Forwarded-Prefix},
and its redirects come back under the prefix.

The rules for trying again (RFC 9110 section 9.2.2):
 - no connection could be opened: nothing was sent, so any method moves on;
 - the connection broke after the request was sent but before any response
   byte: only idempotent methods move on, since the backend may have acted;
 - a kept-alive connection found closed that way is first retried once on a
   fresh connection to the same backend (idempotent methods only);
 - once the response has started, nothing is retried: the client's
   connection is aborted so that it cannot take a truncated body for a
   whole one;
 - a request that offers an upgrade (a WebSocket handshake) is sent at
   most once, whatever its method: only a connection that could not be
   opened moves it on.  Answered C{101}, it becomes a tunnel between the
   client's connection and the backend's (L{rrbalancer.tunnel}).
"""

import ipaddress
import os
import re
from typing import List, Optional, Tuple
from urllib.parse import quote as urlquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from . import _twisted, http2
from .backends import Backend
from .client import BackendBusy, BackendError, ConnectError, ProtocolError, ResponseTimeout
from .config import Config, HealthConfig
from .headers import LocationRewriter, requestHead, responseHeaders, upgradeOffer
from .interfaces import IPicker, IResponseReceiver, IUpstream
from .queue import QueueFull
from .values import BackendConfig
from .tunnel import Tunnel
from .upstream import connectionPool, trustRoot

IDEMPOTENT_METHODS = frozenset(
    [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"]
)
RETRY_AFTER_SECONDS = b"5"
# Response headers the balancer sets before the backend answers, kept
# beside the backend's: its own answer to the client's "Connection: close"
# (set by Twisted), and a rate limit's quota.
_OWN_RESPONSE_HEADERS = (b"connection", b"ratelimit-policy", b"ratelimit")


def bodyLength(content) -> int:
    """
    The size of a request's spooled body (a BytesIO, or a temporary file
    for large bodies).
    """
    if content is None:
        return 0
    getbuffer = getattr(content, "getbuffer", None)
    if getbuffer is not None:
        return getbuffer().nbytes
    position = content.tell()
    content.seek(0, 2)
    size = content.tell()
    content.seek(position)
    return size


def requestTarget(uri: bytes) -> bytes:
    """
    The request target to send on: the client's own bytes, not re-encoded,
    except that an absolute-form target is reduced to its path and query.
    """
    if uri[:1] == b"/" or uri == b"*":
        return uri
    scheme, sep, rest = uri.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        end = len(rest)
        for mark in (b"/", b"?"):
            at = rest.find(mark)
            if at != -1 and at < end:
                end = at
        path = rest[end:]
        # An empty path is "/", and a query alone keeps it: http://h?q=1
        # asks for /?q=1.
        return path if path[:1] == b"/" else b"/" + path
    return uri


# An origin-form target of visible ASCII (no DEL, no byte past 0x7E): the
# common case, checked with one match.
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*\Z")
_ABSOLUTE_FORM = re.compile(
    rb"(?i:https?)://([\x21-\x22\x24-\x2e\x30-\x3e\x40-\x7e]+)([/?][\x21-\x7e]*)?\Z"
)


def targetAuthority(method: bytes, uri: bytes) -> Optional[bytes]:
    """
    For a target that is not origin-form: its authority if it is
    absolute-form, C{b""} for C{*} on OPTIONS, None when it is no valid
    target at all (RFC 9112 section 3.2: C{@host/x}, C{host/x}, C{*} on
    GET, control or non-ASCII bytes).
    """
    if uri == b"*":
        return b"" if method == b"OPTIONS" else None
    match = _ABSOLUTE_FORM.match(uri)
    if match is None or b"@" in match.group(1):
        return None
    return match.group(1)


def splitMount(target: bytes, depth: int) -> Tuple[bytes, Optional[bytes]]:
    """
    Split an origin-form target at a resource mounted C{depth} segments
    deep: (the rest, to send the backend, query kept; the prefix, or None
    at the root).  The client's bytes are kept as they came, not decoded
    and encoded again.
    """
    if not depth or target[:1] != b"/":
        return target, None
    path, sep, query = target.partition(b"?")
    segments = path.split(b"/", depth + 1)
    prefix = b"/".join(segments[: depth + 1])
    rest = b"/" + segments[depth + 1] if len(segments) > depth + 1 else b"/"
    return rest + sep + query, prefix


# A request id a client sends is kept when it is this long at most and
# made of visible ASCII; any other is replaced.
_MAX_REQUEST_ID = 200


class _RandomIDs:
    """
    Request ids: 16 random bytes each, as 32 hex digits, cut from one
    C{urandom} read of many.

    One C{os.urandom} call per request was a tenth of a request's cost on
    PyPy 3.9, which opens, reads and closes C{/dev/urandom} on every call.
    (Workers are processes of their own, started afresh, so no two share
    a read.)
    """

    def __init__(self, urandom=os.urandom, batch: int = 256) -> None:
        self._urandom = urandom
        self._batch = batch
        self._digits = ""
        self._next = 0

    def __call__(self) -> bytes:
        start = self._next
        if start >= len(self._digits):
            self._digits = self._urandom(16 * self._batch).hex()
            start = 0
        self._next = start + 32
        return self._digits[start : start + 32].encode("ascii")


_newRequestID = _RandomIDs()


def requestID(request, header: bytes) -> bytes:
    """
    The request's id: the one its client (or a proxy in front) sent in
    C{header}, or a new one; kept on the request for the access log.
    """
    given = request.requestHeaders.getRawHeaders(header)
    value = given[0] if given else b""
    if not (0 < len(value) <= _MAX_REQUEST_ID and all(0x21 <= c <= 0x7E for c in value)):
        value = _newRequestID()
    request.requestID = value.decode("ascii")
    return value


def viaChain(request, name: bytes) -> Optional[bytes]:
    """
    The C{Via} to send on (the client's entries and ours, RFC 9110 section
    7.6.3), or None when the client's already name this balancer: the
    request came back to it, a loop.
    """
    given = request.requestHeaders.getRawHeaders(b"via", [])
    for value in given:
        for entry in value.split(b","):
            parts = entry.split()
            if len(parts) >= 2 and parts[1] == name:
                return None
    protocol = request.clientproto.split(b"/", 1)[-1] or b"1.1"
    return b", ".join(given + [protocol + b" " + name])


def respondWithError(request, code: int, message: bytes, retryAfter=None) -> None:
    """
    A short plain-text error from the balancer itself; it never names a
    backend.  The caller knows that the client is still there and that no
    response has started.
    """
    if request.finished:
        return
    request.setResponseCode(code)
    body = message + b"\n"
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if retryAfter is not None:
        request.setHeader(b"retry-after", retryAfter)
    request.setHeader(b"date", datetimeToString())
    request.write(body)
    request.finish()


class _Forwarding:
    """
    One client request on its way through the backends.

    @ivar target: the request target the backends receive.
    @ivar prefix: where the resource is mounted (C{X-Forwarded-Prefix}),
        or None at the root.
    @ivar upgrade: the protocols the request offers to switch to, passed
        on with it, or None.
    """

    log = Logger()
    upgrade = None

    def __init__(
        self, picker: IPicker, request, target: bytes, prefix=None, requestIDHeader=None,
        via: Optional[bytes] = None, sticky=None,
    ) -> None:
        self.picker = picker
        self.sticky = sticky
        self.request = request
        self.target = target
        self.prefix = prefix
        extra = []
        if requestIDHeader is not None:
            extra.append((requestIDHeader, requestID(request, requestIDHeader)))
        if via is not None:
            extra.append((b"via", via))
        self.extraHeaders = extra
        headers = request.requestHeaders
        offered = headers.getRawHeaders(b"upgrade")
        if offered is not None and getattr(request, "switchProtocols", None) is not None:
            # (Only a request of the balancer's own site can leave HTTP.)
            self.upgrade = upgradeOffer(
                request.clientproto, headers.getRawHeaders(b"connection"), offered
            )
        self.tried: List[Backend] = []
        self.attempt: Optional["_Attempt"] = None
        self.clientGone = False
        self.onlyBusy = True
        # In the queue for a backend with room (see rrbalancer.queue).
        self.waiting: Optional[Deferred] = None
        self.served = False
        watch = getattr(request, "watchConnectionLost", None)
        if watch is not None:
            # The balancer's own requests say so without a Deferred.
            watch(self._clientGone)
        else:
            request.notifyFinish().addErrback(self._clientGone)

    def _clientGone(self, reason: Failure) -> None:
        self.clientGone = True
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.cancel()
        if self.attempt is not None:
            self.attempt.cancel()

    def answer(self, code: int, message: bytes, retryAfter=None) -> None:
        """
        Answer with the balancer's own error, unless there is nobody left
        to answer or a response has already started.
        """
        started = self.attempt is not None and self.attempt.started
        if not (self.clientGone or started):
            respondWithError(self.request, code, message, retryAfter)

    def next(self) -> None:
        picker = self.picker
        queueing = getattr(picker, "requestQueue", None) is not None
        if queueing and picker.mustWait(self.served):
            self._wait()
            return
        backend = None
        if self.sticky is not None:
            backend = self.sticky.backendFor(self.request, self.tried)
        if backend is None:
            backend = picker.pick(self.tried, self.request)
        if backend is None:
            if queueing and picker.mayWait():
                self._wait()
            elif self.tried and self.onlyBusy:
                self.answer(
                    503,
                    b"Service Unavailable: every backend is busy",
                    retryAfter=RETRY_AFTER_SECONDS,
                )
            elif self.tried:
                self.answer(502, b"Bad Gateway")
            else:
                self.answer(
                    503,
                    b"Service Unavailable: no backend is up",
                    retryAfter=RETRY_AFTER_SECONDS,
                )
            return
        self.tried.append(backend)
        self.request.attempts = len(self.tried)
        backend.upstream.forward(self, backend)

    def _wait(self) -> None:
        """
        Wait in the picker's queue for a backend with room.
        """
        d = self.waiting = self.picker.requestQueue.wait(first=self.served)
        d.addCallbacks(self._turn, self._waitFailed)

    def _turn(self, waited: float) -> None:
        self.waiting = None
        self.served = True
        try:
            self.next()
        except Exception:
            self.log.failure("proxying after the queue failed")
            self.answer(500, b"Internal Server Error")

    def _waitFailed(self, failure: Failure) -> None:
        self.waiting = None
        if failure.check(CancelledError):
            return
        full = failure.check(QueueFull) is not None
        self.log.info(
            "{method} refused: every backend is full and {why}",
            method=self.request.method.decode("latin-1"),
            why="the queue is full" if full else "it waited too long in the queue",
        )
        self.answer(
            503,
            b"Service Unavailable: every backend is full and so is the queue"
            if full
            else b"Service Unavailable: waited too long for a backend",
            retryAfter=RETRY_AFTER_SECONDS,
        )

    def failed(self, backend: Backend, error: BackendError, retryable: bool) -> None:
        """
        An attempt on C{backend} failed before any response byte reached
        the client.
        """
        self.attempt = None
        if self.clientGone:
            return
        if not isinstance(error, BackendBusy):
            self.onlyBusy = False
        if retryable:
            self.log.info(
                "retrying {method} on another backend after {url}: {error}",
                method=self.request.method.decode("latin-1"),
                url=backend.url,
                error=str(error),
            )
            self.next()
        elif isinstance(error, ResponseTimeout):
            self.answer(504, b"Gateway Timeout")
        else:
            self.answer(502, b"Bad Gateway")


@implementer(IResponseReceiver)
class _Attempt:
    """
    One try of a request on one backend: the receiver of the backend's
    response (see L{rrbalancer.client}).
    """

    log = Logger()

    connection = None
    _acquiring = None
    _tunnel = None
    _site = None

    code = 0
    bytesIn = 0
    bytesOut = 0
    # From the request's start to its answer's first bytes reaching the
    # balancer: the backend's latency, as the balancing policy hears it.
    latency = None

    def __init__(
        self, upstream: "BackendProxyResource", backend: Backend, forwarding: _Forwarding
    ) -> None:
        self.upstream = upstream
        self.clock = upstream.clock
        self.startedAt = self.clock.seconds()
        self.backend = backend
        self.pool = upstream.pool
        self.forwarding = forwarding
        self.request = forwarding.request
        self.cancelled = False
        self.started = False
        self.freshRetried = False

    def start(self, fresh: bool = False) -> None:
        pool = self.pool
        if self.forwarding.upgrade is not None:
            # Its connection will not go back to the pool: not one from it.
            d = self._acquiring = pool.acquireFresh()
            d.addCallbacks(self._connected, self._connectFailed)
            return
        if not fresh:
            connection = pool.idleConnection()
            if connection is not None:
                self._connected(connection)
                return
        d = pool.connect() if fresh else pool.acquire()
        self._acquiring = d
        d.addCallbacks(self._connected, self._connectFailed)

    def cancel(self) -> None:
        """
        The client went away: stop the exchange and free the backend.
        """
        self.cancelled = True
        if self.connection is None and self._acquiring is not None:
            # Waiting in the backend's queue: leave it.  (A connection being
            # opened is left to open, and kept for the next request.)
            self.pool.stopWaiting(self._acquiring)
        if self.connection is not None:
            connection, self.connection = self.connection, None
            # The client's connection is gone, and its producer with it
            # (there is no channel left to unregister from).
            connection.abort()
            self._end()

    def _end(self) -> None:
        backend = self.backend
        backend.active -= 1
        if self.started:
            backend.recordResponse(
                self.code,
                self.clock.seconds() - self.startedAt,
                self.bytesIn,
                self.bytesOut,
                self.latency,
            )

    def _connected(self, connection) -> None:
        self._acquiring = None
        if self.cancelled:
            self.pool.release(connection)
            self._end()
            return
        self.connection = connection
        request = self.request
        content = request.content
        length = bodyLength(content)
        if content is not None:
            content.seek(0)
        upstream = self.upstream
        headers = request.requestHeaders
        hostHeader = upstream.hostHeader
        if hostHeader is None:
            hostHeader = headers.getRawHeaders(b"host", [upstream.backendHost])[0]
        address = request.getClientAddress()
        clientAddress = getattr(address, "host", None)
        trusted = upstream.trusts(clientAddress)
        clientAddress = clientAddress.encode("ascii") if clientAddress else b"unix"
        head = requestHead(
            request.method,
            self.forwarding.target,
            headers.getAllRawHeaders(),
            hostHeader,
            clientAddress,
            b"https" if request.isSecure() else b"http",
            length,
            headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding"),
            self.forwarding.prefix,
            self.forwarding.extraHeaders,
            upstream.forwardedStyle,
            trusted,
            self.forwarding.upgrade,
        )
        self.bytesIn = length
        connection.request(
            head,
            content,
            length,
            request.method == b"HEAD",
            self,
            upstream.timeout,
            self.forwarding.upgrade,
            inLoad=True,
        )

    def _connectFailed(self, failure: Failure) -> None:
        self._acquiring = None
        self._end()
        if self.cancelled:
            return
        error = failure.value
        if not isinstance(error, BackendError):
            error = ConnectError(failure.getErrorMessage())
        if not isinstance(error, BackendBusy):
            # A busy backend is healthy, only full.
            self.backend.recordPassiveFailure(str(error))
        self.forwarding.failed(self.backend, error, retryable=True)

    # -- IResponseReceiver ----------------------------------------------------

    def responseHead(self, code, reason, headers, contentLength) -> None:
        self.started = True
        self.code = code
        self.latency = max(0.0, self.connection.responseArrived - self.startedAt)
        request = self.request
        request.backendURL = self.backend.url
        request.backendStatus = code
        request.setResponseCode(code, reason)
        out = Headers()
        # The balancer's own answer to the client's "Connection: close" (set
        # by Twisted) is about the client connection: keep it.
        before = request.responseHeaders
        for name in _OWN_RESPONSE_HEADERS:
            values = before.getRawHeaders(name)
            if values:
                out.setRawHeaders(name, values)
        for name, value in self._endToEnd(headers):
            out.addRawHeader(name, value)
        sticky = self.forwarding.sticky
        if sticky is not None:
            sticky.stick(request, self.backend, out)
        if contentLength is not None and code != 204:
            out.setRawHeaders(b"content-length", [b"%d" % (contentLength,)])
        request.responseHeaders = out
        # The backend's Content-Type or none: not the site's default.
        request.defaultContentType = None
        connection = self.connection
        request.registerProducer(connection, True)
        _startPausedIfFull(request, connection)
        if connection.responseInHand:
            # Its body (if any) follows before this returns: one send.
            hold = getattr(request.channel, "holdWrites", None)
            if hold is not None:
                hold()
        request.write(b"")

    def _endToEnd(self, headers):
        """
        The backend's end-to-end headers as the client gets them.
        """
        request = self.request
        host = request.requestHeaders.getRawHeaders(b"host")
        if host is not None:
            host = host[0]
        else:
            # An HTTP/1.0 client named no host: the address it reached.
            local = request.getHost()
            address = getattr(local, "host", None)
            if address is None:
                host = b"localhost"
            else:
                if ":" in address:
                    address = f"[{address}]"
                host = f"{address}:{local.port}".encode("ascii")
        clientBase = (b"https://" if request.isSecure() else b"http://") + host
        rewrite = self.upstream.rewriteLocation
        return responseHeaders(headers, rewrite, clientBase, self.forwarding.prefix)

    def responseSwitched(self, reason, headers, rest: bytes) -> None:
        """
        The backend switched protocols: pass its C{101} on, and join the
        two connections into a tunnel.
        """
        connection, self.connection = self.connection, None
        self.started = True
        self.code = 101
        self.latency = max(0.0, connection.responseArrived - self.startedAt)
        try:
            self._joinTunnel(connection, reason, headers, rest)
        except Exception:
            # Never a client left hanging: both connections go.
            self.log.failure("joining a tunnel with {url} failed", url=self.backend.url)
            connection.abort()
            self.request.transport.abortConnection()
            tunnel = self._tunnel
            if tunnel is not None and not tunnel.started:
                # Nothing will tell the site and the backend that it ended.
                self._site._tunnelClosed(tunnel)
                self.backend._tunnelClosed(tunnel)
        self._end()

    def _joinTunnel(self, connection, reason, headers, rest: bytes) -> None:
        request = self.request
        request.backendURL = self.backend.url
        request.backendStatus = 101
        request.setResponseCode(101, reason)
        lines = [b"HTTP/1.1 101 " + reason]
        # The hop-by-hop pair that says what the connection becomes.
        lines.extend(
            name + b": " + value
            for name, value in headers
            if name.lower() in (b"upgrade", b"connection")
        )
        lines.extend(name + b": " + value for name, value in self._endToEnd(headers))
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        site = self._site = request.channel.site
        tunnel = self._tunnel = Tunnel(
            self.clock, self.upstream.tunnelTimeout, (self.backend.tunnels, site.tunnelCounts)
        )
        # Counted before the request stops being: a stopping balancer, and a
        # backend's removal, wait for either.
        site.tunnelOpened(tunnel)
        self.backend.tunnelOpened(tunnel)
        channel = request.switchProtocols(head)
        fromClient = channel.startTunnel(tunnel.client)
        connection.startTunnel(tunnel.backend)
        tunnel.start(
            channel.transport,
            connection.transport,
            toClient=rest,
            toBackend=fromClient,
            clientConsumer=channel,
        )
        if _twisted.waitingForTransport(channel):
            # The client's transport is full and will not say so again.
            tunnel.backend.pauseProducing()

    def responseBody(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.request.write(data)

    def responseDone(self) -> None:
        self.connection = None
        self._end()
        request = self.request
        forwarding = self.forwarding
        # Parted, the forwarding and its last attempt hold no cycle and are
        # freed as soon as the request is: at thousands of requests a
        # second, the cycle collector's pauses are the tail's latency.
        forwarding.attempt = None
        if not forwarding.clientGone:
            request.unregisterProducer()
            request.finish()

    def responseFailed(self, error: BackendError) -> None:
        self.connection = None
        request = self.request
        if isinstance(error, ProtocolError):
            self.backend.protocolErrors += 1
            self.log.warn(
                "backend {url} broke HTTP: {error}", url=self.backend.url, error=str(error)
            )
        if self.started:
            self.code = 0
            self._end()
            request.unregisterProducer()
            self.log.warn(
                "response from {url} cut short, client connection aborted: {error}",
                url=self.backend.url,
                error=str(error),
            )
            if not self.forwarding.clientGone:
                abortResponse(request)
            return
        # An upgrade is never sent twice: what the backend did with the
        # first is unknown (a WebSocket's handshake starts a session).
        idempotent = request.method in IDEMPOTENT_METHODS and self.forwarding.upgrade is None
        if (
            error.reused
            and not error.gotBytes
            and not isinstance(error, ResponseTimeout)
            and not self.freshRetried
            and idempotent
        ):
            # A kept connection the backend had closed: not the backend's
            # fault, so try it again on a fresh connection.
            self.freshRetried = True
            self.start(fresh=True)
            return
        self._end()
        self.backend.recordPassiveFailure(str(error))
        retryable = (not error.requestSent) or (
            idempotent and not error.gotBytes and not isinstance(error, ResponseTimeout)
        )
        self.forwarding.failed(self.backend, error, retryable)


def _startPausedIfFull(request, producer) -> None:
    """
    A client whose side is already full will not ask again: the producer
    just registered must start paused.  On HTTP/1.1, a connection whose
    transport is full (a pipelined request after a response that filled
    it); on HTTP/2, a stream whose flow-control window is spent, or whose
    connection's transport is full.
    """
    channel = getattr(request, "channel", None)
    if channel is None:
        return
    if http2.isStream(channel):
        if http2.streamBlocked(channel):
            # Through the stream, which resumes it when its window opens.
            channel.flowControlBlocked()
    elif _twisted.waitingForTransport(channel):
        producer.pauseProducing()


def abortResponse(request) -> None:
    """
    Cut a started response short so that the client cannot take it for a
    whole one: close an HTTP/1.1 connection at once, or reset an HTTP/2
    stream (and that stream only; the connection goes on).
    """
    transport = request.transport
    if transport is not None:
        transport.abortConnection()
    elif http2.isStream(request.channel):
        request.channel.abortConnection()


def _render(resource, request, picker: IPicker, target: bytes, prefix=None):
    """
    Start forwarding C{request}; anything that goes wrong on the way is a
    500 and one log line, never a request left hanging.
    """
    forwarding = None
    try:
        via = None
        if resource.viaName is not None:
            via = viaChain(request, resource.viaName)
            if via is None:
                respondWithError(request, 508, b"Loop Detected: this request has been here before")
                return NOT_DONE_YET
        forwarding = _Forwarding(
            picker, request, target, prefix, resource.requestIDHeader, via,
            resource.sticky,
        )
        limits = resource.limits
        if limits:
            def refuse(retryAfter: int, reason: str) -> None:
                forwarding.answer(
                    429, b"Too Many Requests", retryAfter=b"%d" % (retryAfter,)
                )

            limits.gate(request, lambda: _start(resource, request, forwarding), refuse)
        else:
            _forward(request, forwarding)
    except Exception:
        _failed(resource, request, forwarding)
    return NOT_DONE_YET


def _start(resource, request, forwarding: _Forwarding) -> None:
    """
    Forward a request a limit held for a while.
    """
    try:
        _forward(request, forwarding)
    except Exception:
        _failed(resource, request, forwarding)


def _forward(request, forwarding: _Forwarding) -> None:
    """
    Forward a request: its route's mirror copies leave first, while its
    spooled body is still where the primary will read it from.
    """
    mirror = getattr(request, "mirror", None)
    if mirror is not None:
        mirror(forwarding)
    forwarding.next()


def _failed(resource, request, forwarding: Optional[_Forwarding]) -> None:
    resource.log.failure(
        "proxying {method} {target} failed",
        method=request.method.decode("latin-1"),
        target=request.uri.decode("latin-1"),
    )
    if forwarding is None:
        respondWithError(request, 500, b"Internal Server Error")
    else:
        forwarding.answer(500, b"Internal Server Error")


def _headerName(name: Optional[str]) -> Optional[bytes]:
    return name.encode("ascii") if name is not None else None


def _viaName(name: Optional[str]) -> Optional[bytes]:
    # "auto" is resolved by the service; a resource built elsewhere with it
    # makes its own name.
    if name == "auto":
        name = "rrbalancer-" + os.urandom(4).hex()
    return name.encode("ascii") if name is not None else None


@implementer(IPicker)
class _One:
    """
    A group of one, for a L{BackendProxyResource} rendered on its own.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def pick(self, exclude=(), request=None):
        if self.backend in exclude or not self.backend.available:
            return None
        return self.backend


@implementer(IUpstream)
class BackendProxyResource(ReverseProxyResource):
    """
    A reverse proxy to one backend.

    It keeps L{ReverseProxyResource}'s face and contract: built from the
    backend's host, port and base path, it sends the backend that path, the
    segments below it (quoted as the stock class quotes them, one child
    resource per segment) and the query.  None of the stock client is used:
    requests go out as HTTP/1.1 on kept connections from a pool, with the
    forwarding headers set, the client's framing never copied, the response
    streamed back with backpressure, and a 502 or 504 when the backend
    fails.

    In a L{BalancerResource}, each backend of the group has one, and the
    balancer calls L{forward} with the target it computed.

    @param config: the timeouts, pool limits and C{Host} policy; by default
        the settings' defaults, except that the backend's own C{Host} is
        sent, as the stock class does.
    @param pool: the connections to share (children share their parent's).
    """

    log = Logger()
    # A resource for one backend has no other to stick a client to, and
    # no limits of its own.
    sticky = None
    limits = None

    def __init__(
        self,
        host,
        port: int,
        path: bytes = b"",
        reactor=None,
        *,
        scheme: str = "http",
        config: Optional[Config] = None,
        pool=None,
        backend: Optional[Backend] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if isinstance(host, bytes):
            host = host.decode("ascii")
        ReverseProxyResource.__init__(self, host, port, path, reactor=reactor)
        if config is None:
            config = Config(hostHeader="backend", admin=None)
        self.config = config
        self.clock = reactor
        self.scheme = scheme
        netloc = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        if port != default:
            netloc = f"{netloc}:{port}"
        self.url = f"{scheme}://{netloc}"
        self.backendHost = netloc.encode("ascii")
        self.hostHeader = self.backendHost if config.hostHeader == "backend" else None
        self.requestIDHeader = _headerName(config.requestIDHeader)
        self.forwardedStyle = config.forwardedHeader
        self.viaName = _viaName(config.via)
        self.trustedProxies = tuple(ipaddress.ip_network(n) for n in config.trustedProxies)
        self.timeout = config.backendTimeout
        self.tunnelTimeout = config.tunnelTimeout
        self.rewriteLocation = LocationRewriter(self.url)
        if pool is None:
            pool = connectionPool(
                reactor,
                BackendConfig(url=self.url),
                config,
                trustRoot(config.backendCA),
            )
        self.pool = pool
        self._backend = backend

    @property
    def backend(self) -> Backend:
        """
        The server model requests rendered here are counted on.  On its own
        (not in a balancer's group) it is a backend without health checks,
        tried for every request.
        """
        if self._backend is None:
            self._backend = Backend(
                "1", BackendConfig(url=self.url), HealthConfig(enabled=False), self.clock, self
            )
        return self._backend

    def trusts(self, clientAddress: Optional[str]) -> bool:
        """
        Is the forwarding chain this client sent to be kept?  Every chain
        is, unless trusted proxies are named; then only theirs.
        """
        if not self.trustedProxies:
            return True
        if clientAddress is None:
            return False
        try:
            address = ipaddress.ip_address(clientAddress)
        except ValueError:
            return False
        return any(address in network for network in self.trustedProxies)

    def getChild(self, path, request):
        return BackendProxyResource(
            self.host,
            self.port,
            self.path + b"/" + urlquote(path, safe=b"").encode("utf-8"),
            self.clock,
            scheme=self.scheme,
            config=self.config,
            pool=self.pool,
            backend=self.backend,
        )

    def render(self, request):
        path = self.path or b"/"
        query = request.uri.partition(b"?")[2]
        target = path + b"?" + query if query else path
        return _render(self, request, _One(self.backend), target)

    def forward(self, forwarding: _Forwarding, backend: Backend) -> None:
        backend.active += 1
        backend.requests += 1
        attempt = _Attempt(self, backend, forwarding)
        forwarding.attempt = attempt
        attempt.start()


class BalancerResource(Resource):
    """
    Every request below it, whatever its path, goes to the next backend the
    picker gives.

    At the root of a site the backends see the client's target as it came;
    mounted under a prefix, they see the rest of it.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        picker: IPicker,
        requestIDHeader: Optional[str] = "X-Request-ID",
        via: Optional[str] = None,
        sticky=None,
        limits=None,
    ) -> None:
        """
        @param requestIDHeader: the header that carries a request's id to
            the backend (kept from the client or made), or None for none.
        @param via: this balancer's name in C{Via}, or None to send none.
        @param sticky: a L{rrbalancer.sticky.StickyCookie} that sends a
            client back to its backend, or None.
        @param limits: the client rate limits (L{rrbalancer.limits.Limits})
            a request passes before a backend is picked, or None.
        """
        Resource.__init__(self)
        self.picker = picker
        self.sticky = sticky
        self.limits = limits
        self.requestIDHeader = _headerName(requestIDHeader)
        self.viaName = _viaName(via)

    def render(self, request):
        if request.method == b"CONNECT":
            respondWithError(request, 405, b"Method Not Allowed")
            return NOT_DONE_YET
        uri = request.uri
        if not _ORIGIN_FORM.match(uri):
            authority = targetAuthority(request.method, uri)
            if authority is None:
                respondWithError(request, 400, b"Bad Request: invalid request target")
                return NOT_DONE_YET
            if authority:
                # RFC 9112 section 3.2.2: an absolute-form target's authority
                # is the request's host, whatever Host says.
                request.requestHeaders.setRawHeaders(b"host", [authority])
        target, prefix = splitMount(requestTarget(uri), len(request.prepath))
        return _render(self, request, self.picker, target, prefix)
