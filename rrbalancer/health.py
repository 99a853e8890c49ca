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
than half the timeout is given one more timeout, and counts neither way if
the loop is late again: the answer may well have come in time and sat
unread while the balancer was busy, and a balancer that marks its healthy
backends down (or reconnects to them) because it is overloaded only makes
matters worse.  The rise/fall counting is the backend's own
(L{rrbalancer.backends.Backend.recordCheck}).
"""

import heapq
import math
import random as _random
from collections import deque
from itertools import count
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

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
        "connection",
        "timedOut",
        "verdict",
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
        self.connection = None
        # Given one more timeout, the loop having been late.
        self.timedOut = False
        # (ok, reason), decided at the deadline.
        self.verdict = None
        self.done = False

    def run(self) -> None:
        pool = self.checker._poolFor(self.backend)
        connection = pool.idleConnection()
        if connection is not None:
            self._send(connection)
        else:
            self._connect(pool)

    def _connect(self, pool: ConnectionPool) -> None:
        d = self.connecting = pool.connect()
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, connection: BackendConnection) -> None:
        self.connecting = None
        self._send(connection)

    def _connectFailed(self, failure) -> None:
        self.connecting = None
        if self.verdict is not None:
            self._finish(*self.verdict)
        else:
            self._finish(False, describeFailure(failure, self.checker._config.timeout))

    def _send(self, connection: BackendConnection) -> None:
        self.connection = connection
        connection.request(self.checker._head(self.backend), None, 0, False, self, None)

    def expire(self) -> None:
        """
        The deadline passed with no verdict.

        If the event loop was late meanwhile by more than half the timeout,
        the answer may have come in time and still be unread: the check
        gets one more timeout, on the same connection (closing it would
        only cost a new connection to a backend that did nothing wrong,
        and when many checks time out at once, that cost is what keeps
        the loop late).  Otherwise, or the second time, the connection
        attempt or the exchange is given up.
        """
        checker = self.checker
        timeout = checker._config.timeout
        now = checker._clock.seconds()
        late = max(now - self.deadline, checker.lagMonitor.lateSince(self.started))
        if late > timeout / 2:
            if not self.timedOut:
                self.timedOut = True
                self.started = now
                self.deadline = now + timeout
                checker._inFlight.append(self)
                return
            reason = f"the balancer's event loop was {late:.3g}s late"
            checker._notCounted(reason)
            self.verdict = (None, reason)
        else:
            self.verdict = (False, f"no answer within {timeout:g}s")
        self._giveUp()

    def giveUp(self) -> None:
        """
        Stop waiting (the checker is stopping): the check counts neither
        way.
        """
        if not self.done and self.verdict is None:
            self.verdict = (None, "the health checker stopped")
            self._giveUp()

    def _giveUp(self) -> None:
        if self.connecting is not None:
            # A cancelled Deferred always fails: back in _connectFailed.
            self.connecting.cancel()
            return
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()
        self._finish(*self.verdict)

    # -- the receiver ---------------------------------------------------------

    def responseHead(self, code: int, reason: bytes, headers, contentLength) -> None:
        self.code = code

    def responseBody(self, data: bytes) -> None:
        pass

    def responseDone(self) -> None:
        self.connection = None
        code = self.code
        self._finish(200 <= code < 400, f"HTTP {code}")

    def responseFailed(self, error: Exception) -> None:
        self.connection = None
        if getattr(error, "reused", False) and not error.gotBytes and not self.fresh:
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
        if not checker.running:
            # Its deadline needs no waking for any more (while running, the
            # timer wakes often enough that it is not worth moving).
            checker._arm()
        if ok is not None and backend._group is checker._group:
            code = self.code or None
            duration = checker._clock.seconds() - self.started
            backend.recordCheck(ok, reason, code=code, duration=duration)
            if checker.observer is not None:
                checker.observer(backend, ok, reason, code, duration)
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

    @ivar lateChecks: checks that timed out twice while the loop was late,
        and so did not count.
    @ivar scheduled: whether L{start} checks every backend at its interval;
        without, only L{check} does (a worker of several that takes the
        results of another's checks).
    @ivar observer: called with (backend, ok, reason, code, duration) for
        each result counted, or None.
    """

    scheduled = True
    observer: Optional[Callable[..., None]] = None

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
        self._lateSinceLog = 0
        self._lateLoggedAt: Optional[float] = None
        self.running = False
        self._pending: Set[Backend] = set()
        # (when, sequence, backend): each backend's next check.
        self._schedule: List[tuple] = []
        self._sequence = count()
        # The checks under way, in the order they started, which is the
        # order of their deadlines (one timeout for all): the one timer
        # also wakes for the first deadline, and a check needs none of its
        # own.
        self._inFlight: Deque[_Check] = deque()
        self._call = None
        self._wakeAt = 0.0
        # Each backend's check request, made once: made anew, it was about
        # a fiftieth of a check's time in the profile.
        self._heads: Dict[Backend, bytes] = {}
        # Backends to check soon (see checkSoon), and how many such checks
        # the current tick has started.
        self._soon: Deque[Tuple[Backend, bool]] = deque()
        self._soonAsked: Set[Backend] = set()
        self._soonTick = -1
        self._soonStarted = 0

    # Lateness is logged at most this often (seconds): when it strikes, it
    # strikes thousands of checks at once.
    LATE_LOG_EVERY = 60.0

    def _notCounted(self, reason: str) -> None:
        self.lateChecks += 1
        self._lateSinceLog += 1
        now = self._clock.seconds()
        if self._lateLoggedAt is None or now - self._lateLoggedAt >= self.LATE_LOG_EVERY:
            self.log.warn(
                "{n} health checks timed out twice while the event loop was late, "
                "and were not counted (the last: {reason}); the balancer is "
                "overloaded",
                n=self._lateSinceLog,
                reason=reason,
            )
            self._lateLoggedAt = now
            self._lateSinceLog = 0

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
        if not self.scheduled:
            return
        backends = list(self._group)
        now = self._clock.seconds()
        step = self._config.interval / max(len(backends), 1)
        for position, backend in enumerate(backends):
            self._push(now + position * step, backend)
        self._group.watchAdditions(self._added)
        self._wake()

    def stop(self) -> None:
        """
        Stop checking, and give up the checks under way (they count neither
        way, and their Deferreds fire with None).
        """
        if not self.running:
            return
        self.running = False
        self._group.unwatchAdditions(self._added)
        if self._ownMonitor:
            self.lagMonitor.stop()
        self._schedule = []
        self._heads = {}
        self._soon.clear()
        self._soonAsked.clear()
        # The checks under way are given up: their results would come from
        # a checker that no longer runs.
        inFlight, self._inFlight = self._inFlight, deque()
        for check in inFlight:
            check.giveUp()
        self._arm()

    def _push(self, when: float, backend: Backend) -> None:
        heapq.heappush(self._schedule, (when, next(self._sequence), backend))

    def _head(self, backend: Backend) -> bytes:
        """
        C{backend}'s check request; kept while it is on the schedule, which
        forgets it when it finds the backend removed.
        """
        head = self._heads.get(backend)
        if head is None:
            head = checkRequest(backend, self._config.path)
            if self.running and self.scheduled and backend._group is self._group:
                self._heads[backend] = head
        return head

    def _added(self, backend: Backend) -> None:
        """
        A backend added at run time is checked soon (L{checkSoon}), and from
        then on once an interval: ten thousand added in one call come due
        as they were first checked, spread over an interval.
        """
        self._askSoon(backend, True)

    def _arm(self) -> None:
        """
        Have the timer wake for the next check due (while running) or the
        first deadline of a check under way, whichever is sooner.
        """
        inFlight = self._inFlight
        while inFlight and inFlight[0].done:
            inFlight.popleft()
        wake = inFlight[0].deadline if inFlight else None
        if self.running and self._schedule:
            due = self._schedule[0][0]
            if wake is None or due < wake:
                wake = due
        if self._soon:
            due = (self._tickOf(self._clock.seconds()) + 1) * self.tick
            if wake is None or due < wake:
                wake = due
        call = self._call
        if call is not None and call.active():
            # Compared with the time asked for, not the call's: the reactor
            # adds the delay to its own later reading of the clock, so the
            # call's time is a little past the wake, and every backend
            # added in one call replaced the timer.
            if wake is not None and self._wakeAt <= wake:
                return
            call.cancel()
        self._call = None
        if wake is not None:
            self._wakeAt = wake
            self._call = self._clock.callLater(max(wake - self._clock.seconds(), 0.0), self._wake)

    def _wake(self) -> None:
        """
        Expire the checks whose deadline has passed, start the checks now
        due, and schedule each backend's next.
        """
        self._call = None
        now = self._clock.seconds()
        inFlight = self._inFlight
        try:
            while inFlight and (inFlight[0].done or inFlight[0].deadline <= now):
                check = inFlight.popleft()
                if not check.done:
                    try:
                        check.expire()
                    except Exception:
                        self.log.failure(
                            "health check of {url} could not end", url=check.backend.url
                        )
            if self._soon:
                self._startSoon(now)
            if self.running:
                self._startDue(now)
        except Exception:
            # Whatever went wrong, the checks must go on: the timer is
            # armed again below.
            self.log.failure("health checks could not be scheduled")
        finally:
            self._arm()

    def _startDue(self, now: float) -> None:
        horizon = now + self.tick
        interval = self._config.interval
        jitter = self.jitter
        random = self._random
        schedule = self._schedule
        group = self._group
        pending = self._pending
        push = heapq.heappush
        pop = heapq.heappop
        sequence = self._sequence
        # At most twice a tick's share start in one wake: a loop that fell
        # behind catches up over its next turns, serving clients between
        # them, not in one turn as long as it was late.
        limit = 2 * self._perTick()
        started = 0
        for _ in range(len(schedule)):
            if not schedule or schedule[0][0] > horizon or started >= limit:
                break
            due, _, backend = pop(schedule)
            if backend._group is not group:
                self._heads.pop(backend, None)
                continue  # removed: forget it
            if due + interval <= now:
                # The loop was more than an interval late: skip the missed
                # checks, keeping this backend's phase.
                due += interval * math.floor((now - due) / interval)
            push(
                schedule,
                (due + interval * (1.0 + jitter * (2.0 * random() - 1.0)), next(sequence), backend),
            )
            if backend.adminState == DISABLED or backend in pending:
                continue
            started += 1
            try:
                self._run(backend, None, arm=False)
            except Exception:
                self.log.failure("health check of {url} could not start", url=backend.url)

    def _perTick(self) -> int:
        """
        How many checks a tick starts at the interval: the backends' number
        times the tick over the interval, and at least one.
        """
        return max(1, math.ceil(len(self._group) * self.tick / self._config.interval))

    def checkSoon(self, backend: Backend) -> None:
        """
        Check C{backend} as soon as the checker's pace allows: at once,
        unless this tick has already started as many such checks as it
        starts scheduled ones (the backends' number times the tick over the
        interval, and at least one), in which case at a later tick, in
        turn.

        This is how a backend added at run time gets its first check (it
        takes no traffic before): one added alone is checked at once, and
        ten thousand added in one call over about an interval, rather than
        in one turn of the loop: opening ten thousand connections at once
        held the loop for seconds, every client waiting.  A backend waiting
        for such a check, or being checked, is not asked for twice.  It
        never raises.
        """
        if backend in self._soonAsked or backend in self._pending:
            return  # it will be checked soon, or is being checked
        self._askSoon(backend, False)

    def _askSoon(self, backend: Backend, added: bool) -> None:
        """
        @param added: C{backend} has just been added, and is put on the
            schedule when this check starts.
        """
        if not self._soon and self._soonBudget(self._clock.seconds()):
            self._checkSoon(backend, added, arm=True)
        else:
            self._soon.append((backend, added))
            self._soonAsked.add(backend)
            self._arm()

    def _soonBudget(self, now: float) -> bool:
        """
        May one more check asked for by L{checkSoon} start in this tick?
        (Counted as started if so.)
        """
        tick = self._tickOf(now)
        if tick != self._soonTick:
            self._soonTick = tick
            self._soonStarted = 0
        if self._soonStarted >= self._perTick():
            return False
        self._soonStarted += 1
        return True

    def _tickOf(self, when: float) -> int:
        # Rounded, so that the tick a wake is armed for is the tick it finds
        # itself in (0.03 / 0.01 is 2.9999999999999996).
        return math.floor(when / self.tick + 1e-6)

    def _startSoon(self, now: float) -> None:
        soon = self._soon
        while soon and self._soonBudget(now):
            backend, added = soon.popleft()
            self._soonAsked.discard(backend)
            self._checkSoon(backend, added, arm=False)

    def _checkSoon(self, backend: Backend, added: bool, arm: bool) -> None:
        if backend._group is not self._group:
            return
        if added and self.running:
            interval = self._config.interval
            factor = 1.0 + self.jitter * (2.0 * self._random() - 1.0)
            self._push(self._clock.seconds() + interval * factor, backend)
        if backend.adminState == DISABLED or backend in self._pending:
            return
        try:
            self._run(backend, None, arm=arm)
        except Exception:
            self.log.failure("health check of {url} could not start", url=backend.url)

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
        or None if the check did not count (the loop was late, or the
        checker stopped).
        """
        d = Deferred()
        self._run(backend, d)
        return d

    def _run(self, backend: Backend, deferred: Optional[Deferred], arm: bool = True) -> None:
        self._pending.add(backend)
        check = _Check(self, backend, deferred)
        self._inFlight.append(check)
        try:
            check.run()
        except Exception as e:
            # A pool that cannot even start fails the check like any error
            # (and does not leave it pending for ever).
            check._finish(False, str(e) or type(e).__name__)
        if arm and not check.done:
            self._arm()
