"""
The client-facing HTTP server: a L{Site} whose requests enforce the body
size limit, count themselves in flight (for a graceful stop), and are
logged in NCSA combined format only when an access log is asked for.
"""

import sys

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request, Site

_TOO_LARGE_BODY = b"Content Too Large: the request body exceeds the limit\n"


class BalancerRequest(Request):
    """
    A request as the balancer needs it.

    The body is spooled by L{Request} itself (in memory when small, in a
    temporary file otherwise); this class refuses it early, with a 413,
    once it is known to be over the limit, before it fills the disk.
    """

    # A proxied response carries the backend's Content-Type or none.
    defaultContentType = None
    _site = None
    _refused = False
    _received = 0

    def _limit(self) -> int:
        return self.channel.site.maxBodySize

    def gotLength(self, length):
        limit = self._limit()
        if limit and length is not None and length > limit:
            # No "100 Continue" for a body that will be refused.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
        Request.gotLength(self, length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
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
        channel = self.channel
        channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
        )
        channel.loseConnection()

    def process(self):
        if self._refused:
            return
        self._site = self.channel.site
        self._site.inFlight += 1
        Request.process(self)

    def _uncount(self) -> None:
        site, self._site = self._site, None
        if site is not None:
            site._requestDone()

    def finish(self):
        Request.finish(self)
        self._uncount()

    def connectionLost(self, reason):
        Request.connectionLost(self, reason)
        self._uncount()


class _Stdout:
    """
    The access log on standard output, flushed line by line and never
    closed by the site.
    """

    def write(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        pass


class BalancerSite(Site):
    """
    @ivar inFlight: requests received and not yet answered.
    """

    requestFactory = BalancerRequest
    displayTracebacks = False

    def __init__(
        self,
        resource,
        reactor,
        accessLog=None,
        maxBodySize: int = 0,
        timeout: float = 60.0,
    ) -> None:
        Site.__init__(
            self,
            resource,
            logPath=accessLog,
            timeout=timeout,
            reactor=reactor,
        )
        self.maxBodySize = maxBodySize
        self.inFlight = 0
        self._idleWaiters = []

    def _openLogFile(self, path):
        if path == "-":
            return _Stdout()
        return Site._openLogFile(self, path)

    def log(self, request):
        if self.logPath is not None:
            Site.log(self, request)

    def _requestDone(self) -> None:
        self.inFlight -= 1
        if self.inFlight == 0 and self._idleWaiters:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def whenIdle(self) -> Deferred:
        """
        Fires when no request is in flight: the point at which a stopping
        balancer loses nobody's request.
        """
        if self.inFlight == 0:
            return succeed(None)
        d = Deferred()
        self._idleWaiters.append(d)
        return d
