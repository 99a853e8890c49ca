"""
Tests for L{rrbalancer.service}: the wiring of L{makeService} (on a
L{MemoryReactorClock}), the listeners' failure to listen, the graceful stop,
the backend endpoints, and the access log of the site it builds.
"""

import json
import re
from typing import List

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    connectProtocol,
)
from twisted.internet.error import (
    CannotListenError,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransportWithDisconnection, MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rrbalancer.backends import DOWN
from rrbalancer.client import ConnectionPool
from rrbalancer.config import BackendConfig, Config, ConfigError, HealthConfig, buildConfig
from rrbalancer.demo import DemoBackends
from rrbalancer.proxy import BackendProxyResource
from rrbalancer.listeners import Listener
from rrbalancer.memory import HeapGuard, pypyHeap
from rrbalancer.service import BalancerService, makeService
from rrbalancer.site import BalancerSite

from .support import memoryReactor, rawRequest, splitResponse

NO_HEALTH = HealthConfig(enabled=False)


def config(**kwargs) -> Config:
    kwargs.setdefault("backends", (BackendConfig(url="http://127.0.0.1:8081"),))
    kwargs.setdefault("health", NO_HEALTH)
    kwargs.setdefault("admin", None)
    return Config(**kwargs)


# -- helpers for tests on the real reactor --------------------------------


@inlineCallbacks
def waitUntil(predicate, what: str, limit: float = 5.0):
    """
    Poll C{predicate} every few milliseconds of reactor time, for at most
    C{limit} seconds.
    """
    for i in range(int(limit / 0.005)):
        if predicate():
            return
        yield deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class SlowBackend(Resource):
    """
    A backend that answers only when the test says so.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.waiting = []
        self.arrived = Deferred()

    def render(self, request):
        self.waiting.append(request)
        if not self.arrived.called:
            self.arrived.callback(request)
        return NOT_DONE_YET

    def answer(self, body: bytes = b"slow answer\n") -> None:
        request = self.waiting.pop(0)
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(body)
        request.finish()


class FastBackend(Resource):
    isLeaf = True

    def render(self, request):
        body = b"hello from the backend\n"
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return body


class RealNetworkMixin:
    """
    Start backends and balancers on the real reactor, on loopback ports the
    system picks, and clean everything up without leaving the reactor dirty.
    """

    timeout = 10

    def startBackend(self, resource, tls=None) -> int:
        """
        @param tls: L{CertificateOptions} to serve HTTPS with.
        """
        site = Site(resource)
        site.noisy = False
        site.log = lambda request: None
        tracking = WrappingFactory(site)
        tracking.noisy = False
        if tls is None:
            port = reactor.listenTCP(0, tracking, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, tracking, tls, interface="127.0.0.1")

        @inlineCallbacks
        def cleanup():
            yield port.stopListening()
            for protocol in list(tracking.protocols):
                protocol.transport.abortConnection()
            yield waitUntil(lambda: not tracking.protocols, "backend connections to close")

        self.addCleanup(cleanup)
        self.backendConnections = tracking.protocols
        return port.getHost().port

    def startBalancer(self, conf: Config) -> BalancerService:
        service = makeService(conf, reactor)
        service.startService()

        def cleanup():
            if service.running:
                return service.stopService()

        self.addCleanup(cleanup)
        return service

    def balancerFor(self, backendPort: int, **settings) -> BalancerService:
        """
        A started balancer on a loopback port the system picks, in front of
        the backend on C{backendPort}.
        """
        settings.setdefault("backends", (BackendConfig(url=f"http://127.0.0.1:{backendPort}"),))
        settings.setdefault("ports", ("tcp:0:interface=127.0.0.1",))
        return self.startBalancer(config(**settings))

    def listeningPort(self, listener: Listener):
        return listener.port

    def balancerPort(self, service: BalancerService) -> int:
        [listener] = service.listeners
        return self.listeningPort(listener).getHost().port

    def trackServerConnections(self, site):
        """
        Record the balancer's server-side protocols as the site builds them.
        """
        built = []
        original = site.buildProtocol

        def buildProtocol(addr):
            protocol = original(addr)
            built.append(protocol)
            return protocol

        site.buildProtocol = buildProtocol
        return built


def makeCertificates(folder: str):
    """
    A private CA, and a certificate it signed for 127.0.0.1 and localhost.

    @return: the CA's PEM file, and server-side L{CertificateOptions}.
    """
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet.ssl import PrivateCertificate

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def build(subject, issuer, key, signer, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = build(
        name("rrbalancer test CA"), name("rrbalancer test CA"), caKey, caKey,
        [(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build(
        name("localhost"), ca.subject, key, caKey,
        [(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), False)],
    )
    caFile = os.path.join(folder, "ca.pem")
    with open(caFile, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = PrivateCertificate.loadPEM(
        keyPEM + leaf.public_bytes(serialization.Encoding.PEM)
    )
    return caFile, server.options()


class HTTPSBackendTests(RealNetworkMixin, TestCase):
    """
    https backends on real sockets: verified against the CA bundle given
    with C{--backend-ca}, by IP address and by host name.
    """

    @inlineCallbacks
    def fetchThrough(self, url: str, caFile: str):
        service = self.startBalancer(
            config(
                backends=(BackendConfig(url=url),),
                ports=("tcp:0:interface=127.0.0.1",),
                backendCA=caFile,
            )
        )
        port = self.balancerPort(service)
        client = yield rawRequest(
            port, b"GET / HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"
        )
        data = yield client.closed
        return service, splitResponse(data)

    @inlineCallbacks
    def test_verified(self):
        caFile, tls = makeCertificates(self._folder())
        backendPort = self.startBackend(FastBackend(), tls=tls)
        for host in ("127.0.0.1", "localhost"):
            service, (status, headers, body) = yield self.fetchThrough(
                f"https://{host}:{backendPort}", caFile
            )
            self.assertEqual(status, b"HTTP/1.1 200 OK", host)
            self.assertEqual(body, b"hello from the backend\n")
            yield service.stopService()

    @inlineCallbacks
    def test_unknownCA(self):
        """
        A backend whose certificate no trusted CA signed is not talked to:
        502, and a failure counted against it.
        """
        _, tls = makeCertificates(self._folder())
        otherCA, _ = makeCertificates(self._folder())
        backendPort = self.startBackend(FastBackend(), tls=tls)
        service, (status, headers, body) = yield self.fetchThrough(
            f"https://127.0.0.1:{backendPort}", otherCA
        )
        self.assertEqual(status, b"HTTP/1.1 502 Bad Gateway")
        self.assertNotIn(str(backendPort).encode(), body)
        [backend] = service.group
        self.assertEqual(backend.failures, 1)
        self.assertEqual(
            backend.lastError, "TLS with the backend failed: certificate verify failed"
        )

    def _folder(self) -> str:
        import os

        folder = self.mktemp()
        os.makedirs(folder)
        return folder


class ForwardedFor(Resource):
    """
    Answers with the X-Forwarded-For it was sent.
    """

    isLeaf = True

    def render(self, request):
        body = request.getHeader(b"x-forwarded-for") or b"-"
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return body


class ProxyProtocolTests(RealNetworkMixin, TestCase):
    @inlineCallbacks
    def test_clientAddressFromProxyHeader(self):
        """
        On a haproxy: port, the client address the PROXY header gives is
        the one passed on in X-Forwarded-For.
        """
        backendPort = self.startBackend(ForwardedFor())
        service = self.balancerFor(backendPort, ports=("haproxy:tcp:0:interface=127.0.0.1",))
        client = yield rawRequest(
            self.balancerPort(service),
            b"PROXY TCP4 203.0.113.9 127.0.0.1 50000 80\r\n"
            b"GET / HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n",
        )
        status, headers, body = splitResponse((yield client.closed))
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, b"203.0.113.9")


# -- makeService on a memory reactor --------------------------------------


class MakeServiceTests(SynchronousTestCase):
    def test_listenersForEachPort(self):
        """
        Every port gets its listener, with the endpoint its description
        names (a bare number is TCP on every interface); nothing listens
        before the service starts.
        """
        conf = buildConfig(
            {
                "port": [
                    8000,
                    "8001",
                    "tcp:8002:interface=127.0.0.1",
                    "tcp6:8003:interface=\\:\\:1",
                    "unix:/nonexistent/rrbalancer.sock",
                ],
                "backend": ["http://127.0.0.1:8081"],
                "admin": "none",
            }
        )
        memory = MemoryReactorClock()
        service = makeService(conf, memory)
        listeners = service.listeners
        self.assertEqual(
            [l.description for l in listeners],
            [
                "tcp:8000",
                "tcp:8001",
                "tcp:8002:interface=127.0.0.1",
                "tcp6:8003:interface=\\:\\:1",
                "unix:/nonexistent/rrbalancer.sock",
            ],
        )
        self.assertEqual(
            [type(l.serverEndpoint) for l in listeners],
            [
                TCP4ServerEndpoint,
                TCP4ServerEndpoint,
                TCP4ServerEndpoint,
                TCP6ServerEndpoint,
                UNIXServerEndpoint,
            ],
        )
        self.assertEqual(memory.tcpServers, [])
        self.assertEqual(memory.unixServers, [])

        service.startService()
        site = service.site
        self.assertIsInstance(site, BalancerSite)
        self.assertEqual(
            [(port, factory, interface) for port, factory, backlog, interface in memory.tcpServers],
            [
                (8000, site, ""),
                (8001, site, ""),
                (8002, site, "127.0.0.1"),
                (8003, site, "::1"),
            ],
        )
        self.assertEqual(
            [(path, factory) for path, factory, *rest in memory.unixServers],
            [("/nonexistent/rrbalancer.sock", site)],
        )
        self.successResultOf(service.stopService())

    def test_malformedEndpoint(self):
        for bad in ["tcp:notaport", "bogus:1", "tcp:8000:backlog=x", "ssl:8443:privateKey=/nonexistent"]:
            with self.assertRaises(ConfigError) as raised:
                makeService(config(ports=(bad,)), MemoryReactorClock())
            message = str(raised.exception)
            self.assertTrue(message.startswith("port: bad endpoint"), message)
            self.assertIn(repr(bad), message)
            self.assertNotIn("\n", message)

    def test_samePortTwice(self):
        """
        A port listed twice is a configuration mistake, reported as such
        (not a traceback from the service hierarchy).
        """
        with self.assertRaises(ConfigError) as raised:
            buildConfig(
                {"port": ["8000", "tcp:8000"], "backend": ["http://127.0.0.1:8081"]}
            )
        self.assertIn("tcp:8000", str(raised.exception))

    def test_healthServiceOnlyWhenEnabled(self):
        memory = MemoryReactorClock()
        service = makeService(config(health=HealthConfig(enabled=False)), memory)
        self.assertIsNone(service.healthChecker)

        health = HealthConfig(enabled=True, interval=3.0)
        service = makeService(config(health=health), memory)
        checker = service.healthChecker
        self.assertIs(checker._config, health)
        self.assertIs(checker._clock, memory)
        self.assertIs(checker._group, service.group)

    def test_healthChecksRunOnTheServiceReactor(self):
        """
        Started, the health service checks every backend through the
        reactor it was given; a backend that does not answer goes down
        after C{fall} timeouts; stopped, the checks stop.
        """
        memory = memoryReactor()
        health = HealthConfig(interval=2.0, timeout=1.0, fall=1, rise=1)
        service = makeService(config(health=health), memory)
        [backend] = service.group
        checker = service.healthChecker
        service.startService()
        self.assertTrue(checker.running)
        [(host, port, factory, timeout, bind)] = memory.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8081))
        memory.pump([0.25] * 4)
        self.assertEqual(backend.state, DOWN)
        self.assertEqual(backend.lastError, "no answer within 1s")
        self.successResultOf(service.stopService())
        self.assertFalse(checker.running)

    def test_heapGuardOnPyPy(self):
        """
        On PyPy the service keeps the heap bounded with a L{HeapGuard} on
        its own reactor, started and stopped with it; CPython has none.
        """
        memory = memoryReactor()
        service = makeService(config(), memory)
        guard = service.heapGuard
        if pypyHeap() is None:
            self.assertIsNone(guard)
            self.assertEqual([s for s in service if isinstance(s, HeapGuard)], [])
            return
        self.assertIn(guard, list(service))
        self.assertIs(guard._clock, memory)
        service.startService()
        self.assertTrue(guard.running)
        self.assertGreater(guard.bound, 0)
        self.successResultOf(service.stopService())
        self.assertFalse(guard.running)

    def test_demoOnlyWhenAsked(self):
        memory = MemoryReactorClock()
        service = makeService(config(), memory)
        self.assertEqual([s for s in service if isinstance(s, DemoBackends)], [])
        service = makeService(config(backends=(), demo=True), memory)
        self.assertEqual(len([s for s in service if isinstance(s, DemoBackends)]), 1)

    def test_backendsPrepared(self):
        """
        Each backend gets its pool, whose connections go to its endpoint,
        and its proxy resource.
        """
        memory = MemoryReactorClock()
        conf = config(
            backends=(
                BackendConfig(url="http://127.0.0.1:8081"),
                BackendConfig(url="http://127.0.0.1:8082", weight=3),
            ),
            maxIdlePerBackend=7,
            poolIdleTimeout=12.0,
            connectTimeout=2.5,
        )
        service = makeService(conf, memory)
        backends = list(service.group)
        self.assertEqual([b.url for b in backends], ["http://127.0.0.1:8081", "http://127.0.0.1:8082"])
        for backend in backends:
            self.assertIsInstance(backend.pool, ConnectionPool)
            self.assertEqual(backend.pool.maxIdle, 7)
            self.assertEqual(backend.pool.idleTimeout, 12.0)
            self.assertIsInstance(backend.upstream, BackendProxyResource)
            self.assertIs(backend.upstream.pool, backend.pool)
        backends[1].pool.connect()
        [(host, port, factory, timeout, bind)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8082, 2.5))

    def startLines(self, backends) -> List[str]:
        """
        What a service over C{backends} logs as it starts.
        """
        events = []
        service = makeService(config(backends=backends), MemoryReactorClock())
        service.log = Logger(observer=events.append)
        service.startService()
        self.addCleanup(service.stopService)
        return [formatEvent(event) for event in events]

    def test_fewBackendsListedAtStart(self):
        """
        A start names each backend of a small set, its weight, and whether
        it is a backup.
        """
        lines = self.startLines((
            BackendConfig(url="http://127.0.0.1:8081"),
            BackendConfig(url="http://127.0.0.1:8082", weight=3, backup=True),
        ))
        self.assertIn("backend http://127.0.0.1:8081 weight 1", lines)
        self.assertIn("backend http://127.0.0.1:8082 weight 3 (backup)", lines)

    def test_manyBackendsInBriefAtStart(self):
        """
        Beyond L{BalancerService.LISTED_AT_START} backends, a start says
        them in one line, the first few and how many more, rather than a
        line each.
        """
        many = BalancerService.LISTED_AT_START + 1
        backends = tuple(
            BackendConfig(url=f"http://127.0.0.{i + 1}:8080", backup=i == 0) for i in range(many)
        )
        lines = self.startLines(backends)
        self.assertEqual([line for line in lines if line.startswith("backend ")], [])
        [brief] = [line for line in lines if line.startswith("backends: ")]
        self.assertIn("'http://127.0.0.1:8080'", brief)
        self.assertIn(f"and {many - 5} more (1 of them backup)", brief)
        self.assertNotIn(f"http://127.0.0.{many}:8080", brief)

    def test_siteSettings(self):
        conf = config(maxBodySize=1234, clientTimeout=7.0, accessLog=None)
        service = makeService(conf, MemoryReactorClock())
        self.assertEqual(service.site.maxBodySize, 1234)
        self.assertEqual(service.site.timeOut, 7.0)
        self.assertIsNone(service.site.accessLog)


class CannotListenReactor(MemoryReactorClock):
    def __init__(self, exception) -> None:
        MemoryReactorClock.__init__(self)
        self.exception = exception

    def listenTCP(self, *args, **kwargs):
        raise self.exception


class RecordingReactor(MemoryReactorClock):
    """
    A memory reactor on which one port number is taken.
    """

    def __init__(self, taken: int) -> None:
        MemoryReactorClock.__init__(self)
        self.taken = taken

    def listenTCP(self, port, *args, **kwargs):
        if port == self.taken:
            raise CannotListenError("127.0.0.1", port, OSError(98, "Address already in use"))
        return MemoryReactorClock.listenTCP(self, port, *args, **kwargs)


class StderrMixin:
    """
    Capture what the balancer tells the operator on the real standard
    error (C{sys.__stderr__}, the terminal even once twistd logs).
    """

    def captureStderr(self):
        import io
        import sys

        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        return stderr

    def assertOneLineExit(self, raised, stderr, message: str) -> None:
        self.assertEqual(raised.exception.code, 1)
        self.assertEqual(stderr.getvalue(), f"rrbalancer: {message}\n")


class CannotListenTests(StderrMixin, SynchronousTestCase):
    """
    A listener that cannot listen ends the start with one line.
    """

    def test_adminPortInUseFirst(self):
        """
        An admin port in use is reported before any client port listens.
        """
        stderr = self.captureStderr()
        memory = RecordingReactor(8001)
        service = makeService(
            config(ports=("tcp:8000:interface=127.0.0.1",), admin="tcp:8001:interface=127.0.0.1"),
            memory,
        )
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        self.assertOneLineExit(
            raised, stderr,
            "cannot listen on --admin tcp:8001:interface=127.0.0.1: Address already in use",
        )
        self.assertEqual(memory.tcpServers, [])

    def test_cannotListen(self):
        stderr = self.captureStderr()
        error = CannotListenError("127.0.0.1", 80, OSError(13, "Permission denied"))
        service = makeService(config(ports=("tcp:80",)), CannotListenReactor(error))
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        self.assertOneLineExit(raised, stderr, "cannot listen on tcp:80: Permission denied")

    def test_otherError(self):
        stderr = self.captureStderr()
        service = makeService(
            config(ports=("tcp:80",)), CannotListenReactor(RuntimeError("no sockets today"))
        )
        with self.assertRaises(SystemExit) as raised:
            service.startService()
        self.assertOneLineExit(raised, stderr, "cannot listen on tcp:80: no sockets today")


class PortInUseTests(StderrMixin, RealNetworkMixin, TestCase):
    """
    With the real reactor: a port already bound on 127.0.0.1.
    """

    def setUp(self):
        self.taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(self.taken.stopListening)
        self.description = f"tcp:{self.taken.getHost().port}:interface=127.0.0.1"
        self.stderr = self.captureStderr()

    def assertInUse(self, raised) -> None:
        self.assertOneLineExit(
            raised,
            self.stderr,
            f"cannot listen on {self.description}: Address already in use",
        )

    def test_startService(self):
        service = makeService(config(ports=(self.description,)), reactor)
        with self.assertRaises(SystemExit) as raised:
            service.startService()
        self.assertInUse(raised)
        return service.stopService()

    def test_privilegedStartService(self):
        """
        twistd listens in privilegedStartService, before dropping
        privileges; the failure is the same one line there.
        """
        service = makeService(
            config(ports=("tcp:0:interface=127.0.0.1", self.description)), reactor
        )
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        self.assertInUse(raised)
        # The listener that did start is stopped with the service.
        service.startService()
        return service.stopService()


# -- the graceful stop ----------------------------------------------------


class GracefulStopClockTests(SynchronousTestCase):
    """
    The stop, on a memory reactor: requests in flight are driven by hand.
    """

    def setUp(self):
        self.memory = MemoryReactorClock()
        self.service = makeService(config(shutdownGrace=5.0), self.memory)
        self.service.startService()
        self.site = self.service.site
        self.client = StringTransportWithDisconnection(
            peerAddress=IPv4Address("TCP", "10.0.0.9", 50000)
        )
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 50000))
        self.client.protocol = channel
        channel.makeConnection(self.client)
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: balancer\r\n\r\n")
        self.assertEqual(self.site.inFlight, 1)
        # The balancer is connecting to the backend.
        [(host, port, self.backendFactory, timeout, bind)] = self.memory.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8081))

    def backendAnswers(self, response: bytes) -> StringTransport:
        protocol = self.backendFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"GET /slow HTTP/1.1\r\n"))
        protocol.dataReceived(response)
        return transport

    def test_waitsForRequestInFlight(self):
        d = self.service.stopService()
        self.assertNoResult(d)
        self.memory.advance(4.9)
        self.assertNoResult(d)
        self.backendAnswers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.site.inFlight, 0)
        response = self.client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertTrue(response.endswith(b"\r\n\r\nok"), response)

    def test_gracePeriodEnds(self):
        """
        A request that does not finish within C{shutdownGrace} does not
        hold the stop any longer.
        """
        d = self.service.stopService()
        self.memory.advance(4.999)
        self.assertNoResult(d)
        self.memory.advance(0.001)
        self.assertIsNone(self.successResultOf(d))
        # Past the grace, the client's connection is closed.
        self.assertEqual(self.site.inFlight, 0)
        self.assertFalse(self.client.connected)

    def test_idleStopsAtOnce(self):
        self.backendAnswers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.site.inFlight, 0)
        [backend] = self.service.group
        self.assertEqual(backend.pool.idleCount, 1)
        self.assertIsNone(self.successResultOf(self.service.stopService()))
        self.assertEqual(backend.pool.idleCount, 0, "kept connections are closed")

    def test_zeroGrace(self):
        service = makeService(config(shutdownGrace=0.0), self.memory)
        service.startService()
        service.site.inFlight = 1  # as if a request were in flight
        d = service.stopService()
        self.memory.advance(0)
        self.successResultOf(d)


class GracefulStopTests(RealNetworkMixin, TestCase):
    """
    The stop on the real reactor, with a backend that answers when told.
    """

    @inlineCallbacks
    def test_inFlightRequestCompletes(self):
        backend = SlowBackend()
        backendPort = self.startBackend(backend)
        service = self.balancerFor(backendPort, shutdownGrace=10.0)
        port = self.balancerPort(service)
        client = yield rawRequest(
            port, b"GET /slow HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"
        )
        yield backend.arrived
        self.assertEqual(service.site.inFlight, 1)

        stopped = service.stopService()
        events: List[str] = []
        stopped.addCallback(lambda _: events.append("stopped"))

        # The listening port closes at once: new connections are refused
        # while the request in flight is still waiting.
        refused = []

        @inlineCallbacks
        def tryConnect():
            try:
                extra = yield connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1), Protocol()
                )
            except ConnectionRefusedError:
                refused.append(True)
            else:
                extra.transport.abortConnection()

        for attempt in range(50):
            yield tryConnect()
            if refused:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(refused, [True], "the listening port is still open")
        self.assertEqual(events, [])
        self.assertFalse(client.closed.called)

        backend.answer(b"worth the wait\n")
        data = yield client.closed
        status, headers, body = splitResponse(data)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, b"worth the wait\n")
        yield stopped
        self.assertEqual(events, ["stopped"])
        self.assertEqual(service.site.inFlight, 0)
        [b] = service.group
        self.assertEqual(b.pool.idleCount, 0)
        yield waitUntil(lambda: not self.backendConnections, "pool connections to close")

    @inlineCallbacks
    def test_graceExpires(self):
        """
        With a backend that never answers, the stop completes once the
        grace period is over.
        """
        backend = SlowBackend()
        backendPort = self.startBackend(backend)
        service = self.balancerFor(backendPort, shutdownGrace=0.2)
        port = self.balancerPort(service)
        client = yield rawRequest(port, b"GET /never HTTP/1.1\r\nHost: balancer\r\n\r\n")
        yield backend.arrived
        yield service.stopService()
        # Past the grace, the client's connection is closed, which frees
        # the backend too.
        yield client.closed
        yield waitUntil(lambda: not self.backendConnections, "backend connection to close")
        self.assertEqual(service.site.inFlight, 0)

    @inlineCallbacks
    def test_responseWrittenBeforeStopCompletes(self):
        """
        When the stop completes, twistd's reactor shuts down at once and
        drops every connection without writing what is still buffered; so
        the in-flight response must have been written out by then.
        """
        backend = SlowBackend()
        backendPort = self.startBackend(backend)
        service = self.balancerFor(backendPort, shutdownGrace=10.0)
        serverSide = self.trackServerConnections(service.site)
        port = self.balancerPort(service)
        client = yield rawRequest(port, b"GET /slow HTTP/1.1\r\nHost: balancer\r\n\r\n")
        yield backend.arrived
        stopped = service.stopService()

        def shutdownLikeTheReactor(result):
            # What reactor.disconnectAll does to every connection.
            for protocol in serverSide:
                transport = protocol.transport
                if transport is not None and not transport.disconnected:
                    reactor.removeReader(transport)
                    reactor.removeWriter(transport)
                    transport.connectionLost(Failure(ConnectionLost()))
            return result

        stopped.addCallback(shutdownLikeTheReactor)
        yield waitUntil(lambda: serverSide, "the balancer to accept")
        backend.answer(b"x" * 100000)
        yield stopped
        data = yield client.closed
        status, headers, body = splitResponse(data)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(len(body), 100000)



# -- backend endpoints ----------------------------------------------------


# -- the access log -------------------------------------------------------

# Twisted's formatter quotes the client address (see test_hostNotQuoted);
# everything else is checked strictly.
COMBINED = re.compile(
    r'^(?P<q>"?)127\.0\.0\.1(?P=q) - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
    r'"(?P<request>[^"]*)" (?P<code>\d{3}) (?P<length>\d+|-) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


class AccessLogTests(RealNetworkMixin, TestCase):
    @inlineCallbacks
    def proxy(self, accessLog, requests, **settings):
        backendPort = self.startBackend(FastBackend())
        self.backendURL = f"http://127.0.0.1:{backendPort}"
        service = self.balancerFor(backendPort, accessLog=accessLog, **settings)
        port = self.balancerPort(service)
        responses = []
        for request in requests:
            client = yield rawRequest(port, request)
            responses.append(splitResponse((yield client.closed)))
        yield service.stopService()
        return responses

    @inlineCallbacks
    def test_jsonLines(self):
        """
        C{access_log_format = "json"}: one object a line, with exactly the
        documented keys, the backend that answered and the request's id.
        """
        path = self.mktemp()
        yield self.proxy(
            path,
            [
                b"GET /a?b=c HTTP/1.1\r\nHost: balancer\r\nX-Request-ID: r-1\r\n"
                b"Connection: close\r\n\r\n",
                b"CONNECT x:1 HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n",
            ],
            accessLogFormat="json",
        )
        with open(path) as f:
            first, second = [json.loads(line) for line in f.read().splitlines()]
        self.assertEqual(
            sorted(first),
            sorted(
                ["time", "client", "method", "target", "protocol", "status", "bytes",
                 "duration_ms", "backend", "backend_status", "attempts", "request_id",
                 "pool"]
            ),
        )
        self.assertEqual(
            {k: first[k] for k in first if k not in ("time", "duration_ms")},
            {
                "client": "127.0.0.1", "method": "GET", "target": "/a?b=c",
                "protocol": "HTTP/1.1", "status": 200,
                "bytes": len(b"hello from the backend\n"), "backend": self.backendURL,
                "backend_status": 200, "attempts": 1, "request_id": "r-1",
                "pool": "default",
            },
        )
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertIsInstance(first["duration_ms"], float)
        self.assertGreaterEqual(first["duration_ms"], 0)
        self.assertEqual(
            (second["status"], second["backend"], second["backend_status"], second["attempts"]),
            (405, None, None, 0),
        )

    @inlineCallbacks
    def test_combinedLines(self):
        path = self.mktemp()
        responses = yield self.proxy(
            path,
            [
                b"GET /a?b=c HTTP/1.1\r\nHost: balancer\r\nReferer: http://ref.example/\r\n"
                b"User-Agent: test-agent/1.0\r\nConnection: close\r\n\r\n",
                b"HEAD /b HTTP/1.0\r\nHost: balancer\r\n\r\n",
            ],
        )
        self.assertEqual(
            [status for status, headers, body in responses],
            [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"],
        )
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2, lines)
        first = COMBINED.match(lines[0])
        self.assertIsNotNone(first, lines[0])
        self.assertEqual(
            first.group("request", "code", "length", "referer", "agent"),
            ("GET /a?b=c HTTP/1.1", "200", str(len(b"hello from the backend\n")),
             "http://ref.example/", "test-agent/1.0"),
        )
        second = COMBINED.match(lines[1])
        self.assertIsNotNone(second, lines[1])
        self.assertEqual(
            second.group("request", "code", "referer", "agent"),
            ("HEAD /b HTTP/1.0", "200", "-", "-"),
        )

    @inlineCallbacks
    def test_hostNotQuoted(self):
        """
        NCSA combined lines start with the bare client address, as log
        analysers (GoAccess, AWStats...) expect.
        """
        path = self.mktemp()
        yield self.proxy(path, [b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"])
        with open(path) as f:
            [line] = f.read().splitlines()
        self.assertTrue(line.startswith("127.0.0.1 - - ["), line)


    @inlineCallbacks
    def test_noAccessLog(self):
        """
        Without an access log, requests are logged nowhere: not in the
        legacy log file, not on standard output, not as log events.
        """
        from io import StringIO
        import sys

        from twisted.logger import globalLogPublisher

        legacy = StringIO()
        stdout = StringIO()
        self.patch(legacyLog, "logfile", legacy)
        self.patch(sys, "stdout", stdout)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        responses = yield self.proxy(
            None, [b"GET /quiet HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"]
        )
        self.assertEqual(responses[0][0], b"HTTP/1.1 200 OK")
        self.assertEqual(legacy.getvalue(), "")
        self.assertEqual(stdout.getvalue(), "")
        from twisted.logger import formatEvent

        self.assertEqual(
            [formatEvent(e) for e in events if "GET /quiet" in formatEvent(e)], []
        )

    @inlineCallbacks
    def test_stdout(self):
        import sys
        from io import StringIO

        stdout = StringIO()
        self.patch(sys, "stdout", stdout)
        yield self.proxy("-", [b"GET /out HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"])
        [line] = stdout.getvalue().splitlines()
        self.assertEqual(COMBINED.match(line).group("request"), "GET /out HTTP/1.1")


    @inlineCallbacks
    def test_requestFinishingDuringStopIsLogged(self):
        """
        A request still in flight when the stop begins is logged when it
        ends, like any other.
        """
        path = self.mktemp()
        backend = SlowBackend()
        backendPort = self.startBackend(backend)
        service = self.balancerFor(backendPort, accessLog=path)
        port = self.balancerPort(service)
        client = yield rawRequest(
            port, b"GET /late HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n"
        )
        yield backend.arrived
        listening = self.listeningPort(service.listeners[0])
        stopped = service.stopService()
        yield waitUntil(lambda: listening.disconnected, "the port to close")
        backend.answer()
        yield client.closed
        yield stopped
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(COMBINED.match(lines[0]).group("request"), "GET /late HTTP/1.1")
        # The log is closed once the stop is over.
        self.assertIsNone(service.site.accessLog._file)
        self.assertEqual(service.site.numPorts, 0)
