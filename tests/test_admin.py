"""
Tests for L{rrbalancer.admin}: the JSON API in memory (L{StubTreq}, a
L{Clock}), the token, the admin settings, and, on real loopback sockets, a
slow request that outlives the removal of its backend and a balancer under
load while backends are added and removed.

The helpers at the top (real backends, a balancer on port 0, polling with a
bound) are shared with the dashboard and reload tests.
"""

import base64
import csv
import io
import json
import os

from twisted.internet import reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import treq
from treq.client import HTTPClient
from treq.testing import StubTreq

from rrbalancer.admin import AdminAPI, AdminResource, APIError
from rrbalancer.backends import DISABLED, DRAINING, UP, BackendGroup
from rrbalancer.config import (
    ADMIN_DEFAULT,
    BackendConfig,
    Config,
    ConfigError,
    HealthConfig,
    buildConfig,
    isLoopbackEndpoint,
    parseAdmin,
)
from rrbalancer.health import USER_AGENT
from rrbalancer.metrics import Metrics, MetricsResource
from rrbalancer.service import makeService
from rrbalancer.tap import Options

CONTRACT_FIELDS = {
    "id", "url", "weight", "backup", "state", "healthy", "active", "requests",
    "failures", "last_check", "last_error", "latency_ms",
}


# -- in-memory helpers ----------------------------------------------------------


class FakeChecker:
    """
    Stands for the L{HealthChecker}: records which backends were to be
    checked soon.
    """

    def __init__(self) -> None:
        self.checked = []

    def checkSoon(self, backend):
        self.checked.append(backend)


class InMemoryAdmin:
    """
    An admin resource over a group of backends on a L{Clock}, reached with
    L{StubTreq}.
    """

    def __init__(self, urls=("http://127.0.0.1:8081", "http://127.0.0.1:8082"),
                 health=HealthConfig(enabled=False), token=None, checker=None, **group):
        self.clock = Clock()
        self.clock.advance(1000)
        self.group = BackendGroup(health, self.clock, **group)
        for url in urls:
            self.group.add(BackendConfig(url))
        self.checker = checker
        self.api = AdminAPI(self.group, self.clock, healthChecker=checker)
        self.events = []
        self.api.log = Logger(observer=self.events.append)
        self.resource = AdminResource(
            self.api, MetricsResource(Metrics(self.group)), token
        )
        self.stub = StubTreq(self.resource)

    def request(self, method, path, body=None, raw=None, headers=None, host="127.0.0.1"):
        """
        @return: (status code, decoded JSON or None, response)
        """
        data = raw if raw is not None else (
            json.dumps(body).encode("utf-8") if body is not None else None
        )
        headers = dict(headers or {})
        headers[b"Host"] = [host.encode("ascii")]
        if data is not None:
            headers.setdefault(b"Content-Type", [b"application/json"])
        d = self.stub.request(method, f"http://127.0.0.1{path}", data=data, headers=headers)
        self.stub.flush()
        results = []
        d.addCallback(lambda r: self.stub.content(r).addCallback(lambda c: (r, c)))
        d.addBoth(results.append)
        self.stub.flush()
        response, content = results[0]
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = None
        return response.code, decoded, response, content

    def snapshot(self):
        return [
            (b.id, b.url, b.weight, b.backup, b.adminState, b.healthy, b.removing)
            for b in self.group
        ]


# -- real-socket helpers ---------------------------------------------------------


@inlineCallbacks
def poll(condition, timeout=15.0, interval=0.01, what="a condition"):
    """
    Wait, at most C{timeout} seconds, until C{condition()} is true.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(reactor, interval, lambda: None)


def settleConnections(testCase):
    """
    At the end of a test (this cleanup runs last), abort the TCP
    connections the test left open and wait until they are gone, so that
    the reactor is clean without waiting on anybody's timer.
    """
    before = set(reactor.getReaders()) | set(reactor.getWriters())

    @inlineCallbacks
    def settle():
        def extra():
            now = set(reactor.getReaders()) | set(reactor.getWriters())
            return [
                s for s in now - before if isinstance(s, (tcp.Server, tcp.Client))
            ]

        for connection in extra():
            connection.abortConnection()
        yield poll(lambda: not extra(), timeout=5, what="connections to close")

    testCase.addCleanup(settle)


class TestBackend(Resource):
    """
    A real backend: answers C{"<name> <path>"}; a request for C{/slow...}
    is held until L{release}.  Health checks are not counted as requests.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name
        self.served = 0
        self.firstServedAt = None
        self.held = []

    def render(self, request):
        if request.getHeader(b"user-agent") == USER_AGENT:
            return b"ok\n"
        body = f"{self.name} {request.path.decode()}\n".encode("utf-8")
        if request.path.startswith(b"/slow"):
            self.held.append((request, body))
            return NOT_DONE_YET
        self.served += 1
        if self.firstServedAt is None:
            self.firstServedAt = reactor.seconds()
        return body

    def release(self):
        held, self.held = self.held, []
        for request, body in held:
            self.served += 1
            request.write(body[: len(body) // 2])
            request.write(body[len(body) // 2 :])
            request.finish()


def startBackend(testCase, name):
    """
    @return: (the L{TestBackend}, its URL)
    """
    resource = TestBackend(name)
    site = Site(resource)
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    testCase.addCleanup(port.stopListening)
    return resource, f"http://127.0.0.1:{port.getHost().port}"


@inlineCallbacks
def startWithAdmin(testCase, config: Config):
    """
    Start a balancer on loopback port 0 with its admin listener; stopped at
    the end of the test.

    @return: fires with (service, balancer base URL, admin base URL)
    """
    service = makeService(config, reactor)
    service.signals.install = False
    service.privilegedStartService()
    service.startService()
    testCase.addCleanup(service.stopService)
    yield poll(
        lambda: all(l.address() for l in service.listeners)
        and service.adminListener.address(),
        what="the listeners",
    )
    balancer = "http://" + service.listeners[0].address()
    admin = "http://" + service.adminListener.address()
    return service, balancer, admin


def balancerConfig(urls, health=None, **kwargs) -> Config:
    return Config(
        backends=tuple(BackendConfig(url) for url in urls),
        ports=("tcp:0:interface=127.0.0.1",),
        admin="tcp:0:interface=127.0.0.1",
        health=health or HealthConfig(enabled=False),
        shutdownGrace=5.0,
        **kwargs,
    )


def makeClient(testCase):
    """
    A treq client whose connections close after each request.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


@inlineCallbacks
def call(client, method, url, body=None, headers=None):
    """
    @return: fires with (status code, decoded JSON or None)
    """
    data = json.dumps(body).encode("utf-8") if body is not None else None
    if data is not None:
        headers = dict(headers or {}, **{"Content-Type": ["application/json"]})
    response = yield client.request(method, url, data=data, headers=headers)
    content = yield treq.content(response)
    return response.code, (json.loads(content) if content else None)


# -- the API --------------------------------------------------------------------


class ListTests(SynchronousTestCase):
    def test_fields(self):
        """
        C{GET /api/backends} has every field of the contract.
        """
        admin = InMemoryAdmin()
        code, body, response, _ = admin.request("GET", "/api/backends")
        self.assertEqual(code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual([b["url"] for b in body["backends"]],
                         ["http://127.0.0.1:8081", "http://127.0.0.1:8082"])
        first = body["backends"][0]
        self.assertEqual(CONTRACT_FIELDS - set(first), set())
        self.assertEqual(first["id"], "1")
        self.assertEqual(first["weight"], 1)
        self.assertIs(first["backup"], False)
        self.assertEqual(first["state"], "up")
        self.assertIs(first["healthy"], True)
        self.assertEqual(first["active"], 0)
        self.assertEqual(first["latency_ms"], {"p50": None, "p99": None})
        self.assertIsNone(first["last_check"])
        self.assertIsNone(first["last_error"])

    def test_figures(self):
        """
        The counters, in-flight count and latency of a backend show.
        """
        admin = InMemoryAdmin()
        backend = admin.group.get("1")
        backend.requests = 3
        backend.active = 1
        backend.recordPassiveFailure("connection refused")
        for ms in (10, 20, 30):
            backend.recordResponse(200, ms / 1000, 0, 10)
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(code, 200)
        self.assertEqual(body["requests"], 3)
        self.assertEqual(body["active"], 1)
        self.assertEqual(body["failures"], 1)
        self.assertEqual(body["last_error"], "connection refused")
        self.assertEqual(body["latency_ms"], {"p50": 20.0, "p99": 30.0})
        self.assertEqual(body["error_rate"], 0.25)

    def test_states(self):
        admin = InMemoryAdmin(urls=("http://a:1", "http://b:1", "http://c:1", "http://d:1"))
        a, b, c, d = admin.group
        b.healthy = False
        c.adminState = DRAINING
        d.adminState = DISABLED
        _, body, _, _ = admin.request("GET", "/api/backends")
        self.assertEqual([x["state"] for x in body["backends"]],
                         ["up", "down", "draining", "disabled"])


class AddTests(SynchronousTestCase):
    def test_add(self):
        """
        C{POST /api/backends} adds a backend, answers 201 with it, and (with
        health checks off) it takes traffic at once.
        """
        admin = InMemoryAdmin()
        code, body, response, _ = admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:8083", "weight": 3}
        )
        self.assertEqual(code, 201)
        self.assertEqual(body["url"], "http://127.0.0.1:8083")
        self.assertEqual(body["weight"], 3)
        self.assertIs(body["backup"], False)
        self.assertEqual(body["state"], "up")
        self.assertEqual(
            response.headers.getRawHeaders(b"location"), [f"/api/backends/{body['id']}".encode()]
        )
        self.assertEqual(body["sources"], ["api"])
        backend = admin.group.get(body["id"])
        self.assertTrue(backend.available)
        picks = {admin.group.pick().url for _ in range(5)}
        self.assertIn("http://127.0.0.1:8083", picks)

    def test_addBackup(self):
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:8083", "backup": True}
        )
        self.assertEqual(code, 201)
        self.assertIs(admin.group.get(body["id"]).backup, True)

    def test_waitsForFirstCheck(self):
        """
        With health checks on, a new backend is checked at once and takes
        no traffic until that check passes; one pass is enough.
        """
        checker = FakeChecker()
        admin = InMemoryAdmin(health=HealthConfig(rise=3), checker=checker)
        code, body, _, _ = admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:8083"}
        )
        self.assertEqual(code, 201)
        self.assertEqual(body["state"], "down")
        backend = admin.group.get(body["id"])
        self.assertEqual(checker.checked, [backend])
        self.assertFalse(backend.available)
        self.assertNotIn(backend, [admin.group.pick() for _ in range(6)])
        backend.recordCheck(True, "HTTP 200")
        self.assertTrue(backend.available)
        self.assertEqual(admin.request("GET", f"/api/backends/{backend.id}")[1]["state"], "up")

    def test_duplicate(self):
        """
        The same backend twice is a 409, even spelt another way.
        """
        admin = InMemoryAdmin()
        before = admin.snapshot()
        for url in ("http://127.0.0.1:8081", "http://127.0.0.1:8081/", "HTTP://127.0.0.1:8081"):
            code, body, _, _ = admin.request("POST", "/api/backends", {"url": url})
            self.assertEqual(code, 409, url)
            self.assertIn("already exists", body["error"])
        admin2 = InMemoryAdmin(urls=("http://example.com",))
        code, _, _, _ = admin2.request("POST", "/api/backends", {"url": "http://example.com:80"})
        self.assertEqual(code, 409)
        self.assertEqual(admin.snapshot(), before)

    def test_badInput(self):
        """
        Every bad input is a 400 naming the problem, and adds nothing.
        """
        admin = InMemoryAdmin()
        before = admin.snapshot()
        cases = [
            (b"{not json", "not valid JSON"),
            (b"", "empty"),
            (b"\xff\xfe", "UTF-8"),
            (b"[1, 2]", "JSON object"),
            (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
            (b'"http://127.0.0.1:9"', "JSON object"),
            (b"{}", "url: missing"),
            (b'{"url": 5}', "url: expected a string"),
            (b'{"url": "ftp://127.0.0.1:9"}', "http:// or https://"),
            (b'{"url": "http://"}', "no host"),
            (b'{"url": "http://127.0.0.1:9/path"}', "no path"),
            (b'{"url": "http://127.0.0.1:99999"}', "url"),
            (b'{"url": "not a url"}', "url"),
            (b'{"url": "http://127.0.0.1:9", "weight": 0}', "weight"),
            (b'{"url": "http://127.0.0.1:9", "weight": -2}', "weight"),
            (b'{"url": "http://127.0.0.1:9", "weight": "2"}', "weight"),
            (b'{"url": "http://127.0.0.1:9", "weight": 1.5}', "weight"),
            (b'{"url": "http://127.0.0.1:9", "weight": true}', "weight"),
            (b'{"url": "http://127.0.0.1:9", "backup": "yes"}', "backup"),
            (b'{"url": "http://127.0.0.1:9", "colour": "red"}', "unknown field 'colour'"),
        ]
        for raw, expected in cases:
            code, body, _, _ = admin.request("POST", "/api/backends", raw=raw)
            self.assertEqual(code, 400, raw)
            self.assertIn(expected, body["error"], raw)
        self.assertEqual(admin.snapshot(), before)
        self.assertEqual(admin.events, [])


class ChangeTests(SynchronousTestCase):
    def test_drain(self):
        """
        A draining backend gets no new request; the others do.
        """
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request("PATCH", "/api/backends/1", {"state": "draining"})
        self.assertEqual(code, 200)
        self.assertEqual(body["state"], "draining")
        backend = admin.group.get("1")
        self.assertEqual(backend.adminState, DRAINING)
        self.assertEqual({admin.group.pick().id for _ in range(4)}, {"2"})

    def test_disable(self):
        """
        A disabled backend gets no traffic and no health checks.
        """
        from rrbalancer.health import HealthChecker

        admin = InMemoryAdmin()
        code, body, _, _ = admin.request("PATCH", "/api/backends/2", {"state": "disabled"})
        self.assertEqual(code, 200)
        self.assertEqual(body["state"], "disabled")
        self.assertEqual({admin.group.pick().id for _ in range(4)}, {"1"})
        checker = HealthChecker(admin.group, None, admin.clock, HealthConfig())
        checked = []
        checker.check = checked.append
        checker.checkAll()
        self.assertEqual([b.id for b in checked], ["1"])

    def test_enable(self):
        """
        C{"up"} brings a drained or disabled backend back; one that was
        disabled is checked first (with health checks on).
        """
        checker = FakeChecker()
        admin = InMemoryAdmin(health=HealthConfig(), checker=checker)
        admin.request("PATCH", "/api/backends/1", {"state": "draining"})
        code, body, _, _ = admin.request("PATCH", "/api/backends/1", {"state": "up"})
        self.assertEqual((code, body["state"]), (200, "up"))
        admin.request("PATCH", "/api/backends/2", {"state": "disabled"})
        code, body, _, _ = admin.request("PATCH", "/api/backends/2", {"state": "up"})
        self.assertEqual(code, 200)
        backend = admin.group.get("2")
        self.assertEqual(checker.checked, [backend])
        self.assertEqual(backend.adminState, UP)
        self.assertFalse(backend.available)
        backend.recordCheck(True, "HTTP 200")
        self.assertTrue(backend.available)

    def test_weight(self):
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request("PATCH", "/api/backends/1", {"weight": 3})
        self.assertEqual((code, body["weight"]), (200, 3))
        picks = [admin.group.pick().id for _ in range(8)]
        self.assertEqual(picks.count("1"), 6)

    def test_both(self):
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request(
            "PATCH", "/api/backends/1", {"weight": 2, "state": "draining"}
        )
        self.assertEqual((code, body["weight"], body["state"]), (200, 2, "draining"))

    def test_badInput(self):
        admin = InMemoryAdmin()
        before = admin.snapshot()
        cases = [
            (b"{oops", "not valid JSON"),
            (b"[]", "JSON object"),
            (b"{}", "nothing to change"),
            (b'{"state": "down"}', "state: expected one of draining, disabled, up"),
            (b'{"state": 1}', "state"),
            (b'{"weight": 0}', "weight"),
            (b'{"weight": -1}', "weight"),
            (b'{"weight": "3"}', "weight"),
            (b'{"weight": 3, "state": "bogus"}', "state"),
            (b'{"state": "up", "weight": 0}', "weight"),
            (b'{"backup": true}', "unknown field 'backup'"),
            (b'{"url": "http://x"}', "unknown field 'url'"),
        ]
        for raw, expected in cases:
            code, body, _, _ = admin.request("PATCH", "/api/backends/1", raw=raw)
            self.assertEqual(code, 400, raw)
            self.assertIn(expected, body["error"], raw)
        self.assertEqual(admin.snapshot(), before)

    def test_unknownID(self):
        admin = InMemoryAdmin()
        before = admin.snapshot()
        for method, body in [("GET", None), ("PATCH", {"state": "draining"}),
                             ("PATCH", b"{bad"), ("DELETE", None)]:
            raw = body if isinstance(body, bytes) else None
            code, answer, _, _ = admin.request(
                method, "/api/backends/42", None if raw else body, raw=raw
            )
            self.assertEqual(code, 404, method)
            self.assertIn("no backend with id '42'", answer["error"])
        self.assertEqual(admin.snapshot(), before)


class RemoveTests(SynchronousTestCase):
    def test_removeIdle(self):
        """
        A backend with nothing in flight is forgotten at once.
        """
        admin = InMemoryAdmin()
        code, body, _, content = admin.request("DELETE", "/api/backends/1")
        self.assertEqual((code, content), (204, b""))
        self.assertIsNone(admin.group.get("1"))
        self.assertEqual(admin.request("GET", "/api/backends/1")[0], 404)

    def test_removeBusy(self):
        """
        A backend with requests in flight drains first: no new request, the
        ones in flight go on, and it is forgotten when the last one ends.
        """
        admin = InMemoryAdmin()
        backend = admin.group.get("1")
        backend.active = 2
        code, _, _, _ = admin.request("DELETE", "/api/backends/1")
        self.assertEqual(code, 204)
        self.assertIs(admin.group.get("1"), backend)
        _, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(body["state"], "draining")
        self.assertIs(body["removing"], True)
        self.assertEqual({admin.group.pick().id for _ in range(4)}, {"2"})
        # Changing a backend on its way out is refused; removing it again is not.
        code, body, _, _ = admin.request("PATCH", "/api/backends/1", {"state": "up"})
        self.assertEqual(code, 409)
        self.assertEqual(admin.request("DELETE", "/api/backends/1")[0], 204)
        code, body, _, _ = admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:8081"}
        )
        self.assertEqual(code, 409)
        self.assertIn("being removed", body["error"])
        backend.active -= 1
        self.assertIs(admin.group.get("1"), backend)
        backend.active -= 1
        self.assertIsNone(admin.group.get("1"))


class StatusTests(SynchronousTestCase):
    def test_status(self):
        admin = InMemoryAdmin()
        admin.clock.advance(12.5)
        backend = admin.group.get("1")
        backend.requests = 4
        backend.active = 1
        backend.recordResponse(200, 0.01, 0, 0)
        backend.recordResponse(503, 0.01, 0, 0)
        code, body, _, _ = admin.request("GET", "/api/status")
        self.assertEqual(code, 200)
        from rrbalancer import __version__

        self.assertEqual(body["version"], __version__)
        self.assertEqual(body["uptime"], 12.5)
        self.assertEqual(body["listeners"], [])
        totals = body["totals"]
        self.assertEqual(totals["backends"], 2)
        self.assertEqual(totals["up"], 2)
        self.assertEqual(totals["requests"], 4)
        self.assertEqual(totals["active"], 1)
        self.assertEqual(totals["responses"], {"2xx": 1, "5xx": 1})


class PolicyFiguresTests(SynchronousTestCase):
    """
    What ejection, slow start, the panic threshold and the policy make of
    the backends shows in the API.
    """

    def test_backend(self):
        from rrbalancer.backends import Ejection
        from rrbalancer.policies import PowerOfTwoChoices

        clock = Clock()
        admin = InMemoryAdmin(
            ("http://127.0.0.1:8081", "http://127.0.0.1:8082", "http://127.0.0.1:8083"),
            ejection=Ejection(after=2, time=30), slowStart=10,
            policy=PowerOfTwoChoices(clock),
        )
        one = admin.group.get("1")
        one.recordResponse(200, 0.25, 0, 0)
        one.recordPassiveFailure("connection refused")
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(body["consecutive_failures"], 1)
        # The failure counts as a 1 s answer, a sixteenth of the average.
        self.assertEqual(body["policy"], {"ewma_ms": 296.875, "cost": 0.296875})
        one.recordPassiveFailure("connection refused")
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(body["state"], "ejected")
        self.assertEqual(body["ejections"], 1)
        self.assertEqual(body["ejected_until"], 1030)
        admin.clock.advance(30)
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual((body["state"], body["weight_ramp"]), ("up", 0.1))
        code, body, _, _ = admin.request("GET", "/api/backends?state=ejected")
        self.assertEqual(body["backends"], [])

    def test_status(self):
        admin = InMemoryAdmin(panicThreshold=60)
        admin.group.get("1").setAdminState("draining", "test")
        admin.group.get("2").setAdminState("draining", "test")
        code, body, _, _ = admin.request("GET", "/api/status")
        self.assertEqual(body["panic"], {"threshold": 60, "active": False, "times": 0})
        self.assertEqual(body["ejection"]["after"], 5)
        self.assertEqual(body["slow_start"], 0)

class DiscoveryStatusTests(SynchronousTestCase):
    """
    C{GET /api/discovery} (and the status) show each discovery source: its
    state and since when, its last answer, the backends it gives.
    """

    def setUp(self):
        from rrbalancer.discovery import parseSource
        from rrbalancer.discovery._dns import DNSSource
        from rrbalancer.discovery._service import Discovery
        from twisted.names import dns, error

        from .test_discovery_dns import FakeResolver, a

        self.admin = InMemoryAdmin(urls=())
        self.resolver = FakeResolver()
        name = "web.example.com"
        self.resolver.answers[(name, dns.A)] = [a(name, "192.0.2.1", 30), a(name, "192.0.2.2", 30)]
        source = DNSSource(parseSource(f"dns+a://{name}:8080"), self.resolver, self.admin.clock)
        source.log = Logger(observer=lambda event: None)
        self.admin.api.discovery = Discovery(self.admin.group, [source])
        self.admin.api.discovery.startService()
        self.fail = lambda: self.resolver.answers.__setitem__((name, dns.A), error.DNSServerError())

    def test_sources(self):
        code, body, _, _ = self.admin.request("GET", "/api/discovery")
        self.assertEqual(code, 200)
        self.assertEqual(body["now"], 1000)
        self.assertEqual(
            body["sources"],
            [{"url": "dns+a://web.example.com:8080", "kind": "dns+a", "state": "ok",
              "since": 1000, "last_answer": 1000, "last_error": None, "backends": 2,
              "lookups": 1, "failures": 0, "next_lookup": 1030}],
        )
        _, listed, _, _ = self.admin.request("GET", "/api/backends")
        self.assertEqual(
            [b["sources"] for b in listed["backends"]], [["dns+a://web.example.com:8080"]] * 2
        )

    def test_failing(self):
        self.fail()
        self.admin.clock.advance(30)
        _, body, _, _ = self.admin.request("GET", "/api/discovery")
        [source] = body["sources"]
        self.assertEqual(
            (source["state"], source["since"], source["last_answer"], source["backends"]),
            ("failing", 1030, 1000, 2),
        )
        self.assertEqual(source["last_error"], "A web.example.com: SERVFAIL")
        self.assertEqual(source["next_lookup"], 1031)

    def test_inStatus(self):
        _, body, _, _ = self.admin.request("GET", "/api/status")
        self.assertEqual([s["url"] for s in body["discovery"]], ["dns+a://web.example.com:8080"])

    def test_none(self):
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request("GET", "/api/discovery")
        self.assertEqual((code, body["sources"]), (200, []))
        self.assertEqual(admin.request("GET", "/api/status")[1]["discovery"], [])
        self.assertEqual(admin.request("POST", "/api/discovery", {})[0], 405)


class RoutingTests(SynchronousTestCase):
    def test_unknownPath(self):
        admin = InMemoryAdmin()
        for path in ("/api/nothing", "/api/backends/1/x", "/nothing.js"):
            code, body, _, _ = admin.request("GET", path)
            self.assertEqual(code, 404, path)
            self.assertIn("no such", body["error"])

    def test_wrongMethod(self):
        admin = InMemoryAdmin()
        before = admin.snapshot()
        for method, path, allow in [
            ("PUT", "/api/backends", b"GET, POST"),
            ("POST", "/api/backends/1", b"GET, PATCH, DELETE"),
            ("DELETE", "/api/status", b"GET"),
            ("GET", "/api/reload", b"POST"),
            ("POST", "/metrics", b"GET"),
        ]:
            code, body, response, _ = admin.request(method, path, raw=b"{}")
            self.assertEqual(code, 405, (method, path))
            self.assertEqual(response.headers.getRawHeaders(b"allow"), [allow])
            self.assertIn("not allowed", body["error"])
        self.assertEqual(admin.snapshot(), before)


class LogTests(SynchronousTestCase):
    def test_changesLogged(self):
        """
        Each change is logged: who (the peer), what, before and after.
        """
        admin = InMemoryAdmin()
        admin.request("POST", "/api/backends", {"url": "http://127.0.0.1:8083"})
        admin.request("PATCH", "/api/backends/1", {"state": "draining", "weight": 2})
        admin.request("DELETE", "/api/backends/2")
        from twisted.logger import formatEvent

        lines = [formatEvent(e) for e in admin.events]
        self.assertEqual(len(lines), 3, lines)
        added, changed, removed = lines
        self.assertIn("admin 127.0.0.1:31337: added backend 3 http://127.0.0.1:8083", added)
        self.assertIn("absent ->", added)
        self.assertIn("changed backend 1 http://127.0.0.1:8081", changed)
        self.assertIn('{"backup": false, "state": "up", "weight": 1} -> '
                      '{"backup": false, "state": "draining", "weight": 2}', changed)
        self.assertIn("127.0.0.1:31337: removing backend 2", removed)
        self.assertIn("-> removed", removed)
        self.assertEqual(admin.events[0]["peer"], "127.0.0.1:31337")


# -- the token and the guards ------------------------------------------------------


class TokenTests(SynchronousTestCase):
    token = b"s3cret-token"

    def setUp(self):
        self.admin = InMemoryAdmin(token=self.token)

    def test_missing(self):
        """
        Without the token: 401, and nothing changes.
        """
        before = self.admin.snapshot()
        for method, path, body in [
            ("GET", "/api/backends", None),
            ("GET", "/api/status", None),
            ("GET", "/metrics", None),
            ("GET", "/", None),
            ("GET", "/dashboard.js", None),
            ("POST", "/api/backends", {"url": "http://127.0.0.1:8083"}),
            ("PATCH", "/api/backends/1", {"state": "disabled"}),
            ("DELETE", "/api/backends/1", None),
            ("POST", "/api/reload", None),
        ]:
            code, answer, response, _ = self.admin.request(method, path, body)
            self.assertEqual(code, 401, (method, path))
            self.assertIn("token", answer["error"])
            self.assertTrue(response.headers.getRawHeaders(b"www-authenticate"))
        self.assertEqual(self.admin.snapshot(), before)

    def test_wrong(self):
        before = self.admin.snapshot()
        for header in [b"Bearer wrong", b"Bearer s3cret-toke", b"Bearer s3cret-token-and-more",
                       b"bearer", b"Token s3cret-token", b"s3cret-token",
                       b"Basic " + base64.b64encode(b"admin:wrong"), b"Basic !!!"]:
            code, _, _, _ = self.admin.request(
                "DELETE", "/api/backends/1", headers={b"Authorization": [header]}
            )
            self.assertEqual(code, 401, header)
        self.assertEqual(self.admin.snapshot(), before)

    def test_right(self):
        headers = {b"Authorization": [b"Bearer " + self.token]}
        code, body, _, _ = self.admin.request("GET", "/api/backends", headers=headers)
        self.assertEqual(code, 200)
        code, _, _, _ = self.admin.request(
            "PATCH", "/api/backends/1", {"state": "draining"}, headers=headers
        )
        self.assertEqual(code, 200)
        self.assertEqual(self.admin.group.get("1").adminState, DRAINING)
        self.assertEqual(self.admin.request("GET", "/metrics", headers=headers)[0], 200)

    def test_basicForBrowsers(self):
        """
        A browser may give the token as the password of HTTP Basic auth;
        the dashboard asks for it that way.
        """
        code, _, response, _ = self.admin.request("GET", "/")
        self.assertEqual(code, 401)
        self.assertIn(b"Basic", response.headers.getRawHeaders(b"www-authenticate")[0])
        basic = b"Basic " + base64.b64encode(b"anyone:" + self.token)
        code, _, _, content = self.admin.request("GET", "/", headers={b"Authorization": [basic]})
        self.assertEqual(code, 200)
        self.assertIn(b"<html", content)

    def test_apiChallengeIsBearer(self):
        _, _, response, _ = self.admin.request("GET", "/api/status")
        self.assertIn(b"Bearer", response.headers.getRawHeaders(b"www-authenticate")[0])

    def test_hostNotCheckedWithToken(self):
        headers = {b"Authorization": [b"Bearer " + self.token]}
        code, _, _, _ = self.admin.request(
            "GET", "/api/status", headers=headers, host="balancer.example.com:8001"
        )
        self.assertEqual(code, 200)


class GuardTests(SynchronousTestCase):
    def test_foreignHost(self):
        """
        Without a token, a request whose Host is not a loopback name (a page
        reaching the API by DNS rebinding) is refused.
        """
        admin = InMemoryAdmin()
        before = admin.snapshot()
        code, body, _, _ = admin.request("DELETE", "/api/backends/1", host="evil.example:8001")
        self.assertEqual(code, 403)
        self.assertIn("loopback", body["error"])
        self.assertEqual(admin.snapshot(), before)
        for host in ("localhost:8001", "127.0.0.1", "[::1]:8001", "127.0.0.2:9"):
            self.assertEqual(admin.request("GET", "/api/status", host=host)[0], 200, host)

    def test_crossOrigin(self):
        """
        A change sent from another site's page is refused; one from the
        dashboard itself is not.
        """
        admin = InMemoryAdmin()
        before = admin.snapshot()
        for origin in (b"http://evil.example", b"null", b"http://127.0.0.1:9999"):
            code, body, _, _ = admin.request(
                "POST", "/api/backends", {"url": "http://127.0.0.1:8083"},
                headers={b"Origin": [origin]},
            )
            self.assertEqual(code, 403, origin)
            self.assertIn("cross-origin", body["error"])
        self.assertEqual(admin.snapshot(), before)
        code, _, _, _ = admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:8083"},
            headers={b"Origin": [b"http://127.0.0.1"]},
        )
        self.assertEqual(code, 201)
        # Reading is harmless from anywhere (and the browser keeps the answer
        # from another site's page anyway).
        code, _, _, _ = admin.request(
            "GET", "/api/status", headers={b"Origin": [b"http://evil.example"]}
        )
        self.assertEqual(code, 200)


# -- settings ----------------------------------------------------------------------


class AdminSettingsTests(SynchronousTestCase):
    def tokenFile(self, content=b"tok\n"):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_default(self):
        config = buildConfig({"demo": True})
        self.assertEqual(config.admin, ADMIN_DEFAULT)
        self.assertEqual(ADMIN_DEFAULT, "tcp:8001:interface=127.0.0.1")
        self.assertIsNone(config.adminTokenFile)

    def test_none(self):
        for value in ("none", "None", "off", False):
            self.assertIsNone(buildConfig({"demo": True, "admin": value}).admin)

    def test_portNumberIsLoopback(self):
        self.assertEqual(parseAdmin("9001"), "tcp:9001:interface=127.0.0.1")
        self.assertEqual(parseAdmin(9001), "tcp:9001:interface=127.0.0.1")
        self.assertRaises(ConfigError, parseAdmin, "70000")
        self.assertRaises(ConfigError, parseAdmin, "nonsense")

    def test_loopback(self):
        for description in ("tcp:8001:interface=127.0.0.1", r"tcp6:8001:interface=\:\:1",
                            "tcp:8001:interface=localhost", "unix:/run/rr.sock",
                            "tcp:interface=127.0.0.5:port=8001"):
            self.assertTrue(isLoopbackEndpoint(description), description)
        for description in ("tcp:8001", "tcp:8001:interface=0.0.0.0", r"tcp6:8001:interface=\:\:",
                            "tcp:8001:interface=192.0.2.1", "ssl:8443:privateKey=k.pem",
                            "systemd:domain=INET:index=0"):
            self.assertFalse(isLoopbackEndpoint(description), description)

    def test_notLoopbackNeedsToken(self):
        """
        A non-loopback admin endpoint without a token is refused, in one
        line; with a token it is fine.
        """
        e = self.assertRaises(
            ConfigError, buildConfig, {"demo": True, "admin": "tcp:8001:interface=0.0.0.0"}
        )
        self.assertIn("admin-token-file", str(e))
        self.assertNotIn("\n", str(e))
        config = buildConfig(
            {"demo": True, "admin": "tcp:8001", "admin_token_file": self.tokenFile()}
        )
        self.assertEqual(config.admin, "tcp:8001")

    def test_badTokenFile(self):
        e = self.assertRaises(
            ConfigError, buildConfig, {"demo": True, "admin_token_file": "/nonexistent/tok"}
        )
        self.assertIn("admin_token_file: cannot read", str(e))
        e = self.assertRaises(
            ConfigError, buildConfig, {"demo": True, "admin_token_file": self.tokenFile(b" \n")}
        )
        self.assertIn("is empty", str(e))

    def test_workers(self):
        """
        With workers the parent has the admin listener, by default as with
        one process, and under the same rules.
        """
        self.assertEqual(buildConfig({"demo": True, "workers": 2}).admin, ADMIN_DEFAULT)
        self.assertEqual(
            buildConfig({"demo": True, "workers": 2, "admin": "tcp:9001:interface=127.0.0.1"}).admin,
            "tcp:9001:interface=127.0.0.1",
        )
        e = self.assertRaises(
            ConfigError, buildConfig, {"demo": True, "workers": 2, "admin": "tcp:9001"}
        )
        self.assertIn("can be reached from other hosts", str(e))
        self.assertIsNone(buildConfig({"demo": True, "workers": 2, "admin": "none"}).admin)

    def test_flags(self):
        options = Options()
        path = self.tokenFile()
        options.parseOptions(["--demo", "--admin", "tcp:9001", "--admin-token-file", path])
        self.assertEqual(options.config.admin, "tcp:9001")
        self.assertEqual(options.config.adminTokenFile, os.path.abspath(path))
        options = Options()
        options.parseOptions(["--demo", "--admin", "none"])
        self.assertIsNone(options.config.admin)

    def test_flagRefusal(self):
        """
        The plugin refuses to start with a non-loopback admin endpoint and
        no token: one line, non-zero exit.
        """
        options = Options()
        e = self.assertRaises(
            SystemExit, options.parseOptions, ["--demo", "--admin", "tcp:9001"]
        )
        self.assertTrue(str(e.code).startswith("rrbalancer: admin: tcp:9001 can be reached"))
        self.assertNotIn("\n", str(e.code))

    def test_fileKeys(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('admin = "none"\ndemo = true\n')
        from rrbalancer.config import loadConfig

        self.assertIsNone(loadConfig(path).admin)
        tokenPath = os.path.join(os.path.dirname(os.path.abspath(path)), "token")
        with open(tokenPath, "w") as f:
            f.write("t")
        with open(path, "w") as f:
            f.write('admin = "tcp:9001"\nadmin_token_file = "token"\ndemo = true\n')
        config = loadConfig(path)
        self.assertEqual((config.admin, config.adminTokenFile), ("tcp:9001", tokenPath))


class WiringTests(SynchronousTestCase):
    def test_adminListener(self):
        service = makeService(balancerConfig(["http://127.0.0.1:9"]), reactor)
        self.assertEqual(service.adminListener.description, "tcp:0:interface=127.0.0.1")
        self.assertIn(service.adminListener, list(service))
        self.assertNotIn(service.adminListener, service.listeners)

    def test_noAdmin(self):
        config = Config(backends=(BackendConfig("http://127.0.0.1:9"),),
                        ports=("tcp:0:interface=127.0.0.1",), admin=None)
        service = makeService(config, reactor)
        self.assertIsNone(getattr(service, "adminListener", None))

    def test_badEndpoint(self):
        config = Config(backends=(BackendConfig("http://127.0.0.1:9"),),
                        ports=("tcp:0:interface=127.0.0.1",), admin="bogus:1")
        e = self.assertRaises(ConfigError, makeService, config, reactor)
        self.assertIn("admin: bad endpoint", str(e))


# -- on real sockets -------------------------------------------------------------


class DrainWithoutCutTests(TestCase):
    """
    A slow request in flight while its backend is drained and removed
    finishes whole; the backend is forgotten only then.
    """

    timeout = 30

    @inlineCallbacks
    def test_slowRequestSurvivesRemoval(self):
        settleConnections(self)
        one, oneURL = startBackend(self, "one")
        two, twoURL = startBackend(self, "two")
        service, balancer, admin = yield startWithAdmin(self, balancerConfig([oneURL, twoURL]))
        client = makeClient(self)

        slow = client.get(balancer + "/slow")
        yield poll(lambda: one.held or two.held, what="the slow request to arrive")
        holder, other = (one, two) if one.held else (two, one)
        backend = service.group.byURL(oneURL if holder is one else twoURL)
        self.assertEqual(backend.active, 1)

        code, _ = yield call(client, "DELETE", f"{admin}/api/backends/{backend.id}")
        self.assertEqual(code, 204)
        # Still there, draining, with its request in flight.
        self.assertIs(service.group.get(backend.id), backend)
        code, body = yield call(client, "GET", f"{admin}/api/backends/{backend.id}")
        self.assertEqual((code, body["state"], body["active"]), (200, "draining", 1))
        # New requests go to the other backend only.
        for n in range(4):
            response = yield client.get(f"{balancer}/fast{n}")
            content = yield treq.content(response)
            self.assertEqual(response.code, 200)
            self.assertEqual(content.decode(), f"{other.name} /fast{n}\n")

        holder.release()
        response = yield slow
        content = yield treq.content(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(content.decode(), f"{holder.name} /slow\n")
        yield poll(lambda: service.group.get(backend.id) is None, what="the removal")
        code, _ = yield call(client, "GET", f"{admin}/api/backends/{backend.id}")
        self.assertEqual(code, 404)


class LoadTests(TestCase):
    """
    A balancer with two backends under steady load: a third backend added
    through the API takes requests within one health interval, and one of
    the first two is drained and removed while the load runs; the client
    sees no error at any point.
    """

    timeout = 60
    interval = 1.0
    clients = 4

    @inlineCallbacks
    def test_addAndRemoveUnderLoad(self):
        settleConnections(self)
        one, oneURL = startBackend(self, "one")
        two, twoURL = startBackend(self, "two")
        three, threeURL = startBackend(self, "three")
        health = HealthConfig(interval=self.interval, timeout=1.0, rise=2, fall=3)
        service, balancer, admin = yield startWithAdmin(
            self, balancerConfig([oneURL, twoURL], health=health)
        )
        client = makeClient(self)
        results = []
        running = [True]

        @inlineCallbacks
        def load(n):
            count = 0
            while running[0]:
                count += 1
                try:
                    response = yield client.get(f"{balancer}/load/{n}/{count}")
                    content = yield treq.content(response)
                    results.append((response.code, content))
                except Exception as e:  # the test fails on any of these
                    results.append((None, repr(e)))

        loops = [load(n) for n in range(self.clients)]
        yield poll(lambda: one.served > 5 and two.served > 5, what="the load to start")

        code, body = yield call(client, "POST", f"{admin}/api/backends", {"url": threeURL})
        self.assertEqual(code, 201)
        added = reactor.seconds()
        yield poll(lambda: three.served > 0, timeout=5 * self.interval,
                   what="the new backend's first request")
        self.assertLessEqual(three.firstServedAt - added, self.interval)

        removedID = service.group.byURL(oneURL).id
        code, _ = yield call(client, "DELETE", f"{admin}/api/backends/{removedID}")
        self.assertEqual(code, 204)
        yield poll(lambda: service.group.get(removedID) is None, what="the removal")
        servedByOne = one.served
        seen = len(results)
        yield poll(lambda: len(results) > seen + 50, what="more load")
        running[0] = False
        yield poll(lambda: sum(1 for l in loops if l.called) == len(loops), what="the load to stop")

        self.assertEqual(one.served, servedByOne)
        self.assertGreater(three.served, 5)
        errors = [r for r in results if r[0] != 200]
        self.assertEqual(errors, [])
        names = {content.split()[0] for _, content in results}
        self.assertEqual(names, {b"one", b"two", b"three"})

        # The metrics saw the same traffic.
        response = yield client.get(f"{admin}/metrics")
        text = (yield treq.content(response)).decode()
        self.assertIn(f'rrbalancer_backend_requests_total{{backend="{threeURL}",code="2xx"}}', text)
        self.assertNotIn(oneURL, text)


class LargeSetTests(SynchronousTestCase):
    """
    The API for large sets: pages, filters and totals; one call that
    applies many changes, all or nothing.
    """

    def setUp(self):
        self.admin = InMemoryAdmin(urls=[f"http://127.0.0.1:{9000 + n}" for n in range(25)])

    def test_page(self):
        code, body, _, _ = self.admin.request("GET", "/api/backends?offset=10&limit=5")
        self.assertEqual(code, 200)
        self.assertEqual([b["id"] for b in body["backends"]], ["11", "12", "13", "14", "15"])
        self.assertEqual((body["total"], body["matched"], body["offset"], body["limit"]), (25, 25, 10, 5))
        self.assertEqual(body["counts"], {"up": 25, "down": 0, "ejected": 0, "draining": 0, "disabled": 0})

    def test_filters(self):
        self.admin.group.get("3").setAdminState("draining", "test")
        self.admin.group.get("4").setAdminState("draining", "test")
        code, body, _, _ = self.admin.request("GET", "/api/backends?state=draining")
        self.assertEqual([b["id"] for b in body["backends"]], ["3", "4"])
        self.assertEqual((body["total"], body["matched"]), (25, 2))
        self.assertEqual(body["counts"]["draining"], 2)
        code, body, _, _ = self.admin.request("GET", "/api/backends?q=:9012")
        self.assertEqual([b["url"] for b in body["backends"]], ["http://127.0.0.1:9012"])

    def test_badQuery(self):
        for query in ["state=sleepy", "limit=0", "limit=x", "offset=-1", "limit=100000"]:
            code, body, _, _ = self.admin.request("GET", "/api/backends?" + query)
            self.assertEqual(code, 400, query)
            self.assertIn("error", body)

    def test_bulk(self):
        before = len(self.admin.group)
        code, body, _, _ = self.admin.request("POST", "/api/backends/bulk", {
            "add": [{"url": "http://127.0.0.1:7001"}, {"url": "http://127.0.0.1:7002", "weight": 3}],
            "change": [{"id": "1", "state": "draining"}, {"url": "http://127.0.0.1:9001", "weight": 4}],
            "remove": ["3", "http://127.0.0.1:9003"],
        })
        self.assertEqual(code, 200, body)
        self.assertEqual(body["changed"], ["1", "2"])
        self.assertEqual(body["removed"], ["3", "4"])
        group = self.admin.group
        self.assertEqual(len(group), before)  # two in, two out (no request in flight)
        self.assertEqual(group.byURL("http://127.0.0.1:7002").weight, 3)
        self.assertEqual(group.get("1").state, "draining")
        self.assertEqual(group.get("2").weight, 4)
        self.assertIsNone(group.get("3"))

    def test_bulkAllOrNothing(self):
        """
        One bad item anywhere refuses the whole call and changes nothing.
        """
        before = self.admin.snapshot()
        for body, code in [
            ({"add": [{"url": "http://127.0.0.1:7001"}, {"url": "ftp://x"}]}, 400),
            ({"add": [{"url": "http://127.0.0.1:7001"}], "remove": ["999"]}, 404),
            ({"add": [{"url": "http://127.0.0.1:9000"}]}, 409),
            ({"add": [{"url": "http://127.0.0.1:7001"}, {"url": "http://127.0.0.1:7001/"}]}, 400),
            ({"change": [{"id": "1", "state": "gone"}]}, 400),
            ({"remove": "1"}, 400),
            ({"other": []}, 400),
        ]:
            answer, error, _, _ = self.admin.request("POST", "/api/backends/bulk", body)
            self.assertEqual(answer, code, (body, error))
            self.assertIn("error", error)
            self.assertEqual(self.admin.snapshot(), before)

    def test_bulkOfThousandsIsLinear(self):
        """
        Ten thousand backends in one call: every check is a lookup, not a
        scan (a quadratic call would take minutes here).
        """
        admin = InMemoryAdmin(urls=[])
        adds = [{"url": f"http://127.{n // 65536}.{n // 256 % 256}.{n % 256}:80"} for n in range(10000)]
        code, body, _, _ = admin.request("POST", "/api/backends/bulk", {"add": adds})
        self.assertEqual(code, 200)
        self.assertEqual(len(admin.group), 10000)
        code, body, _, _ = admin.request("GET", "/api/backends?limit=100&offset=9950")
        self.assertEqual((len(body["backends"]), body["total"]), (50, 10000))


class CrossSiteTests(SynchronousTestCase):
    """
    What a page on another site can make a browser send is refused: a body
    that is not JSON (text/plain and forms need no preflight), and anything
    the browser marks cross-site.
    """

    def setUp(self):
        self.admin = InMemoryAdmin()

    def test_bodyMustBeJSON(self):
        before = self.admin.snapshot()
        for contentType in (b"text/plain", b"application/x-www-form-urlencoded", None):
            headers = {b"Content-Type": [contentType]} if contentType else {b"Content-Type": []}
            code, body, _, _ = self.admin.request(
                "POST", "/api/backends", {"url": "http://127.0.0.1:9000"}, headers=headers
            )
            self.assertEqual(code, 415, contentType)
            self.assertIn("application/json", body["error"])
        # A multipart body does not even parse as a form: refused too.
        code, _, _, _ = self.admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:9000"},
            headers={b"Content-Type": [b"multipart/form-data; boundary=x"]},
        )
        self.assertIn(code, (400, 415))
        code, body, _, _ = self.admin.request(
            "PATCH", "/api/backends/1", {"state": "draining"},
            headers={b"Content-Type": [b"text/plain;charset=UTF-8"]},
        )
        self.assertEqual(code, 415)
        self.assertEqual(self.admin.snapshot(), before)

    def test_jsonWithParameters(self):
        code, _, _, _ = self.admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:9000"},
            headers={b"Content-Type": [b"application/json; charset=utf-8"]},
        )
        self.assertEqual(code, 201)

    def test_secFetchSiteCrossSite(self):
        before = self.admin.snapshot()
        code, body, _, _ = self.admin.request(
            "PATCH", "/api/backends/1", {"state": "draining"},
            headers={b"Sec-Fetch-Site": [b"cross-site"]},
        )
        self.assertEqual(code, 403)
        self.assertEqual(self.admin.snapshot(), before)
        for site in (b"same-origin", b"none"):
            code, _, _, _ = self.admin.request(
                "PATCH", "/api/backends/1", {"weight": 2}, headers={b"Sec-Fetch-Site": [site]}
            )
            self.assertEqual(code, 200, site)


class StatsPageTests(SynchronousTestCase):
    """
    The per-backend figures HAProxy's stats page shows.
    """

    def test_figures(self):
        admin = InMemoryAdmin(health=HealthConfig(fall=1, rise=1))
        backend = admin.group.get("1")
        backend.active = 3
        backend.active = 1
        backend.recordResponse(200, 0.01, 10, 100)
        backend.recordResponse(503, 0.02, 0, 5)
        backend.recordCheck(False, "HTTP 500", code=500, duration=0.004)
        admin.clock.advance(7)
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(code, 200)
        self.assertEqual(body["responses"], {"2xx": 1, "5xx": 1})
        self.assertEqual((body["bytes_in"], body["bytes_out"]), (10, 105))
        self.assertEqual(body["peak_active"], 3)
        self.assertEqual(body["tunnels"], 0)
        backend.tunnels.open, backend.tunnels.opened = 2, 5
        backend.tunnels.toBackend, backend.tunnels.toClient = 30, 400
        _, tunnels, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual(
            [tunnels[k] for k in ("tunnels", "tunnels_total", "tunnel_bytes_to_backend",
                                  "tunnel_bytes_to_client")],
            [2, 5, 30, 400],
        )
        self.assertEqual((body["last_check_code"], body["last_check_ms"]), (500, 4.0))
        self.assertEqual((body["times_down"], body["downtime"]), (1, 7.0))
        backend.recordCheck(True, "HTTP 200", code=200, duration=0.001)
        admin.clock.advance(5)
        code, body, _, _ = admin.request("GET", "/api/backends/1")
        self.assertEqual((body["times_down"], body["downtime"]), (1, 7.0))


class ListenerRowsTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_listenerConnections(self):
        settleConnections(self)
        one, oneURL = startBackend(self, "one")
        service, balancer, admin = yield startWithAdmin(self, balancerConfig([oneURL]))
        client = makeClient(self)
        for _ in range(3):
            yield client.get(balancer + "/x")
        code, status = yield call(client, "GET", admin + "/api/status")
        [listener] = status["listeners"]
        self.assertGreaterEqual(listener["connections_total"], 1)
        self.assertIn("connections", listener)
        self.assertEqual(listener["requests_total"], 3)
        self.assertGreater(listener["requests_per_second"], 0)


class ExportTests(SynchronousTestCase):
    def test_csv(self):
        admin = InMemoryAdmin()
        admin.group.get("1").recordResponse(200, 0.01, 0, 0)
        code, _, response, content = admin.request("GET", "/api/backends?format=csv")
        self.assertEqual(code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/csv"))
        rows = list(csv.reader(io.StringIO(content.decode("utf-8"))))
        self.assertEqual(len(rows), 3)
        header = rows[0]
        self.assertEqual(rows[1][header.index("url")], "http://127.0.0.1:8081")
        self.assertEqual(rows[1][header.index("responses_2xx")], "1")


# -- several workers, in memory ---------------------------------------------------


class MemoryWorker:
    """
    A worker as its parent reaches it: its own group and admin API behind
    a L{WorkerChannel}, connected in memory to the parent's end.
    """

    def __init__(self, pool, index, urls) -> None:
        from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

        from rrbalancer._channel import ParentChannel, WorkerChannel

        self.clock = Clock()
        self.clock.advance(1000)
        self.group = BackendGroup(HealthConfig(enabled=False), self.clock)
        for url in urls:
            self.group.add(BackendConfig(url))
        self.api = AdminAPI(self.group, self.clock)
        self.stuck = False
        server = WorkerChannel(self.api, Metrics(self.group))
        self.parent = ParentChannel(pool, index)
        self.pump = connect(
            server, makeFakeServer(server), self.parent, makeFakeClient(self.parent)
        )

    def state(self):
        return [(b.id, b.url, b.weight, b.adminState) for b in self.group]


class MergeStatusTests(SynchronousTestCase):
    def test_mirrorsSummed(self):
        """
        The workers' mirror counts add up in the balancer's status.
        """
        from rrbalancer.admin._workers import mergeStatus

        def status(inFlight, mirrored, skipped):
            totals = dict.fromkeys(
                ("requests", "failures", "active", "in_flight", "retries",
                 "requests_per_second"), 0)
            return {
                "panic": {"active": False, "times": 0}, "ejection": {"ejected": 0},
                "rate_limits": [], "queue": None, "totals": dict(totals, responses={}),
                "mirrors": {"in_flight": inFlight, "max_in_flight": 10, "pools": {"shadow": {
                    "mirrored": mirrored, "failed": 1,
                    "skipped": {"in_flight": skipped, "body_too_large": 0}}}},
            }

        merged = mergeStatus([(1, status(2, 5, 1)), (2, status(3, 7, 0))], [])
        self.assertEqual(merged["mirrors"], {
            "in_flight": 5, "max_in_flight": 10, "pools": {"shadow": {
                "mirrored": 12, "failed": 2, "skipped": {"in_flight": 1, "body_too_large": 0}}},
        })


class WorkersAPITests(SynchronousTestCase):
    """
    L{WorkersAPI}: the parent's admin API over workers reached in memory.
    """

    urls = ("http://127.0.0.1:8081", "http://127.0.0.1:8082")

    def setUp(self):
        from rrbalancer.admin._workers import WorkersAPI, WorkersMetrics
        from rrbalancer.workers import WorkerPool

        self.clock = Clock()
        self.pool = WorkerPool(
            Config(backends=(BackendConfig(self.urls[0]),), ports=("tcp:0",), admin=None),
            self.clock, 2,
        )
        self.api = WorkersAPI(self.pool, self.clock, timeout=5)
        self.metrics = WorkersMetrics(self.api)
        self.workers = {}
        for index in (1, 2):
            self.connect(index)

    def connect(self, index):
        self.workers[index] = MemoryWorker(self.pool, index, self.urls)
        self.settle()
        return self.workers[index]

    def settle(self):
        for _ in range(50):
            moved = [w.pump.pump() for w in self.workers.values() if not w.stuck]
            if not any(moved):
                return
        self.fail("the channels never settled")

    def result(self, d):
        self.settle()
        return self.successResultOf(d)

    def refusal(self, d):
        self.settle()
        return self.failureResultOf(d, APIError).value

    def test_addedEverywhereWithOneID(self):
        answer = self.result(self.api.addBackend({"url": "http://127.0.0.1:8083"}, "peer"))
        self.assertEqual(answer["id"], "3")
        self.assertEqual([w["worker"] for w in answer["workers"]], [1, 2])
        for worker in self.workers.values():
            self.assertEqual(worker.group.get("3").url, "http://127.0.0.1:8083")

    def test_changedAndRemovedEverywhere(self):
        answer = self.result(self.api.changeBackend("1", {"state": "draining", "weight": 4}, "p"))
        self.assertEqual((answer["state"], answer["weight"]), (DRAINING, 4))
        self.result(self.api.removeBackend("2", "p"))
        self.result(self.api.bulk({"add": [{"url": "http://127.0.0.1:8084"}]}, "p"))
        for worker in self.workers.values():
            self.assertEqual(
                worker.state(),
                [("1", self.urls[0], 4, DRAINING), ("3", "http://127.0.0.1:8084", 1, UP)],
            )

    def test_refusedChangesNothing(self):
        """
        A change the first worker refuses is answered as it refused it, and
        reaches no other worker.
        """
        before = [w.state() for w in self.workers.values()]
        error = self.refusal(self.api.changeBackend("1", {"weight": 0}, "p"))
        self.assertEqual(error.code, 400)
        self.assertIn("weight", error.message)
        self.assertEqual(self.refusal(self.api.changeBackend("9", {"weight": 2}, "p")).code, 404)
        self.assertEqual([w.state() for w in self.workers.values()], before)

    def test_otherWorkerRefuses(self):
        """
        A worker that cannot apply what the first did is named.
        """
        backend = self.workers[2].group.get("1")
        backend.active = 1
        self.workers[2].group.retire(backend, "by hand")
        error = self.refusal(self.api.changeBackend("1", {"weight": 2}, "p"))
        self.assertEqual(error.code, 502)
        self.assertIn("worker 2 did not apply the change", error.message)
        self.assertIn("is being removed", error.message)
        self.assertEqual(self.workers[1].group.get("1").weight, 2)
        # Ids a worker has that the first has not: refused, not overwritten.
        self.workers[2].group.add(BackendConfig("http://127.0.0.1:8090"))
        error = self.refusal(self.api.addBackend({"url": "http://127.0.0.1:8083"}, "p"))
        self.assertIn("worker 2 did not apply the change: ids differ", error.message)
        self.assertEqual(self.workers[2].group.get("3").url, "http://127.0.0.1:8090")

    def test_reloadWithoutFile(self):
        """
        A reload the first worker refuses (no config file) is its answer.
        """
        error = self.refusal(self.api.reload("p"))
        self.assertEqual(error.code, 409)
        self.assertIn("without --config", error.message)

    def test_workerTimesOut(self):
        self.workers[2].stuck = True
        d = self.api.changeBackend("1", {"weight": 2}, "p")
        self.settle()
        self.assertNoResult(d)
        self.clock.advance(5)
        error = self.failureResultOf(d, APIError).value
        self.assertEqual(error.code, 504)
        self.assertIn("worker 2 did not answer within 5s", error.message)
        d = self.api.listBackends()
        self.settle()
        self.clock.advance(5)
        self.assertIn("worker 2", self.failureResultOf(d, APIError).value.message)

    def test_noWorker(self):
        for worker in self.workers.values():
            worker.pump.clientIO.loseConnection()
        self.settle()
        self.assertEqual(self.api.workers(), [])
        self.assertEqual(self.refusal(self.api.addBackend({"url": "http://a:1"}, "p")).code, 503)
        self.assertEqual(self.refusal(self.api.status()).code, 503)

    def test_figuresSummed(self):
        """
        Counts are summed; a backend is up only if every worker finds it
        so, and each worker's view is listed.
        """
        one, two = (self.workers[i].group.get("1") for i in (1, 2))
        one.requests, two.requests = 3, 4
        one.active, two.active = 1, 2
        one.stats.responses["2xx"] = 3
        two.stats.responses["2xx"] = 2
        two.stats.responses["5xx"] = 2
        two.healthy = False
        page = self.result(self.api.listBackends())
        self.assertEqual(page["total"], 2)
        self.assertEqual(page["counts"]["down"], 1)
        backend = page["backends"][0]
        self.assertEqual(backend["requests"], 7)
        self.assertEqual(backend["active"], 3)
        self.assertEqual(backend["responses"], {"2xx": 5, "5xx": 2})
        self.assertEqual((backend["state"], backend["healthy"]), ("down", False))
        self.assertEqual(
            [(w["worker"], w["state"], w["requests"]) for w in backend["workers"]],
            [(1, "up", 3), (2, "down", 4)],
        )
        self.assertEqual(self.result(self.api.getBackend("1"))["requests"], 7)
        self.assertEqual(self.refusal(self.api.getBackend("9")).code, 404)
        self.assertEqual(self.result(self.api.listBackends(state="up"))["matched"], 1)
        status = self.result(self.api.status())
        self.assertEqual(status["totals"]["requests"], 7)
        self.assertEqual(status["totals"]["active"], 3)
        self.assertEqual(status["totals"]["up"], 1)
        self.assertEqual([w["answering"] for w in status["workers"]], [True, True])

    def test_pages(self):
        """
        Pages, search and counts over every worker's backends, the page
        asked for in full only.
        """
        self.result(self.api.bulk(
            {"add": [{"url": f"http://127.0.0.1:{9000 + n}"} for n in range(5)]}, "p"))
        page = self.result(self.api.listBackends(offset=2, limit=3))
        self.assertEqual([b["id"] for b in page["backends"]], ["3", "4", "5"])
        self.assertEqual((page["total"], page["matched"], page["counts"]["up"]), (7, 7, 7))
        self.assertEqual(len(page["backends"][0]["workers"]), 2)
        page = self.result(self.api.listBackends(match=":9003"))
        self.assertEqual([b["url"] for b in page["backends"]], ["http://127.0.0.1:9003"])
        self.assertEqual(self.result(self.api.listBackends(offset=50))["backends"], [])
        self.assertEqual(self.assertRaises(APIError, self.api.listBackends, limit=0).code, 400)

    def test_metricsSummed(self):
        from prometheus_client.parser import text_string_to_metric_families

        self.workers[1].group.get("1").requests = 3
        self.workers[2].group.get("1").requests = 4
        self.workers[2].group.get("1").healthy = False
        text = self.result(self.metrics.render()).decode("utf-8")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        backend = ("backend", self.urls[0])
        self.assertEqual(samples[("rrbalancer_backend_attempts_total", (backend,))], 7)
        self.assertEqual(samples[("rrbalancer_backend_up", (backend, ("worker", "1")))], 1)
        self.assertEqual(samples[("rrbalancer_backend_up", (backend, ("worker", "2")))], 0)
        self.assertEqual(samples[("rrbalancer_workers", ())], 2)

    def test_workerStartedAgain(self):
        """
        A worker that starts again gets the backends changed before it
        started, with their ids, before it is asked anything.
        """
        self.result(self.api.addBackend({"url": "http://127.0.0.1:8083"}, "p"))
        self.result(self.api.changeBackend("1", {"state": "disabled"}, "p"))
        self.workers[2].pump.clientIO.loseConnection()
        self.settle()
        self.assertEqual([i for i, _ in self.api.workers()], [1])
        again = self.connect(2)
        self.assertEqual(again.state(), self.workers[1].state())
        self.assertEqual([i for i, _ in self.api.workers()], [1, 2])
        self.assertEqual(self.result(self.api.addBackend({"url": "http://b:1"}, "p"))["id"], "4")
        self.assertEqual(again.group.get("4").url, "http://b:1")

    def test_discoveryAndPoolsThroughTheResource(self):
        """
        C{/api/discovery} answers from the workers' status; a pool other
        than the default is refused with a reason, not a traceback.
        """
        stub = StubTreq(AdminResource(self.api, MetricsResource(self.metrics)))
        headers = {b"Host": [b"127.0.0.1"]}
        d = stub.get("http://127.0.0.1/api/discovery", headers=headers)
        for _ in range(5):
            stub.flush()
            self.settle()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(self.successResultOf(stub.content(response)))["sources"], [])
        d = stub.get("http://127.0.0.1/api/backends?pool=api", headers=headers)
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 400)
        self.assertIn(b"default pool only", self.successResultOf(stub.content(response)))

    def test_throughTheResource(self):
        """
        The admin resource answers the workers' API once they have.
        """
        stub = StubTreq(AdminResource(self.api, MetricsResource(self.metrics)))
        d = stub.post(
            "http://127.0.0.1/api/backends", data=b'{"url": "http://127.0.0.1:8083"}',
            headers={b"Content-Type": [b"application/json"], b"Host": [b"127.0.0.1"]},
        )
        for _ in range(5):
            stub.flush()
            self.settle()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/api/backends/3"])
        body = json.loads(self.successResultOf(stub.content(response)))
        self.assertEqual(len(body["workers"]), 2)
        self.workers[2].stuck = True
        d = stub.get("http://127.0.0.1/metrics", headers={b"Host": [b"127.0.0.1"]})
        stub.flush()
        self.settle()
        self.clock.advance(5)
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.assertIn(b"worker 2", self.successResultOf(stub.content(response)))
