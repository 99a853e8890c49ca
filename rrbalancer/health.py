"""
Active health checks: every interval, one GET per backend with treq.

A check passes on a 2xx or 3xx answer within the timeout; anything else,
whatever form the failure takes (status, timeout, refused, reset, a
cancelled request), fails it.  The rise/fall counting is the backend's own
(L{rrbalancer.backends.Backend.recordCheck}).
"""

from typing import Dict, Optional

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .backends import DISABLED, Backend, BackendGroup
from .config import HealthConfig

USER_AGENT = b"rrbalancer-health-check"


def describeFailure(failure, timeout: float) -> str:
    """
    One short reason for the log and the admin API.
    """
    # The client's own connect timeout, and the timeout cancelling a
    # connection attempt (whose message would only be the address).
    if failure.check(
        CancelledError, TimeoutError, ConnectTimeoutError, ConnectingCancelledError
    ):
        return f"no answer within {timeout:g}s"
    reasons = getattr(failure.value, "reasons", None)
    if reasons:  # treq/Agent wrap the real cause in a list of failures
        return describeFailure(reasons[0], timeout)
    return failure.getErrorMessage() or failure.type.__name__


class _Discard(Protocol):
    """
    Reads a check's body to its end, and drops it.
    """

    def __init__(self) -> None:
        self.finished = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        # Timed out: close the connection rather than leave it to a backend
        # that may never end the body.
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


def discardBody(response) -> Deferred:
    """
    Read and drop a response's body, so that its connection is freed; the
    Deferred's cancellation closes the connection.
    """
    if response.length == 0:
        return succeed(None)
    protocol = _Discard()
    response.deliverBody(protocol)
    return protocol.finished


class HealthChecker:
    """
    Runs the checks on a L{LoopingCall}.

    @param http: a treq C{HTTPClient} (or L{treq.testing.StubTreq}) whose
        C{get} reaches the backends.
    """

    log = Logger()

    def __init__(
        self,
        group: BackendGroup,
        http,
        clock: IReactorTime,
        config: HealthConfig,
    ) -> None:
        self._group = group
        self._http = http
        self._clock = clock
        self._config = config
        # The checks under way, to cancel when the checker stops.
        self._pending: Dict[Backend, Optional[Deferred]] = {}
        self._stopped = False
        self._loop = LoopingCall(self.checkAll)
        self._loop.clock = clock

    def start(self) -> None:
        self._stopped = False
        self._loop.start(self._config.interval, now=True)

    def stop(self) -> None:
        """
        Stop checking, and give up the checks under way (their result no
        longer counts).
        """
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        for d in list(self._pending.values()):
            if d is not None:
                d.cancel()

    def checkAll(self) -> None:
        """
        Check every backend that is not disabled and has no check under way
        (a check can outlive an interval when the timeout is longer).
        It never raises: a L{LoopingCall} stops for good when its function
        does.
        """
        for backend in self._group:
            if backend.adminState == DISABLED or backend in self._pending:
                continue
            try:
                self.check(backend)
            except Exception:
                self.log.failure("health check of {url} could not start", url=backend.url)

    def check(self, backend: Backend):
        """
        Check one backend now; the Deferred fires with whether it passed.
        """
        # Marked before the request starts: an answer may come at once.
        self._pending[backend] = None
        timeout = self._config.timeout
        url = backend.url + self._config.path
        # A client that raises instead of failing its Deferred fails the
        # check like any error (and does not leave it pending for ever).
        # Redirects are not followed: a 3xx passes as it is, and its
        # Location may name another server entirely.
        d = maybeDeferred(
            self._http.get,
            url,
            headers={b"User-Agent": [USER_AGENT]},
            allow_redirects=False,
        )

        def answered(response):
            code = response.code
            ok = 200 <= code < 400
            return discardBody(response).addCallback(lambda _: (ok, f"HTTP {code}"))

        def failed(failure):
            return (False, describeFailure(failure, timeout))

        def record(result):
            self._pending.pop(backend, None)
            ok, reason = result
            if self._group.get(backend.id) is backend and not self._stopped:
                backend.recordCheck(ok, reason)
            return ok

        d.addCallback(answered)
        d.addTimeout(timeout, self._clock)
        d.addErrback(failed)
        d.addCallback(record)
        if backend in self._pending:
            self._pending[backend] = d
        return d
