"""
Tests for L{rrbalancer.health}: the checks run against in-memory backends
(L{treq.testing.StubTreq}) on a L{Clock}, so that no test waits for time.
"""

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from treq.client import HTTPClient
from treq.testing import StubTreq

from rrbalancer.backends import DISABLED, DOWN, DRAINING, UP, BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.health import USER_AGENT, HealthChecker, describeFailure


class ScriptedBackend(Resource):
    """
    A backend whose health endpoint answers with C{self.code}, or (with
    C{hang}) never answers until the test finishes the request.
    """

    isLeaf = True

    def __init__(self, code: int = 200, hang: bool = False) -> None:
        Resource.__init__(self)
        self.code = code
        self.hang = hang
        self.requests = []
        self.hanging = []

    def render(self, request):
        self.requests.append(request)
        if self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        if 300 <= self.code < 400:
            request.setHeader(b"location", b"/elsewhere")
        return b"status %d\n" % (self.code,)


class RecordingHTTP:
    """
    An http client whose C{get} is scripted by the test: each call records
    its arguments and returns what C{answer} gives (or raises it).
    """

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = []

    def get(self, url, **kwargs):
        self.calls.append((url, kwargs))
        return self.answer()


def makeChecker(http, health=None, urls=("http://127.0.0.1:8081",)):
    health = health or HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
    clock = Clock()
    group = BackendGroup(health, clock)
    backends = [group.add(BackendConfig(url=url)) for url in urls]
    checker = HealthChecker(group, http, clock, health)
    return checker, group, backends, clock


def results(d):
    """
    The result a Deferred has already fired with.
    """
    out = []
    d.addBoth(out.append)
    assert out, "the check has not finished"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class CheckTests(SynchronousTestCase):
    """
    One check: what passes, what fails, and why.
    """

    def check(self, backendResource, health=None):
        stub = StubTreq(backendResource)
        checker, group, [backend], clock = makeChecker(stub, health)
        d = checker.check(backend)
        stub.flush()
        return results(d), backend

    def test_2xxPasses(self):
        for code in (200, 204, 299):
            ok, backend = self.check(ScriptedBackend(code))
            self.assertIs(ok, True, code)
            self.assertEqual(backend._passes, 1)
            self.assertIsNone(backend.lastError)

    def test_3xxPasses(self):
        """
        A 3xx passes as it is: its Location is not followed (it may name
        another server entirely).
        """
        for code in (301, 302, 304, 307, 399):
            resource = ScriptedBackend(code)
            ok, backend = self.check(resource)
            self.assertIs(ok, True, code)
            self.assertEqual(len(resource.requests), 1, "redirect followed")
            self.assertEqual(backend._passes, 1)

    def test_5xxFails(self):
        ok, backend = self.check(ScriptedBackend(503))
        self.assertIs(ok, False)
        self.assertEqual(backend.lastError, "HTTP 503")
        self.assertEqual(backend._fails, 1)

    def test_4xxFails(self):
        ok, backend = self.check(ScriptedBackend(404))
        self.assertIs(ok, False)
        self.assertEqual(backend.lastError, "HTTP 404")

    def test_hitsBackendURLPlusPath(self):
        """
        The check is a GET of the backend's URL plus the configured path,
        with the checker's User-Agent.
        """
        resource = ScriptedBackend(200)
        health = HealthConfig(path="/healthz?full=1", timeout=1.0)
        self.check(resource, health)
        [request] = resource.requests
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.uri, b"/healthz?full=1")
        self.assertEqual(request.getHeader(b"host"), b"127.0.0.1:8081")
        self.assertEqual(request.getHeader(b"user-agent"), USER_AGENT)

    def test_urlIsExactlyURLPlusPath(self):
        http = RecordingHTTP(lambda: Deferred())
        checker, group, [backend], clock = makeChecker(
            http,
            HealthConfig(path="/status"),
            urls=("https://backend.example:8443",),
        )
        checker.check(backend)
        [(url, kwargs)] = http.calls
        self.assertEqual(url, "https://backend.example:8443/status")
        self.assertEqual(kwargs["headers"], {b"User-Agent": [USER_AGENT]})
        self.assertIs(kwargs["allow_redirects"], False)

    def test_timeout(self):
        """
        A backend that never answers fails the check once the timeout has
        passed, not before, with a reason that says so.
        """
        resource = ScriptedBackend(hang=True)
        stub = StubTreq(resource)
        checker, group, [backend], clock = makeChecker(stub)
        d = checker.check(backend)
        stub.flush()
        self.assertEqual(len(resource.hanging), 1)
        self.assertNoResult(d)
        clock.advance(0.999)
        self.assertNoResult(d)
        clock.advance(0.001)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")
        stub.flush()
        # The server saw its client go away.
        self.assertTrue(resource.hanging[0]._disconnected)

    def test_timeoutReasonUsesConfiguredTimeout(self):
        http = RecordingHTTP(lambda: Deferred())
        checker, group, [backend], clock = makeChecker(
            http, HealthConfig(timeout=2.5)
        )
        d = checker.check(backend)
        clock.advance(2.5)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 2.5s")

    def test_timeoutWhileReadingBody(self):
        """
        The timeout covers the body too: a backend that sends its head and
        then stalls fails the check.
        """

        class Stalling(Resource):
            isLeaf = True

            def render(self, request):
                request.setHeader(b"content-length", b"100")
                request.write(b"partial")
                return NOT_DONE_YET

        stub = StubTreq(Stalling())
        checker, group, [backend], clock = makeChecker(stub)
        d = checker.check(backend)
        stub.flush()
        self.assertNoResult(d)
        clock.advance(1.0)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(backend.lastError, "no answer within 1s")

    def test_connectTimeoutReason(self):
        """
        The client's own connection timeout reads like the check's.
        """
        http = RecordingHTTP(lambda: fail(error.TimeoutError()))
        checker, group, [backend], clock = makeChecker(http)
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertEqual(backend.lastError, "no answer within 1s")

    def test_cancelledConnectionAttemptReason(self):
        """
        The timeout cancelling a connection attempt reads as a timeout, not
        as the address the attempt was for.
        """
        from twisted.internet.address import HostnameAddress

        http = RecordingHTTP(
            lambda: fail(error.ConnectingCancelledError(HostnameAddress(b"backend", 80)))
        )
        checker, group, [backend], clock = makeChecker(http)
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertEqual(backend.lastError, "no answer within 1s")

    def test_connectionRefused(self):
        http = RecordingHTTP(
            lambda: fail(error.ConnectionRefusedError("111: Connection refused"))
        )
        checker, group, [backend], clock = makeChecker(http)
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertIn("Connection refused", backend.lastError)
        self.assertNotIn("\n", backend.lastError)

    def test_connectionLostBeforeResponse(self):
        """
        Agent wraps the cause of a lost request in L{ResponseNeverReceived};
        the reason names the cause.
        """
        http = RecordingHTTP(
            lambda: fail(
                ResponseNeverReceived([Failure(error.ConnectionLost("reset by peer"))])
            )
        )
        checker, group, [backend], clock = makeChecker(http)
        self.assertIs(self.successResultOf(checker.check(backend)), False)
        self.assertIn("reset by peer", backend.lastError)
        self.assertNotIn("ResponseNeverReceived", backend.lastError)

    def test_reasonNamesTypeWithoutMessage(self):
        class Odd(Exception):
            pass

        self.assertEqual(describeFailure(Failure(Odd()), 1.0), "Odd")

    def test_backendRemovedDuringCheck(self):
        """
        A check that ends after its backend left the group changes nothing.
        """
        pending = Deferred()
        http = RecordingHTTP(lambda: pending)
        checker, group, [backend], clock = makeChecker(http)
        d = checker.check(backend)
        group.remove(backend)
        pending.errback(error.ConnectionRefusedError())
        self.assertIs(self.successResultOf(d), False)
        self.assertIsNone(backend.lastCheck)
        self.assertEqual(backend._fails, 0)


class RealClientTests(TestCase):
    """
    The checker with a real treq client, against a closed port on loopback.
    """

    timeout = 10

    @inlineCallbacks
    def test_connectionRefused(self):
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=5))
        checker, group, [backend], clock = makeChecker(
            http, urls=(f"http://127.0.0.1:{number}",)
        )
        ok = yield checker.check(backend)
        self.assertIs(ok, False)
        self.assertIn("refused", backend.lastError.lower())
        self.assertEqual(checker._pending, {})


class StallingBody(Resource):
    """
    Sends its head and part of its body, then never ends.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.lost = Deferred()

    def render_GET(self, request):
        request.setHeader(b"content-length", b"100")
        request.write(b"partial")
        request.notifyFinish().addBoth(lambda _: self.lost.callback(None))
        return NOT_DONE_YET


class StalledBodyTests(TestCase):
    timeout = 10

    @inlineCallbacks
    def test_connectionClosedAtTimeout(self):
        """
        A check whose body stalls fails at the timeout and closes its
        connection, rather than leave one open per check to a backend that
        never finishes.
        """
        backend = StallingBody()
        site = Site(backend)
        site.log = lambda request: None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        heads = []

        class Watching:
            def get(self, *args, **kwargs):
                return http.get(*args, **kwargs).addCallback(
                    lambda response: heads.append(response) or response
                )

        http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=5))
        checker, group, [checked], clock = makeChecker(
            Watching(), urls=(f"http://127.0.0.1:{port.getHost().port}",)
        )
        d = checker.check(checked)
        for _ in range(500):
            if heads:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(heads, "no response head arrived")
        clock.advance(1.0)
        self.assertIs((yield d), False)
        self.assertIn("no answer within 1s", checked.lastError)
        yield backend.lost


class RiseFallTests(SynchronousTestCase):
    """
    The checks, run by the loop, move a backend down after C{fall} failures
    and up after C{rise} passes.
    """

    def setUp(self):
        self.resource = ScriptedBackend(200)
        self.stub = StubTreq(self.resource)
        self.health = HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
        self.checker, self.group, [self.backend], self.clock = makeChecker(
            self.stub, self.health
        )
        self.checker.start()
        self.addCleanup(self.checker.stop)
        self.stub.flush()

    def tick(self):
        self.clock.advance(self.health.interval)
        self.stub.flush()

    def test_firstCheckAtStart(self):
        self.assertEqual(len(self.resource.requests), 1)
        self.assertEqual(self.backend.lastCheck, 0)

    def test_fallThenRise(self):
        backend = self.backend
        self.resource.code = 503
        self.tick()
        self.tick()
        self.assertEqual(backend.state, UP, "two failures are not enough")
        self.assertTrue(backend.available)
        self.tick()
        self.assertEqual(backend.state, DOWN)
        self.assertFalse(backend.available)
        self.assertEqual(backend.lastChangeReason, "HTTP 503")
        self.assertEqual(backend.lastChange, 3 * self.health.interval)

        self.tick()
        self.assertEqual(backend.state, DOWN, "more failures change nothing")
        self.resource.code = 200
        self.tick()
        self.assertEqual(backend.state, DOWN, "one pass is not enough")
        self.tick()
        self.assertEqual(backend.state, UP)
        self.assertEqual(backend.lastChangeReason, "HTTP 200")
        self.assertEqual(len(self.resource.requests), 7)

    def test_passResetsFailures(self):
        self.resource.code = 500
        self.tick()
        self.tick()
        self.resource.code = 200
        self.tick()
        self.resource.code = 500
        self.tick()
        self.tick()
        self.assertEqual(self.backend.state, UP)
        self.tick()
        self.assertEqual(self.backend.state, DOWN)

    def test_failuresByTimeout(self):
        """
        Checks that time out count towards C{fall} like any failure.
        """
        self.resource.hang = True
        for i in range(3):
            self.tick()
            self.clock.advance(self.health.timeout)
        self.assertEqual(self.backend.state, DOWN)
        self.assertEqual(self.backend.lastChangeReason, "no answer within 1s")

    def test_disabledNotChecked(self):
        self.backend.adminState = DISABLED
        self.tick()
        self.tick()
        self.assertEqual(len(self.resource.requests), 1)
        self.backend.adminState = UP
        self.tick()
        self.assertEqual(len(self.resource.requests), 2)

    def test_drainingStillChecked(self):
        self.backend.adminState = DRAINING
        self.tick()
        self.assertEqual(len(self.resource.requests), 2)

    def test_stop(self):
        self.checker.stop()
        self.assertFalse(self.checker._loop.running)
        self.tick()
        self.assertEqual(len(self.resource.requests), 1)
        self.checker.stop()  # a second stop is harmless


class LoopTests(SynchronousTestCase):
    """
    The loop itself: one check at a time per backend, and it never dies.
    """

    def test_pendingCheckNotStartedTwice(self):
        """
        With a timeout longer than the interval, a check still waiting for
        its answer is not started again; once it ends, checks go on.
        """
        resource = ScriptedBackend(hang=True)
        stub = StubTreq(resource)
        health = HealthConfig(interval=1.0, timeout=5.0, rise=1, fall=1)
        checker, group, [backend, other], clock = makeChecker(
            stub, health, urls=("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        )
        checker.start()
        self.addCleanup(checker.stop)
        stub.flush()
        self.assertEqual(len(resource.requests), 2)
        for i in range(4):
            clock.advance(1.0)
            stub.flush()
        self.assertEqual(len(resource.requests), 2, "no second check while one is pending")
        clock.advance(1.0)  # t=5: both checks time out, and new ones start
        stub.flush()
        self.assertEqual(backend.state, DOWN)
        self.assertEqual(other.state, DOWN)
        self.assertEqual(len(resource.requests), 4)

    def test_stopGivesUpChecksUnderWay(self):
        """
        Stopping cancels the checks waiting for an answer, counts none of
        them, and leaves no timer behind.
        """
        resource = ScriptedBackend(hang=True)
        stub = StubTreq(resource)
        health = HealthConfig(interval=1.0, timeout=5.0, rise=1, fall=1)
        checker, group, [backend], clock = makeChecker(stub, health)
        checker.start()
        stub.flush()
        self.assertEqual(len(resource.requests), 1)
        checker.stop()
        stub.flush()
        self.assertEqual(checker._pending, {})
        self.assertEqual((backend.checksPassed, backend.checksFailed), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pendingClearedAfterAnswer(self):
        resource = ScriptedBackend(hang=True)
        stub = StubTreq(resource)
        health = HealthConfig(interval=1.0, timeout=5.0)
        checker, group, [backend], clock = makeChecker(stub, health)
        checker.start()
        self.addCleanup(checker.stop)
        stub.flush()
        clock.advance(1.0)
        stub.flush()
        self.assertEqual(len(resource.requests), 1)
        request = resource.hanging.pop()
        request.write(b"late but fine")
        request.finish()
        stub.flush()
        self.assertEqual(backend._passes, 1)
        self.assertEqual(checker._pending, {})
        resource.hang = False
        clock.advance(1.0)
        stub.flush()
        self.assertEqual(len(resource.requests), 2)

    def test_synchronousRaiseKeepsLoopRunning(self):
        """
        An http client that raises instead of returning a Deferred fails
        that check; checkAll does not raise, the loop keeps running, the
        other backends are still checked, and the next round checks again.
        """
        calls = []

        class Raising:
            def get(self, url, **kwargs):
                calls.append(url)
                if url.startswith("http://127.0.0.1:8081"):
                    raise RuntimeError("client exploded")
                return Deferred()

        health = HealthConfig(interval=1.0, timeout=0.5, rise=1, fall=2)
        checker, group, [bad, good], clock = makeChecker(
            Raising(),
            health,
            urls=("http://127.0.0.1:8081", "http://127.0.0.1:8082"),
        )
        checker.start()
        self.addCleanup(checker.stop)
        self.assertTrue(checker._loop.running)
        self.assertEqual(len(calls), 2)
        self.assertEqual(bad.lastError, "client exploded")
        self.assertNotIn(bad, checker._pending)

        checker.checkAll()  # direct call: never raises
        clock.advance(1.0)
        self.assertTrue(checker._loop.running)
        self.assertEqual(
            calls.count("http://127.0.0.1:8081/"), 3, "the raising backend is retried"
        )
        self.assertEqual(bad.state, DOWN, "a client that cannot check counts as failed")

    def test_errorOutsideCheckDoesNotStopLoop(self):
        """
        Even an error that escapes L{HealthChecker.check} itself is logged,
        not raised.
        """
        health = HealthConfig(interval=1.0)
        checker, group, [backend], clock = makeChecker(
            RecordingHTTP(lambda: Deferred()), health
        )

        def broken(backend):
            raise ValueError("broken check")

        checker.check = broken
        checker.start()
        self.addCleanup(checker.stop)
        clock.advance(1.0)
        self.assertTrue(checker._loop.running)
        errors = self.flushLoggedErrors(ValueError)
        self.assertEqual(len(errors), 2)
