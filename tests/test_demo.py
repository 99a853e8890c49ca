"""
Tests for L{rrbalancer.demo}: the demo backends, on the real reactor and
loopback ports the system picks.
"""

import re

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.backends import BackendGroup
from rrbalancer.config import Config, HealthConfig
from rrbalancer.demo import DEMO_BACKENDS, DemoBackendResource, DemoBackends

from .support import rawRequest, splitResponse
from .test_service import RealNetworkMixin

HELLO = re.compile(rb"^Hello from demo backend (\d) \(request (\d+) to this backend\)\n$")


class DemoBackendsTests(RealNetworkMixin, TestCase):
    def startDemo(self):
        group = BackendGroup(HealthConfig(enabled=False), reactor)
        demo = DemoBackends(group, reactor)
        demo.startService()

        def cleanup():
            if demo.running:
                return demo.stopService()

        self.addCleanup(cleanup)
        return demo, group

    @inlineCallbacks
    def get(self, port: int, method: bytes = b"GET"):
        client = yield rawRequest(
            port, method + b" /anything HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
        )
        data = yield client.closed
        return splitResponse(data)

    def test_listensOnLoopbackOnly(self):
        """
        Three ports, each on 127.0.0.1, each added to the group as a backend.
        """
        demo, group = self.startDemo()
        self.assertEqual(len(demo.ports), DEMO_BACKENDS)
        self.assertEqual(DEMO_BACKENDS, 3)
        hosts = [port.getHost() for port in demo.ports]
        self.assertEqual([h.host for h in hosts], ["127.0.0.1"] * 3)
        self.assertEqual(len({h.port for h in hosts}), 3)
        self.assertEqual(
            [b.url for b in group], [f"http://127.0.0.1:{h.port}" for h in hosts]
        )
        self.assertTrue(all(b.available for b in group))

    @inlineCallbacks
    def test_eachNamesItself(self):
        demo, group = self.startDemo()
        for n, port in enumerate(demo.ports, 1):
            for count in (1, 2):
                status, headers, body = yield self.get(port.getHost().port)
                self.assertEqual(status, b"HTTP/1.1 200 OK")
                self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
                self.assertEqual(headers[b"content-length"], b"%d" % (len(body),))
                self.assertEqual(
                    HELLO.match(body).groups(), (b"%d" % n, b"%d" % count), body
                )

    @inlineCallbacks
    def test_headHasNoBody(self):
        demo, group = self.startDemo()
        port = demo.ports[0].getHost().port
        status, headers, body = yield self.get(port, b"HEAD")
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, b"")
        # The length is the one a GET would have.
        status, getHeaders, getBody = yield self.get(port)
        self.assertEqual(
            int(headers[b"content-length"]),
            len(getBody.replace(b"request 2", b"request 1")),
        )

    @inlineCallbacks
    def test_stopStopsListening(self):
        demo, group = self.startDemo()
        ports = list(demo.ports)
        numbers = [port.getHost().port for port in ports]
        yield demo.stopService()
        self.assertEqual(demo.ports, [])
        # Stopped means closed, when the stop's Deferred fires.
        self.assertEqual([port.disconnected for port in ports], [True] * 3)
        for number in numbers:
            with self.assertRaises(ConnectionRefusedError):
                yield connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", number, timeout=5), Protocol()
                )

    @inlineCallbacks
    def test_throughTheBalancer(self):
        """
        With C{demo}, the balancer's requests go round the three demo
        backends in turn.
        """
        service = self.startBalancer(
            Config(
                backends=(),
                demo=True,
                admin=None,
                ports=("tcp:0:interface=127.0.0.1",),
                health=HealthConfig(enabled=False),
            )
        )
        port = self.balancerPort(service)
        names = []
        for i in range(6):
            status, headers, body = yield self.get(port)
            self.assertEqual(status, b"HTTP/1.1 200 OK")
            names.append(int(HELLO.match(body).group(1)))
        self.assertEqual(names, [1, 2, 3, 1, 2, 3])
        yield service.stopService()
        [demo] = [s for s in service if isinstance(s, DemoBackends)]
        self.assertEqual(demo.ports, [])


class DemoResourceTests(SynchronousTestCase):
    def test_privilegedStartThenStart(self):
        """
        twistd calls privilegedStartService, then startService: the
        backends are added once.
        """
        memory = MemoryReactorClock()
        group = BackendGroup(HealthConfig(enabled=False), memory)
        demo = DemoBackends(group, memory, count=1)
        demo.privilegedStartService()
        demo.startService()
        self.assertEqual(len(group), 1)
        self.assertEqual([interface for *rest, interface in memory.tcpServers], ["127.0.0.1"])

    def test_counts(self):
        from twisted.web.test.requesthelper import DummyRequest

        resource = DemoBackendResource("demo backend 7")
        first = resource.render(DummyRequest([b""]))
        second = resource.render(DummyRequest([b""]))
        self.assertEqual(first, b"Hello from demo backend 7 (request 1 to this backend)\n")
        self.assertEqual(second, b"Hello from demo backend 7 (request 2 to this backend)\n")
