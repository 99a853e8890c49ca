"""
Active health checks, spread over the interval.

Each backend is checked once per interval at a phase of its own: the first
checks are spread evenly over the first interval (as HAProxy spreads them),
and each next one comes an interval later, give or take C{jitter}, so that
checks never all fall on one instant and a thousand backends cost the loop
a steady trickle rather than a burst.  One timer drives them all: a heap of
the next checks' times, whose earliest is the one call scheduled.

A check is one C{GET} of the configured path on the backend's own
connection pool (L{rrbalancer.client}): a kept connection when there is
one, so that a check usually costs one write and one read, and a new one
otherwise, left open for the next check or request where the backend
allows.  It passes on a 2xx or 3xx answer received whole within the
timeout; anything else fails it, whatever form the failure takes (status,
timeout, refused, reset, a malformed answer).  Redirects are not followed:
a 3xx passes as it is, and its Location may name another server entirely.

A check whose timeout expired while the event loop itself was late by more
than half the timeout counts neither way: the answer may well have come in
time and sat unread while the balancer was busy, and a balancer that marks
its healthy backends down because it is overloaded only makes matters
worse.  The rise/fall counting is the backend's own
(L{rrbalancer.backends.Backend.recordCheck}).
"""

import heapq
import math
import random as _random
from itertools import count
from typing import Callable, List, Optional, Set

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .backends import DISABLED, Backend, BackendGroup
from .client import BackendConnection, ConnectionPool, ResponseTimeout
from .config import HealthConfig
from .lag import LagMonitor

USER_AGENT = b"rrbalancer-health-check"


def describeFailure(failure, timeout: float) -> str:
    """
    One short reason for the log and the admin API.
    """
    # A connect timeout, and the timeout cancelling a connection attempt
    # (whose message would only be the address).
    if failure.check(
        CancelledError,
        TimeoutError,
        ConnectTimeoutError,
        ConnectingCancelledError,
        ResponseTimeout,
    ):
        return f"no answer within {timeout:g}s"
    reasons = getattr(failure.value, "reasons", None)
    if reasons:  # some clients wrap the real cause in a list of failures
        return describeFailure(reasons[0], timeout)
    return failure.getErrorMessage() or failure.type.__name__


def checkRequest(backend: Backend, path: str) -> bytes:
    """
    A check's request head: C{GET path HTTP/1.1} with the backend's
    address as C{Host}.
    """
    host = backend.url.partition("://")[2]
    return b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n\r\n" % (
        path.encode("utf-8"),
        host.encode("utf-8"),
        USER_AGENT,
    )


class _Check:
    """
    One check in flight, and the receiver of its response (see
    L{rrbalancer.client}).
    """

    __slots__ = (
        "checker",
        "backend",
        "deferred",
        "started",
        "deadline",
        "code",
        "fresh",
        "connecting",
        "connectTimer",
        "timedOut",
        "done",
    )

    def __init__(self, checker: "HealthChecker", backend: Backend, deferred) -> None:
        self.checker = checker
        self.backend = backend
        self.deferred = deferred
        self.started = checker._clock.seconds()
        self.deadline = self.started + checker._config.timeout
        self.code = 0
        self.fresh = False
        self.connecting = None
        self.connectTimer = None
        self.timedOut = False
        self.done = False

    def run(self) -> None:
        pool = self.checker._poolFor(self.backend)
        connection = pool.idleConnection()
        if connection is not None:
            self._send(connection)
        else:
            self._connect(pool)

    def _connect(self, pool: ConnectionPool) -> None:
        clock = self.checker._clock
        self.connectTimer = clock.callLater(
            max(self.deadline - clock.seconds(), 0.0), self._connectTimedOut
        )
        d = self.connecting = pool.connect()
        d.addCallbacks(self._connected, self._connectFailed)

    def _connectTimedOut(self) -> None:
        self.connectTimer = None
        self.timedOut = True
        if self.connecting is not None:
            self.connecting.cancel()

    def _stopConnectTimer(self) -> None:
        self.connecting = None
        if self.connectTimer is not None:
            if self.connectTimer.active():
                self.connectTimer.cancel()
            self.connectTimer = None

    def _connected(self, connection: BackendConnection) -> None:
        self._stopConnectTimer()
        self._send(connection)

    def _connectFailed(self, failure) -> None:
        self._stopConnectTimer()
        if self.timedOut:
            self._timedOut()
        else:
            self._finish(False, describeFailure(failure, self.checker._config.timeout))

    def _send(self, connection: BackendConnection) -> None:
        checker = self.checker
        remaining = self.deadline - checker._clock.seconds()
        connection.request(
            checkRequest(self.backend, checker._config.path),
            None,
            0,
            False,
            self,
            max(remaining, 0.001),
            overall=True,
        )

    # -- the receiver ---------------------------------------------------------

    def responseHead(self, code: int, reason: bytes, headers, contentLength) -> None:
        self.code = code

    def responseBody(self, data: bytes) -> None:
        pass

    def responseDone(self) -> None:
        code = self.code
        self._finish(200 <= code < 400, f"HTTP {code}")

    def responseFailed(self, error: Exception) -> None:
        if isinstance(error, ResponseTimeout):
            self._timedOut()
        elif getattr(error, "reused", False) and not error.gotBytes and not self.fresh:
            # A kept connection that the backend had closed meanwhile: that
            # says nothing of the backend, so ask again on a new one.
            self.fresh = True
            try:
                self._connect(self.checker._poolFor(self.backend))
            except Exception as e:
                self._finish(False, str(e) or type(e).__name__)
        else:
            self._finish(False, str(error) or type(error).__name__)

    # -- the verdict ---------------------------------------------------------

    def _timedOut(self) -> None:
        checker = self.checker
        timeout = checker._config.timeout
        late = max(
            checker._clock.seconds() - self.deadline,
            checker.lagMonitor.lateSince(self.started),
        )
        if late > timeout / 2:
            self._finish(None, f"the balancer's event loop was {late:.3g}s late")
        else:
            self._finish(False, f"no answer within {timeout:g}s")

    def _finish(self, ok: Optional[bool], reason: str) -> None:
        """
        @param ok: passed, failed, or None for a check that counts neither
            way.
        """
        if self.done:
            return
        self.done = True
        checker = self.checker
        backend = self.backend
        checker._pending.discard(backend)
        if ok is None:
            checker.lateChecks += 1
            checker.log.debug(
                "health check of {url} not counted: {reason}", url=backend.url, reason=reason
            )
        elif checker._group.get(backend.id) is backend:
            backend.recordCheck(ok, reason)
        if self.deferred is not None:
            self.deferred.callback(ok)


def _ownPool(backend: Backend) -> ConnectionPool:
    return backend.pool


class HealthChecker:
    """
    Checks every backend that is not disabled, once per interval each, at
    phases spread over the interval.

    @param poolFor: the connection pool a backend's checks use; by default
        the backend's own, whose kept connections checks and requests then
        share (one connection per backend for both, where a separate pool
        would double the connections held open).
    @param jitter: each wait between two checks of one backend is the
        interval times a random factor between C{1 - jitter} and
        C{1 + jitter} (HAProxy's C{spread-checks}, as a fraction), so that
        balancers and backends that started together drift apart.
    @param random: a random number in [0, 1) (tests give their own).
    @param lagMonitor: measures the event loop's lateness; by default one
        of the checker's own, started and stopped with it.
    @param tick: checks due within this many seconds of each other start
        together, so that the timer fires at most about 1/tick times a
        second however many backends there are.

    @ivar lateChecks: checks that timed out while the loop was late, and so
        did not count.
    """

    log = Logger()

    def __init__(
        self,
        group: BackendGroup,
        poolFor: Optional[Callable[[Backend], ConnectionPool]],
        clock: IReactorTime,
        config: HealthConfig,
        jitter: float = 0.05,
        random: Callable[[], float] = _random.random,
        lagMonitor: Optional[LagMonitor] = None,
        tick: float = 0.01,
    ) -> None:
        self._group = group
        self._poolFor = poolFor if poolFor is not None else _ownPool
        self._clock = clock
        self._config = config
        self.jitter = jitter
        self._random = random
        self._ownMonitor = lagMonitor is None
        self.lagMonitor = lagMonitor if lagMonitor is not None else LagMonitor(clock)
        self.tick = tick
        self.lateChecks = 0
        self.running = False
        self._pending: Set[Backend] = set()
        # (when, sequence, backend): each backend's next check.
        self._schedule: List[tuple] = []
        self._sequence = count()
        self._call = None

    # -- the schedule ----------------------------------------------------------

    def start(self) -> None:
        """
        Start checking: the backends there now are checked over the first
        interval, one after another, the first at once.
        """
        if self.running:
            return
        self.running = True
        if self._ownMonitor:
            self.lagMonitor.start()
        backends = list(self._group)
        now = self._clock.seconds()
        step = self._config.interval / max(len(backends), 1)
        for position, backend in enumerate(backends):
            self._push(now + position * step, backend)
        self._group.watchAdditions(self._added)
        self._fire()

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        self._group.unwatchAdditions(self._added)
        if self._ownMonitor:
            self.lagMonitor.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._schedule = []

    def _push(self, when: float, backend: Backend) -> None:
        heapq.heappush(self._schedule, (when, next(self._sequence), backend))

    def _added(self, backend: Backend) -> None:
        """
        A backend added at run time is first checked at a random point of
        the next interval, so that many added at once do not come due
        together.
        """
        self._push(self._clock.seconds() + self._random() * self._config.interval, backend)
        self._arm()

    def _arm(self) -> None:
        if not self.running or not self._schedule:
            return
        due = self._schedule[0][0]
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= due:
                return
            call.cancel()
        self._call = self._clock.callLater(max(due - self._clock.seconds(), 0.0), self._fire)

    def _fire(self) -> None:
        """
        Start the checks now due, and schedule each backend's next.
        """
        self._call = None
        clock = self._clock
        now = clock.seconds()
        horizon = now + self.tick
        interval = self._config.interval
        jitter = self.jitter
        random = self._random
        schedule = self._schedule
        group = self._group
        pending = self._pending
        for _ in range(len(schedule)):
            if not schedule or schedule[0][0] > horizon:
                break
            due, _, backend = heapq.heappop(schedule)
            if group.get(backend.id) is not backend:
                continue  # removed: forget it
            if due + interval <= now:
                # The loop was more than an interval late: skip the missed
                # checks, keeping this backend's phase.
                due += interval * math.floor((now - due) / interval)
            self._push(due + interval * (1.0 + jitter * (2.0 * random() - 1.0)), backend)
            if backend.adminState == DISABLED or backend in pending:
                continue
            self._run(backend, None)
        self._arm()

    def checkAll(self) -> None:
        """
        Check now every backend that is not disabled and has no check under
        way.  It never raises.
        """
        for backend in self._group:
            if backend.adminState == DISABLED or backend in self._pending:
                continue
            try:
                self.check(backend)
            except Exception:
                self.log.failure("health check of {url} could not start", url=backend.url)

    # -- one check -------------------------------------------------------------

    def check(self, backend: Backend) -> Deferred:
        """
        Check one backend now; the Deferred fires with whether it passed,
        or None if the check did not count (the loop was late).
        """
        d = Deferred()
        self._run(backend, d)
        return d

    def _run(self, backend: Backend, deferred: Optional[Deferred]) -> None:
        self._pending.add(backend)
        check = _Check(self, backend, deferred)
        try:
            check.run()
        except Exception as e:
            # A pool that cannot even start fails the check like any error
            # (and does not leave it pending for ever).
            check._finish(False, str(e) or type(e).__name__)
