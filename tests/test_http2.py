"""
Tests for L{rrbalancer.http2}: HTTP/2 on TLS ports.

In memory, an HTTP/2 client's state machine (the C{h2} package) talks to a
site's channel on a L{StringTransport} that says it negotiated C{h2}, with
the clock moved by hand; on real sockets, curl and h2load talk to a
balancer's C{tls:} port in front of a real backend.
"""

import hashlib
import os
import shutil
import socket

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet.address import IPv4Address
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from rrbalancer import http2, proxy
from rrbalancer.site import BalancerSite
from rrbalancer.tls import CertificateStore

from .support import Held, Net, ScriptedBackend, ok, startBalancer, withTimeout
from .test_tls import CA, writePair

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """
    A transport on which ALPN chose C{negotiatedProtocol}.
    """

    negotiatedProtocol = b"h2"

    def __init__(self):
        StringTransport.__init__(
            self,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
        )

    def getPeerCertificate(self):
        return None

    def setTcpNoDelay(self, enabled):
        self.noDelay = enabled


def _frames(data):
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames



@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.paused = 0
        self.resumed = 0
        self.stopped = False

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1

    def stopProducing(self):
        self.stopped = True


class Client:
    """
    An HTTP/2 client connection to C{site}, in memory.
    """

    def __init__(self, testCase, site, clock, **config):
        self.clock = clock
        self.transport = TLSTransport()
        self.channel = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)
        config.setdefault("header_encoding", None)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, **config)
        )
        self.h2.initiate_connection()
        self.events = []
        self.pump()
        testCase.addCleanup(self.close)

    def pump(self):
        """
        Send what the client has to send, let the server's sending loop
        run, and read what it sent.
        """
        for _ in range(100):
            out = self.h2.data_to_send()
            if out:
                self.channel.dataReceived(out)
            self.clock.advance(0)
            data = self.transport.value()
            self.transport.clear()
            if data:
                self.events.extend(self.h2.receive_data(data))
            if not out and not data:
                break

    def request(self, method=b"GET", path=b"/", headers=(), body=None, end=True):
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream,
            [(b":method", method), (b":path", path), (b":scheme", b"https"),
             (b":authority", b"balancer.example")] + list(headers),
            end_stream=body is None and end,
        )
        if body is not None:
            self.h2.send_data(stream, body, end_stream=end)
        self.pump()
        return stream

    def of(self, stream, kind):
        return [e for e in self.events if isinstance(e, kind) and getattr(e, "stream_id", stream) == stream]

    def status(self, stream):
        for event in self.of(stream, h2.events.ResponseReceived):
            return dict(event.headers)[b":status"]
        return None

    def body(self, stream):
        return b"".join(e.data for e in self.of(stream, h2.events.DataReceived))

    def ended(self, stream):
        return bool(self.of(stream, h2.events.StreamEnded))

    def close(self):
        if self.transport.connected:
            self.channel.connectionLost(None)


class MemoryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.resource = Held()
        self.site = BalancerSite(self.resource, self.clock, maxConcurrentStreams=7)
        self.client = Client(self, self.site, self.clock)

    def answer(self, request, code=200, body=b"ok"):
        request.setResponseCode(code)
        request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(body)
        request.finish()
        self.client.pump()

    def test_settings(self):
        """
        The connection preface announces the bound on concurrent streams.
        """
        changed = self.client.of(None, h2.events.RemoteSettingsChanged)
        self.assertTrue(changed)
        self.assertEqual(self.client.h2.remote_settings.max_concurrent_streams, 7)
        self.assertIsNotNone(self.client.channel.http2)

    def test_requestOfAStream(self):
        """
        A stream is one of the site's requests: the request line from the
        pseudo-headers, C{:authority} as C{Host}, secure, HTTP/2; cookies
        sent as several fields become one.
        """
        stream = self.client.request(
            path=b"/a?b=c",
            headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-thing", b"y")],
        )
        [request] = self.resource.requests
        self.assertEqual(
            (request.method, request.uri, request.clientproto),
            (b"GET", b"/a?b=c", b"HTTP/2"),
        )
        self.assertEqual(request.requestHeaders.getRawHeaders(b"host"), [b"balancer.example"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"cookie"), [b"a=1; b=2"])
        self.assertTrue(request.isSecure())
        self.assertEqual(self.site.inFlight, 1)
        self.answer(request, body=b"hello")
        self.assertEqual((self.client.status(stream), self.client.body(stream)), (b"200", b"hello"))
        self.assertTrue(self.client.ended(stream))
        self.assertEqual(self.site.inFlight, 0)

    def test_authorityAndHost(self):
        """
        A C{Host} field beside C{:authority} names the same (the h2 package
        refuses a request in which they differ): the backend gets one.
        """
        stream = self.client.request(headers=[(b"host", b"balancer.example")])
        [request] = self.resource.requests
        self.assertEqual(request.requestHeaders.getRawHeaders(b"host"), [b"balancer.example"])
        self.answer(request)
        self.assertEqual(self.client.status(stream), b"200")

    def test_authorityAndHostDiffer(self):
        """
        Were a C{Host} that names another than C{:authority} to get through
        (the h2 package refuses it first), the request would not be
        forwarded.
        """
        self.client.request()
        [request] = self.resource.requests
        request.requestHeaders.addRawHeader(b"host", b"other.example")
        self.assertEqual(request._http2Head(), b"Bad Request: :authority and Host differ")

    def test_declaredBodyTooLarge(self):
        """
        A body declared over the limit is answered 413 on its stream before
        it is sent; the rest the client sends anyway is acknowledged and it
        is asked to stop (RST_STREAM, NO_ERROR); the connection goes on.
        """
        self.site.maxBodySize = 10
        stream = self.client.request(
            method=b"POST", headers=[(b"content-length", b"100")], body=b"x" * 50, end=False
        )
        self.assertEqual(self.client.status(stream), b"413")
        self.assertTrue(self.client.ended(stream))
        self.client.h2.send_data(stream, b"y" * 50)
        self.client.pump()
        resets = self.client.of(stream, h2.events.StreamReset)
        self.assertEqual([r.error_code for r in resets], [h2.errors.ErrorCodes.NO_ERROR])
        self.assertEqual(self.resource.requests, [])
        self.assertEqual(self.site.inFlight, 0)
        after = self.client.request()
        self.answer(self.resource.requests[0])
        self.assertEqual(self.client.status(after), b"200")

    def test_streamedBodyTooLarge(self):
        self.site.maxBodySize = 10
        stream = self.client.request(method=b"POST", body=b"x" * 11, end=False)
        self.assertEqual(self.client.status(stream), b"413")
        self.assertEqual(self.resource.requests, [])

    def test_bodyWithinLimit(self):
        self.site.maxBodySize = 10
        self.client.request(method=b"POST", body=b"x" * 10)
        [request] = self.resource.requests
        self.assertEqual(request.content.read(), b"x" * 10)

    def test_firstRequestDeadline(self):
        """
        A connection that sends bytes but no request within the header
        timeout is closed with GOAWAY; one whose first request came in
        time is held to the idle timeout only.
        """
        self.clock.advance(self.site.headerTimeout - 1)
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(1)
        self.client.pump()
        [goaway] = self.client.of(None, h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.NO_ERROR)
        self.assertTrue(self.client.transport.disconnecting)
        served = Client(self, self.site, self.clock)
        served.request()
        self.answer(self.resource.requests[0])
        self.clock.advance(self.site.headerTimeout * 2)
        self.assertFalse(served.transport.disconnecting)

    def headBlock(self, stream, path=b"/late"):
        """
        A request head for C{stream}, encoded by the client's own header
        compressor (so that the server's stays in step with it), to be
        sent by hand in as many frames as a test likes.
        """
        return self.client.h2.encoder.encode(
            [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"),
             (b":authority", b"balancer.example")]
        )

    def send(self, *frames):
        self.client.channel.dataReceived(b"".join(f.serialize() for f in frames))
        self.clock.advance(0)

    def sentFrames(self):
        frames = _frames(self.client.transport.value())
        self.client.transport.clear()
        return frames

    def test_slowHeadAfterTheFirst(self):
        """
        A request head after the first one, trickled (HEADERS, then
        CONTINUATION frames slower than the header timeout in all), gets
        GOAWAY when the header timeout has passed since its first byte,
        whatever it sent since; the stream it would open is refused, the
        streams open already finish, and the connection closes then.
        """
        first = self.client.request()
        [request] = self.resource.requests
        self.client.transport.clear()
        stream = first + 2
        block = self.headBlock(stream)
        head = HeadersFrame(stream, block[:3])
        head.flags.add("END_STREAM")
        self.send(head)
        for part in (block[3:5], block[5:7]):
            self.clock.advance(self.site.headerTimeout / 3)
            self.send(ContinuationFrame(stream, part))
        self.assertEqual(self.sentFrames(), [])
        self.clock.advance(self.site.headerTimeout / 3)
        [goaway] = self.sentFrames()
        self.assertIsInstance(goaway, GoAwayFrame)
        self.assertEqual((goaway.last_stream_id, goaway.error_code), (first, 0))
        self.assertFalse(self.client.transport.disconnecting)
        late = ContinuationFrame(stream, block[7:])
        late.flags.add("END_HEADERS")
        self.send(late)
        [refused] = self.sentFrames()
        self.assertIsInstance(refused, RstStreamFrame)
        self.assertEqual(
            (refused.stream_id, refused.error_code),
            (stream, h2.errors.ErrorCodes.REFUSED_STREAM),
        )
        self.assertEqual(len(self.resource.requests), 1)
        self.answer(request)
        self.assertTrue(self.client.transport.disconnecting)

    def test_headThatNeverEnds(self):
        """
        A HEADERS frame whose CONTINUATION never comes, on a connection
        idle otherwise: GOAWAY after the header timeout, and closed.
        """
        stream = self.client.request()
        self.answer(self.resource.requests[0])
        self.client.transport.clear()
        self.send(HeadersFrame(stream + 2, self.headBlock(stream + 2)[:4]))
        self.clock.advance(self.site.headerTimeout)
        [goaway] = self.sentFrames()
        self.assertIsInstance(goaway, GoAwayFrame)
        self.assertTrue(self.client.transport.disconnecting)

    def test_partFrameTrickled(self):
        """
        A HEADERS frame itself trickled a few bytes at a time (as each
        chunk arrives, the idle timeout would start again): GOAWAY after
        the header timeout.
        """
        stream = self.client.request()
        self.answer(self.resource.requests[0])
        self.client.transport.clear()
        head = HeadersFrame(stream + 2, self.headBlock(stream + 2))
        head.flags.add("END_HEADERS")
        data = head.serialize()
        for i in range(len(data) - 1):
            self.client.channel.dataReceived(data[i:i + 1])
            self.clock.advance(self.site.timeOut / 2)
            if self.client.transport.value():
                break
        self.assertLess(i, len(data) - 2)
        [goaway] = self.sentFrames()
        self.assertIsInstance(goaway, GoAwayFrame)
        self.assertTrue(self.client.transport.disconnecting)

    def test_headsInTime(self):
        """
        Heads split over frames and reads, each whole within the header
        timeout, are served, however long the connection lives; a slow
        body is the body timeout's, not the header timeout's.
        """
        self.client.request()
        post = self.client.request(
            method=b"POST", headers=[(b"content-length", b"100")], body=b"x", end=False
        )
        for n, stream in enumerate((post + 2, post + 4)):
            block = self.headBlock(stream, b"/%d" % (n,))
            head = HeadersFrame(stream, block[:5])
            head.flags.add("END_STREAM")
            last = ContinuationFrame(stream, block[5:])
            last.flags.add("END_HEADERS")
            data = head.serialize() + last.serialize()
            for i in range(0, len(data), 7):
                self.client.channel.dataReceived(data[i:i + 7])
                self.clock.advance(self.site.headerTimeout / 20)
            self.clock.advance(self.site.headerTimeout)
        # Part of a DATA frame of the unfinished body, held.
        part = DataFrame(post, b"y" * 99).serialize()[:50]
        self.client.channel.dataReceived(part)
        self.clock.advance(self.site.headerTimeout * 2)
        self.assertEqual(
            [r.path for r in self.resource.requests], [b"/", b"/0", b"/1"]
        )
        self.assertFalse(self.client.transport.disconnecting)
        self.assertNotIn(
            GoAwayFrame, [type(f) for f in _frames(self.client.transport.value())]
        )

    def test_headUnderWayReadsTheBuffer(self):
        """
        L{http2.headUnderWay} reads the C{h2} package's frame buffer, which
        nothing public shows: its names are still there.
        """
        conn = self.client.channel.http2.conn
        self.assertFalse(http2.headUnderWay(conn))
        head = HeadersFrame(1, b"\x82").serialize()
        conn.incoming_buffer.add_data(head[:5])
        self.assertTrue(http2.headUnderWay(conn))
        data = DataFrame(1, b"x").serialize()
        conn.incoming_buffer._data = bytearray(data[:5])
        self.assertFalse(http2.headUnderWay(conn))
        conn.incoming_buffer._data = bytearray(data[:2])
        self.assertTrue(http2.headUnderWay(conn))

    def test_idleMeansNoStream(self):
        """
        The idle timeout closes a connection with no stream open, never one
        whose request waits on its backend.
        """
        stream = self.client.request()
        [request] = self.resource.requests
        self.clock.advance(self.site.timeOut * 3)
        self.client.pump()
        self.assertFalse(self.client.transport.disconnecting)
        self.answer(request)
        self.assertEqual(self.client.status(stream), b"200")
        self.clock.advance(self.site.timeOut)
        self.client.pump()
        self.assertTrue(self.client.transport.disconnecting)
        self.assertTrue(self.client.of(None, h2.events.ConnectionTerminated))

    def test_bodyStalls(self):
        """
        A stream's body may pause the body timeout between two reads, then
        it is answered 408; the connection goes on.
        """
        stream = self.client.request(
            method=b"POST", headers=[(b"content-length", b"10")], body=b"x" * 5, end=False
        )
        self.clock.advance(self.site.bodyTimeout - 1)
        self.client.h2.send_data(stream, b"x")
        self.client.pump()
        self.clock.advance(self.site.bodyTimeout - 1)
        self.client.pump()
        self.assertIsNone(self.client.status(stream))
        self.clock.advance(1)
        self.client.pump()
        self.assertEqual(self.client.status(stream), b"408")
        self.assertEqual(self.resource.requests, [])
        after = self.client.request(method=b"POST", body=b"whole")
        [request] = self.resource.requests
        self.assertEqual(request.content.read(), b"whole")
        self.clock.advance(self.site.bodyTimeout * 2)
        self.answer(request)
        self.assertEqual(self.client.status(after), b"200")

    def test_cutShort(self):
        """
        A response cut short resets its stream with INTERNAL_ERROR (the
        client must not take it for whole) and tells its request that its
        client is gone; the connection serves the next stream.
        """
        stream = self.client.request()
        [request] = self.resource.requests
        gone = []
        request.watchConnectionLost(gone.append)
        request.setHeader(b"content-length", b"100")
        request.write(b"part")
        proxy.abortResponse(request)
        self.client.pump()
        resets = self.client.of(stream, h2.events.StreamReset)
        self.assertEqual([r.error_code for r in resets], [h2.errors.ErrorCodes.INTERNAL_ERROR])
        self.assertEqual(len(gone), 1)
        self.assertEqual(self.site.inFlight, 0)
        after = self.client.request()
        self.answer(self.resource.requests[1])
        self.assertEqual(self.client.status(after), b"200")

    def test_transportFullPausesEveryStream(self):
        """
        A client's transport that is full pauses the producer of every
        stream (a backend), whatever room their windows have, until it
        drains; a producer registered meanwhile starts paused.
        """
        self.client.request()
        self.client.request()
        first, second = self.resource.requests
        producers = [Producer(), Producer()]
        for request, producer in zip((first, second), producers):
            request.registerProducer(producer, True)
        connection = self.client.channel.http2
        connection.pauseProducing()
        self.assertEqual([p.paused for p in producers], [1, 1])
        self.client.request()
        third = self.resource.requests[2]
        late = Producer()
        third.registerProducer(late, True)
        proxy._startPausedIfFull(third, late)
        self.assertEqual(late.paused, 1)
        connection.resumeProducing()
        self.assertEqual([p.resumed for p in producers + [late]], [1, 1, 1])

    def test_windowSpentPauses(self):
        """
        A stream whose flow-control window is spent pauses its producer
        until the client opens it again.
        """
        stream = self.client.request()
        [request] = self.resource.requests
        producer = Producer()
        request.registerProducer(producer, True)
        request.write(b"x" * 65535)
        self.assertEqual(producer.paused, 1)
        self.assertTrue(http2.streamBlocked(request.channel))
        self.client.pump()
        self.assertEqual(len(self.client.body(stream)), 65535)
        self.client.h2.acknowledge_received_data(65535, stream)
        self.client.pump()
        self.assertEqual(producer.resumed, 1)
        self.assertFalse(http2.streamBlocked(request.channel))

    def test_goAway(self):
        """
        A stopping balancer closes an HTTP/2 connection with GOAWAY, once
        its streams are answered.
        """
        stream = self.client.request()
        [request] = self.resource.requests
        self.client.channel.loseConnection()
        self.client.pump()
        [goaway] = self.client.of(None, h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.NO_ERROR)
        self.assertFalse(self.client.transport.disconnecting)
        # (The h2 package's client state machine is closed by a GOAWAY, so
        # the stream's frames are read here.)
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()
        for _ in range(10):
            self.clock.advance(0)
        frames = _frames(self.client.transport.value())
        self.assertEqual(
            [(type(f).__name__, f.stream_id) for f in frames],
            [("HeadersFrame", stream), ("DataFrame", stream), ("DataFrame", stream)],
        )
        self.assertIn("END_STREAM", frames[-1].flags)
        self.assertTrue(self.client.transport.disconnecting)
        # The transport's producer let go, as TLS needs to close.
        self.assertIsNone(self.client.transport.producer)

    def test_rapidReset(self):
        """
        A client that opens and resets streams faster than the budget
        (Rapid Reset) is sent GOAWAY with ENHANCE_YOUR_CALM and its
        connection closed; one that resets now and then is not.
        """
        channel = self.client.channel.http2
        channel.RESET_BURST = 5
        for _ in range(5):
            stream = self.client.request()
            self.client.h2.reset_stream(stream)
            self.client.pump()
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(1)
        for _ in range(25):
            stream = self.client.request()
            self.client.h2.reset_stream(stream)
            self.client.pump()
            if self.client.transport.disconnecting:
                break
        self.assertTrue(self.client.transport.disconnecting)
        [goaway] = self.client.of(None, h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def test_connectionLost(self):
        self.client.request()
        [request] = self.resource.requests
        gone = []
        request.watchConnectionLost(gone.append)
        self.client.channel.connectionLost(None)
        self.assertEqual(len(gone), 1)
        self.assertEqual(self.site.inFlight, 0)

    def test_upgradeRefused(self):
        """
        RFC 9113 has no Upgrade: a request that carries one is malformed,
        and never reaches the site, let alone a tunnel; the connection is
        closed with PROTOCOL_ERROR.
        """
        self.client = Client(
            self, self.site, self.clock,
            validate_outbound_headers=False, normalize_outbound_headers=False,
        )
        self.client.request(headers=[(b"upgrade", b"websocket"), (b"connection", b"upgrade")])
        self.assertEqual(self.resource.requests, [])
        [goaway] = self.client.of(None, h2.events.ConnectionTerminated)
        self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(self.client.transport.disconnecting)

    def test_plainTransportStaysHTTP11(self):
        """
        A connection that did not choose h2 by ALPN (plain TCP) is HTTP/1.1,
        even when it starts with the HTTP/2 preface: no h2c.
        """
        transport = StringTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.assertIsNone(channel.http2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 4"))
        channel.connectionLost(None)


class NegotiationTests(SynchronousTestCase):
    def test_offered(self):
        site = BalancerSite(Held(), Clock())
        self.assertEqual(site.acceptableProtocols(), [b"h2", b"http/1.1"])
        site = BalancerSite(Held(), Clock(), http2=False)
        self.assertEqual(site.acceptableProtocols(), [b"http/1.1"])

    def test_storeChooses(self):
        folder = os.path.abspath(self.mktemp())
        certs = os.path.join(folder, "certs")
        os.makedirs(certs)
        writePair(certs, "a", CA(folder).issue("a.example"))
        both = CertificateStore(certs)
        self.assertEqual(both._selectProtocol(None, [b"http/1.1", b"h2"]), b"h2")
        self.assertEqual(both._selectProtocol(None, [b"http/1.1"]), b"http/1.1")
        only = CertificateStore(certs, protocols=[b"http/1.1"])
        self.assertEqual(only._selectProtocol(None, [b"h2", b"http/1.1"]), b"http/1.1")


def _curlHasHTTP2():
    if CURL is None:
        return False
    import subprocess

    version = subprocess.run([CURL, "--version"], capture_output=True).stdout
    return b"HTTP2" in version


# 20 MiB that no two offsets share a pattern of: a lost or repeated chunk
# changes the hash.
BIG = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(20 * 1024 * 1024 // 32))


def _backend(connection, request):
    """
    /big: 20 MiB; /fail: no answer at all; /cut: a response that stops
    short; anything else: what the backend received, head and body.
    """
    target = request.head.split(b" ", 2)[1]
    if target == b"/big":
        connection.write(ok(BIG))
    elif target == b"/fail":
        connection.close()
    elif target == b"/cut":
        connection.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npart")
        connection.close()
    else:
        connection.write(ok(request.head + b"\r\n\r\n" + request.body))


class RealClientTests(TestCase):
    """
    curl and h2load speaking HTTP/2 to a balancer's tls: port.
    """

    timeout = 60

    # Skipped without them, except under CI (CI set), which installs them.
    if not _curlHasHTTP2() and not os.environ.get("CI"):
        skip = "curl with HTTP/2 (nghttp2) is needed"

    @inlineCallbacks
    def setUp(self):
        self.net = Net(self)
        folder = os.path.abspath(self.mktemp())
        self.certs = certs = os.path.join(folder, "certs")
        os.makedirs(certs)
        self.ca = CA(folder)
        writePair(certs, "a", self.ca.issue("a.example"))
        self.pem = os.path.join(certs, "a.pem")
        self.accessLog = os.path.join(folder, "access.log")
        self.backend = ScriptedBackend(self.net, _backend)
        self.balancer = yield startBalancer(
            self.net, [self.backend.url], ports=("tls:0:interface=127.0.0.1",),
            tlsCert=certs, accessLog=self.accessLog, via="edge",
        )
        self.base = f"https://a.example:{self.balancer.port}"

    def curl(self, *args):
        return getProcessOutputAndValue(
            CURL,
            ["-sS", "--http2", "--max-time", "30", "--cacert", self.ca.path,
             "--resolve", f"a.example:{self.balancer.port}:127.0.0.1", *args],
            env=dict(os.environ),
        )

    @inlineCallbacks
    def test_sslPort(self):
        """
        An ssl: port offers HTTP/2 too, connection after connection (its
        context, shared by them, is set up once); with http2 off, HTTP/1.1.
        """
        for http2, version in ((True, b"2"), (False, b"1.1")):
            balancer = yield startBalancer(
                self.net, [self.backend.url],
                ports=(f"ssl:0:interface=127.0.0.1:privateKey={self.pem}:certKey={self.pem}",),
                http2=http2,
            )
            for _ in range(2):
                out, err, code = yield getProcessOutputAndValue(
                    CURL,
                    ["-sS", "--http2", "--max-time", "30", "--cacert", self.ca.path,
                     "-o", "/dev/null", "-w", "%{http_version}",
                     "--resolve", f"a.example:{balancer.port}:127.0.0.1",
                     f"https://a.example:{balancer.port}/"],
                    env=dict(os.environ),
                )
                self.assertEqual((code, out), (0, version), err)

    @inlineCallbacks
    def test_getAndPost(self):
        """
        A GET and a POST with a body reach the backend in HTTP/1.1, with
        C{:authority} as C{Host}, the forwarding headers of a TLS client,
        a request id and C{Via: 2 edge}; the access log says HTTP/2.
        """
        out, err, code = yield self.curl(
            "-w", "\n%{http_version}", "-H", "X-Request-ID: abc", self.base + "/get?x=1"
        )
        self.assertEqual(code, 0, err)
        head, _, version = out.rpartition(b"\n")
        self.assertEqual(version, b"2")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"GET /get?x=1 HTTP/1.1")
        headers = {n.lower(): v.strip() for n, _, v in (l.partition(b":") for l in lines[1:] if l)}
        self.assertEqual(headers[b"host"], b"a.example:%d" % (self.balancer.port,))
        self.assertEqual(headers[b"x-forwarded-proto"], b"https")
        self.assertEqual(headers[b"x-forwarded-for"], b"127.0.0.1")
        self.assertEqual(headers[b"x-request-id"], b"abc")
        self.assertEqual(headers[b"via"], b"2 edge")
        out, err, code = yield self.curl("--data-binary", "a body", self.base + "/post")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"POST /post HTTP/1.1\r\n"), out)
        self.assertIn(b"\r\nContent-Length: 6\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\na body"), out)
        with open(self.accessLog, "rb") as f:
            log = f.read()
        self.assertIn(b'"GET /get?x=1 HTTP/2" 200 ', log)
        self.assertIn(b'"POST /post HTTP/2" 200 ', log)

    @inlineCallbacks
    def test_selectionAndRetries(self):
        """
        Streams of one connection are balanced request by request, and one
        sent to a backend that refuses is retried on the next.
        """
        other = ScriptedBackend(self.net, _backend)
        refusing = f"http://127.0.0.1:{self.net.refusingPort()}"
        balancer = yield startBalancer(
            self.net, [self.backend.url, refusing, other.url],
            ports=("tls:0:interface=127.0.0.1",), tlsCert=self.certs,
        )
        base = f"https://a.example:{balancer.port}"
        out, err, code = yield getProcessOutputAndValue(
            CURL,
            ["-sS", "--http2", "--max-time", "30", "--cacert", self.ca.path,
             "--resolve", f"a.example:{balancer.port}:127.0.0.1",
             "-w", "%{http_code} %{num_connects}\n"]
            + [a for i in range(6) for a in ("-o", "/dev/null", f"{base}/{i}")],
            env=dict(os.environ),
        )
        self.assertEqual(out.decode("ascii").splitlines(), ["200 1"] + ["200 0"] * 5, err)
        self.assertEqual((len(self.backend.requests), len(other.requests)), (3, 3))

    @inlineCallbacks
    def test_loopDetected(self):
        out, err, code = yield self.curl(
            "-o", "/dev/null", "-w", "%{http_code}", "-H", "Via: 1.1 edge", self.base + "/"
        )
        self.assertEqual((code, out), (0, b"508"), err)

    @inlineCallbacks
    def test_largeDownload(self):
        """
        20 MiB streamed from the backend through flow control arrive whole.
        """
        path = os.path.abspath(self.mktemp())
        out, err, code = yield self.curl(
            "-o", path, "-w", "%{http_version} %{size_download}", self.base + "/big"
        )
        self.assertEqual((code, out), (0, b"2 %d" % (len(BIG),)), err)
        with open(path, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(got, hashlib.sha256(BIG).hexdigest())

    @inlineCallbacks
    def test_largeUpload(self):
        """
        8 MiB sent in DATA frames reach the backend whole, with their
        length.
        """
        body = BIG[: 8 * 1024 * 1024]
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(body)
        out, err, code = yield self.curl("--data-binary", "@" + path, self.base + "/up")
        self.assertEqual(code, 0, err)
        head, _, received = out.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: %d\r\n" % (len(body),), head + b"\r\n")
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(body).hexdigest())

    @inlineCallbacks
    def test_failuresOnOneConnection(self):
        """
        A backend that closes without an answer is a 502 on its stream; one
        that breaks off a response resets its stream; neither closes the
        client's connection, whose next stream is served.
        """
        out, err, code = yield self.curl(
            "-w", "%{http_code} %{num_connects}\n", "-X", "POST",
            "-o", "/dev/null", self.base + "/fail",
            "-o", "/dev/null", self.base + "/cut",
            "-o", "/dev/null", self.base + "/after",
        )
        lines = out.decode("ascii").splitlines()
        self.assertEqual(lines[0], "502 1", (out, err))
        # The cut stream: reset, whatever status curl saw first.
        self.assertTrue(lines[1].endswith(" 0"), (out, err))
        self.assertEqual(lines[2], "200 0", (out, err))
        self.assertIn(b"INTERNAL_ERROR", err)

    @inlineCallbacks
    def test_manyStreams(self):
        """
        h2load: 1000 requests on 2 connections, 20 streams at a time on
        each, all answered 2xx.
        """
        if H2LOAD is None and not os.environ.get("CI"):
            raise SkipTest("h2load (Debian's nghttp2-client) is needed")
        out, err, code = yield getProcessOutputAndValue(
            H2LOAD or "h2load",
            ["-n", "1000", "-c", "2", "-m", "20", "-T", "30",
             f"https://127.0.0.1:{self.balancer.port}/many"],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"status codes: 1000 2xx, 0 3xx, 0 4xx, 0 5xx", out)
        self.assertIn(b"1000 succeeded, 0 failed, 0 errored", out)


@implementer(IPushProducer)
class _Streamer:
    """
    A backend's response of C{BIG}, written as its connection takes it.
    """

    def __init__(self, transport):
        # Small socket buffers, so that what the balancer holds shows.
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        self.transport = transport
        self.sent = 0
        self.paused = False
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(BIG),))
        transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < len(BIG):
            chunk = BIG[self.sent : self.sent + 65536]
            self.sent += len(chunk)
            self.transport.write(chunk)
        if self.sent >= len(BIG):
            self.transport.unregisterProducer()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True


class _SlowReader(Protocol):
    """
    An HTTP/2 client with windows as large as the protocol allows, which
    asks for C{path} and, once the response has started, reads nothing
    until told to.
    """

    def __init__(self, path):
        self.path = path
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.body = hashlib.sha256()
        self.received = 0
        self.ended = Deferred()

    def connectionMade(self):
        largest = 2**31 - 1
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: largest})
        self.h2.increment_flow_control_window(largest - 65535)
        self.h2.send_headers(
            1,
            [(b":method", b"GET"), (b":path", self.path), (b":scheme", b"https"),
             (b":authority", b"a.example")],
            end_stream=True,
        )
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data):
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                # From now on, nothing is read (what this call holds aside).
                self.transport.pauseProducing()
            elif isinstance(event, h2.events.DataReceived):
                self.body.update(event.data)
                self.received += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.callback(None)
        self.transport.write(self.h2.data_to_send())


class SlowReaderTests(TestCase):
    """
    A client that reads slowly holds back its backend through the
    balancer, whatever its flow-control windows allow.
    """

    timeout = 60

    @inlineCallbacks
    def test_transportFullPausesBackend(self):
        net = Net(self)
        folder = os.path.abspath(self.mktemp())
        certs = os.path.join(folder, "certs")
        os.makedirs(certs)
        ca = CA(folder)
        writePair(certs, "a", ca.issue("a.example"))
        streamers = []
        backend = ScriptedBackend(
            net, lambda connection, request: streamers.append(_Streamer(connection.transport))
        )
        balancer = yield startBalancer(
            net, [backend.url], ports=("tls:0:interface=127.0.0.1",), tlsCert=certs
        )
        with open(ca.path, "rb") as f:
            authority = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(
            "a.example", trustRoot=authority, acceptableProtocols=[b"h2"]
        )
        client = _SlowReader(b"/big")
        endpoint = wrapClientTLS(
            options, TCP4ClientEndpoint(reactor, "127.0.0.1", balancer.port)
        )
        yield endpoint.connect(Factory.forProtocol(lambda: net.track(client, client=True)))
        # The balancer stops reading its backend connection, and the
        # backend is held back, well before the end.
        yield _poll(lambda: streamers and streamers[0].paused and not _reading(streamers[0]))
        # (What was sent is in the sockets' buffers, a few MiB each on
        # loopback, and the client's window; without the pause, all of it.)
        self.assertLess(streamers[0].sent, len(BIG) * 3 // 4)
        self.assertLess(client.received, len(BIG) // 4)
        client.transport.resumeProducing()
        yield withTimeout(client.ended, 30)
        self.assertEqual(client.received, len(BIG))
        self.assertEqual(client.body.hexdigest(), hashlib.sha256(BIG).hexdigest())


def _reading(streamer) -> bool:
    """
    Is the balancer reading the connection C{streamer} writes to?
    """
    port = streamer.transport.getPeer().port
    return any(
        getattr(reader, "getHost", None) is not None
        and getattr(reader.getHost(), "port", None) == port
        for reader in reactor.getReaders()
    )


def _poll(test, seconds=10.0, interval=0.01):
    """
    Fires when C{test()} is true, checking every C{interval} seconds, for
    at most C{seconds}.
    """
    d = Deferred()
    deadline = reactor.seconds() + seconds

    def check():
        if test():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("not so within %s seconds" % (seconds,)))
        else:
            reactor.callLater(interval, check)

    check()
    return d
