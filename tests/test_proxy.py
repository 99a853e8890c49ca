"""
Proxy correctness, end to end: real HTTP on loopback sockets through the
balancer built by L{rrbalancer.service.makeService}, against scripted raw
backends (exact bytes) and twisted.web sites; plus, for what needs a clock
or backpressure under the test's control, the same pieces in memory.
"""

import gc
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource

from rrbalancer.client import INLINE_BODY_SIZE
from rrbalancer.proxy import _RandomIDs

from .support import (
    CountingSite,
    FramingError,
    MemoryBalancer,
    Net,
    RecordingUnread,
    ScriptedBackend,
    closeWithoutAnswer,
    connectClient,
    exchange,
    get,
    ok,
    parseResponse,
    reply,
    startBalancer,
)


def echo(connection, request):
    """
    Answers with the request's body, byte for byte.
    """
    connection.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(request.body), request.body)
    )


def post(body: bytes, path: bytes = b"/upload") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: balancer.example\r\nContent-Length: %d\r\n\r\n%s"
        % (path, len(body), body)
    )


def byTarget(answers):
    """
    A handler answering each request target with its own bytes.
    """

    def handler(connection, request):
        connection.write(answers[request.target])

    return handler


class _Integration(unittest.TestCase):
    timeout = 15

    def setUp(self):
        self.net = Net(self)

    def backend(self, handler) -> ScriptedBackend:
        return ScriptedBackend(self.net, handler)

    def balancer(self, *backends, **settings):
        return startBalancer(
            self.net, [getattr(b, "url", b) for b in backends], **settings
        )

    def assertNoBackendAddress(self, response, backend):
        """
        A balancer's own error names no backend.
        """
        self.assertNotIn(b"127.0.0.1", response.raw)
        self.assertNotIn(b"%d" % (backend.port,), response.raw)


class BodyTests(_Integration):
    """
    Bodies cross the balancer byte for byte, with framing recomputed.
    """

    @inlineCallbacks
    def test_binaryBodiesBothWays(self):
        body = bytes(range(256)) * 8 + b"\r\n\r\n0\r\n\r\n\x00"
        backend = self.backend(echo)
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, post(body))
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.requests[0].body, body)
        self.assertEqual(backend.requests[0].header(b"content-length"), [b"%d" % len(body)])
        self.assertEqual(response.body, body)
        self.assertEqual(response.header(b"content-length"), [b"%d" % len(body)])

    @inlineCallbacks
    def test_largeBodySpooled(self):
        """
        A body of more than 1 MiB, which Twisted spools to a temporary file
        and the client sends on with a pull producer, arrives whole, and a
        response as large comes back whole.
        """
        body = random.Random(7).randbytes(1536 * 1024 + 3)
        self.assertGreater(len(body), INLINE_BODY_SIZE)
        backend = self.backend(echo)
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, post(body))
        self.assertEqual(response.code, 200)
        received = backend.requests[0]
        self.assertEqual(received.header(b"content-length"), [b"%d" % len(body)])
        self.assertTrue(received.body == body, "request body changed on the way")
        self.assertTrue(response.body == body, "response body changed on the way")

    @inlineCallbacks
    def test_formBodiesPassedOn(self):
        """
        Form bodies are the backend's to read: one that Twisted's own form
        parser refuses (multipart without a boundary, or cut short) reaches
        the backend as it came, as does a urlencoded one, rather than being
        answered 400 by the balancer.
        """
        backend = self.backend(echo)
        balancer = yield self.balancer(backend)
        for contentType, body in (
            (b"multipart/form-data", b"no boundary here"),
            (b"multipart/form-data; boundary=xyz", b"--xyz\r\ncut short"),
            (b"application/x-www-form-urlencoded", b"a=1&b=%ZZ&&c"),
        ):
            response = yield exchange(
                self.net,
                balancer.port,
                b"POST /form HTTP/1.1\r\nHost: balancer.example\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (contentType, len(body), body),
            )
            self.assertEqual((response.code, response.body), (200, body), contentType)
            received = backend.requests[-1]
            self.assertEqual(received.header(b"content-type"), [contentType])

    @inlineCallbacks
    def test_chunkedRequestBody(self):
        """
        A chunked body from the client reaches the backend with a
        Content-Length and no Transfer-Encoding.
        """
        backend = self.backend(echo)
        balancer = yield self.balancer(backend)
        response = yield exchange(
            self.net,
            balancer.port,
            b"POST /c HTTP/1.1\r\nHost: balancer.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld\x00\r\n0\r\n\r\n",
        )
        received = backend.requests[0]
        self.assertEqual(received.body, b"hello world\x00")
        self.assertEqual(received.header(b"content-length"), [b"12"])
        self.assertNotIn(b"transfer-encoding", received.names())
        self.assertEqual(response.body, b"hello world\x00")

    @inlineCallbacks
    def test_emptyPostGetsContentLengthZero(self):
        backend = self.backend(reply(ok()))
        balancer = yield self.balancer(backend)
        yield exchange(self.net, balancer.port, post(b""))
        self.assertEqual(backend.requests[0].header(b"content-length"), [b"0"])

    @inlineCallbacks
    def test_chunkedResponseReframedOnce(self):
        """
        A chunked backend response is decoded and framed again once: the
        client reads valid chunked framing and the very same body.
        """
        backend = self.backend(
            reply(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
                b"0\r\nX-Trailer: t\r\n\r\n"
            )
        )
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.body, b"Wikipedia in\r\n\r\nchunks.")
        self.assertEqual(response.framing, "chunked")
        self.assertEqual(response.header(b"transfer-encoding"), [b"chunked"])

    @inlineCallbacks
    def test_chunkedResponseToHTTP10Client(self):
        """
        An HTTP/1.0 client cannot read chunks: it gets the decoded body,
        delimited by the close.
        """
        backend = self.backend(
            reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(b"GET / HTTP/1.0\r\nHost: balancer.example\r\n\r\n")
        data = yield client.waitForClose()
        response, rest = parseResponse(data, closed=True)
        self.assertEqual((response.body, response.framing), (b"abc", "close"))

    @inlineCallbacks
    def test_readUntilClose(self):
        """
        A backend response with no length, ended by the backend's close, is
        delivered whole (framed for the client).
        """
        body = b"all of it, " * 5000
        backend = self.backend(
            lambda c, r: (c.write(b"HTTP/1.1 200 OK\r\n\r\n" + body), c.close())
        )
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.framing, "chunked")
        self.assertTrue(response.body == body)

    @inlineCallbacks
    def test_headKeepsContentLength(self):
        """
        A HEAD response has no body but keeps the backend's Content-Length,
        and the client connection stays usable.
        """
        backend = self.backend(
            byTarget(
                {
                    b"/h": b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
                    b"/next": ok(b"next"),
                }
            )
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(b"HEAD /h HTTP/1.1\r\nHost: balancer.example\r\n\r\n")
        response = yield client.readResponse(b"HEAD")
        self.assertEqual(response.header(b"content-length"), [b"1234"])
        self.assertNotIn(b"transfer-encoding", response.names())
        client.send(get(b"/next"))
        response = yield client.readResponse()
        self.assertEqual(response.body, b"next")
        self.assertTrue(response.raw.startswith(b"HTTP/1.1 200 OK\r\n"))

    @inlineCallbacks
    def test_noBodyStatuses(self):
        """
        204 and 304 carry no body and no chunked framing; what follows on the
        client connection is read correctly.
        """
        backend = self.backend(
            byTarget(
                {
                    b"/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                    b"/304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n"
                    b"Content-Length: 50\r\n\r\n",
                    b"/next": ok(b"next"),
                }
            )
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        for target in (b"/204", b"/304", b"/next"):
            client.send(get(target))
        first = yield client.readResponse()
        second = yield client.readResponse()
        third = yield client.readResponse()
        self.assertEqual((first.code, first.body), (204, b""))
        self.assertEqual(first.header(b"x-a"), [b"1"])
        self.assertNotIn(b"transfer-encoding", first.names())
        self.assertNotIn(b"content-length", first.names())
        self.assertEqual((second.code, second.body), (304, b""))
        self.assertNotIn(b"transfer-encoding", second.names())
        self.assertEqual((third.code, third.body), (200, b"next"))


class SlowUploadTests(_Integration):
    """
    An upload is not a request head: it may take longer than the header
    timeout as a whole, and only a pause between two reads longer than the
    body timeout ends it.  Timeouts are scaled down so that the test runs
    in about a second of real time.
    """

    def later(self, seconds):
        return deferLater(reactor, seconds)

    @inlineCallbacks
    def test_tricklingBodyReachesBackend(self):
        """
        A body sent a byte at a time over four header timeouts reaches the
        backend whole, and the client gets the backend's answer.
        """
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, headerTimeout=0.2, bodyTimeout=0.5)
        client = yield connectClient(self.net, balancer.port)
        body = b"0123456789"
        client.send(post(body)[: -len(body)])
        for byte in body:
            yield self.later(0.08)
            client.send(bytes([byte]))
        response = yield client.readResponse(b"POST")
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.requests[0].body, body)

    @inlineCallbacks
    def test_idleConnectionNotWrittenTo(self):
        """
        After a request whose body came after its head, the kept-alive
        connection stays silent past the header timeout, and serves the next
        request.
        """
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, headerTimeout=0.2)
        client = yield connectClient(self.net, balancer.port)
        client.send(post(b"ok")[:-2])
        yield self.later(0.1)
        client.send(b"ok")
        response = yield client.readResponse(b"POST")
        self.assertEqual(response.code, 200)
        received = client.data
        yield self.later(0.5)
        self.assertEqual(client.data, received)
        self.assertFalse(client.isClosed)
        client.send(get(b"/next"))
        response = yield client.readResponse()
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.requests[-1].target, b"/next")

    @inlineCallbacks
    def test_stalledBodyGets408(self):
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, headerTimeout=5, bodyTimeout=0.3)
        client = yield connectClient(self.net, balancer.port)
        client.send(post(b"0123456789")[:-5])
        data = yield client.waitForClose()
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        self.assertEqual(backend.requests, [])


class ResponseErrorTests(_Integration):
    """
    A backend that fails or answers badly never yields a response the
    client could take for a good one.
    """

    @inlineCallbacks
    def test_closedWithoutStatusLine(self):
        backend = self.backend(closeWithoutAnswer)
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 502)
        self.assertNoBackendAddress(response, backend)

    @inlineCallbacks
    def test_closedInsideHead(self):
        backend = self.backend(
            lambda c, r: (c.write(b"HTTP/1.1 200 OK\r\nContent-Len"), c.close())
        )
        balancer = yield self.balancer(backend)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 502)

    @inlineCallbacks
    def _diesMidBody(self, head, part, abort=False):
        backend = self.backend(lambda c, r: c.write(head + part))
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.waitForBytes(part[-5:])
        if abort:
            backend.connections[0].abort()
        else:
            backend.connections[0].close()
        # Either the client's connection is cut, or (wrongly) it gets a
        # complete response and the connection stays open.
        yield client.waitFor(lambda: client.isClosed or parseResponse(client.data))
        self.assertTrue(client.isClosed, "a cut response was completed")
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertRaises(FramingError, parseResponse, client.data, closed=True)

    def test_diesMidBodyWithLength(self):
        """
        The backend dies inside a body of known length: the client's
        connection is cut short, never completed with what arrived.
        """
        return self._diesMidBody(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"ten bytes."
        )

    def test_diesMidBodyChunked(self):
        """
        The backend dies between chunks: the client never gets a last chunk.
        """
        return self._diesMidBody(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n"
        )

    def test_resetInsideCloseDelimitedBody(self):
        """
        A body delimited by the close ends well only with a clean close: a
        reset means it was cut, and the client must see a cut too.
        """
        return self._diesMidBody(b"HTTP/1.1 200 OK\r\n\r\n", b"some of it", abort=True)

    @inlineCallbacks
    def test_interimResponsesSkipped(self):
        backend = self.backend(
            reply(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                + ok(b"final")
            )
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get(extra=b"Connection: close\r\n"))
        data = yield client.waitForClose()
        response, rest = parseResponse(data, closed=True)
        self.assertEqual((response.code, response.body, rest), (200, b"final", b""))
        self.assertNotIn(b"Early Hints", data)
        self.assertNotIn(b"</s.css>", data)

    @inlineCallbacks
    def test_invalidResponses(self):
        """
        Responses a proxy cannot pass on safely become a 502, whose body
        does not name the backend.
        """
        bad = {
            b"/version": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"/garbage": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"/code": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            b"/shortcode": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
            b"/reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
            b"/reasoncr": b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
            b"/space": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
            b"/spacecolon": b"HTTP/1.1 200 OK\r\nX-A : x\r\nContent-Length: 0\r\n\r\n",
            b"/nocolon": b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 0\r\n\r\n",
            b"/fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
            b"/nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
            b"/conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!",
            b"/conflictlist": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
            b"/nonnumeric": b"HTTP/1.1 200 OK\r\nContent-Length: 5a\r\n\r\nhello",
            b"/negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
            b"/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            b"/coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n",
        }
        backend = self.backend(byTarget(bad))
        balancer = yield self.balancer(backend)
        for target in bad:
            response = yield exchange(self.net, balancer.port, get(target))
            self.assertEqual(response.code, 502, target)
            self.assertEqual(response.reason, b"Bad Gateway", target)
            self.assertNoBackendAddress(response, backend)
            self.assertNotIn(b"X-Injected", response.raw)
        # One try each: an invalid answer is not retried.
        self.assertEqual(len(backend.requests), len(bad))

    @inlineCallbacks
    def test_invalidChunkedBody(self):
        """
        A chunked body turns out invalid after the head went on: the client
        connection is cut, never completed.
        """
        backend = self.backend(
            reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcZZ\r\n")
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.waitFor(lambda: client.isClosed or parseResponse(client.data))
        self.assertTrue(client.isClosed)
        self.assertRaises(FramingError, parseResponse, client.data, closed=True)
        yield backend.waitForAllClosed()

    @inlineCallbacks
    def test_streamsBeforeBackendFinishes(self):
        """
        What the backend sent reaches the client while the backend is still
        working on the rest.
        """
        backend = self.backend(
            reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst!\r\n")
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.waitForBytes(b"first!")
        self.assertEqual(parseResponse(client.data), None)
        backend.connections[0].write(b"5\r\nlast!\r\n0\r\n\r\n")
        response = yield client.readResponse()
        self.assertEqual(response.body, b"first!last!")

    @inlineCallbacks
    def test_streamsCloseDelimited(self):
        backend = self.backend(reply(b"HTTP/1.0 200 OK\r\n\r\nfirst part;"))
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.waitForBytes(b"first part;")
        backend.connections[0].write(b"second part")
        backend.connections[0].close()
        response = yield client.readResponse()
        self.assertEqual(response.body, b"first part;second part")


class RetryTests(_Integration):
    """
    The rules for moving a request on to another backend.
    """

    @inlineCallbacks
    def test_refusedMovesOnEvenForPost(self):
        """
        Nothing was sent when the connection was refused, so even a POST
        moves on; the refusing backend gets a passive failure.
        """
        good = self.backend(echo)
        balancer = yield self.balancer(
            f"http://127.0.0.1:{self.net.refusingPort()}", good
        )
        response = yield exchange(self.net, balancer.port, post(b"payload"))
        self.assertEqual((response.code, response.body), (200, b"payload"))
        self.assertEqual(len(good.requests), 1)
        refusing, other = balancer.backends
        self.assertEqual((refusing.failures, other.failures), (1, 0))
        self.assertIsNotNone(refusing.lastError)

    @inlineCallbacks
    def test_closedWithoutAnswerRetriesGet(self):
        closing = self.backend(closeWithoutAnswer)
        good = self.backend(reply(ok(b"from good")))
        balancer = yield self.balancer(closing, good)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.body, b"from good")
        self.assertEqual((len(closing.requests), len(good.requests)), (1, 1))

    @inlineCallbacks
    def test_closedWithoutAnswerDoesNotRetryPost(self):
        """
        The backend may have acted on a POST it saw: it is not sent again.
        """
        closing = self.backend(closeWithoutAnswer)
        good = self.backend(reply(ok(b"from good")))
        balancer = yield self.balancer(closing, good)
        response = yield exchange(self.net, balancer.port, post(b"once"))
        self.assertEqual(response.code, 502)
        self.assertEqual((len(closing.requests), len(good.requests)), (1, 0))
        self.assertNoBackendAddress(response, closing)

    @inlineCallbacks
    def test_oneTryPerBackend(self):
        backends = [self.backend(closeWithoutAnswer) for i in range(3)]
        balancer = yield self.balancer(*backends)
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 502)
        self.assertEqual([len(b.requests) for b in backends], [1, 1, 1])
        self.assertEqual([len(b.connections) for b in backends], [1, 1, 1])

    @inlineCallbacks
    def test_allRefused(self):
        balancer = yield self.balancer(
            f"http://127.0.0.1:{self.net.refusingPort()}",
            f"http://127.0.0.1:{self.net.refusingPort()}",
        )
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 502)
        self.assertEqual([b.failures for b in balancer.backends], [1, 1])
        self.assertNotIn(b"127.0.0.1", response.raw)

    @inlineCallbacks
    def test_noBackendUp(self):
        backend = self.backend(reply(ok()))
        balancer = yield self.balancer(backend)
        for b in balancer.backends:
            b.healthy = False
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 503)
        self.assertEqual(response.header(b"retry-after"), [b"5"])
        self.assertEqual(backend.connections, [])


class PoolTests(_Integration):
    """
    Backend connections are kept and reused, and only while usable.
    """

    @inlineCallbacks
    def test_hundredRequestsOneConnection(self):
        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request):
                return b"hello " + request.uri

        site = CountingSite(self.net, Hello())
        balancer = yield self.balancer(site)
        for i in range(100):
            # A new client connection each time (closed after its answer):
            # the kept backend connection outlives them all.
            request = get(b"/%d" % i, extra=b"Connection: close\r\n")
            response = yield exchange(self.net, balancer.port, request)
            self.assertEqual(response.body, b"hello /%d" % i)
        self.assertEqual(site.accepted, 1)
        self.assertEqual(balancer.backends[0].pool.opened, 1)

    def _whenPoolLoses(self, pool) -> Deferred:
        lost = Deferred()
        original = pool.lost

        def patched(connection):
            original(connection)
            if not lost.called:
                lost.callback(None)

        pool.lost = patched
        return lost

    @inlineCallbacks
    def test_idleConnectionClosedByBackendNotReused(self):
        backend = self.backend(reply(ok(b"fine")))
        balancer = yield self.balancer(backend)
        pool = balancer.backends[0].pool
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(pool.idleCount, 1)
        lost = self._whenPoolLoses(pool)
        backend.connections[0].close()
        yield lost
        self.assertEqual(pool.idleCount, 0)
        response = yield exchange(self.net, balancer.port, get(b"/again"))
        self.assertEqual(response.body, b"fine")
        self.assertEqual(len(backend.connections), 2)
        self.assertEqual(backend.connections[1].requests[0].target, b"/again")
        self.assertEqual(balancer.backends[0].failures, 0)

    @inlineCallbacks
    def test_staleConnectionRetriedFreshOnSameBackend(self):
        """
        A kept connection that the backend closes on the next request,
        without a byte, is not the backend's fault: the request is tried
        again on a fresh connection to the same backend.
        """

        def stale(connection, request):
            if connection is stale.backend.connections[0] and len(connection.requests) > 1:
                connection.close()
            else:
                connection.write(ok(b"from A via %d" % len(stale.backend.connections)))

        a = stale.backend = self.backend(stale)
        b = self.backend(reply(ok(b"from B")))
        balancer = yield self.balancer(a, b)
        bodies = []
        for i in range(3):
            response = yield exchange(self.net, balancer.port, get(b"/%d" % i))
            bodies.append(response.body)
        self.assertEqual(bodies, [b"from A via 1", b"from B", b"from A via 2"])
        self.assertEqual([r.target for r in a.requests], [b"/0", b"/2", b"/2"])
        self.assertEqual(len(b.requests), 1)
        self.assertEqual([x.failures for x in balancer.backends], [0, 0])


class GarbageTests(_Integration):
    """
    A proxied request leaves nothing for the cycle collector: what it
    made is freed by reference counting as soon as it is done.  Under load
    every cycle is work for the collector, and its pauses grow with
    everything else the balancer holds (a pause per hundred requests, of
    milliseconds with a thousand backends).
    """

    @inlineCallbacks
    def test_noCycles(self):
        if not hasattr(gc, "DEBUG_SAVEALL"):
            raise unittest.SkipTest("PyPy frees nothing by reference counting")
        backend = self.backend(reply(ok(b"served")))
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.readResponse()
        gc.collect()
        self.addCleanup(gc.set_debug, gc.get_debug())
        self.addCleanup(gc.garbage.clear)
        gc.set_debug(gc.DEBUG_SAVEALL)
        for i in range(20):
            client.send(get(b"/%d" % i))
            response = yield client.readResponse()
            self.assertEqual(response.body, b"served")
        gc.collect()
        gc.set_debug(0)
        ours = sorted(
            {
                type(o).__module__ + "." + type(o).__qualname__
                for o in gc.garbage
                if type(o).__module__.startswith(("rrbalancer", "twisted.web"))
            }
        )
        self.assertEqual(ours, [])


class ClientDisconnectTests(_Integration):
    @inlineCallbacks
    def test_disconnectMidResponseAbortsBackend(self):
        """
        The client leaving in the middle of a response closes the backend
        connection (the rest would be wasted), and logs no error.
        """
        backend = self.backend(
            reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nthe beginning")
        )
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield client.waitForBytes(b"the beginning")
        client.transport.abortConnection()
        yield backend.waitForAllClosed()
        self.assertEqual(balancer.backends[0].pool.idleCount, 0)
        self.assertEqual(balancer.backends[0].active, 0)
        self.assertEqual(balancer.site.inFlight, 0)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_disconnectBeforeResponse(self):
        backend = self.backend(lambda c, r: None)
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        yield backend.waitFor(lambda: backend.requests)
        client.transport.loseConnection()
        yield backend.waitForAllClosed()
        self.assertEqual(balancer.backends[0].active, 0)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class MalformedRequestTests(_Integration):
    @inlineCallbacks
    def _refused(self, request, code):
        backend = self.backend(reply(ok(b"served")))
        balancer = yield self.balancer(backend)
        client = yield connectClient(self.net, balancer.port)
        client.send(request)
        data = yield client.waitForClose()
        response, rest = parseResponse(data, closed=True)
        self.assertEqual(response.code, code)
        self.assertEqual(backend.requests, [])
        # The balancer serves the next client as if nothing happened.
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.body, b"served")

    def test_badRequestLine(self):
        return self._refused(b"THIS IS NOT HTTP AT ALL\r\n\r\n", 400)

    def test_headerWithNul(self):
        return self._refused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400)

    def test_headerWithoutColon(self):
        return self._refused(b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400)

    def test_negativeContentLength(self):
        return self._refused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400)

    def test_absurdContentLength(self):
        return self._refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            413,
        )

    def test_contentLengthAndChunked(self):
        return self._refused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            400,
        )


class BodyLimitTests(_Integration):
    """
    A request body over max_body_size gets a 413 before it is read, and is
    never sent to a backend.
    """

    @inlineCallbacks
    def _send(self, request):
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, maxBodySize=1000)
        client = yield connectClient(self.net, balancer.port)
        client.send(request)
        data = yield client.waitForClose()
        response, rest = parseResponse(data, closed=True)
        return response, backend

    @inlineCallbacks
    def test_contentLengthOverLimit(self):
        response, backend = yield self._send(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n"
        )
        self.assertEqual(response.code, 413)
        self.assertEqual(backend.requests, [])

    @inlineCallbacks
    def test_expectContinueOverLimit(self):
        """
        No 100 Continue invites a body that will be refused.
        """
        response, backend = yield self._send(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(response.code, 413)

    @inlineCallbacks
    def test_expectContinueUnderLimit(self):
        """
        A declared body within the limit is invited with 100 Continue, and
        flows to the backend once sent.
        """
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, maxBodySize=1000)
        client = yield connectClient(self.net, balancer.port)
        client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        yield client.waitForBytes(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(backend.requests, [])
        client.send(b"hello")
        yield client.waitForBytes(b"hello")
        self.assertEqual(backend.requests[0].body, b"hello")

    @inlineCallbacks
    def test_chunkedOverLimit(self):
        chunk = b"x" * 600
        response, backend = yield self._send(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"258\r\n%s\r\n258\r\n%s\r\n0\r\n\r\n" % (chunk, chunk)
        )
        self.assertEqual(response.code, 413)
        self.assertEqual(backend.requests, [])

    @inlineCallbacks
    def test_atLimitPasses(self):
        body = b"y" * 1000
        backend = self.backend(echo)
        balancer = yield self.balancer(backend, maxBodySize=1000)
        response = yield exchange(self.net, balancer.port, post(body))
        self.assertEqual(response.body, body)
        chunked = yield exchange(
            self.net,
            balancer.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3e8\r\n%s\r\n0\r\n\r\n" % (body,),
        )
        self.assertEqual(chunked.body, body)


class TargetTests(_Integration):
    @inlineCallbacks
    def test_targetForwardedAsReceived(self):
        backend = self.backend(reply(ok()))
        balancer = yield self.balancer(backend)
        targets = [b"/a%2Fb/../c?x=%20", b"/%7e/./x//y?a=1&a=2&b=%zz#", b"/?q=%2F%2f"]
        for target in targets:
            yield exchange(self.net, balancer.port, get(target))
        self.assertEqual([r.target for r in backend.requests], targets)
        self.assertEqual(
            backend.requests[0].requestLine, b"GET /a%2Fb/../c?x=%20 HTTP/1.1"
        )

    @inlineCallbacks
    def test_absoluteFormReducedToOriginForm(self):
        backend = self.backend(reply(ok()))
        balancer = yield self.balancer(backend)
        yield exchange(
            self.net,
            balancer.port,
            b"GET http://balancer.example/p%20q?r=1 HTTP/1.1\r\nHost: balancer.example\r\n\r\n",
        )
        self.assertEqual(backend.requests[0].target, b"/p%20q?r=1")


# -- in memory: the clock and backpressure under the test's control --------------------


class _InMemory(unittest.SynchronousTestCase):
    def request(self, balancer, data=None):
        channel, transport = balancer.client()
        channel.dataReceived(data or get())
        return channel, transport

    def response(self, transport, method=b"GET", closed=False):
        parsed = parseResponse(transport.value(), method, closed=closed)
        self.assertIsNotNone(parsed, transport.value())
        return parsed[0]


class MemoryTests(_InMemory):
    """
    The balancer's pieces on string transports and a fake clock.
    """

    def test_noAnswerInTime(self):
        """
        A backend that does not answer within backend_timeout gets a 504,
        and its connection is dropped.
        """
        balancer = MemoryBalancer(backendTimeout=2.5)
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        self.assertTrue(backend.value().startswith(b"GET / HTTP/1.1\r\n"))
        balancer.clock.advance(2.4)
        self.assertEqual(transport.value(), b"")
        balancer.clock.advance(0.1)
        response = self.response(transport)
        self.assertEqual(response.code, 504)
        self.assertTrue(backend.disconnected)
        self.assertEqual(balancer.backends[0].active, 0)

    def test_queueFull(self):
        """
        A backend at its connection limit with a full queue gets no more
        requests: 503 with Retry-After, no failure counted against it, and
        the request in progress is unaffected.
        """
        balancer = MemoryBalancer(maxConnections=1, queueSize=0)
        first, firstTransport = self.request(balancer)
        second, secondTransport = self.request(balancer)
        response = self.response(secondTransport)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.header(b"retry-after"), [b"5"])
        [backend] = balancer.backends
        self.assertEqual(backend.failures, 0)
        self.assertTrue(backend.available)
        protocol, _ = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.response(firstTransport).code, 200)
        self.assertEqual(len(balancer.opened[backend.id]), 1)

    def test_queued(self):
        """
        A request that finds the backend at its limit waits for the
        connection to come free and goes out on it.
        """
        balancer = MemoryBalancer(maxConnections=1, queueSize=1)
        first, firstTransport = self.request(balancer)
        second, secondTransport = self.request(balancer, get(b"/second"))
        self.assertEqual(secondTransport.value(), b"")
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"GET /second HTTP/1.1\r\n", backend.value())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok2")
        self.assertEqual(self.response(secondTransport).code, 200)
        self.assertEqual(len(balancer.opened[balancer.backends[0].id]), 1)

    def test_queueWaitTooLong(self):
        balancer = MemoryBalancer(maxConnections=1, queueSize=1, queueTimeout=2)
        self.request(balancer)
        second, secondTransport = self.request(balancer)
        balancer.clock.advance(2)
        self.assertEqual(self.response(secondTransport).code, 503)

    def test_timeoutNotRetried(self):
        """
        A backend that timed out may still act on the request: it is not
        sent to another backend, even for a GET.
        """
        balancer = MemoryBalancer(
            ("http://127.0.0.1:8081", "http://127.0.0.1:8082"), backendTimeout=1
        )
        channel, transport = self.request(balancer)
        balancer.clock.advance(1)
        self.assertEqual(self.response(transport).code, 504)
        self.assertEqual(balancer.opened[balancer.backends[1].id], [])

    def test_bytesKeepTheTimeoutAway(self):
        """
        backend_timeout bounds the silence, not the whole response.
        """
        balancer = MemoryBalancer(backendTimeout=2)
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for part in (b"ab", b"cd", b"ef"):
            balancer.clock.advance(1.5)
            protocol.dataReceived(part)
        response = self.response(transport)
        self.assertEqual(response.body, b"abcdef")

    def test_silenceMidBodyAbortsClient(self):
        balancer = MemoryBalancer(backendTimeout=2)
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
        balancer.clock.advance(2)
        self.assertTrue(backend.disconnected)
        self.assertTrue(transport.disconnected)
        self.assertRaises(FramingError, parseResponse, transport.value(), closed=True)

    def test_slowClientPausesBackend(self):
        """
        When the client's transport cannot take more, the backend connection
        stops being read; when it can, reading resumes.
        """
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        # The balancer's HTTP channel is the client transport's producer; a
        # full send buffer pauses it.
        clientSide = transport.producer
        clientSide.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        clientSide.resumeProducing()
        self.assertEqual(backend.producerState, "producing")
        clientSide.pauseProducing()
        protocol.dataReceived(b"defghij")
        self.assertEqual(self.response(transport).body, b"abcdefghij")
        # A connection goes back to the pool reading again.
        self.assertEqual(backend.producerState, "producing")
        self.assertEqual(balancer.backends[0].pool.idleCount, 1)

    def test_pipelinedResponseStartsPaused(self):
        """
        A response that starts while the client's transport is still full
        from the one before starts paused (the transport will not say it is
        full again), and resumes when the client drains.
        """
        balancer = MemoryBalancer()
        channel, transport = balancer.client()
        channel.dataReceived(get(b"/1") + get(b"/2"))
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        transport.producer.pauseProducing()
        protocol.dataReceived(b"cd")
        # The second request went out on the same, kept, connection.
        self.assertIn(b"GET /2 HTTP/1.1\r\n", backend.value())
        self.assertEqual(len(balancer.opened[balancer.backends[0].id]), 1)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nef")
        self.assertEqual(backend.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")
        protocol.dataReceived(b"gh")
        first, rest = parseResponse(transport.value())
        second, rest = parseResponse(rest)
        self.assertEqual((first.body, second.body, rest), (b"abcd", b"efgh", b""))

    def test_clientGoneAbortsBackend(self):
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(backend.disconnected)
        self.assertEqual(balancer.backends[0].active, 0)
        self.assertEqual(balancer.backends[0].pool.idleCount, 0)
        # What the backend still sends goes nowhere.
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(balancer.site.inFlight, 0)

    def test_clientGoneBeforeHeadAbortsBackend(self):
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(backend.disconnected)
        self.assertEqual(balancer.backends[0].active, 0)

    def test_clientGoneWhileConnecting(self):
        """
        A connection that opens after its client left is kept for the next
        request, unused.
        """
        balancer = MemoryBalancer()
        balancer.hold = True
        channel, transport = self.request(balancer)
        channel.connectionLost(Failure(ConnectionLost()))
        d, protocol, backend = balancer.held[0]
        d.callback(None)
        self.assertEqual(backend.value(), b"")
        self.assertFalse(backend.disconnecting)
        self.assertEqual(balancer.backends[0].pool.idleCount, 1)
        self.assertEqual(balancer.backends[0].active, 0)

    def test_refusedCountsAsPassiveFailure(self):
        balancer = MemoryBalancer(("http://127.0.0.1:8081", "http://127.0.0.1:8082"))
        balancer.refuse.add(balancer.backends[0].id)
        channel, transport = self.request(balancer, post(b"x"))
        protocol, backend = balancer.backendConnection(1)
        self.assertTrue(backend.value().endswith(b"\r\n\r\nx"))
        protocol.dataReceived(ok(b"done"))
        self.assertEqual(self.response(transport).body, b"done")
        self.assertEqual([b.failures for b in balancer.backends], [1, 0])


# -- upgrades (WebSocket and others), in memory ---------------------------------------------

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: balancer.example\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class ClientWriteTests(_InMemory):
    """
    How a response is written to the client: in one write when the backend
    sent it in one read, as it comes otherwise.
    """

    def writes(self, transport):
        calls = []
        write, writeSequence = transport.write, transport.writeSequence

        def counted(data):
            calls.append(data)
            write(data)

        def countedSequence(seq):
            calls.append(b"".join(seq))
            writeSequence(seq)

        transport.write, transport.writeSequence = counted, countedSequence
        return calls

    def test_inOneRead(self):
        balancer = MemoryBalancer()
        for method, response in [
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ]:
            channel, transport = balancer.client()
            calls = self.writes(transport)
            channel.dataReceived(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
            protocol, _ = balancer.backendConnection()
            protocol.dataReceived(response)
            self.assertEqual(len(calls), 1, (method, calls))
            self.assertEqual(calls[0], transport.value())
            parsed = self.response(transport, method)
            self.assertEqual(parsed.code, int(response[9:12]))

    def test_splitStreams(self):
        """
        A body still to come: the head goes out as soon as it is read.
        """
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer)
        protocol, _ = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))
        protocol.dataReceived(b"world")
        self.assertEqual(self.response(transport).body, b"helloworld")


class LatencyTests(_InMemory):
    """
    What a balancing policy hears of an answer's latency: from the
    request's start to the first bytes of its answer, not to its end.
    """

    def test_toFirstBytes(self):
        balancer = MemoryBalancer(balance="p2c")
        [backend] = balancer.backends
        self.assertTrue(backend.pool.stampArrivals)
        channel, transport = self.request(balancer)
        protocol, _ = balancer.backendConnection()
        balancer.clock.advance(0.5)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        balancer.clock.advance(2)
        protocol.dataReceived(b"world")
        self.assertEqual(self.response(transport).body, b"helloworld")
        figures = balancer.group.policy.figures(backend)
        self.assertEqual(figures["ewma_ms"], 500.0)
        # The backend's own figures are the whole exchange's.
        self.assertEqual(backend.stats.latency()["p50"], 2500.0)

    def test_onlyForAPolicyThatTimes(self):
        """
        Round robin does not look at latency: no stamps; a reload to p2c
        has the backends' new connections stamped.
        """
        from rrbalancer.backends import Ejection
        from rrbalancer.policies import PowerOfTwoChoices, RoundRobin

        from rrbalancer import backends

        self.patch(backends, "UnreadAnswers", RecordingUnread)
        balancer = MemoryBalancer()
        [backend] = balancer.backends
        self.assertFalse(backend.pool.stampArrivals)
        channel, transport = self.request(balancer)
        protocol, _ = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        balancer.group.rebalance(
            PowerOfTwoChoices(balancer.clock), Ejection(), slowStart=0, panicThreshold=0
        )
        self.assertTrue(backend.pool.stampArrivals)
        # The connection kept joins the watch, as new ones will.
        self.assertEqual(len(backend.pool.unread.watched), 1)
        balancer.group.rebalance(RoundRobin(), Ejection(), slowStart=0, panicThreshold=0)
        self.assertEqual((backend.pool.stampArrivals, backend.pool.unread), (False, None))

    def test_clientRequestsAwaitAnswers(self):
        """
        A client's request counts in the load: its connection awaits the
        answer until the first bytes are read, in the watch of answers
        waiting unread that p2c's pools share.
        """
        balancer = MemoryBalancer(balance="p2c")
        [backend] = balancer.backends
        self.assertIs(backend.pool.unread, balancer.group._unread)
        watch = backend.pool.unread = RecordingUnread()
        channel, transport = self.request(balancer)
        protocol, _ = balancer.backendConnection()
        [connection] = watch.watched
        self.assertTrue(connection.awaitingAnswer)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(connection.awaitingAnswer)
        self.assertEqual(watch.answered, [connection])


class UpgradeMemoryTests(_InMemory):
    """
    An upgrade through the balancer's pieces: the 101, the tunnel it opens
    between the two connections, and every other answer.
    """

    def switched(self, balancer=None, early=b"", rest=b""):
        """
        A client whose upgrade the backend accepted: (balancer, channel,
        client transport, backend protocol, backend transport).
        """
        balancer = balancer or MemoryBalancer()
        self.logged = []
        balancer.site.log = self.logged.append
        channel, transport = self.request(balancer, UPGRADE + early)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(SWITCH + rest)
        return balancer, channel, transport, protocol, backend

    def test_switch(self):
        """
        The backend gets the upgrade with its pair of headers; the client
        gets the 101 with the backend's headers; then bytes pass both ways,
        those sent early first.
        """
        balancer, channel, transport, protocol, backend = self.switched(
            early=b"\x81\x03abc", rest=b"\x81\x02hi"
        )
        head, _, sent = backend.value().partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        self.assertIn(b"connection: upgrade", lines)
        self.assertIn(b"upgrade: websocket", lines)
        self.assertIn(b"sec-websocket-key: dghlihnhbxbszsbub25jzq==", lines)
        self.assertEqual(sent, b"\x81\x03abc")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi",
        )
        channel.dataReceived(b"\x82\x01\x00")
        protocol.dataReceived(b"\x82\x01\xff")
        self.assertTrue(backend.value().endswith(b"\x81\x03abc\x82\x01\x00"))
        self.assertTrue(transport.value().endswith(b"\x81\x02hi\x82\x01\xff"))
        [b] = balancer.backends
        self.assertEqual((b.tunnels.open, b.tunnels.toBackend, b.tunnels.toClient), (1, 8, 7))
        self.assertEqual(balancer.site.tunnelCounts.toClient, 7)

    def test_requestEndsAtTheSwitch(self):
        """
        The request is over at the 101: logged with it (as NGINX does), no
        longer in flight nor on its backend, counted as a 1xx; the tunnel
        is counted instead.
        """
        balancer, channel, transport, protocol, backend = self.switched()
        [request] = self.logged
        self.assertEqual(request.code, 101)
        self.assertEqual(request.backendStatus, 101)
        self.assertEqual(balancer.site.inFlight, 0)
        self.assertEqual(len(balancer.site.tunnels), 1)
        self.assertEqual(channel.requests, [])
        [b] = balancer.backends
        self.assertEqual(b.active, 0)
        self.assertEqual(b.stats.responses, {"1xx": 1})
        self.assertEqual(b.tunnels.opened, 1)

    def test_eitherSideClosesBoth(self):
        balancer, channel, transport, protocol, backend = self.switched()
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(backend.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        [b] = balancer.backends
        self.assertEqual((b.tunnels.open, len(balancer.site.tunnels)), (0, 0))
        self.assertEqual(b.pool.openCount, 0)
        self.assertEqual(b.pool.idleCount, 0)

        balancer, channel, transport, protocol, backend = self.switched()
        protocol.dataReceived(b"\x88\x02\x03\xe8")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().endswith(b"\x88\x02\x03\xe8"))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(balancer.site.tunnels), 0)
        self.assertEqual(balancer.site._channels, set())

    def test_backpressure(self):
        """
        A client that cannot take more pauses the backend, through the
        channel that owns the client transport's producer slot; a backend
        that cannot take more pauses the client.
        """
        balancer, channel, transport, protocol, backend = self.switched()
        transport.producer.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        self.assertEqual(transport.producerState, "producing")
        transport.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")
        backend.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        backend.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_clientAlreadyFull(self):
        """
        A client whose transport was full before the switch (it did not
        read the 101 yet) holds the backend back from the start.
        """
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer, UPGRADE)
        transport.producer.pauseProducing()
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(SWITCH)
        self.assertEqual(backend.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")

    def test_joinFails(self):
        """
        Should joining the two connections fail, both are cut and the
        failure logged: no client is left waiting.
        """
        from rrbalancer import tunnel

        def broken(*args, **kwargs):
            raise RuntimeError("broken")

        self.patch(tunnel.Tunnel, "start", broken)
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer, UPGRADE)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(SWITCH)
        self.assertTrue(transport.disconnected)
        self.assertTrue(backend.disconnected)
        self.assertEqual(balancer.backends[0].active, 0)
        self.assertEqual(balancer.site.tunnels, set())
        self.successResultOf(balancer.site.whenIdle())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_clientTimeoutsOff(self):
        """
        An HTTP connection's idle timeout does not apply to a tunnel; the
        tunnel's own does.
        """
        balancer, channel, transport, protocol, backend = self.switched(
            MemoryBalancer(clientTimeout=5, tunnelTimeout=100)
        )
        balancer.clock.advance(99)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x")
        balancer.clock.advance(99)
        self.assertFalse(transport.disconnecting or backend.disconnecting)
        balancer.clock.advance(1)
        self.assertTrue(transport.disconnecting and backend.disconnecting)

    def test_refused(self):
        """
        Any other answer to an upgrade is an ordinary response; the backend
        connection is closed after it, and the client's goes on as HTTP.
        """
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer, UPGRADE)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\nnope"
        )
        response = self.response(transport)
        self.assertEqual((response.code, response.body), (426, b"nope"))
        self.assertEqual(response.header(b"upgrade"), [])
        self.assertTrue(backend.disconnecting)
        [b] = balancer.backends
        self.assertEqual(b.pool.idleCount, 0)
        self.assertEqual(balancer.site.tunnels, set())
        channel.dataReceived(get(b"/next"))
        protocol, backend = balancer.backendConnection()
        self.assertTrue(backend.value().startswith(b"GET /next HTTP/1.1\r\n"))
        self.assertNotIn(b"Upgrade", backend.value())

    def test_neverOnAKeptConnection(self):
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(ok())
        [b] = balancer.backends
        self.assertEqual(b.pool.idleCount, 1)
        self.request(balancer, UPGRADE)
        self.assertEqual(len(balancer.opened[b.id]), 2)
        self.assertEqual(b.pool.idleCount, 1)

    def test_noAnswerNotRetried(self):
        """
        An upgrade the backend does not answer in time is a 504, never sent
        to another backend.
        """
        balancer = MemoryBalancer(
            ("http://127.0.0.1:8081", "http://127.0.0.1:8082"), backendTimeout=2.0
        )
        channel, transport = self.request(balancer, UPGRADE)
        balancer.clock.advance(2.0)
        self.assertEqual(self.response(transport).code, 504)
        self.assertEqual([len(balancer.opened[b.id]) for b in balancer.backends], [1, 0])

    def test_resetNotRetried(self):
        balancer = MemoryBalancer(("http://127.0.0.1:8081", "http://127.0.0.1:8082"))
        channel, transport = self.request(balancer, UPGRADE)
        protocol, backend = balancer.backendConnection()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.response(transport).code, 502)
        self.assertEqual([len(balancer.opened[b.id]) for b in balancer.backends], [1, 0])

    def test_refusedConnectionMovesOn(self):
        """
        Nothing was sent on a connection that could not be opened: the
        upgrade goes to the next backend, as any request does.
        """
        balancer = MemoryBalancer(("http://127.0.0.1:8081", "http://127.0.0.1:8082"))
        balancer.refuse.add(balancer.backends[0].id)
        self.logged = []
        balancer.site.log = self.logged.append
        channel, transport = self.request(balancer, UPGRADE)
        protocol, backend = balancer.backendConnection(1)
        protocol.dataReceived(SWITCH)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        self.assertEqual(balancer.backends[1].tunnels.open, 1)

    def test_badSwitch(self):
        """
        A 101 to a protocol the client did not offer is a 502.
        """
        balancer = MemoryBalancer()
        channel, transport = self.request(balancer, UPGRADE)
        protocol, backend = balancer.backendConnection()
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        self.assertEqual(self.response(transport).code, 502)
        self.assertEqual(balancer.backends[0].protocolErrors, 1)

    def test_notPassed(self):
        """
        h2c, an HTTP/1.0 upgrade, or an Upgrade without Connection: upgrade
        is no upgrade: an ordinary request on a kept connection, without
        the pair.
        """
        for request in [
            UPGRADE.replace(b"websocket", b"h2c"),
            UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"),
            UPGRADE.replace(b"keep-alive, Upgrade", b"keep-alive"),
        ]:
            balancer = MemoryBalancer()
            channel, transport = self.request(balancer, request)
            protocol, backend = balancer.backendConnection()
            self.assertNotIn(b"upgrade", backend.value().lower(), request)
            protocol.dataReceived(ok())
            self.assertEqual(balancer.backends[0].pool.idleCount, 1)

    def test_stopLetsTunnelsRunForTheGrace(self):
        """
        A stopping balancer waits for its tunnels as for requests in
        flight, for the shutdown grace at most, then closes them.
        """
        balancer, channel, transport, protocol, backend = self.switched(
            MemoryBalancer(shutdownGrace=10.0)
        )
        balancer.service.startService()
        stopped = balancer.service.stopService()
        balancer.clock.advance(9)
        self.assertNoResult(stopped)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"still here")
        self.assertTrue(backend.value().endswith(b"still here"))
        balancer.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(backend.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        protocol.connectionLost(Failure(ConnectionDone()))
        balancer.clock.advance(1)
        self.successResultOf(stopped)

    def test_stopAfterTunnelsClose(self):
        balancer, channel, transport, protocol, backend = self.switched(
            MemoryBalancer(shutdownGrace=10.0)
        )
        balancer.service.startService()
        stopped = balancer.service.stopService()
        protocol.connectionLost(Failure(ConnectionDone()))
        channel.connectionLost(Failure(ConnectionDone()))
        balancer.clock.advance(0.1)
        self.successResultOf(stopped)


class RandomIDsTests(unittest.SynchronousTestCase):
    def test_cutFromOneRead(self):
        """
        Each id is 16 bytes of one read, as 32 hex digits, in turn; the
        next read comes when a read is used up.
        """
        reads = []

        def urandom(n):
            reads.append(n)
            return bytes(range(len(reads), len(reads) + n))

        ids = _RandomIDs(urandom, batch=2)
        self.assertEqual(
            [ids(), ids(), ids()],
            [bytes(range(1, 17)).hex().encode(), bytes(range(17, 33)).hex().encode(),
             bytes(range(2, 18)).hex().encode()],
        )
        self.assertEqual(reads, [32, 32])

    def test_distinct(self):
        ids = _RandomIDs()
        made = [ids() for _ in range(1000)]
        self.assertEqual(len(set(made)), 1000)
        self.assertTrue(all(len(i) == 32 and int(i, 16) >= 0 for i in made))
