"""
Tests for L{rrbalancer.queue} and the C{--max-conns} limit it serves: the
queue on a L{Clock}, fullness in the group, and the done-means of a real
balancer on loopback sockets.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.backends import BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.queue import QueueFull, QueueTimeout, RequestQueue

from .support import Net, ScriptedBackend, connectClient, exchange, get, ok, startBalancer


class RequestQueueTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.queue = RequestQueue(2, 1.0, self.clock)

    def test_oldestFirst(self):
        served = []
        for name in "ab":
            self.queue.wait().addCallback(lambda waited, name=name: served.append((name, waited)))
        self.clock.advance(0.25)
        self.queue.serve()
        self.clock.advance(0.25)
        self.queue.serve()
        self.assertEqual(served, [("a", 0.25), ("b", 0.5)])
        self.assertEqual(self.queue.counts["served"], 2)
        self.queue.serve()  # nobody waits: nothing happens

    def test_full(self):
        self.queue.wait()
        self.queue.wait()
        self.failureResultOf(self.queue.wait(), QueueFull)
        self.assertEqual(self.queue.counts["rejected"], 1)

    def test_timeout(self):
        d = self.queue.wait()
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.failureResultOf(d, QueueTimeout)
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.queue.counts["timeouts"], 1)

    def test_leave(self):
        a = self.queue.wait()
        b = self.queue.wait()
        a.cancel()
        self.failureResultOf(a)
        self.assertEqual(self.queue.counts["abandoned"], 1)
        self.queue.serve()
        self.assertEqual(self.successResultOf(b), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first(self):
        served = []
        self.queue.wait().addCallback(lambda _: served.append("a"))
        self.queue.wait(first=True).addCallback(lambda _: served.append("b"))
        self.queue.serve()
        self.assertEqual(served, ["b"])

    def test_waitHistogram(self):
        self.queue.wait()
        self.clock.advance(0.02)
        self.queue.serve()
        # 0.02 s falls in the 0.05 s bucket.
        self.assertEqual(self.queue.waits[3], 1)
        self.assertAlmostEqual(self.queue.waitSum, 0.02)


class FullBackendTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.group = BackendGroup(HealthConfig(enabled=False), self.clock, maxConns=2)
        self.a = self.group.add(BackendConfig("http://a"))
        self.b = self.group.add(BackendConfig("http://b"))

    def test_fullSkipped(self):
        self.a.active = 2
        self.assertEqual({self.group.pick() for _ in range(4)}, {self.b})
        self.assertEqual(self.group.full, 1)
        self.b.active = 2
        self.assertIsNone(self.group.pick())
        self.assertTrue(self.group.mayWait())
        self.a.active = 1
        self.assertEqual(self.group.full, 1)
        self.assertIs(self.group.pick(), self.a)

    def test_roomServesTheQueue(self):
        self.a.active = self.b.active = 2
        served = []
        self.group.requestQueue.wait().addCallback(served.append)
        self.assertTrue(self.group.mustWait(served=False))
        self.assertFalse(self.group.mustWait(served=True))
        self.a.active = 1
        self.assertEqual(served, [])
        self.clock.advance(0)
        self.assertEqual(served, [0])

    def test_tunnelsHoldConnections(self):
        """
        An open tunnel holds a connection to its backend for as long as it
        lasts, and counts toward C{max_conns} as a request does; the queue
        moves on when it closes.
        """
        from rrbalancer.tunnel import Tunnel

        tunnel = Tunnel(self.clock, 3600.0, (self.a.tunnels,))
        self.a.active = 1
        self.a.tunnelOpened(tunnel)
        tunnel.start(StringTransport(), StringTransport())
        # The upgrade's request ends; its tunnel stays.
        self.a.active = 0
        self.a.active = 1
        self.assertEqual((self.a.load, self.group.full), (2, 1))
        self.b.active = 2
        served = []
        self.group.requestQueue.wait().addCallback(served.append)
        for end in (tunnel.client, tunnel.backend):
            end.connectionLost(None)
        self.assertEqual((self.a.load, self.group.full), (1, 1))
        self.clock.advance(0)
        self.assertEqual(served, [0])
        self.assertIs(self.group.pick(), self.a)

    def test_downFullBackendNotCounted(self):
        self.a.active = 2
        self.a.setAdminState("disabled", "test")
        self.assertEqual(self.group.full, 0)
        self.group.remove(self.b)
        self.assertFalse(self.group.mayWait())

    def test_noLimit(self):
        group = BackendGroup(HealthConfig(enabled=False), self.clock)
        a = group.add(BackendConfig("http://a"))
        a.active = 1000
        self.assertIs(group.pick(), a)
        self.assertIsNone(group.requestQueue)


class ThroughTheBalancerTests(TestCase):
    def setUp(self):
        self.net = Net(self)

    def holdingBackend(self):
        """
        A backend that answers only when the test says so.
        """
        held = []
        backend = ScriptedBackend(self.net, lambda connection, request: held.append(connection))
        return backend, held

    @inlineCallbacks
    def test_queueThenFull(self):
        """
        max_conns 1, queue 2: of 5 concurrent requests, 3 are served one
        after the other and 2 get 503 with Retry-After at once.
        """
        backend, held = self.holdingBackend()
        balancer = yield startBalancer(self.net, [backend.url], maxConns=1, queueSize=2)
        clients = []
        for _ in range(5):
            client = yield connectClient(self.net, balancer.port)
            client.send(get())
            clients.append(client)
            yield backend.waitFor(lambda: len(held) == 1)
        responses = [client.readResponse() for client in clients]
        refused = []
        for d in responses[3:]:
            refused.append((yield d))
        self.assertEqual([r.code for r in refused], [503, 503])
        self.assertEqual(refused[0].header(b"retry-after"), [b"5"])
        self.assertIn(b"queue", refused[0].body)
        for n in range(3):
            yield backend.waitFor(lambda: len(held) == n + 1)
            # One at a time: the next is not sent before this one ends.
            self.assertEqual(len(backend.requests), n + 1)
            held[n].write(ok())
            response = yield responses[n]
            self.assertEqual(response.code, 200)
        queue = balancer.group.requestQueue
        self.assertEqual((queue.counts["served"], queue.counts["rejected"]), (2, 2))
        text = balancer.service.metrics.render().decode()
        self.assertIn('rrbalancer_queue_requests_total{outcome="rejected"} 2', text)
        self.assertIn("rrbalancer_queue_wait_seconds_count 2", text)
        self.assertIn("rrbalancer_queue_peak 2", text)

    @inlineCallbacks
    def test_queueTimeout(self):
        """
        Behind a slow request, with queue_timeout 1, a queued request gets
        503 after about a second.
        """
        backend, held = self.holdingBackend()
        balancer = yield startBalancer(
            self.net, [backend.url], maxConns=1, queueSize=2, queueTimeout=1.0
        )
        slow = yield connectClient(self.net, balancer.port)
        slow.send(get())
        yield backend.waitFor(lambda: len(held) == 1)
        started = reactor.seconds()
        response = yield exchange(self.net, balancer.port, get())
        waited = reactor.seconds() - started
        self.assertEqual(response.code, 503)
        self.assertIn(b"waited too long", response.body)
        self.assertTrue(0.9 < waited < 3, waited)
        held[0].write(ok())
        response = yield slow.readResponse()
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_clientLeavesTheQueue(self):
        backend, held = self.holdingBackend()
        balancer = yield startBalancer(self.net, [backend.url], maxConns=1, queueSize=1)
        first = yield connectClient(self.net, balancer.port)
        first.send(get())
        yield backend.waitFor(lambda: len(held) == 1)
        leaving = yield connectClient(self.net, balancer.port)
        leaving.send(get())
        queue = balancer.group.requestQueue
        for _ in range(200):
            if len(queue):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(queue), 1)
        leaving.transport.loseConnection()
        for _ in range(200):
            if not len(queue):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(queue.counts["abandoned"], 1)
        held[0].write(ok())
        response = yield first.readResponse()
        self.assertEqual(response.code, 200)
        # Its place is free: another request is served.
        next_ = exchange(self.net, balancer.port, get())
        yield backend.waitFor(lambda: len(held) == 2)
        held[1].write(ok())
        self.assertEqual((yield next_).code, 200)


class MetricsTests(SynchronousTestCase):
    def test_parses(self):
        """
        The queue's families are valid Prometheus text and OpenMetrics.
        """
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
        from prometheus_client.parser import text_string_to_metric_families as text

        from rrbalancer.metrics import Metrics

        clock = Clock()
        group = BackendGroup(HealthConfig(enabled=False), clock, maxConns=1)
        group.add(BackendConfig("http://a")).active = 1
        group.requestQueue.wait()
        clock.advance(0.3)
        group.requestQueue.serve()
        metrics = Metrics(group)
        families = {f.name: f for f in text(metrics.render().decode())}
        buckets = {s.labels["le"]: s.value for s in families["rrbalancer_queue_wait_seconds"].samples
                   if s.name.endswith("_bucket")}
        self.assertEqual((buckets["0.1"], buckets["0.5"], buckets["+Inf"]), (0, 1, 1))
        self.assertIn("rrbalancer_queue_length", {f.name for f in om(metrics.render(True).decode())})

    def test_poolsWithAndWithout(self):
        """
        With pools, the queue's series are those of the pools that have a
        queue, each labelled with its pool; the others have none.
        """
        from types import SimpleNamespace

        from prometheus_client.parser import text_string_to_metric_families as text

        from rrbalancer.metrics import Metrics

        clock = Clock()
        queued = BackendGroup(HealthConfig(enabled=False), clock, maxConns=1)
        queued.add(BackendConfig("http://a")).active = 1
        queued.requestQueue.wait()
        plain = BackendGroup(HealthConfig(enabled=False), clock)
        plain.add(BackendConfig("http://b"))
        pools = SimpleNamespace(
            config=SimpleNamespace(pools=("api", "web")),
            balancers={"api": SimpleNamespace(group=queued), "web": SimpleNamespace(group=plain)},
            mirrors=None,
        )
        families = {f.name: f for f in text(Metrics(queued, pools=pools).render().decode())}
        self.assertEqual(
            [(s.labels, s.value) for s in families["rrbalancer_queue_length"].samples],
            [({"pool": "api"}, 1)],
        )
        self.assertEqual(
            {s.labels["pool"] for s in families["rrbalancer_queue_wait_seconds"].samples},
            {"api"},
        )
        self.assertEqual(
            {s.labels["pool"] for s in families["rrbalancer_retries"].samples}, {"api", "web"}
        )
