"""
Backends that misbehave, on real sockets.  Each fault is sent once, to the
first request; then a second client asks the same balancer for C{/next}.

For every fault the first client gets the answer of the table below
(never a hang), and the second gets exactly its own response: a backend
connection that carried a fault is dropped, never handed to the next
client with stale bytes in it, and the balancer keeps no more backend
connections than it had.

| fault | the client gets | the connection |
| --- | --- | --- |
| reset in the middle of the head | 502 | closed |
| reset in the middle of a body with Content-Length | 502, or the head and the connection aborted | closed |
| a status line that is not HTTP | 502 | closed |
| a chunk line that is not hex, after the head | the connection aborted | closed |
| a body longer than its Content-Length | the response, cut at Content-Length | dropped (its extra bytes never reach anyone) |
| a body shorter than its Content-Length, then close | 502, or the connection aborted | closed |
| both Content-Length and Transfer-Encoding: chunked | the chunked body (RFC 9112 §6.3), without Content-Length | dropped |
| two responses to one request | the first | dropped |
| an answer before the request body was read | the answer | dropped |
| no answer at all | 504 after --backend-timeout | closed |
| a kept connection closed as it is reused | 200, from a fresh connection | replaced |
| 103 Early Hints, then 200 | the 200 | kept |
| a header value holding NUL or a bare CR | 502 | closed |

Against the literal design (C{RRBALANCER_TEST_LITERAL=1}: a resource
handing each request to the next stock C{ReverseProxyResource}), every case
here and in L{tests.test_hardening} fails but seven: an answer before the
body, a body longer than its Content-Length and two responses to one
request (it opens a new HTTP/1.0 connection per request, so no stale bytes
can reach another client), and four of the hardening cases (an early
answer, HTTP/1.0 without Host, an unknown coding, running out of file
descriptors): 28 of 35 fail there, by a wrong answer, a hang, a traceback
or connections left open.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from .support import Net, ScriptedBackend, connectClient, exchange, get, ok, startBalancer


def post(path: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: b.example\r\nContent-Length: %d\r\n\r\n%s" % (
        path, len(body), body,
    )


class _Faults(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def fault(self, fault, request=None, **settings):
        """
        Send C{request} (a GET of C{/fault} by default) through a balancer
        whose backend answers it with C{fault(connection, request)}, then
        check that a second client's C{/next} gets its own answer.

        @return: the first client's L{RawClient}, once the exchange ended
            (a response read, or the connection closed).
        """
        def handler(connection, received):
            if received.target == b"/fault":
                fault(connection, received)
            else:
                connection.write(ok(b"next:" + received.target))

        backend = ScriptedBackend(self.net, handler)
        balancer = yield startBalancer(self.net, [backend.url], **settings)
        self.balancer, self.backend = balancer, backend
        client = yield connectClient(self.net, balancer.port)
        client.send(request or get(b"/fault"))
        yield client.waitFor(lambda: client.isClosed or b"\r\n\r\n" in client.data)
        # Let the exchange end, whatever it was.
        yield deferLater(reactor, 0.05, lambda: None)
        self.first = client
        for n in range(3):
            response = yield exchange(self.net, balancer.port, get(b"/next%d" % (n,)))
            self.assertEqual((response.code, response.body), (200, b"next:/next%d" % (n,)))
        # (The literal design keeps no connections: nothing to count.)
        for backend in balancer.backends:
            self.assertLessEqual(backend.pool.openCount, 1)
        return client

    @inlineCallbacks
    def assertAborted(self, client, head=b"HTTP/1.1 200 "):
        """
        The client never took a broken response for a whole one: it got a
        502 (the fault came before the head was passed on), or its
        connection was closed after the head, or before anything (the head
        was still in the balancer's buffer when the connection was
        aborted).
        """
        if client.data.startswith(b"HTTP/1.1 502 "):
            yield self.assertAnswer(client, 502)
            return client.data
        data = yield client.waitForClose()
        self.assertTrue(data == b"" or data.startswith(head), data)
        self.assertNotIn(b"\r\n0\r\n\r\n", data)
        return data

    @inlineCallbacks
    def assertAnswer(self, client, code, body=None):
        response = yield client.readResponse()
        self.assertEqual(response.code, code)
        if body is not None:
            self.assertEqual(response.body, body)
        return response

    @inlineCallbacks
    def assertDropped(self):
        """
        The backend connection that carried the fault was closed.
        """
        first = self.backend.connections[0]
        yield first.closed


class FaultTests(_Faults):
    @inlineCallbacks
    def test_resetMidHead(self):
        def fault(c, r):
            c.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            c.abort()

        client = yield self.fault(fault)
        yield self.assertAnswer(client, 502)

    @inlineCallbacks
    def test_resetMidBody(self):
        def fault(c, r):
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            c.abort()

        client = yield self.fault(fault)
        yield self.assertAborted(client)

    @inlineCallbacks
    def test_badStatusLine(self):
        client = yield self.fault(lambda c, r: c.write(b"HTTP/1.1 2OO OK\r\n\r\n"))
        yield self.assertAnswer(client, 502)
        yield self.assertDropped()

    @inlineCallbacks
    def test_badChunk(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nSTALE\r\n0\r\n\r\n"
        ))
        data = yield self.assertAborted(client)
        self.assertNotIn(b"STALE", data)
        yield self.assertDropped()

    @inlineCallbacks
    def test_bodyLongerThanContentLength(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTALE BYTES"
        ))
        yield self.assertAnswer(client, 200, b"ok")
        yield self.assertDropped()

    @inlineCallbacks
    def test_bodyShorterThanContentLength(self):
        def fault(c, r):
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            c.close()

        client = yield self.fault(fault)
        yield self.assertAborted(client)

    @inlineCallbacks
    def test_contentLengthAndChunked(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        ))
        response = yield self.assertAnswer(client, 200, b"ok")
        self.assertEqual(response.header(b"content-length"), [])
        yield self.assertDropped()

    @inlineCallbacks
    def test_twoResponses(self):
        client = yield self.fault(lambda c, r: c.write(ok(b"first") + ok(b"SECOND")))
        yield self.assertAnswer(client, 200, b"first")
        yield self.assertDropped()

    @inlineCallbacks
    def test_answerBeforeTheBody(self):
        body = b"x" * (512 * 1024)
        client = yield self.fault(
            lambda c, r: c.write(ok(b"early")), request=post(b"/fault", body)
        )
        yield self.assertAnswer(client, 200, b"early")

    @inlineCallbacks
    def test_noAnswer(self):
        client = yield self.fault(lambda c, r: None, backendTimeout=0.5)
        yield self.assertAnswer(client, 504)
        yield self.assertDropped()

    @inlineCallbacks
    def test_earlyHints(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok(b"final")
        ))
        yield self.assertAnswer(client, 200, b"final")

    @inlineCallbacks
    def test_nulInHeaderValue(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok"
        ))
        yield self.assertAnswer(client, 502)
        yield self.assertDropped()

    @inlineCallbacks
    def test_bareCRInHeaderValue(self):
        client = yield self.fault(lambda c, r: c.write(
            b"HTTP/1.1 200 OK\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\nok"
        ))
        yield self.assertAnswer(client, 502)
        yield self.assertDropped()


class ReuseTests(_Faults):
    @inlineCallbacks
    def test_closedAsReused(self):
        """
        A kept connection the backend closes as the next request arrives:
        the request is sent again on a fresh connection.
        """
        def handler(connection, received):
            if connection is backend.connections[0] and len(connection.requests) == 2:
                connection.close()
            else:
                connection.write(ok(b"fine"))

        backend = ScriptedBackend(self.net, handler)
        balancer = yield startBalancer(self.net, [backend.url])
        for _ in range(3):
            response = yield exchange(self.net, balancer.port, get())
            self.assertEqual((response.code, response.body), (200, b"fine"))
        self.assertEqual(len(backend.connections), 2)
