"""
Tests for L{rrbalancer._twisted}: each private Twisted name the balancer
relies on is still there and still means what the balancer takes it to
mean.  When a Twisted release changes one, this fails, naming it, instead
of the balancer misbehaving at run time.
"""

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.resource import Resource
from zope.interface.interface import InterfaceClass

from rrbalancer import _twisted


class Held(Resource):
    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


class PrivateNamesTests(SynchronousTestCase):
    def channel(self):
        channel = HTTPChannel()
        channel.site = Site(Held())
        channel.requestFactory = Request
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        return channel

    def test_trustRootInterface(self):
        """
        The interface C{trustRoot=} takes, with the one method a root of the
        balancer's own implements.
        """
        self.assertIsInstance(_twisted.IOpenSSLTrustRoot, InterfaceClass)
        self.assertIn("_addCACertsToContext", _twisted.IOpenSSLTrustRoot.names())

    def test_handlingRequest(self):
        channel = self.channel()
        self.assertFalse(_twisted.handlingRequest(channel))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(_twisted.handlingRequest(channel))

    def test_headSoFar(self):
        channel = self.channel()
        self.assertEqual(_twisted.headSoFar(channel), (0, 0))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n")
        size, count = _twisted.headSoFar(channel)
        self.assertEqual(size, len(b"GET / HTTP/1.1") + len(b"Host: x") + len(b"A: b"))
        # A header line counts once the next one shows it is not folded.
        self.assertEqual(count, 1)

    def test_takeBuffered(self):
        """
        Bytes read while a request is handled are held for the next one;
        taken, they are the channel's no more.
        """
        channel = self.channel()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nearly ")
        channel.dataReceived(b"bytes")
        self.assertEqual(_twisted.takeBuffered(channel), b"early bytes")
        self.assertEqual(_twisted.takeBuffered(channel), b"")
        channel.dataReceived(b"later")
        self.assertEqual(_twisted.takeBuffered(channel), b"later")

    def test_stopRereadingResolvConf(self):
        """
        A resolver made from resolv.conf arms a timer to read it again, and
        stopRereadingResolvConf takes it away for good.
        """
        from twisted.internet.task import Clock
        from twisted.names.client import Resolver

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        clock = Clock()
        resolver = Resolver(resolv=path, reactor=clock)
        [call] = clock.getDelayedCalls()
        _twisted.stopRereadingResolvConf(resolver)
        self.assertEqual(clock.getDelayedCalls(), [])
        resolver.maybeParseConfig()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(resolver.dynServers, [("127.0.0.1", 53)])

    def test_waitingForTransport(self):
        channel = self.channel()
        self.assertFalse(_twisted.waitingForTransport(channel))
        channel.pauseProducing()
        self.assertTrue(_twisted.waitingForTransport(channel))

    def test_tcpClientBuffers(self):
        """
        writeNow reads a TCP client transport's buffers and writes to its
        socket directly.
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.tcp import Client

        self.assertIs(_twisted._TCP_CLIENT, Client)
        for name in ("writeSomeData", "TLS", "connected", "disconnecting"):
            self.assertTrue(hasattr(Client, name), name)
        descriptor = FileDescriptor(reactor=MemoryReactorClock())
        self.assertEqual((descriptor.dataBuffer, descriptor._tempDataBuffer), (b"", []))

    def test_badRequestAnswer(self):
        """
        L{rrbalancer.site.BalancerChannel} overrides the method with which
        Twisted answers 400 to bytes it cannot parse, and closes.
        """
        channel = self.channel()
        channel._respondToBadRequestAndDisconnect()
        self.assertEqual(channel.transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(channel.transport.disconnecting)
