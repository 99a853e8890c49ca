"""
Tests for L{rrbalancer.site}: limits on the request head, in-flight
counting.
"""

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.site import BalancerSite
from rrbalancer.tunnel import Tunnel

from .support import Held


def timersStarted(channel) -> list:
    """
    The delays of the timers C{channel} starts from now on, as it starts
    them.
    """
    started = []
    callLater = channel.callLater

    def countingCallLater(delay, f, *a, **kw):
        started.append(delay)
        return callLater(delay, f, *a, **kw)

    channel.callLater = countingCallLater
    return started


class ChannelTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.resource = Held()
        self.site = BalancerSite(
            self.resource, self.reactor, headerTimeout=10, bodyTimeout=20, timeout=60
        )
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def connect(self):
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_slowHeadGets408(self):
        """
        A head trickling in a byte at a time is cut off once the header
        timeout has passed since its first byte, though bytes keep coming.
        """
        channel, transport = self.connect()
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
        for byte in head:
            channel.dataReceived(bytes([byte]))
            self.reactor.advance(0.3)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_prompt(self):
        """
        A whole head in time is served, and the head timer does not fire
        later on the request in progress.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.reactor.advance(30)
        self.assertEqual(len(self.resource.requests), 1)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_wholeHeadNoTimer(self):
        """
        A head that comes whole in one read starts no head timer at all,
        and an idle kept-alive connection has none either: only a head
        still partial after a read has one (one timer a request otherwise,
        and with many backends the reactor keeps cancelled timers a while).
        """
        channel, transport = self.connect()
        started = timersStarted(channel)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        request = self.resource.requests[0]
        request.write(b"ok")
        request.finish()
        channel.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(10, started)
        channel.dataReceived(b"GE")
        self.assertNotIn(10, started)
        self.resource.requests[1].finish()
        channel.dataReceived(b"GE")
        self.assertEqual(started.count(10), 1)

    def test_idleTimerKept(self):
        """
        The idle timer is made once for a kept-alive connection, not once
        a request: handing a request on leaves it running, and its
        response's end moves it on.
        """
        channel, transport = self.connect()
        started = timersStarted(channel)
        for n in range(3):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.resource.requests[n].finish()
            self.reactor.advance(30)
        self.assertEqual(started, [])
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_longRequestNotIdle(self):
        """
        A request in hand for longer than the idle timeout is not cut off
        by the idle timer left running; the connection is idle again, for
        the whole timeout, once its response is done.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.reactor.advance(100)
        self.assertFalse(transport.disconnecting)
        self.resource.requests[0].finish()
        self.reactor.advance(59)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_idleTimerGoneWithConnection(self):
        """
        A connection lost while a request is in hand leaves no timer behind
        (it would hold the channel until it fired).
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_partialLineStartsTimer(self):
        """
        Part of a request line, with no whole line yet, is a head begun:
        it is cut off at the header timeout.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HT")
        self.reactor.advance(10)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))

    def test_timerRestartsPerRequest(self):
        """
        On a kept-alive connection, each request gets the full time for its
        head, counted from its own first byte.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        request = self.resource.requests[0]
        request.write(b"ok")
        request.finish()
        self.reactor.advance(9)
        channel.dataReceived(b"GET /2 HTTP/1.1\r\n")
        self.reactor.advance(9)
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(len(self.resource.requests), 2)
        self.assertNotIn(b"408", transport.value())

    def test_hugeHeadGets431(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_tooManyHeadersGets431(self):
        channel, transport = self.connect()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(channel.maxHeaders + 1))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertEqual(self.resource.requests, [])

    def test_inFlight(self):
        """
        A request counts as in flight from its arrival to its end, and
        whenIdle fires when none is left.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.site.inFlight, 1)
        idle = self.site.whenIdle()
        self.assertNoResult(idle)
        self.resource.requests[0].finish()
        self.assertEqual(self.site.inFlight, 0)
        self.successResultOf(idle)

    def test_tunnelsHoldIdle(self):
        """
        An open tunnel keeps the site from being idle (a stop waits for
        it), until both its connections are gone.
        """
        tunnel = Tunnel(self.reactor, 60.0)
        self.site.tunnelOpened(tunnel)
        idle = self.site.whenIdle()
        self.assertNoResult(idle)
        tunnel.start(StringTransport(), StringTransport())
        tunnel.client.connectionLost(None)
        self.assertNoResult(idle)
        tunnel.backend.connectionLost(None)
        self.successResultOf(idle)
        self.assertEqual(self.site.tunnels, set())

    def test_switchProtocols(self):
        """
        A request answered with a 101 ends there: the head written as it
        is given, logged, no longer in flight, out of its channel; the
        channel's bytes then go to the tunnel's end, those it held first.
        """
        logged = []
        self.site.log = logged.append
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nearly")
        [request] = self.resource.requests
        request.setResponseCode(101)
        finished = request.notifyFinish()
        self.assertIs(request.switchProtocols(b"HTTP/1.1 101 X\r\n\r\n"), channel)
        self.assertEqual(transport.value(), b"HTTP/1.1 101 X\r\n\r\n")
        self.assertEqual(logged, [request])
        self.assertEqual(self.site.inFlight, 0)
        self.assertEqual(channel.requests, [])
        self.successResultOf(finished)
        tunnel = Tunnel(self.reactor, 60.0)
        self.assertEqual(channel.startTunnel(tunnel.client), b"early")
        self.assertIs(channel.tunnel, tunnel.client)
        got = []
        tunnel.client.dataReceived = got.append
        channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(got, [b"GET / HTTP/1.1\r\n\r\n"])
        self.assertEqual(len(self.resource.requests), 1)
        # Idle for longer than the connection's timeout: a tunnel has its
        # own.
        self.reactor.advance(120)
        self.assertFalse(transport.disconnecting)

    def test_inFlightClientGone(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(Exception("gone"))
        self.assertEqual(self.site.inFlight, 0)

    def test_noTimeoutAfterBadRequest(self):
        """
        A connection already closing (here after a 400 for a bad request
        line) gets no 408 on top when the head timer would have fired.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"BAD REQUEST LINE WITH TOO MANY PARTS HTTP/1.1\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.reactor.advance(30)
        self.assertNotIn(b"408", transport.value())

    def test_slowBodyIsNotAHead(self):
        """
        A body trickling in one byte a second for longer than the header
        timeout reaches the resource whole: the head timer is for heads.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n")
        for byte in b"abcdefghijklmn":
            self.reactor.advance(1)
            channel.dataReceived(bytes([byte]))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.resource.requests), 1)
        self.assertEqual(self.resource.requests[0].content.read(), b"abcdefghijklmn")

    def test_slowChunkedBody(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for piece in [b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\n"] * 1:
            self.reactor.advance(15)
            channel.dataReceived(piece)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.resource.requests[0].content.read(), b"abcde")

    def test_stalledBodyGets408(self):
        """
        A body that pauses for longer than the body timeout is answered 408
        and the connection closed; it never reaches the resource.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        self.reactor.advance(19)
        channel.dataReceived(b"cd")
        self.reactor.advance(19)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_noStray408AfterLateBody(self):
        """
        After a request whose body came a moment after its head, the idle
        kept-alive connection is never written to: no timer left over from
        the request fires on it.  It is closed silently once idle too long.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        self.reactor.advance(0.5)
        channel.dataReceived(b"ok")
        request = self.resource.requests[0]
        request.setHeader(b"content-length", b"2")
        request.write(b"hi")
        request.finish()
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.reactor.advance(59)
        self.assertEqual(transport.value(), answer)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(2)
        self.assertEqual(transport.value(), answer)
        self.assertTrue(transport.disconnecting)

    def test_idleTimeoutDuringBodyIsTheBodyTimeout(self):
        """
        While a body is read, the connection's idle timeout gives way to the
        body timeout, and comes back for the wait for the next request.
        """
        self.site.bodyTimeout = 90
        channel, transport = self.connect()
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        self.reactor.advance(80)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"ok")
        self.assertEqual(len(self.resource.requests), 1)

    def test_shedsPastMaxInFlight(self):
        """
        Past max_in_flight requests in flight, a new one is answered 503
        with Retry-After at once, and counted.
        """
        self.site.maxInFlight = 1
        first, _ = self.connect()
        first.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        second, transport = self.connect()
        second.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"Retry-After: 1", transport.value())
        self.assertEqual((len(self.resource.requests), self.site.shed), (1, 1))
        self.resource.requests[0].finish()
        third, transport = self.connect()
        third.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.resource.requests), 2)


class _CountingTransport(StringTransport):
    """
    A transport that keeps each call that wrote to it.
    """

    def __init__(self) -> None:
        StringTransport.__init__(self)
        self.calls = []

    def write(self, data):
        self.calls.append(data)
        StringTransport.write(self, data)

    def writeSequence(self, seq):
        self.calls.append(b"".join(seq))
        StringTransport.write(self, b"".join(seq))


class HeldWritesTests(SynchronousTestCase):
    """
    L{BalancerChannel.holdWrites}: a response written while writes are held
    leaves in one write, when the request is done, as it would have left
    in several.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.resource = Held()
        self.site = BalancerSite(self.resource, self.reactor, timeout=60)
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def request(self, data=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        channel = self.site.buildProtocol(None)
        transport = _CountingTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return channel, transport, self.resource.requests[-1]

    def answer(self, request, body=b"hello"):
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()

    def test_oneWriteWhenDone(self):
        unheld, unheldTransport, request = self.request()
        self.answer(request)
        channel, transport, request = self.request()
        channel.holdWrites()
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-length", [b"5"])
        request.write(b"hello")
        self.assertEqual(transport.calls, [])
        request.finish()
        self.assertEqual(transport.calls, [unheldTransport.value()])
        self.assertGreater(len(unheldTransport.calls), 1)

    def test_chunkedEndHeldToo(self):
        """
        The last chunk, which Twisted writes as the request finishes, is
        part of the one write.
        """
        channel, transport, request = self.request()
        channel.holdWrites()
        request.write(b"abc")
        request.finish()
        self.assertEqual(len(transport.calls), 1)
        self.assertTrue(transport.value().endswith(b"\r\n3\r\nabc\r\n0\r\n\r\n"))

    def test_sendHeld(self):
        """
        sendHeld sends what was held, and later writes go straight on.
        """
        channel, transport, request = self.request()
        channel.holdWrites()
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-length", [b"10"])
        request.write(b"hello")
        channel.sendHeld()
        self.assertEqual(len(transport.calls), 1)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))
        request.write(b"world")
        self.assertEqual(transport.calls[1:], [b"world"])
        channel.sendHeld()
        self.assertEqual(len(transport.calls), 2)

    def test_sentBeforeClose(self):
        """
        A connection that closes after its response sends it first.
        """
        channel, transport, request = self.request(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        channel.holdWrites()
        self.answer(request)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))
        self.assertEqual(len(transport.calls), 1)

    def test_pipelinedInOrder(self):
        """
        The next pipelined request is read only after the held response is
        sent: its answer (here a 400) comes after it.
        """
        channel, transport, request = self.request(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n"
        )
        channel.holdWrites()
        self.answer(request)
        first, rest = transport.value().split(b"hello", 1)
        self.assertTrue(first.startswith(b"HTTP/1.1 200 "))
        self.assertTrue(rest.startswith(b"HTTP/1.1 400 "))
