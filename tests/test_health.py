"""
Tests for L{rrbalancer.health}: checks over in-memory connections
(L{BackendConnection}s on L{StringTransport}s) on a L{Clock}, so that no
test waits for time, and one real-socket test per outcome.
"""

from itertools import cycle
from random import Random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer import health
from rrbalancer.backends import DISABLED, DOWN, DRAINING, UP, Backend, BackendGroup
from rrbalancer.client import ConnectionPool, connectorFor
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.health import USER_AGENT, HealthChecker, describeFailure
from rrbalancer.lag import LagMonitor

from .support import Net, ScriptedBackend, ok, reply


def response(code: int, body: bytes = b"fine\n", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (
        code,
        len(body),
        extra,
        body,
    )


class MemoryServer:
    """
    Backends in memory: each connection attempt (to any backend) gives a
    L{BackendConnection} on a L{StringTransport}, or is refused or left
    hanging; L{flush} answers the requests sent since with C{answer}.

    @ivar answer: the response bytes, or None to leave requests unanswered.
    """

    def __init__(self, clock: Clock, answer: bytes = None) -> None:
        self.clock = clock
        self.answer = response(200) if answer is None else answer
        self.refuse = False
        self.hang = False
        self.connections = []  # (protocol, transport)
        self.attempts = []  # (url, when)
        self.hanging = []
        self.requests = []  # (url, bytes)
        self._answered = {}
        self._pools = {}

    def poolFor(self, backend):
        pool = self._pools.get(backend)
        if pool is None:
            pool = self._pools[backend] = ConnectionPool(
                lambda pool: self._connect(backend, pool), self.clock, maxIdle=4
            )
        return pool

    def _connect(self, backend, pool):
        self.attempts.append((backend.url, self.clock.seconds()))
        if self.refuse:
            return fail(ConnectionRefusedError("111: Connection refused"))
        if self.hang:
            d = Deferred(lambda d: d.errback(ConnectingCancelledError(backend.url)))
            self.hanging.append(d)
            return d
        protocol = pool.buildProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.url = backend.url
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def flush(self) -> None:
        """
        Answer every request written since the last flush.
        """
        for protocol, transport in list(self.connections):
            data = transport.value()
            seen = self._answered.get(id(transport), 0)
            new = data[seen:]
            self._answered[id(transport)] = len(data)
            while new:
                end = new.index(b"\r\n\r\n") + 4
                self.requests.append((protocol.url, new[:end]))
                new = new[end:]
                if self.answer is not None and not transport.disconnecting:
                    protocol.dataReceived(self.answer)

    def close(self, index: int, reason=ConnectionDone) -> None:
        protocol, transport = self.connections[index]
        protocol.connectionLost(Failure(reason()))


def makeChecker(
    health=None,
    urls=("http://127.0.0.1:8081",),
    answer=None,
    jitter=0.0,
    random=lambda: 0.5,
):
    health = health or HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
    clock = Clock()
    group = BackendGroup(health, clock)
    server = MemoryServer(clock, answer)
    backends = [group.add(BackendConfig(url=url)) for url in urls]
    checker = HealthChecker(
        group, server.poolFor, clock, health, jitter=jitter, random=random
    )
    return checker, group, backends, clock, server


def step(clock: Clock, seconds: float, server: MemoryServer = None, by: float = 0.05):
    """
    Move time on in small steps (a jump would read as a late event loop),
    answering requests as they come.
    """
    start = clock.seconds()
    for i in range(1, round(seconds / by) + 1):
        # Land on round times, for checks due at round times to run then.
        clock.advance(round(start + i * by, 9) - clock.seconds())
        if server is not None:
            server.flush()


class CheckTests(SynchronousTestCase):
    """
    One check: what passes, what fails, and why.
    """

    def check(self, answer, health=None):
        checker, group, [backend], clock, server = makeChecker(health, answer=answer)
        d = checker.check(backend)
        server.flush()
        return self.successResultOf(d), backend, server

    def test_2xxPasses(self):
        for code in (200, 204, 299):
            ok_, backend, server = self.check(response(code, b"" if code == 204 else b"x"))
            self.assertIs(ok_, True, code)
            self.assertEqual(backend._passes, 1)
            self.assertIsNone(backend.lastError)

    def test_3xxPasses(self):
        """
        A 3xx passes as it is: its Location is not followed.
        """
        for code in (301, 302, 304, 307, 399):
            answer = response(code, b"" if code == 304 else b"moved", b"Location: /x\r\n")
            ok_, backend, server = self.check(answer)
            self.assertIs(ok_, True, code)
            self.assertEqual(len(server.requests), 1, "redirect followed")

    def test_5xxFails(self):
        ok_, backend, _ = self.check(response(503))
        self.assertIs(ok_, False)
        self.assertEqual(backend.lastError, "HTTP 503")
        self.assertEqual(backend._fails, 1)

    def test_4xxFails(self):
        ok_, backend, _ = self.check(response(404))
        self.assertIs(ok_, False)
        self.assertEqual(backend.lastError, "HTTP 404")

    def test_request(self):
        """
        A check is a GET of the configured path, HTTP/1.1, with the
        backend's address as Host and the checker's User-Agent.
        """
        _, _, server = self.check(response(200), HealthConfig(path="/healthz?full=1"))
        [(url, request)] = server.requests
        self.assertEqual(
            request,
            b"GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"
            b"User-Agent: " + USER_AGENT + b"\r\n\r\n",
        )

    def test_hostOfNamedBackend(self):
        checker, group, [backend], clock, server = makeChecker(
            HealthConfig(path="/status"), urls=("https://backend.example:8443",)
        )
        checker.check(backend)
        server.flush()
        [(url, request)] = server.requests
        self.assertTrue(request.startswith(b"GET /status HTTP/1.1\r\nHost: backend.example:8443\r\n"))

    def test_connectionKeptForTheNextCheck(self):
        """
        A check leaves its connection in the backend's pool, and the next
        check (or request) uses it.
        """
        checker, group, [backend], clock, server = makeChecker()
        for _ in range(3):
            d = checker.check(backend)
            server.flush()
            self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(server.attempts), 1)
        self.assertEqual(len(server.requests), 3)
        self.assertEqual(server.poolFor(backend).idleCount, 1)

    def test_connectionClosedWhenTheBackendSaysSo(self):
        checker, group, [backend], clock, server = makeChecker(
            answer=response(200, extra=b"Connection: close\r\n")
        )
        for _ in range(2):
            d = checker.check(backend)
            server.flush()
            self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(server.attempts), 2)
        self.assertTrue(server.connections[0][1].disconnecting)
        self.assertEqual(server.poolFor(backend).idleCount, 0)

    def test_timeout(self):
        """
        A backend that never answers fails the check once the timeout has
        passed, not before, and its connection is closed.
        """
        checker, group, [backend], clock, server = makeChecker()
        server.answer = None
        d = checker.check(backend)
        server.flush()
        step(clock, 0.95)
        self.assertNoResult(d)
        step(clock, 0.05)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")
        self.assertTrue(server.connections[0][1].disconnecting)
        self.assertEqual(checker._pending, set())

    def test_timeoutReasonUsesConfiguredTimeout(self):
        checker, group, [backend], clock, server = makeChecker(HealthConfig(timeout=2.5))
        server.answer = None
        d = checker.check(backend)
        step(clock, 2.5)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 2.5s")

    def test_timeoutWhileReadingBody(self):
        """
        The timeout covers the body too, as one deadline: a backend that
        sends its head and then trickles or stalls fails the check.
        """
        checker, group, [backend], clock, server = makeChecker()
        server.answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
        d = checker.check(backend)
        server.flush()
        step(clock, 0.5)
        server.connections[0][0].dataReceived(b"more")
        step(clock, 0.45)
        self.assertNoResult(d)
        step(clock, 0.05)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")
        self.assertTrue(server.connections[0][1].disconnecting)

    def test_connectTimeout(self):
        """
        A connection attempt that does not succeed within the timeout is
        given up, and reads as a timeout.
        """
        checker, group, [backend], clock, server = makeChecker()
        server.hang = True
        d = checker.check(backend)
        step(clock, 0.95)
        self.assertNoResult(d)
        step(clock, 0.05)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connectionRefused(self):
        checker, group, [backend], clock, server = makeChecker()
        server.refuse = True
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertIn("Connection refused", backend.lastError)
        self.assertNotIn("\n", backend.lastError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connectionLostBeforeResponse(self):
        checker, group, [backend], clock, server = makeChecker()
        d = checker.check(backend)
        server.close(0, ConnectionLost)
        self.assertIs(self.successResultOf(d), False)
        self.assertIn("closed the connection", backend.lastError)

    def test_badResponse(self):
        ok_, backend, _ = self.check(b"HTTP/1.1 2x0 OK\r\n\r\n")
        self.assertIs(ok_, False)
        self.assertEqual(backend.lastError, "invalid response: malformed status code")

    def test_keptConnectionClosedMeanwhile(self):
        """
        A kept connection that the backend closed just as the check was
        sent says nothing about the backend: the check asks again once, on
        a new connection.
        """
        checker, group, [backend], clock, server = makeChecker()
        d = checker.check(backend)
        server.flush()
        self.assertIs(self.successResultOf(d), True)
        d = checker.check(backend)
        server.close(0, ConnectionDone)
        self.assertNoResult(d)
        server.flush()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(server.attempts), 2)
        self.assertEqual(backend._fails, 0)

    def test_freshConnectionClosedFails(self):
        """
        The same on the new connection fails the check: once is enough.
        """
        checker, group, [backend], clock, server = makeChecker()
        d = checker.check(backend)
        server.flush()
        self.successResultOf(d)
        d = checker.check(backend)
        server.close(0)
        server.close(1)
        self.assertIs(self.successResultOf(d), False)
        self.assertIn("closed the connection", backend.lastError)

    def test_reasonNamesTypeWithoutMessage(self):
        class Odd(Exception):
            pass

        self.assertEqual(describeFailure(Failure(Odd()), 1.0), "Odd")

    def test_poolRaises(self):
        """
        A pool that raises instead of connecting fails that check, without
        leaving it pending.
        """
        checker, group, [backend], clock, server = makeChecker()

        def broken(backend):
            raise RuntimeError("pool exploded")

        checker._poolFor = broken
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertEqual(backend.lastError, "pool exploded")
        self.assertEqual(checker._pending, set())

    def test_backendRemovedDuringCheck(self):
        """
        A check that ends after its backend left the group changes nothing.
        """
        checker, group, [backend], clock, server = makeChecker()
        server.answer = response(500)
        d = checker.check(backend)
        group.remove(backend)
        server.flush()
        self.assertIs(self.successResultOf(d), False)
        self.assertIsNone(backend.lastCheck)
        self.assertEqual(backend._fails, 0)


class LateLoopTests(SynchronousTestCase):
    """
    A timeout that the balancer's own lateness may have caused is not held
    against the backend.
    """

    def setUp(self):
        self.checker, self.group, [self.backend], self.clock, self.server = makeChecker()
        self.server.answer = None
        self.logged = []
        self.checker.log = Logger(observer=self.logged.append)

    def test_lateTimeoutGetsAnotherTimeout(self):
        """
        The timeout's timer fired more than half the timeout late: the
        exchange goes on, on the same connection, for one more timeout, and
        an answer within it counts.
        """
        d = self.checker.check(self.backend)
        self.clock.advance(1.6)
        self.assertNoResult(d)
        [(protocol, transport)] = self.server.connections
        self.assertFalse(transport.disconnecting)
        step(self.clock, 0.9)
        protocol.dataReceived(response(200))
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(self.server.connections), 1)
        self.assertEqual(self.checker.lateChecks, 0)

    def test_lateTwiceNotCounted(self):
        d = self.checker.check(self.backend)
        self.clock.advance(1.6)
        self.clock.advance(1.6)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.backend._fails, 0)
        self.assertEqual(self.backend.checksFailed, 0)
        self.assertIsNone(self.backend.lastError)
        self.assertEqual(self.checker.lateChecks, 1)
        self.assertEqual(self.checker._pending, set())
        self.assertTrue(self.server.connections[0][1].disconnecting)
        [event] = self.logged
        self.assertIn("1 health checks timed out twice", formatEvent(event))

    def test_lateLoggedOncePerMinute(self):
        for _ in range(3):
            d = self.checker.check(self.backend)
            self.clock.advance(1.6)
            self.clock.advance(1.6)
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.logged), 1)
        step(self.clock, 60.0, by=1.0)
        d = self.checker.check(self.backend)
        self.clock.advance(1.6)
        self.clock.advance(1.6)
        self.assertEqual(self.checker.lateChecks, 4)
        self.assertEqual(len(self.logged), 2)
        self.assertIn("3 health checks", formatEvent(self.logged[1]))

    def test_lateThenTimedOutCounted(self):
        """
        Late once, then on time at the second deadline: a failure.
        """
        d = self.checker.check(self.backend)
        self.clock.advance(1.6)
        step(self.clock, 1.0)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.backend.lastError, "no answer within 1s")

    def test_lateWhileConnecting(self):
        self.server.hang = True
        d = self.checker.check(self.backend)
        self.clock.advance(1.6)
        self.assertNoResult(d)
        self.assertFalse(self.server.hanging[0].called)
        step(self.clock, 1.0)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.backend.lastError, "no answer within 1s")

    def test_slightlyLateTimeoutCounted(self):
        d = self.checker.check(self.backend)
        self.clock.advance(1.4)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.checker.lateChecks, 0)

    def test_loopLateDuringTheCheck(self):
        """
        The loop stalled while the check waited (seen by the lag monitor),
        though the timeout itself fired on time: one more timeout.
        """
        monitor = self.checker.lagMonitor
        monitor.start()
        self.addCleanup(monitor.stop)
        d = self.checker.check(self.backend)
        step(self.clock, 0.2)
        self.clock.advance(0.7)  # the monitor's 0.25 call runs at 0.9
        self.assertAlmostEqual(monitor.lag, 0.65)
        step(self.clock, 0.1)
        self.assertNoResult(d)
        step(self.clock, 1.0)
        self.assertIs(self.successResultOf(d), False)

    def test_smallLagDuringTheCheckCounted(self):
        monitor = self.checker.lagMonitor
        monitor.start()
        self.addCleanup(monitor.stop)
        d = self.checker.check(self.backend)
        step(self.clock, 0.2)
        self.clock.advance(0.4)
        step(self.clock, 0.4)
        self.assertIs(self.successResultOf(d), False)

    def test_lateLoopDoesNotHidePromptFailures(self):
        """
        Lateness excuses timeouts only: a refusal counts whatever the lag.
        """
        self.server.refuse = True
        d = self.checker.check(self.backend)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.backend._fails, 1)


class ScheduleTests(SynchronousTestCase):
    """
    When checks run: spread over the interval, once per interval each.
    """

    def starts(self, server):
        return [round(when, 6) for url, when in server.attempts]

    def test_firstChecksSpreadOverTheInterval(self):
        urls = [f"http://127.0.0.1:{8081 + i}" for i in range(4)]
        checker, group, backends, clock, server = makeChecker(urls=urls)
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 2.0, server)
        self.assertEqual(self.starts(server), [0.0, 0.5, 1.0, 1.5])
        self.assertEqual([u for u, _ in server.attempts], urls)
        step(clock, 1.9, server)
        self.assertEqual(len(server.requests), 8)
        self.assertEqual(
            sorted(round(when, 6) for _, when in server.attempts), [0.0, 0.5, 1.0, 1.5]
        )

    def test_oncePerIntervalWithJitter(self):
        """
        Each next check comes an interval later, give or take the jitter.
        """
        randoms = cycle([0.0, 0.999999])
        checker, group, [backend], clock, server = makeChecker(
            jitter=0.1, random=lambda: next(randoms)
        )
        times = []
        checker.observer = lambda *result: times.append(clock.seconds())
        checker.start()
        self.addCleanup(checker.stop)
        server.flush()
        step(clock, 7.9, server, by=0.01)
        self.assertEqual(len(times), 4)
        gaps = [round(b - a, 2) for a, b in zip(times, times[1:])]
        self.assertEqual(gaps, [1.8, 2.2, 1.8])

    def test_neverAllAtOnce(self):
        """
        A thousand backends checked every second: checks start a few at a
        time, about ten every 10 ms, from one timer.
        """
        health = HealthConfig(interval=1.0, timeout=0.5)
        urls = [f"http://127.2.{i // 250}.{i % 250 + 2}:9100" for i in range(1000)]
        checker, group, backends, clock, server = makeChecker(
            health, urls=urls, jitter=0.05, random=Random(7).random
        )
        checker.start()
        self.addCleanup(checker.stop)
        perStep = []
        for _ in range(300):
            before = len(server.requests)
            clock.advance(0.01)
            server.flush()
            perStep.append(len(server.requests) - before)
            timers = [c for c in clock.getDelayedCalls() if c.func == checker._wake]
            self.assertEqual(len(timers), 1)
        # No check holds a timer of its own: the checker's, the lag
        # monitor's, and the pools' idle sweeps are all.
        kinds = {c.func.__name__ for c in clock.getDelayedCalls()}
        self.assertEqual(kinds, {"_wake", "_tick", "_sweep"})
        self.assertTrue(2900 <= sum(perStep) <= 3100, sum(perStep))
        self.assertLessEqual(max(perStep), 50)
        self.assertEqual(len(server.attempts), 1000, "one connection per backend, kept")

    def test_disabledNotChecked(self):
        checker, group, [backend], clock, server = makeChecker()
        checker.start()
        self.addCleanup(checker.stop)
        server.flush()
        backend.adminState = DISABLED
        step(clock, 4.0, server)
        self.assertEqual(len(server.requests), 1)
        backend.adminState = UP
        step(clock, 2.0, server)
        self.assertEqual(len(server.requests), 2)

    def test_drainingStillChecked(self):
        checker, group, [backend], clock, server = makeChecker()
        checker.start()
        self.addCleanup(checker.stop)
        backend.adminState = DRAINING
        step(clock, 2.0, server)
        self.assertEqual(len(server.requests), 2)

    def test_fallThenRise(self):
        health = HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
        checker, group, [backend], clock, server = makeChecker(health)
        checker.start()
        self.addCleanup(checker.stop)
        server.flush()
        server.answer = response(503)
        step(clock, 4.0, server)
        self.assertEqual(backend.state, UP, "two failures are not enough")
        step(clock, 2.0, server)
        self.assertEqual(backend.state, DOWN)
        self.assertEqual(backend.lastChangeReason, "HTTP 503")
        self.assertAlmostEqual(backend.lastChange, 6.0)
        server.answer = response(200)
        step(clock, 2.0, server)
        self.assertEqual(backend.state, DOWN, "one pass is not enough")
        step(clock, 2.0, server)
        self.assertEqual(backend.state, UP)
        self.assertEqual(len(server.requests), 6)

    def test_failuresByTimeout(self):
        health = HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
        checker, group, [backend], clock, server = makeChecker(health)
        server.answer = None
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 5.0, server)
        self.assertEqual(backend.state, DOWN)
        self.assertEqual(backend.lastChangeReason, "no answer within 1s")
        self.assertEqual(checker.lateChecks, 0)

    def test_pendingCheckNotStartedTwice(self):
        """
        With a timeout longer than the interval, a check still waiting for
        its answer is not started again; once it ends, checks go on.
        """
        health = HealthConfig(interval=1.0, timeout=5.0, rise=1, fall=1)
        checker, group, [backend], clock, server = makeChecker(health)
        server.answer = None
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 4.5, server)
        self.assertEqual(len(server.requests), 1)
        step(clock, 1.0, server)  # t=5: the check times out, the next starts
        self.assertEqual(backend.state, DOWN)
        self.assertEqual(len(server.requests), 2)

    def test_addedBackendScheduled(self):
        """
        A backend added at run time is checked within an interval, and
        from then on once per interval; a removed one no more.
        """
        checker, group, [first], clock, server = makeChecker()
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 0.5, server)
        added = group.add(BackendConfig(url="http://127.0.0.1:9999"))
        step(clock, 1.0, server)  # random() is 0.5: due at 0.5 + 1.0
        self.assertEqual([u for u, _ in server.requests], [first.url, added.url])
        step(clock, 4.0, server)
        self.assertEqual([u for u, _ in server.requests].count(added.url), 3)
        group.remove(added)
        step(clock, 4.0, server)
        self.assertEqual([u for u, _ in server.requests].count(added.url), 3)
        self.assertEqual(len(checker._schedule), 1)
        # Nor is its check request kept (it was, while it was checked).
        self.assertEqual(list(checker._heads), [first])

    def test_requestMadeOnce(self):
        """
        Each backend's check request is made once, not for every check; a
        check asked for outside the schedule keeps nothing.
        """
        checker, group, [backend], clock, server = makeChecker()
        made = []
        original = health.checkRequest

        def checkRequest(backend, path):
            made.append(backend)
            return original(backend, path)

        self.patch(health, "checkRequest", checkRequest)
        checker.check(backend)
        self.assertEqual((made, checker._heads), ([backend], {}))
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 5.0, server)
        self.assertEqual(len(server.requests), 3)
        self.assertEqual(made, [backend, backend])
        self.assertEqual({head for _, head in server.requests}, {original(backend, "/")})

    def test_lateLoopSkipsMissedChecks(self):
        """
        A loop late by several intervals checks each backend once, not
        once per missed interval, and keeps its phase.
        """
        urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
        checker, group, backends, clock, server = makeChecker(urls=urls)
        checker.start()
        self.addCleanup(checker.stop)
        server.flush()
        clock.advance(10.2)
        server.flush()
        self.assertEqual(len(server.requests), 3)
        self.assertEqual(sorted(entry[0] for entry in checker._schedule), [11.0, 12.0])

    def test_lateLoopCatchesUpInTurns(self):
        """
        Checks a late loop finds due start at most twice a tick's share in
        one wake (here 401 backends at 2 s: 3 a tick, so 6), the rest in
        the turns that follow, none missed.
        """
        urls = [f"http://127.0.0.2:{9000 + i}" for i in range(401)]
        checker, group, backends, clock, server = makeChecker(urls=urls)
        checker.start()
        self.addCleanup(checker.stop)
        attempts = len(server.attempts)
        clock.rightNow += 1.0  # late: the timer has not fired
        checker._wake()
        self.assertEqual(len(server.attempts) - attempts, 6)
        checker._wake()
        self.assertEqual(len(server.attempts) - attempts, 12)
        clock.advance(0)  # the turns that follow
        # Every backend due by then (one each 2/401 s, a tick ahead).
        due = [i for i in range(401) if i * 2.0 / 401 <= 1.0 + checker.tick]
        self.assertEqual(len({url for url, _ in server.attempts}), len(due))

    def test_poolErrorsKeepTheScheduleGoing(self):
        health = HealthConfig(interval=1.0, timeout=0.5, rise=1, fall=2)
        urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
        checker, group, [bad, good], clock, server = makeChecker(health, urls=urls)
        poolFor = checker._poolFor

        def sometimesBroken(backend):
            if backend is bad:
                raise RuntimeError("pool exploded")
            return poolFor(backend)

        checker._poolFor = sometimesBroken
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 3.0, server)
        self.assertEqual(bad.state, DOWN)
        self.assertEqual(bad.lastError, "pool exploded")
        self.assertEqual(good.state, UP)
        self.assertEqual(len(server.requests), 3)

    def test_errorsDoNotStopTheSchedule(self):
        """
        An error recording one backend's check is logged; the other
        backends' checks, and the next rounds, go on.
        """
        urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
        health = HealthConfig(interval=1.0, timeout=0.5, rise=1, fall=1)
        checker, group, [bad, good], clock, server = makeChecker(health, urls=urls)
        server.answer = None

        recordCheck = Backend.recordCheck

        def sometimesBroken(backend, ok, reason, **details):
            if backend is bad:
                raise ValueError("recording failed")
            recordCheck(backend, ok, reason, **details)

        self.patch(Backend, "recordCheck", sometimesBroken)
        checker.start()
        self.addCleanup(checker.stop)
        step(clock, 3.0, server)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)
        self.assertEqual(good.checksFailed, 3)
        self.assertEqual(len(server.requests), 7)

    def test_stop(self):
        checker, group, [backend], clock, server = makeChecker()
        checker.start()
        self.assertTrue(checker.running)
        self.assertTrue(checker.lagMonitor.running)
        checker.stop()
        self.assertFalse(checker.running)
        self.assertFalse(checker.lagMonitor.running)
        step(clock, 4.0, server)
        self.assertEqual(len(server.requests), 1)

        def timers():
            return [c for c in clock.getDelayedCalls() if c.func != server.poolFor(backend)._sweep]

        self.assertEqual(timers(), [])
        group.add(BackendConfig(url="http://127.0.0.1:9999"))
        self.assertEqual(timers(), [])
        checker.stop()  # a second stop is harmless
        checker.start()
        step(clock, 2.0, server)
        self.assertEqual(len(server.requests), 4)
        checker.stop()

    def test_stopGivesUpChecksUnderWay(self):
        """
        Stopping gives up the checks waiting for an answer or a connection,
        counts none of them, and leaves no timer behind.
        """
        urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
        health = HealthConfig(interval=2.0, timeout=1.5)
        checker, group, [a, b], clock, server = makeChecker(health, urls=urls)
        server.answer = None
        checker.start()
        server.hang = True
        step(clock, 1.0, server)
        now = checker.check(a)
        self.assertEqual(len(server.hanging), 2)
        checker.stop()
        self.assertIsNone(self.successResultOf(now))
        self.assertTrue(server.connections[0][1].disconnecting)
        self.assertTrue(all(d.called for d in server.hanging))
        for backend in (a, b):
            self.assertEqual((backend.checksPassed, backend.checksFailed), (0, 0))
        self.assertEqual(checker._pending, set())
        self.assertEqual(checker.lateChecks, 0)
        self.assertEqual(
            [c for c in clock.getDelayedCalls() if c.func.__name__ != "_sweep"], []
        )

    def test_sharedLagMonitorLeftRunning(self):
        clock = Clock()
        monitor = LagMonitor(clock)
        monitor.start()
        group = BackendGroup(HealthConfig(), clock)
        checker = HealthChecker(group, None, clock, HealthConfig(), lagMonitor=monitor)
        checker.start()
        checker.stop()
        self.assertTrue(monitor.running)
        monitor.stop()

    def test_checkAll(self):
        """
        checkAll checks every backend not disabled at once, and never
        raises.
        """
        urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082", "http://127.0.0.1:8083"]
        checker, group, [a, b, c], clock, server = makeChecker(urls=urls)
        c.adminState = DISABLED
        checker.checkAll()
        server.flush()
        self.assertEqual([u for u, _ in server.requests], [a.url, b.url])
        checker.check = lambda backend: 1 / 0
        checker.checkAll()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class CheckSoonTests(SynchronousTestCase):
    """
    A backend added at run time is checked soon: at once when it comes
    alone, and at the checker's own pace when thousands come in one call,
    rather than all in one turn of the loop.
    """

    def added(self, n):
        checker, group, [first], clock, server = makeChecker()
        backends = [group.add(BackendConfig(url=f"http://127.0.0.2:{9000 + i}")) for i in range(n)]
        return checker, group, backends, clock, server

    def sent(self, server):
        # Each first check opens the backend's first connection.
        return [url for url, _ in server.attempts]

    def test_aloneAtOnce(self):
        checker, group, [backend], clock, server = self.added(1)
        checker.checkSoon(backend)
        self.assertEqual(self.sent(server), [backend.url])

    def test_manyPaced(self):
        """
        Each tick starts as many as it starts scheduled checks (here 401
        backends at 2 s: 3 in each tick of 10 ms), in the order asked, the
        last within the interval.
        """
        checker, group, backends, clock, server = self.added(400)
        for backend in backends:
            checker.checkSoon(backend)
        self.assertEqual(self.sent(server), [b.url for b in backends[:3]])
        step(clock, 0.01, server, by=0.01)
        self.assertEqual(self.sent(server), [b.url for b in backends[:6]])
        step(clock, 1.9, server, by=0.01)
        self.assertEqual(self.sent(server), [b.url for b in backends])
        self.assertEqual(len(checker._soon), 0)

    def test_timerArmedOnce(self):
        """
        Backends asked for in one call while others wait arm the timer for
        the next tick once, not once each.  A real clock moves between the
        checker's reading of it and the reactor's, so that the timer's own
        time is always a little past the tick it was armed for.
        """
        checker, group, backends, clock, server = self.added(400)

        def moving():
            clock.rightNow += 0.000001
            return clock.rightNow

        clock.seconds = moving
        armed = []
        callLater = clock.callLater
        clock.callLater = lambda *a: armed.append(a) or callLater(*a)
        for backend in backends:
            checker.checkSoon(backend)
        # Once for the first checks' deadline, once for the next tick.
        self.assertEqual(len([a for a in armed if a[1] == checker._wake]), 2)

    def test_goneOrDisabledSkipped(self):
        """
        A backend removed or disabled while it waited is not checked, nor
        is one whose check is already under way checked twice.
        """
        checker, group, backends, clock, server = self.added(5)
        checker.check(backends[4])
        for backend in backends:
            checker.checkSoon(backend)
        group.remove(backends[1])
        backends[2].adminState = DISABLED
        step(clock, 0.05, server, by=0.01)
        self.assertEqual(
            self.sent(server), [backends[4].url, backends[0].url, backends[3].url]
        )

    def test_addedOnceAnInterval(self):
        """
        Backends added while the checker runs are checked soon, each once
        (asking for it again while it waits, or while it is checked, adds
        nothing), and from then on once an interval: not a second time
        in their first interval.
        """
        checker, group, [first], clock, server = makeChecker()
        checker.start()
        self.addCleanup(checker.stop)
        backends = [group.add(BackendConfig(url=f"http://127.0.0.2:{9000 + i}")) for i in range(400)]
        for backend in backends:
            checker.checkSoon(backend)
        step(clock, 1.9, server, by=0.01)
        sent = [url for url, _ in server.requests]
        self.assertEqual([sent.count(b.url) for b in backends], [1] * 400)
        step(clock, 2.0, server, by=0.01)
        sent = [url for url, _ in server.requests]
        self.assertEqual([sent.count(b.url) for b in backends], [2] * 400)

    def test_stopForgets(self):
        checker, group, backends, clock, server = self.added(5)
        checker.start()
        for backend in backends:
            checker.checkSoon(backend)
        checker.stop()
        attempts = len(server.attempts)
        step(clock, 0.1, server, by=0.01)
        self.assertEqual(len(server.attempts), attempts)


class RealSocketTests(TestCase):
    """
    Checks over real connections to loopback backends.
    """

    timeout = 10

    def checker(self, url, clock=reactor, timeout=1.0):
        health = HealthConfig(timeout=timeout, fall=1)
        group = BackendGroup(health, clock)
        backend = group.add(BackendConfig(url=url))
        host, port = url.rsplit(":", 1)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", int(port), timeout=5)
        pool = ConnectionPool(connectorFor(endpoint), clock)
        self.addCleanup(pool.closeIdle)
        return HealthChecker(group, lambda backend: pool, clock, health), backend

    @inlineCallbacks
    def test_pass(self):
        net = Net(self)
        server = ScriptedBackend(net, reply(ok()))
        checker, backend = self.checker(server.url)
        self.assertIs((yield checker.check(backend)), True)
        self.assertIs((yield checker.check(backend)), True)
        self.assertEqual(len(server.connections), 1, "the connection was kept")
        [request] = server.requests[:1]
        self.assertEqual(request.requestLine, b"GET / HTTP/1.1")
        self.assertEqual(request.header(b"user-agent"), [USER_AGENT])

    @inlineCallbacks
    def test_failStatus(self):
        net = Net(self)
        server = ScriptedBackend(net, reply(response(503)))
        checker, backend = self.checker(server.url)
        self.assertIs((yield checker.check(backend)), False)
        self.assertEqual(backend.lastError, "HTTP 503")
        self.assertEqual(backend.state, DOWN)

    @inlineCallbacks
    def test_stalledBodyTimesOut(self):
        """
        A check whose body stalls fails at the timeout and closes its
        connection, rather than leave it to a backend that never finishes.
        """
        net = Net(self)
        server = ScriptedBackend(
            net, reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        )
        clock = Clock()
        checker, backend = self.checker(server.url, clock=clock)
        d = checker.check(backend)
        pool = checker._poolFor(backend)
        for _ in range(500):
            if any(c._responseStarted for c in pool._open):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        else:
            self.fail("no response head arrived")
        self.assertNoResult(d)
        clock.advance(1.0)
        self.assertIs((yield d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")
        yield server.waitForAllClosed()

    @inlineCallbacks
    def test_refused(self):
        net = Net(self)
        checker, backend = self.checker(f"http://127.0.0.1:{net.refusingPort()}")
        self.assertIs((yield checker.check(backend)), False)
        self.assertIn("refused", backend.lastError.lower())
        self.assertEqual(checker._pending, set())


class SharedTests(SynchronousTestCase):
    """
    A checker whose results another process takes (L{HealthChecker.observer}),
    and one that only takes them (C{scheduled} off).
    """

    def test_observerSeesEachResult(self):
        checker, group, [backend], clock, server = makeChecker(answer=response(503))
        seen = []
        checker.observer = lambda *result: seen.append(result)
        checker.check(backend)
        server.flush()
        [(who, ok_, reason, code, duration)] = seen
        self.assertEqual((who, ok_, reason, code), (backend, False, "HTTP 503", 503))
        self.assertEqual(duration, 0)

    def test_notScheduled(self):
        """
        Started unscheduled, it checks nothing by itself, the lateness of
        the loop is still measured, and a check asked for still runs.
        """
        checker, group, [backend], clock, server = makeChecker(answer=response(200))
        checker.scheduled = False
        checker.start()
        self.addCleanup(checker.stop)
        group.add(BackendConfig("http://127.0.0.1:8082"))
        step(clock, 5, server)
        self.assertEqual(server.requests, [])
        self.assertTrue(checker.lagMonitor.running)
        self.assertIs(self.successResultOf(self.flushed(checker.check(backend), server)), True)

    def flushed(self, d, server):
        server.flush()
        return d
