"""
Mirrors: a copy of a route's requests sent to another pool, whose answers
nobody waits for (NGINX's C{mirror}, Envoy's request mirror policies,
Traefik's mirroring service).

A copy is a side effect that must never become the client's problem, so
everything here is bounded and nothing here is waited on: the copy leaves
once the client's request has passed the rate limits and is about to be
forwarded, its body is taken from the spooled request (the primary still
reads its own from the spool, as it would without a mirror), and its
answer is read and dropped.  A slow or dead mirror only fills the copies in
flight (C{mirror_max_inflight}); past that bound, and for bodies over
C{mirror_max_body}, copies are skipped and counted rather than queued.

The copy goes through the mirror pool as a request of its own would: its
policy picks the backend (a full or unhealthy one is not picked), it runs
on that backend's kept connections, and it counts in that backend's
requests, latency and passive failures.
"""

import random as _random
from io import BytesIO
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .client import BackendError, ConnectError, ResponseTimeout
from .headers import requestHead
from .interfaces import IResponseReceiver

# Why a copy was not sent.
IN_FLIGHT = "in_flight"
BODY_TOO_LARGE = "body_too_large"
NO_BACKEND = "no_backend"
UPGRADE = "upgrade"
SKIP_REASONS = (IN_FLIGHT, BODY_TOO_LARGE, NO_BACKEND, UPGRADE)


class MirrorCounts:
    """
    What became of the copies meant for one pool.

    @ivar mirrored: copies sent.
    @ivar failed: copies sent that got no whole answer (no connection, a
        timeout, a broken response).
    @ivar skipped: copies not sent, by reason (L{SKIP_REASONS}).
    """

    def __init__(self) -> None:
        self.mirrored = 0
        self.failed = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def json(self) -> dict:
        return {"mirrored": self.mirrored, "failed": self.failed, "skipped": dict(self.skipped)}


class Mirrors:
    """
    The balancer's mirrors: one bound on the copies in flight, whichever
    route they come from, and counts by mirror pool.

    @ivar inFlight: copies sent and not yet answered.
    @ivar counts: L{MirrorCounts} by pool, for every pool a route mirrors
        to.
    """

    def __init__(
        self,
        pickers: Mapping[str, object],
        maxInFlight: int,
        maxBody: int,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """
        @param pickers: each pool's L{rrbalancer.backends.BackendGroup} by
            name.
        @param maxInFlight: copies in flight at most; 0 is no bound.
        @param maxBody: the largest body a copy carries, in bytes, unless a
            route says otherwise.
        @param random: a float in [0, 1) per sampled copy.
        """
        self.pickers = dict(pickers)
        self.maxInFlight = maxInFlight
        self.maxBody = maxBody
        self.random = random
        self.inFlight = 0
        self.counts: Dict[str, MirrorCounts] = {}

    def forRoute(self, route) -> Optional[Callable]:
        """
        What a request the route takes calls, with its C{_Forwarding},
        once it is about to be forwarded; None for a route without mirrors.
        """
        if not route.mirror:
            return None
        targets = []
        for pool, percent in route.mirror:
            counts = self.counts.setdefault(pool, MirrorCounts())
            targets.append((pool, percent / 100.0, counts))
        maxBody = route.mirrorMaxBody if route.mirrorMaxBody is not None else self.maxBody
        return _RouteMirror(self, tuple(targets), maxBody)

    def json(self) -> dict:
        """
        The admin status's account of the mirrors.
        """
        return {
            "in_flight": self.inFlight,
            "max_in_flight": self.maxInFlight,
            "pools": {name: counts.json() for name, counts in self.counts.items()},
        }

    def send(self, pool: str, counts: MirrorCounts, forwarding, body: bytes) -> None:
        """
        Send one copy of the request C{forwarding} carries to a backend of
        C{pool}, unless the bound on copies in flight is reached or the
        pool has no backend to take it.
        """
        if self.maxInFlight and self.inFlight >= self.maxInFlight:
            counts.skipped[IN_FLIGHT] += 1
            return
        request = forwarding.request
        backend = self.pickers[pool].pick((), request)
        if backend is None:
            counts.skipped[NO_BACKEND] += 1
            return
        upstream = backend.upstream
        headers = request.requestHeaders
        hostHeader = upstream.hostHeader
        if hostHeader is None:
            hostHeader = headers.getRawHeaders(b"host", [upstream.backendHost])[0]
        clientAddress = getattr(request.getClientAddress(), "host", None)
        trusted = upstream.trusts(clientAddress)
        head = requestHead(
            request.method,
            forwarding.target,
            headers.getAllRawHeaders(),
            hostHeader,
            clientAddress.encode("ascii") if clientAddress else b"unix",
            b"https" if request.isSecure() else b"http",
            len(body),
            headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding"),
            forwarding.prefix,
            forwarding.extraHeaders,
            upstream.forwardedStyle,
            trusted,
        )
        counts.mirrored += 1
        self.inFlight += 1
        _Copy(self, counts, backend, head, body, request.method == b"HEAD").start()


class _RouteMirror:
    """
    A route's mirrors: which copies a request gets, and its body once for
    all of them.
    """

    log = Logger()

    def __init__(
        self, mirrors: Mirrors, targets: Sequence[Tuple[str, float, MirrorCounts]], maxBody: int
    ) -> None:
        self.mirrors = mirrors
        self.targets = targets
        self.maxBody = maxBody

    def __call__(self, forwarding) -> None:
        try:
            self._copy(forwarding)
        except Exception:
            # A copy is never the client's problem.
            self.log.failure("mirroring a request failed")

    def _copy(self, forwarding) -> None:
        random = self.mirrors.random
        chosen = [(pool, counts) for pool, share, counts in self.targets if random() < share]
        if not chosen:
            return
        if forwarding.upgrade is not None:
            # A handshake's copy would open a session nobody speaks on.
            for _, counts in chosen:
                counts.skipped[UPGRADE] += 1
            return
        body = _readBody(forwarding.request.content, self.maxBody)
        if body is None:
            for _, counts in chosen:
                counts.skipped[BODY_TOO_LARGE] += 1
            return
        for pool, counts in chosen:
            self.mirrors.send(pool, counts, forwarding, body)


def _readBody(content, most: int) -> Optional[bytes]:
    """
    A copy of a spooled request body, or None when it is longer than
    C{most} bytes; the spool is left where it was for the primary.
    """
    if content is None:
        return b""
    position = content.tell()
    content.seek(0, 2)
    length = content.tell()
    if length > most:
        content.seek(position)
        return None
    content.seek(0)
    body = content.read(length)
    content.seek(position)
    return body


@implementer(IResponseReceiver)
class _Copy:
    """
    One copy on its way to a mirror backend: the receiver of an answer
    that is read and dropped.
    """

    code = 0
    bytesOut = 0
    connection = None
    freshRetried = False

    def __init__(self, mirrors: Mirrors, counts: MirrorCounts, backend, head: bytes,
                 body: bytes, isHead: bool) -> None:
        self.mirrors = mirrors
        self.counts = counts
        self.backend = backend
        self.head = head
        self.body = body
        self.isHead = isHead
        self.clock = backend.upstream.clock
        self.startedAt = self.clock.seconds()

    def start(self) -> None:
        backend = self.backend
        backend.active += 1
        backend.requests += 1
        pool = backend.pool
        connection = pool.idleConnection()
        if connection is not None:
            self._connected(connection)
            return
        pool.acquire().addCallbacks(self._connected, self._connectFailed)

    def _connected(self, connection) -> None:
        self.connection = connection
        body = self.body
        connection.request(
            self.head,
            BytesIO(body) if body else None,
            len(body),
            self.isHead,
            self,
            self.backend.upstream.timeout,
            inLoad=True,
        )

    def _connectFailed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, BackendError):
            error = ConnectError(failure.getErrorMessage())
        self.responseFailed(error)

    def _end(self) -> None:
        self.connection = None
        self.mirrors.inFlight -= 1
        self.backend.active -= 1

    # -- IResponseReceiver ----------------------------------------------------

    def responseHead(self, code, reason, headers, contentLength) -> None:
        self.code = code

    def responseBody(self, data: bytes) -> None:
        self.bytesOut += len(data)

    def responseDone(self) -> None:
        self._end()
        self.backend.recordResponse(
            self.code, self.clock.seconds() - self.startedAt, len(self.body), self.bytesOut
        )

    def responseFailed(self, error: BackendError) -> None:
        if (
            error.reused
            and not error.gotBytes
            and not isinstance(error, ResponseTimeout)
            and not self.freshRetried
        ):
            # A kept connection the backend had closed, as the proxy
            # retries it: once, on a fresh one.
            self.freshRetried = True
            self.connection = None
            self.backend.pool.connect().addCallbacks(self._connected, self._connectFailed)
            return
        self._end()
        # Counted, not logged: a dead mirror under load would flood the log.
        self.counts.failed += 1
        self.backend.recordPassiveFailure(str(error))

    def responseSwitched(self, reason, headers, rest: bytes) -> None:
        # Never asked for (no copy offers an upgrade); never kept either.
        connection, self.connection = self.connection, None
        connection.abort()
        self._end()
