"""
The client-facing HTTP server: a L{Site} whose requests enforce the body
size limit, count themselves in flight (for a graceful stop), and are
logged in NCSA combined format only when an access log is asked for; and
whose connections bound the time and size of a request head, and write a
response the backend sent in one read in one send.
"""

from typing import Dict, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ILoggingContext, IProtocolFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from zope.interface import implementer_only

from . import _twisted, http2
from ._twisted import writeNow
from .accesslog import AccessLog
from .headers import connectionTokens
from .listeners import describeAddress
from .memory import readLightly
from .stats import RateMeter
from .tunnel import TunnelCounts


class BalancerRequest(Request):
    """
    A request as the balancer needs it.

    The body is spooled by L{Request} itself (in memory when small, in a
    temporary file otherwise); this class refuses it early, with a 413,
    once it is known to be over the limit, before it fills the disk.
    """

    # A proxied response carries the backend's Content-Type or none.
    defaultContentType = None
    # What the access log tells of the exchange (set by the proxy).
    startedAt: Optional[float] = None
    backendURL: Optional[str] = None
    backendStatus: Optional[int] = None
    attempts = 0
    requestID: Optional[str] = None
    # The copies its route sends (rrbalancer.mirror), if it mirrors.
    mirror = None
    _site = None
    _refused = False
    _received = 0
    _bodyTimer = None

    def _limit(self) -> int:
        return self.channel.site.maxBodySize

    def requestReceived(self, command, path, version):
        # Bodies go to the backend as they came, forms included; the admin
        # API reads JSON.
        _twisted.leaveFormsUnparsed(self)
        Request.requestReceived(self, command, path, version)

    def gotLength(self, length):
        limit = self._limit()
        if limit and length is not None and length > limit:
            # No "100 Continue" for a body that will be refused.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
        elif length != 0 and http2.isStream(self.channel):
            # A stream's body: the same bound between two reads as on an
            # HTTP/1.1 connection (whose channel keeps it there).
            site = self.channel.site
            self._bodyTimer = site.reactor.callLater(site.bodyTimeout, self._bodyTimedOut)
        Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._bodyTimer is not None:
            self._bodyTimer.reset(self.channel.site.bodyTimeout)
        limit = self._limit()
        if limit and self._received > limit:
            self._refuse()
            return
        Request.handleContentChunk(self, data)

    def _refuse(self) -> None:
        """
        Answer 413 and close at once: reading the rest of an oversized body
        only to throw it away would let one client hold the connection and
        the disk.
        """
        if self._refused:
            return
        self._refused = True
        self._stopBodyTimer()
        if http2.isStream(self.channel):
            # The stream may not be registered with its connection yet (a
            # declared length is read with the headers): answer once the
            # frames at hand are handled.  The connection goes on.
            self.channel.site.reactor.callLater(
                0, self._refuseStream, 413,
                b"Content Too Large: the request body exceeds the limit",
            )
            return
        _refuseConnection(
            self.channel,
            b"413 Content Too Large",
            b"Content Too Large: the request body exceeds the limit",
        )

    def _bodyTimedOut(self) -> None:
        self._bodyTimer = None
        if not self._refused:
            self._refused = True
            self._refuseStream(408, b"Request Timeout: the request body stalled")

    def _stopBodyTimer(self) -> None:
        timer, self._bodyTimer = self._bodyTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _refuseStream(self, code: int, message: bytes) -> None:
        """
        Answer a stream whose body will not be read on; its connection goes
        on serving the others.
        """
        stream = self.channel
        if stream is None or self.finished:
            return
        # Named for the access log: the request line was never "received".
        self.method, self.uri, self.clientproto = stream.command, stream.path, b"HTTP/2"
        self.path = self.uri.split(b"?", 1)[0]
        self._answer(code, message)

    def _http2Head(self) -> Optional[bytes]:
        """
        Make an HTTP/2 request's fields what an HTTP/1.1 backend may
        receive, or say why it cannot be forwarded.

        C{:authority} became C{Host}, and a C{Host} field beside it (the
        h2 package refuses one that names another) would make two.
        Cookies may come as one field per pair, and HTTP/1.1 allows one
        C{Cookie} line: they are joined (RFC 9113 section 8.2.3).
        """
        headers = self.requestHeaders
        hosts = headers.getRawHeaders(b"host")
        if hosts is not None and len(hosts) > 1:
            if len(set(hosts)) > 1:
                return b"Bad Request: :authority and Host differ"
            headers.setRawHeaders(b"host", hosts[:1])
        cookies = headers.getRawHeaders(b"cookie")
        if cookies is not None and len(cookies) > 1:
            headers.setRawHeaders(b"cookie", [b"; ".join(cookies)])
        return None

    def process(self):
        """
        Hand the request to the site's one resource.

        L{Request.process} would also set default C{Server} and C{Date}
        headers and traverse the resource tree; a proxied response carries
        the backend's own headers, and the balancer's tree is one leaf, so
        that work is skipped on this, the hottest path.  (Other sites, such
        as the admin listener's, are processed as usual.)
        """
        self._stopBodyTimer()
        if self._refused:
            return
        self.site = self._site = site = self.channel.site
        site.inFlight += 1
        counts = getattr(self.channel, "_counted", None)
        if counts is None:
            # An HTTP/2 stream: its connection's listener.
            counts = site.connections.get(listenerKey(self.getHost()))
        if counts is not None:
            counts[2].mark()
        self.startedAt = site.reactor.seconds()
        if not site.resource.isLeaf:
            Request.process(self)
            return
        self.prepath = []
        self.postpath = []
        if self.clientproto == b"HTTP/2":
            problem = self._http2Head()
            if problem is not None:
                self._answer(400, problem)
                return
        if site.maxInFlight and site.inFlight > site.maxInFlight:
            # Overloaded: say so at once (the client may come back), rather
            # than let every request wait until backends and health checks
            # time out behind a late event loop.
            site.shed += 1
            self.setHeader(b"retry-after", b"1")
            self._answer(503, b"Service Unavailable: the balancer is overloaded")
            return
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def _answer(self, code: int, message: bytes) -> None:
        body = message + b"\n"
        self.setResponseCode(code)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % (len(body),))
        self.write(body)
        self.finish()

    _endWatchers = None

    def whenEnded(self, callback) -> None:
        """
        Call C{callback} once this request is over, however it ends
        (answered, its connection lost, switched to a tunnel): what
        L{notifyFinish} tells, without a Deferred per request.
        """
        if self._endWatchers is None:
            self._endWatchers = []
        self._endWatchers.append(callback)

    def _uncount(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            site._requestDone()
        watchers, self._endWatchers = self._endWatchers, None
        if watchers:
            for callback in watchers:
                callback()

    def finish(self):
        # From here a lost connection is no news to the proxying; and
        # without the watcher the request and its forwarding hold no
        # cycle, so both are freed at once instead of by the collector.
        self._lostWatcher = None
        Request.finish(self)
        self._uncount()

    def switchProtocols(self, head: bytes):
        """
        The backend switched protocols: write its C{101} head, and end the
        request as an HTTP exchange there (logged with its 101, as NGINX
        does, no longer in flight, out of its channel).  The channel is
        left to carry the tunnel's bytes; it is returned.
        """
        channel = self.channel
        channel.transport.write(head)
        self.startedWriting = 1
        self.finished = 1
        channel.site.log(self)
        channel.requests.remove(self)
        self._lostWatcher = None
        if self.content is not None:
            self.content.close()
            self.content = None
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.callback(None)
        self._uncount()
        return channel

    _lostWatcher = None

    def watchConnectionLost(self, watcher) -> None:
        """
        Call C{watcher} with the reason if the client's connection is lost
        before the response is finished: L{notifyFinish}'s errback, without
        a Deferred per request.
        """
        self._lostWatcher = watcher

    def connectionLost(self, reason):
        self._stopBodyTimer()
        Request.connectionLost(self, reason)
        self._uncount()
        watcher, self._lostWatcher = self._lostWatcher, None
        if watcher is not None:
            watcher(reason)


def headProblem(requestLine: Optional[bytes], headers) -> Optional[tuple]:
    """
    Why a whole request head may not be read on, as (status, message), or
    None: the framing and Host rules of RFC 9112 that Twisted leaves to its
    users (a request that two parsers can read two ways is how requests are
    smuggled).
    """
    version = requestLine.rsplit(b" ", 1)[-1] if requestLine else b""
    codings = headers.getRawHeaders(b"transfer-encoding")
    if codings is not None:
        tokens = [t.strip().lower() for value in codings for t in value.split(b",") if t.strip()]
        if version != b"HTTP/1.1":
            return (b"400 Bad Request", b"Bad Request: Transfer-Encoding on an HTTP/1.0 request")
        if tokens != [b"chunked"]:
            # (Twisted itself refuses a line naming any coding but chunked
            # or identity; the layouts that get here spread over lines.)
            return (b"400 Bad Request", b"Bad Request: Transfer-Encoding must be chunked, once")
    if version == b"HTTP/1.1":
        hosts = headers.getRawHeaders(b"host")
        if not hosts:
            return (b"400 Bad Request", b"Bad Request: no Host header")
        if len(hosts) > 1:
            return (b"400 Bad Request", b"Bad Request: more than one Host header")
    return None


def listenerKey(address):
    """
    What tells listeners apart in the address a connection reached: the
    port (a listener on every interface is reached at a particular one),
    or the UNIX socket's name.
    """
    port = getattr(address, "port", None)
    return port if port is not None else describeAddress(address)


def _refuseConnection(channel, status: bytes, message: bytes) -> None:
    """
    Answer a request that cannot be read any further, and close.
    """
    body = message + b"\n"
    channel.transport.write(
        b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (status, len(body), body)
    )
    channel.loseConnection()


class BalancerChannel(HTTPChannel):
    """
    An L{HTTPChannel} that will not wait forever for a request head or
    between two reads of a request body.

    The channel's idle timeout restarts at every byte, so a client sending
    its head one byte at a time (slowloris) could hold a connection for
    ever; here the whole head must arrive within C{headerTimeout} seconds
    of its first byte (408 otherwise), and a head over the size or count
    limits gets 431 rather than a bare 400.

    A body is another matter: an upload may rightly take minutes, so it
    gets no deadline, only C{bodyTimeout} seconds at most between two reads
    (NGINX's C{client_body_timeout}), and 408 when that passes.  The head
    timer runs only while a head is read: never during a body, never on an
    idle kept-alive connection.
    """

    headerTimeout = 10.0
    bodyTimeout = 60.0
    _headTimer = None
    _bodyTimer = None
    _idleTimeOut = None
    _suspendingIdle = False
    _refusedHead = False
    _closing = False
    _requestLine = None
    _counted = None
    _host = None
    _tunnel = None
    _h2 = None
    _negotiated = False

    _peer = None
    _secure = None
    # The bytes of a response held back to leave in one send (see
    # holdWrites); None when writes go to the transport as they come.
    _held = None

    # Every request asks these of its connection, some several times, and
    # the answers (a getsockname call, an adapter lookup) do not change.

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self):
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def isSecure(self):
        if self._secure is None:
            self._secure = HTTPChannel.isSecure(self)
        return self._secure

    def connectionMade(self):
        HTTPChannel.connectionMade(self)
        readLightly(self.transport)
        self.site._channelOpened(self)

    def _readingHead(self) -> bool:
        # Line mode without a request in hand is the only state in which
        # bytes belong to a head: a body is read in raw mode, and bytes that
        # arrive while a request is handled are buffered in raw mode too.
        return (
            self.line_mode and not _twisted.handlingRequest(self) and not self._refusedHead
        )

    def startTunnel(self, end) -> bytes:
        """
        Leave HTTP: from now on, every byte read goes to C{end} (a
        L{rrbalancer.tunnel.TunnelEnd}), and so does the connection's loss.
        The request the switch answered is already out of the channel (see
        L{BalancerRequest.switchProtocols}).

        @return: the bytes the client sent after that request, held until
            now: they are the tunnel's first.
        """
        self._tunnel = end
        self.setTimeout(None)
        self._idleTimeOut = None
        self._stopHeadTimer()
        self._stopBodyTimer()
        return _twisted.takeBuffered(self)

    def _startHTTP2(self):
        """
        The client chose HTTP/2: hand the connection to an HTTP/2 one,
        which this channel carries from now on (as it carries a tunnel),
        and which makes the site's requests, one per stream.
        """
        transport = self.transport
        timeOut = self.timeOut
        self.setTimeout(None)
        # The HTTP/2 connection becomes the transport's producer.
        transport.unregisterProducer()
        site = self.site
        connection = self._h2 = http2.BalancerH2Connection(
            site.reactor, site.maxConcurrentStreams, self.headerTimeout
        )
        connection.requestFactory = self.requestFactory
        connection.site = site
        connection.factory = self.factory
        connection.timeOut = timeOut
        connection.callLater = self.callLater
        http2.serve(connection, transport)
        return connection

    @property
    def http2(self):
        """
        The L{http2.BalancerH2Connection} this connection carries, or None
        while it speaks HTTP/1.1.
        """
        return self._h2

    @property
    def tunnel(self):
        """
        The tunnel's end this connection carries, or None while it speaks
        HTTP.
        """
        return self._tunnel

    def dataReceived(self, data):
        if self._h2 is not None:
            self._h2.dataReceived(data)
            return
        if self._tunnel is not None:
            self._tunnel.dataReceived(data)
            return
        if not self._negotiated:
            # The TLS handshake is over by the first byte of data.
            self._negotiated = True
            if http2.negotiated(self.transport) == http2.H2:
                self._startHTTP2().dataReceived(data)
                return
        HTTPChannel.dataReceived(self, data)
        # The head timer is started only for a head that did not come whole
        # in one read: most do, and a timer started and cancelled for each
        # request is work, and with many backends' timers in the reactor's
        # heap, cancelled ones linger there long enough to be old garbage
        # for the cycle collector.
        if (
            self._headTimer is None
            and not self._closing
            and self._readingHead()
            and _twisted.headBegun(self)
        ):
            self._headTimer = self.callLater(self.headerTimeout, self._headTimedOut)

    def lineReceived(self, line):
        if self._refusedHead:
            return
        size, count = _twisted.headSoFar(self)
        # The same accounting HTTPChannel does, a line early, to answer 431
        # (414 for the request line).
        if size + len(line) > self.totalHeadersSize or count >= self.maxHeaders:
            self._tooLarge()
            return
        if self._requestLine is None and line:
            self._requestLine = line
        HTTPChannel.lineReceived(self, line)

    def _tooLarge(self) -> None:
        if self._requestLine is None:
            self._refuseHead(b"414 URI Too Long", b"URI Too Long")
        else:
            self._refuseHead(
                b"431 Request Header Fields Too Large", b"Request Header Fields Too Large"
            )

    def rawDataReceived(self, data):
        if self._refusedHead:
            return
        if self._bodyTimer is not None:
            self._bodyTimer.reset(self.bodyTimeout)
        HTTPChannel.rawDataReceived(self, data)

    def headerReceived(self, line):
        # RFC 9110 section 5.5: NUL, and a CR that is not part of a line
        # ending, have no place in a field; Twisted releases before 25
        # pass NUL on, and a backend may read it differently.
        if b"\x00" in line or b"\r" in line:
            self._refuseHead(b"400 Bad Request", b"Bad Request: invalid character in a header")
            return False
        return HTTPChannel.headerReceived(self, line)

    def _respondToBadRequestAndDisconnect(self):
        # Twisted's 400 for bytes it cannot parse: none once the connection
        # is closing with its answer already written (a 413 in the middle
        # of a chunked body, whose decoder reads on to the end of the data
        # at hand and may find it malformed).
        if self._closing:
            return
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    def lineLengthExceeded(self, line):
        self._tooLarge()

    def allHeadersReceived(self):
        self._stopHeadTimer()
        requestLine, self._requestLine = self._requestLine, None
        problem = headProblem(requestLine, self.requests[-1].requestHeaders)
        if problem is not None:
            # Before Twisted answers "100 Continue" or reads a byte of body:
            # a request framed two ways must not be read either way.
            self._refuseHead(*problem)
            return
        HTTPChannel.allHeadersReceived(self)
        if self.length != 0 and not self._closing:
            # A body follows: the body timer replaces the idle timer until
            # it is whole, so that one answers 408 and the other does not
            # close the connection silently first.
            self._idleTimeOut = self.setTimeout(None)
            self._bodyTimer = self.callLater(self.bodyTimeout, self._bodyTimedOut)

    def allContentReceived(self):
        self._stopBodyTimer()
        if self._refusedHead:
            return
        self._suspendingIdle = True
        try:
            HTTPChannel.allContentReceived(self)
        finally:
            self._suspendingIdle = False

    def setTimeout(self, period):
        """
        Twisted turns the idle timeout off for each request it hands on,
        and on again when the response is done: a timer cancelled and a new
        one made for every request, and with many backends' timers in the
        reactor's heap, the cancelled ones linger there long enough to be
        old garbage for the cycle collector.  Here that pause leaves the
        timer running, unheeded if it fires meanwhile (see
        L{timeoutConnection}), and the response's end moves it on.  Every
        other change of the idle timeout is Twisted's own.
        """
        if period is None and self._suspendingIdle:
            self._suspendingIdle = False
            previous, self.timeOut = self.timeOut, None
            return previous
        return HTTPChannel.setTimeout(self, period)

    def timeoutConnection(self):
        if self.timeOut is None:
            # The idle timer, left running while a request is in hand.
            return
        HTTPChannel.timeoutConnection(self)

    def checkPersistence(self, request, version):
        """
        Keep the connection for another request unless the client said
        C{close}: anywhere in a comma-separated C{Connection} list, on any
        of its lines, in any case (RFC 9110 section 7.6.1; Twisted's own
        check reads only the first line, split on spaces).  HTTP/1.0
        connections end with their response, as Twisted has them.
        """
        if version != b"HTTP/1.1":
            return False
        if b"close" in connectionTokens(request.requestHeaders.getRawHeaders(b"connection")):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def _headTimedOut(self):
        self._headTimer = None
        if self._readingHead():
            self._refuseHead(b"408 Request Timeout", b"Request Timeout")

    def _bodyTimedOut(self):
        self._bodyTimer = None
        self._idleTimeOut = None
        self._refuseHead(b"408 Request Timeout", b"Request Timeout: the request body stalled")

    def _refuseHead(self, status: bytes, message: bytes) -> None:
        self._refusedHead = True
        self._stopHeadTimer()
        self._stopBodyTimer()
        _refuseConnection(self, status, message)

    def _stopHeadTimer(self):
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None

    def _stopBodyTimer(self):
        if self._bodyTimer is not None:
            if self._bodyTimer.active():
                self._bodyTimer.cancel()
            self._bodyTimer = None
        idle, self._idleTimeOut = self._idleTimeOut, None
        if idle is not None and not self._closing:
            self.setTimeout(idle)

    # -- Writes held for one send --------------------------------------------

    def holdWrites(self) -> None:
        """
        Keep what is written for the client until L{sendHeld}, or until the
        request is done, and then send it at once.

        A transport's C{write} only buffers, and asks the reactor to say
        when the socket can be written to: each response would cost an
        event and two epoll changes on top of its send, and leave a turn of
        the loop later.  A response whose head and body the backend sent in
        one read is written here whole, in one send, as soon as it is.
        """
        if self._held is None:
            self._held = []

    def sendHeld(self) -> None:
        """
        Send what L{holdWrites} kept, and write as usual from now on.
        """
        held = self._held
        if held is not None:
            self._held = None
            if held and self.transport is not None:
                writeNow(self.transport, b"".join(held))

    def writeHeaders(self, version, code, reason, headers):
        held = self._held
        if held is None or not isinstance(headers, Headers):
            self.sendHeld()
            HTTPChannel.writeHeaders(self, version, code, reason, headers)
            return
        held += (version, b" ", code, b" ", reason, b"\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                held += (name, b": ", value, b"\r\n")
        held.append(b"\r\n")

    def write(self, data):
        if self._held is not None:
            self._held.append(data)
        else:
            self.transport.write(data)

    def writeSequence(self, iovec):
        if self._held is not None:
            self._held.extend(iovec)
        else:
            self.transport.writeSequence(iovec)

    def requestDone(self, request):
        # Before the next pipelined request, or the close, writes anything.
        self.sendHeld()
        HTTPChannel.requestDone(self, request)

    def loseConnection(self):
        self.sendHeld()
        if self._h2 is not None:
            # GOAWAY, then close once the streams answered are sent.
            self._h2.goAway()
            return
        if self._tunnel is not None:
            # A stopping balancer: the backend's side goes too.
            self._tunnel.tunnel.close()
            return
        # Closing for any reason (a 400 from HTTPChannel, an idle timeout)
        # ends the wait for a head or a body: no 408 may follow.
        self._closing = True
        self._idleTimeOut = None
        self._stopHeadTimer()
        self._stopBodyTimer()
        return HTTPChannel.loseConnection(self)

    def connectionLost(self, reason):
        if self._h2 is not None:
            self._h2.connectionLost(reason)
        if self._tunnel is not None:
            self._tunnel.connectionLost(reason)
        self._closing = True
        self._idleTimeOut = None
        self._stopHeadTimer()
        self._stopBodyTimer()
        HTTPChannel.connectionLost(self, reason)
        self.site._channelClosed(self)


# Not IProtocolNegotiationFactory: Twisted before 25 would set ALPN up on a
# context shared by connections, once for each (which recent pyOpenSSL
# refuses after the first); the ports set it up once, from
# acceptableProtocols (see rrbalancer.tls).
@implementer_only(IProtocolFactory, ILoggingContext)
class BalancerSite(Site):
    """
    @ivar inFlight: requests received and not yet answered.
    @ivar maxInFlight: past this many (0: no bound), new requests are
        answered 503 at once.
    @ivar shed: requests so answered.
    @ivar http2: offer HTTP/2 by ALPN on TLS ports (its channel switches
        to it when a client takes it).
    @ivar maxConcurrentStreams: HTTP/2 streams open at once on one
        connection.
    """

    requestFactory = BalancerRequest
    protocol = BalancerChannel
    displayTracebacks = False
    # The listener says where it listens; "Starting factory <...>" would
    # only show an object's repr.
    noisy = False

    def logPrefix(self) -> str:
        return "rrbalancer"

    def __init__(
        self,
        resource,
        reactor,
        accessLog: Optional[str] = None,
        accessLogFormat: str = "combined",
        maxBodySize: int = 0,
        timeout: float = 60.0,
        headerTimeout: float = 10.0,
        bodyTimeout: float = 60.0,
        maxInFlight: int = 0,
        http2: bool = True,
        maxConcurrentStreams: int = 100,
    ) -> None:
        Site.__init__(self, resource, timeout=timeout, reactor=reactor)
        self.http2 = http2
        self.maxConcurrentStreams = maxConcurrentStreams
        self.accessLog = AccessLog(accessLog, reactor, accessLogFormat) if accessLog else None
        self.maxBodySize = maxBodySize
        self.headerTimeout = headerTimeout
        self.bodyTimeout = bodyTimeout
        self.maxInFlight = maxInFlight
        self.shed = 0
        self.inFlight = 0
        # Tunnels open through this site's connections, and what all of
        # them carried.
        self.tunnels = set()
        self.tunnelCounts = TunnelCounts()
        self._idleWaiters = []
        self._channels = set()
        self._closedWaiters = []
        # Connections by the listener they reached (see listenerKey):
        # [open, accepted since start, its requests (a RateMeter)].
        self.connections: Dict[object, List[int]] = {}

    def buildProtocol(self, addr):
        channel = Site.buildProtocol(self, addr)
        channel.headerTimeout = self.headerTimeout
        channel.bodyTimeout = self.bodyTimeout
        return channel

    def acceptableProtocols(self):
        """
        What a TLS port offers by ALPN: C{h2} and C{http/1.1}, or only
        C{http/1.1}.  (Plain ports never get HTTP/2: no h2c.)
        """
        return http2.alpnProtocols(self.http2)

    # The access log is this site's own (see L{AccessLog}), not Site's.

    def startFactory(self):
        if self.accessLog is not None:
            self.accessLog.open()

    def stopFactory(self):
        if self.accessLog is not None:
            self.accessLog.close()

    def log(self, request):
        if self.accessLog is not None:
            self.accessLog.write(request)

    def reopenAccessLog(self) -> None:
        if self.accessLog is not None:
            self.accessLog.reopen()

    def _channelOpened(self, channel) -> None:
        # Counted once connected: a connection whose TLS setup failed
        # never was, and must not hold up a stop.
        self._channels.add(channel)
        key = listenerKey(channel.getHost())
        counts = self.connections.get(key)
        if counts is None:
            counts = self.connections[key] = [0, 0, RateMeter(self.reactor)]
        counts[0] += 1
        counts[1] += 1
        channel._counted = counts

    def _channelClosed(self, channel) -> None:
        self._channels.discard(channel)
        counts = channel._counted
        if counts is not None:
            counts[0] -= 1
            channel._counted = None
        if not self._channels and self._closedWaiters:
            waiters, self._closedWaiters = self._closedWaiters, []
            for d in waiters:
                d.callback(None)

    def closeConnections(self) -> Deferred:
        """
        Close every client connection once what is buffered for it has been
        written, and fire when all are closed: a stopping balancer must not
        let the reactor drop the end of a response it has already finished.
        """
        if not self._channels:
            return succeed(None)
        d = Deferred()
        self._closedWaiters.append(d)
        for channel in list(self._channels):
            channel.loseConnection()
        return d

    def _requestDone(self) -> None:
        self.inFlight -= 1
        if self.inFlight == 0:
            self._maybeIdle()

    def _maybeIdle(self) -> None:
        if self._idleWaiters and self.inFlight == 0 and not self.tunnels:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def tunnelOpened(self, tunnel) -> None:
        """
        Count C{tunnel} (a L{Tunnel}) until both its connections are gone:
        a stopping balancer lets it run as it lets requests finish.
        """
        self.tunnels.add(tunnel)
        tunnel.whenDone(self._tunnelClosed)

    def _tunnelClosed(self, tunnel) -> None:
        self.tunnels.discard(tunnel)
        self._maybeIdle()

    def whenIdle(self) -> Deferred:
        """
        Fires when no request is in flight and no tunnel open: the point at
        which a stopping balancer cuts nobody off.
        """
        if self.inFlight == 0 and not self.tunnels:
            return succeed(None)
        d = Deferred()
        self._idleWaiters.append(d)
        return d
