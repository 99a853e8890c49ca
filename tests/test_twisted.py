"""
Tests for L{rrbalancer._twisted}: each private Twisted name the balancer
relies on is still there and still means what the balancer takes it to
mean.  When a Twisted release changes one, this fails, naming it, instead
of the balancer misbehaving at run time.
"""

import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import AccumulatingProtocol, MemoryReactorClock, StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from zope.interface.interface import InterfaceClass

from rrbalancer import _twisted

from .support import Held, Net
from .test_admin import poll



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

    def test_leaveFormsUnparsed(self):
        """
        A request told so before its body is handed on leaves a form body
        unparsed, however it is written, and still reads its query.
        """
        for contentType, body in (
            (b"application/x-www-form-urlencoded", b"a=1&b=2"),
            (b"multipart/form-data", b"no boundary"),
        ):
            channel = self.channel()
            seen = []

            class Told(Request):
                def requestReceived(self, command, path, version):
                    _twisted.leaveFormsUnparsed(self)
                    Request.requestReceived(self, command, path, version)

                def process(self):
                    seen.append((self.args, self.content.read()))
                    self.finish()

            channel.requestFactory = Told
            channel.dataReceived(
                b"POST /?q=1 HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (contentType, len(body), body)
            )
            self.assertEqual(seen, [({b"q": [b"1"]}, body)], contentType)

    def test_headSoFar(self):
        channel = self.channel()
        self.assertEqual(_twisted.headSoFar(channel), (0, 0))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n")
        size, count = _twisted.headSoFar(channel)
        self.assertEqual(size, len(b"GET / HTTP/1.1") + len(b"Host: x") + len(b"A: b"))
        # A header line counts once the next one shows it is not folded.
        self.assertEqual(count, 1)

    def test_headBegun(self):
        """
        Part of a line, or a whole line, of a head is a head begun; a head
        read whole and handed on is not.
        """
        channel = self.channel()
        self.assertFalse(_twisted.headBegun(channel))
        channel.dataReceived(b"GE")
        self.assertTrue(_twisted.headBegun(channel))
        channel.dataReceived(b"T / HTTP/1.1\r\n")
        self.assertTrue(_twisted.headBegun(channel))
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertFalse(_twisted.headBegun(channel))

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
        writeNow reads a TCP transport's buffers (a client's, and an
        accepted connection's) and writes to its socket directly (the
        C{socket} each instance has is checked on a real connection, in
        C{tests.test_client.WriteNowTests}).
        """
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.tcp import Client, Server

        self.assertIs(_twisted._TCP_CLIENT, Client)
        self.assertEqual(_twisted._TCP_TRANSPORTS, (Client, Server))
        for name in ("TLS", "connected", "disconnecting"):
            for kind in (Client, Server):
                self.assertTrue(hasattr(kind, name), name)
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


class HTTP2NamesTests(SynchronousTestCase):
    """
    The names of Twisted's HTTP/2 server that L{rrbalancer.http2} relies
    on: the handlers it overrides are the ones a connection calls, and its
    helpers reach what they say.
    """

    def setUp(self):
        import h2.config
        import h2.connection

        self.clock = Clock()
        self.connection = _twisted.H2Connection(self.clock)
        self.connection.site = Site(Held())
        self.connection.requestFactory = Request
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.addCleanup(self.connection.connectionLost, None)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()

    def send(self):
        self.connection.dataReceived(self.client.data_to_send())
        self.clock.advance(0)

    def request(self, end=True):
        stream = self.client.get_next_available_stream_id()
        self.client.send_headers(
            stream,
            [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"),
             (b":authority", b"x")],
            end_stream=end,
        )
        self.send()
        return stream

    def test_streamHandlers(self):
        seen = []
        connection = self.connection
        connection._requestReceived = lambda e: seen.append(("new", e.stream_id))
        connection._requestDataReceived = lambda e: seen.append(("data", e.stream_id))
        connection._requestEnded = lambda e: seen.append(("end", e.stream_id))
        connection._requestAborted = lambda e: seen.append(("reset", e.stream_id))
        stream = self.request(end=False)
        self.client.send_data(stream, b"x", end_stream=True)
        self.send()
        other = self.request(end=False)
        self.client.reset_stream(other)
        self.send()
        self.assertEqual(
            seen,
            [("new", stream), ("data", stream), ("end", stream), ("new", other),
             ("reset", other)],
        )

    def test_requestDoneForgetsStream(self):
        done = []
        original = self.connection._requestDone

        def requestDone(streamID):
            done.append(streamID)
            original(streamID)

        self.connection._requestDone = requestDone
        stream = self.request()
        request = self.connection.site.resource.requests[0]
        self.assertIs(_twisted.streamConnection(request.channel), self.connection)
        self.assertIn(stream, self.connection.streams)
        request.finish()
        for _ in range(5):
            self.clock.advance(0)
        self.assertEqual(done, [stream])
        self.assertNotIn(stream, self.connection.streams)

    def test_streamFlowControl(self):
        """
        The stream methods that pause and resume a stream's producer.
        """
        self.request()
        stream = self.connection.site.resource.requests[0].channel
        for name in ("flowControlBlocked", "windowUpdated", "streamID"):
            self.assertTrue(hasattr(stream, name), name)

    def test_writeControlData(self):
        self.transport.clear()
        self.connection.conn.ping(b"12345678")
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(_twisted.h2WriteControlData(self.connection))
        self.assertIn(b"12345678", self.transport.value())

    def test_connectionLostSignature(self):
        import inspect

        parameters = inspect.signature(_twisted.H2Connection.connectionLost).parameters
        self.assertEqual(list(parameters), ["self", "reason", "_cancelTimeouts"])

    def test_sslContextFactory(self):
        from twisted.internet.endpoints import SSL4ServerEndpoint

        factory = object()
        endpoint = SSL4ServerEndpoint(MemoryReactorClock(), 0, factory)
        self.assertIs(_twisted.sslContextFactory(endpoint), factory)


@inlineCallbacks
def connectedPair(case):
    """
    Two L{AccumulatingProtocol}s connected over loopback TCP, the client
    through an endpoint; each has a C{closedDeferred}.
    """
    net = Net(case)
    server = AccumulatingProtocol()
    server.closedDeferred = Deferred()
    factory = Factory.forProtocol(lambda: server)
    factory.protocolConnectionMade = None
    port = net.listen(factory)
    client = AccumulatingProtocol()
    client.closedDeferred = Deferred()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    yield poll(lambda: server.transport is not None)
    return client, server


class ReadIntoOneBufferTests(TestCase):
    """
    L{_twisted.readIntoOneBuffer} on real TCP connections: what is sent
    arrives whole, in order, on both ends, and an end closing is seen as
    Twisted's own reads see it.
    """

    timeout = 10

    @inlineCallbacks
    def test_bothEnds(self):
        client, server = yield connectedPair(self)
        clientClosed, serverClosed = client.closedDeferred, server.closedDeferred
        for end in (client, server):
            self.assertTrue(_twisted.readIntoOneBuffer(end.transport))
        # More than one read's worth, so that the buffer is reused.
        big = bytes(range(256)) * 1024
        client.transport.write(big)
        server.transport.write(b"hello")
        yield poll(lambda: len(server.data) == len(big) and client.data == b"hello")
        self.assertEqual(server.data, big)
        client.transport.loseConnection()
        yield serverClosed
        yield clientClosed
        self.assertTrue(server.closedReason.check(ConnectionDone))

    def test_notTCP(self):
        """
        A transport that is not a TCP connection, nor over one, is left
        as it is.
        """
        self.assertFalse(_twisted.readIntoOneBuffer(StringTransport()))

    def test_privateNames(self):
        from twisted.internet.tcp import Client, Server

        for kind in (Client, Server):
            self.assertTrue(callable(getattr(kind, "_dataReceived", None)), kind)
            self.assertEqual(kind.bufferSize, len(_twisted._readBuffer))


class ReadDirectTests(TestCase):
    """
    L{_twisted.readDirect} (and L{_twisted.readIntoOneBuffer} given a
    receiver) on real TCP connections made through an endpoint: what is
    read reaches the protocol without the endpoint's wrapper, and the
    end is seen as Twisted's own reads see it.
    """

    timeout = 10

    @inlineCallbacks
    def connected(self, read):
        client, server = yield connectedPair(self)
        clientClosed = client.closedDeferred
        wrapper = client.transport.protocol
        self.assertIsNot(wrapper, client)
        wrapped = []
        wrapper.dataReceived = wrapped.append
        self.assertTrue(read(client.transport, client.dataReceived))
        big = bytes(range(256)) * 1024
        server.transport.write(big)
        yield poll(lambda: len(client.data) == len(big))
        self.assertEqual((client.data, wrapped), (big, []))
        server.transport.loseConnection()
        yield clientClosed
        self.assertTrue(client.closedReason.check(ConnectionDone))

    def test_direct(self):
        return self.connected(_twisted.readDirect)

    def test_oneBuffer(self):
        return self.connected(_twisted.readIntoOneBuffer)

    def test_notTCP(self):
        self.assertFalse(_twisted.readDirect(StringTransport(), lambda data: None))


class ReadStampedTests(TestCase):
    """
    L{_twisted.readStamped} on real TCP connections: each read is handed
    on whole, after the kernel's stamp of when its bytes arrived, which is
    not when the balancer got round to reading them.
    """

    timeout = 10

    @inlineCallbacks
    def test_arrivalNotRead(self):
        if not sys.platform.startswith("linux"):
            raise SkipTest("SO_TIMESTAMPNS is Linux's")
        net = Net(self)
        server = AccumulatingProtocol()
        factory = Factory.forProtocol(lambda: server)
        factory.protocolConnectionMade = None
        port = net.listen(factory)
        client = AccumulatingProtocol()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        yield poll(lambda: server.transport is not None)
        stamps = []
        read = []
        dataReceived = server.dataReceived

        def received(data):
            read.append(time.time())
            dataReceived(data)

        server.dataReceived = received
        self.assertTrue(_twisted.readStamped(server.transport, stamps.append))
        # Linux starts stamping a moment after the first socket asks (the
        # reads before that have no stamp): a few bytes until one has.
        sent = 0
        while not stamps:
            self.assertLess(sent, 500, "no read was ever stamped")
            client.transport.write(b".")
            sent += 1
            yield poll(lambda: len(server.data) == sent)
        del stamps[:], read[:]
        server.transport.stopReading()
        before = time.time()
        client.transport.socket.send(b"hello")
        after = time.time()
        # The bytes wait in the kernel a tenth of a second before they are
        # read: their stamp is their arrival.
        yield deferLater(reactor, 0.1, lambda: None)
        server.transport.startReading()
        yield poll(lambda: server.data.endswith(b"hello"))
        [stamp] = stamps
        self.assertTrue(before - 0.001 <= stamp <= after + 0.05, (before, stamp, after))
        self.assertGreaterEqual(read[0] - stamp, 0.05)
        # A close is seen as a close.
        server.closedDeferred = closed = Deferred()
        client.transport.loseConnection()
        yield closed
        self.assertTrue(server.closedReason.check(ConnectionDone))

    def test_notTCP(self):
        self.assertFalse(_twisted.readStamped(StringTransport(), lambda when: None))
