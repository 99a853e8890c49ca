"""
The balancer inside someone else's twisted.web site: L{Balancer.resource}
and L{BackendProxyResource} mounted in a stock L{Site}, beside the site's
own resources.

L{ReverseProxyTargetTests} ports the scenarios of Twisted's own
C{twisted.web.test.test_proxy.ReverseProxyResourceTests} and runs each on
the stock L{ReverseProxyResource} and on ours, asserting what reaches the
backend: the same request target and C{Host} from both.
"""

import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.threads import deferToThread
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from twisted.web.test.requesthelper import DummyRequest

from rrbalancer import BackendProxyResource, Balancer
from rrbalancer.interfaces import IPicker
from rrbalancer.proxy import BalancerResource
from zope.interface import implementer

from .support import Net, ScriptedBackend, connectClient, exchange, get, ok

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backendRequest(resourceClass, uri: bytes):
    """
    Mount C{resourceClass("127.0.0.1", 1234, b"/path", reactor)} at
    C{/index} of a stock site on a memory reactor, send C{GET uri}, let the
    backend connection open, and return what the backend receives: its
    request line's target and its C{Host}.
    """
    memory = MemoryReactorClock()
    root = Resource()
    root.putChild(b"index", resourceClass("127.0.0.1", 1234, b"/path", memory))
    site = Site(root)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET " + uri + b" HTTP/1.1\r\nAccept: text/html\r\n\r\n")
    [(host, port, factory, _, _)] = memory.tcpClients
    assert (host, port) == ("127.0.0.1", 1234)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    backend = StringTransport()
    protocol.makeConnection(backend)
    head = backend.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    hosts = [line.split(b":", 1)[1].strip() for line in head[1:] if line.lower().startswith(b"host:")]
    channel.connectionLost(Failure(ConnectionDone()))
    return head[0].split(b" ")[1], hosts


class ReverseProxyTargetTests(unittest.SynchronousTestCase):
    """
    Twisted's scenarios, on both classes.
    """

    classes = [ReverseProxyResource, BackendProxyResource]

    def assertTarget(self, uri, expected):
        for cls in self.classes:
            target, hosts = backendRequest(cls, uri)
            self.assertEqual(target, expected, cls.__name__)
            self.assertEqual(hosts, [b"127.0.0.1:1234"], cls.__name__)

    def test_render(self):
        self.assertTarget(b"/index", b"/path")

    def test_renderSubpage(self):
        self.assertTarget(b"/index/page1", b"/path/page1")

    def test_renderWithQuery(self):
        self.assertTarget(b"/index?foo=bar", b"/path?foo=bar")

    def test_renderQuotedSegment(self):
        self.assertTarget(b"/index/page%201", b"/path/page%201")

    def test_getChild(self):
        for cls in self.classes:
            memory = MemoryReactorClock()
            resource = cls("127.0.0.1", 1234, b"/path", memory)
            child = resource.getChild(b"foo", None)
            self.assertIsInstance(child, cls)
            self.assertEqual(child.path, b"/path/foo")
            self.assertEqual(child.port, 1234)
            self.assertEqual(child.host, "127.0.0.1")
            self.assertIdentical(child.reactor, resource.reactor)

    def test_getChildWithSpecial(self):
        for cls in self.classes:
            resource = cls("127.0.0.1", 1234, b"/path", MemoryReactorClock())
            child = resource.getChild(b" /%", None)
            self.assertEqual(child.path, b"/path/%20%2F%25")

    def test_childrenShareConnections(self):
        """
        Ours, unlike the stock class, keeps connections alive: every child
        uses its parent's pool.
        """
        resource = BackendProxyResource("127.0.0.1", 1234, b"/path", MemoryReactorClock())
        self.assertIs(resource.getChild(b"a", None).getChild(b"b", None).pool, resource.pool)


@implementer(IPicker)
class Broken:
    def pick(self, exclude=(), request=None):
        raise RuntimeError("picker broke")


class NeverHangTests(unittest.SynchronousTestCase):
    def test_errorWhileRenderingIs500(self):
        """
        A failure while rendering answers 500 and logs one error; the
        request is finished, not left hanging.
        """
        request = DummyRequest([b"x"])
        request.uri = b"/x"
        result = BalancerResource(Broken()).render(request)
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(request.finished, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsInstance(result, int)

    def test_dummyRequestRefused(self):
        """
        Rendered with Twisted's test request (no channel, no transport), a
        backend that cannot be reached is a 502.
        """
        from twisted.internet.error import ConnectionRefusedError

        memory = MemoryReactorClock()
        resource = BackendProxyResource("127.0.0.1", 1234, b"/p", memory)
        request = DummyRequest([])
        request.uri = b"/p"
        resource.render(request)
        [(_, _, factory, _, _)] = memory.tcpClients
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(request.responseCode, 502)
        self.assertEqual(request.finished, 1)


def echoTarget(connection, request):
    """
    Answers with the target and the forwarding prefix it received.
    """
    body = request.target + b" " + b",".join(request.header(b"x-forwarded-prefix"))
    connection.write(ok(body))


def redirect(location: bytes):
    def handler(connection, request):
        connection.write(
            b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location
        )

    return handler


class MountedBalancerTests(unittest.TestCase):
    """
    L{Balancer.resource} under C{/api} of a user's stock site, on real
    sockets.
    """

    timeout = 15

    def setUp(self):
        self.net = Net(self)

    def site(self, *handlers, **settings):
        backends = [ScriptedBackend(self.net, h) for h in handlers]
        settings.setdefault("health", {"enabled": False})
        balancer = Balancer([b.url for b in backends], reactor, **settings)
        self.net.addService(balancer)
        balancer.startService()
        self.balancer = balancer
        root = Resource()
        root.putChild(b"api", balancer.resource())
        root.putChild(b"local", Data(b"served here\n", "text/plain"))
        site = Site(root)
        site.noisy = False
        self.net.trackFactory(site)
        return backends, self.net.listen(site)

    @inlineCallbacks
    def test_restOfPathAlternates(self):
        """
        C{/api/echo?q=1} reaches the backends as C{/echo?q=1}, in turn, with
        C{X-Forwarded-Prefix: /api}; C{/local} is the site's own.
        """
        (a, b), port = self.site(echoTarget, echoTarget)
        for _ in range(2):
            response = yield exchange(self.net, port, get(b"/api/echo?q=1"))
            self.assertEqual(response.body, b"/echo?q=1 /api")
        self.assertEqual([len(a.requests), len(b.requests)], [1, 1])
        response = yield exchange(self.net, port, get(b"/local"))
        self.assertEqual(response.body, b"served here\n")
        response = yield exchange(self.net, port, get(b"/api"))
        self.assertEqual(response.body, b"/ /api")

    @inlineCallbacks
    def test_redirectsComeBackUnderThePrefix(self):
        """
        A backend's redirect to its own C{/landing}, as a URL or a path,
        comes back as C{/api/landing}.
        """
        (backend,), port = self.site(redirect(b"/landing"))
        response = yield exchange(self.net, port, get(b"/api/x"))
        self.assertEqual(response.header(b"location"), [b"/api/landing"])
        (backend,), port = self.site(lambda c, r: None)
        backend.handler = redirect(backend.url.encode("ascii") + b"/landing")
        response = yield exchange(self.net, port, get(b"/api/x"))
        self.assertEqual(
            response.header(b"location"), [b"http://balancer.example/api/landing"]
        )

    @inlineCallbacks
    def test_stoppingClosesConnections(self):
        """
        Stopping the balancer closes its kept connections to the backends.
        """
        (backend,), port = self.site(echoTarget)
        yield exchange(self.net, port, get(b"/api/a"))
        self.assertEqual(len(backend.connections), 1)
        yield self.balancer.stopService()
        yield backend.waitForAllClosed()


class BackendProxyResourceTests(unittest.TestCase):
    """
    Our L{ReverseProxyResource} on its own, with the stock constructor, in
    a stock site on real sockets.
    """

    timeout = 15

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def test_stockContract(self):
        backend = ScriptedBackend(self.net, echoTarget)
        root = Resource()
        root.putChild(
            b"x", BackendProxyResource("127.0.0.1", backend.port, b"/echo", reactor=reactor)
        )
        site = Site(root)
        self.net.trackFactory(site)
        port = self.net.listen(site)
        client = yield connectClient(self.net, port)
        for sent, received in [
            (b"/x/sub?foo=bar", b"/echo/sub?foo=bar "),
            (b"/x/page%201", b"/echo/page%201 "),
            (b"/x", b"/echo "),
        ]:
            client.send(get(sent))
            response = yield client.readResponse()
            self.assertEqual(response.body, received)
        self.assertEqual(len(backend.connections), 1, "one kept connection")
        root.children[b"x"].pool.closeIdle()


class ExampleTests(unittest.TestCase):
    """
    The README's embedding example runs.
    """

    timeout = 30

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def test_example(self):
        backend = ScriptedBackend(self.net, echoTarget)
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPOSITORY, "examples", "embed.py"), "--port=0", backend.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=REPOSITORY),
            text=True,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        line = yield deferToThread(process.stdout.readline)
        self.assertTrue(line.startswith("listening on http://127.0.0.1:"), line)
        port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        response = yield exchange(self.net, port, get(b"/api/hello?x=1"))
        self.assertEqual(response.body, b"/hello?x=1 /api")
        response = yield exchange(self.net, port, get(b"/"))
        self.assertEqual(response.body, b"served by the site itself\n")

