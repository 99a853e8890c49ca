"""
Hostile bytes from clients and backends, on real sockets: each vector of
the table below, what NGINX 1.22 and HAProxy 2.6 do with the same bytes,
and what rrbalancer answers.

| vector | NGINX / HAProxy | rrbalancer |
| --- | --- | --- |
| upload longer than --header-timeout (see test_proxy.SlowUploadTests) | 200 | 200; 408 only after --body-timeout without a byte |
| backend answers 413 before reading a large body, 100 times | 413, quiet log | 413, no traceback |
| backend chunk size of 27 hex digits, then bytes | nothing of the body | head, then the client connection aborted; no byte after the bad line |
| backend chunk line not hex | nothing of the body | the same |
| backend response head of 100 KB | 502 | 502 (60 KB passes) |
| Connection: close, X-Foo | closes, X-Foo not sent | the same |
| Connection: X-Foo + Connection: close (two lines) | closes | closes, X-Foo not sent |
| GET @evil.example/x, GET evil.example/x, GET * | 400 | 400 |
| DEL or a byte past 0x7E in the target | 400 | 400 |
| GET http://a.example/p?q=1 | Host: a.example | /p?q=1 with Host: a.example |
| Transfer-Encoding: identity + smuggled GET | 501 / 400 | 400, nothing reaches a backend |
| Transfer-Encoding: chunked + identity on two lines, either order | 400 | 400 |
| Transfer-Encoding: gzip, chunked (one line) | 501 / 400 | 400 |
| Transfer-Encoding: chunked + Transfer-Encoding: br (two lines) | 501 / 400 | 400 |
| Transfer-Encoding on an HTTP/1.0 request | 400 | 400 |
| HTTP/1.1 request without Host, or with two | 400 | 400 |
| a 64 KiB request target | 414 | 414 |
| Upgrade: h2c + HTTP2-Settings to a backend that would switch | no tunnel | Upgrade not forwarded; a 101 from the backend is 502 |
| 100 idle connections to a balancer under ulimit -n 64 | (per worker_connections / maxconn) | those over the limit are accepted and closed at once (Twisted's EMFILE recovery); serves again once they go |

Backend faults (resets, bad framing, extra bytes, 1xx, no answer) have
their own table in test_faults.
"""

import socket
import time

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from rrbalancer.config import BackendConfig

from .support import (
    Net,
    ScriptedBackend,
    connectClient,
    exchange,
    get,
    ok,
    reply,
    startBalancer,
)
from .test_plugin import TwistdMixin, get as blockingGet, twistdCommand


class _Hardening(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.net = Net(self)

    def backend(self, handler):
        return ScriptedBackend(self.net, handler)

    @inlineCallbacks
    def refused(self, data, code):
        """
        C{data} sent to a balancer gets C{code} and the connection closed;
        no backend receives anything.
        """
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        client = yield connectClient(self.net, balancer.port)
        client.send(data)
        answer = yield client.waitForClose()
        self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % code), answer)
        self.assertEqual(backend.requests, [])
        return answer


class EarlyAnswer(Protocol):
    """
    A backend that answers 413 as soon as a request head arrives, without
    reading the body, and closes.
    """

    def dataReceived(self, data):
        if self.transport.disconnecting:
            return
        self.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
        )
        self.transport.loseConnection()


class BackendFaultTests(_Hardening):
    @inlineCallbacks
    def test_earlyAnswerLogsNoTraceback(self):
        factory = Factory.forProtocol(EarlyAnswer)
        port = self.net.listen(factory)
        balancer = yield startBalancer(self.net, [f"http://127.0.0.1:{port}"])
        body = b"x" * (256 * 1024)
        request = (
            b"POST /up HTTP/1.1\r\nHost: b.example\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        for _ in range(100):
            response = yield exchange(self.net, balancer.port, request, b"POST")
            self.assertEqual(response.code, 413)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def badChunk(self, line):
        backend = self.backend(
            reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nfirst\r\n" + line + b"\r\nSECRET-AFTER-THE-BAD-LINE\r\n0\r\n\r\n")
        )
        balancer = yield startBalancer(self.net, [backend.url])
        client = yield connectClient(self.net, balancer.port)
        client.send(get())
        data = yield client.waitForClose()
        self.assertNotIn(b"SECRET", data)
        self.assertNotIn(b"\r\n0\r\n\r\n", data, "the response must not look whole")
        [connection] = backend.connections
        yield connection.closed
        self.assertEqual(balancer.backends[0].protocolErrors, 1)

    def test_chunkSizeOverflow(self):
        return self.badChunk(b"1" * 27)

    def test_chunkLineNotHex(self):
        return self.badChunk(b"zz")

    @inlineCallbacks
    def test_responseHeadLimit(self):
        big = b"X-Big: " + b"a" * (100 * 1024) + b"\r\n"
        fits = b"X-Big: " + b"a" * (60 * 1024) + b"\r\n"
        backend = self.backend(
            lambda c, r: c.write(ok(b"ok", big if r.target == b"/big" else fits))
        )
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(self.net, balancer.port, get(b"/big"))
        self.assertEqual(response.code, 502)
        response = yield exchange(self.net, balancer.port, get(b"/fits"))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(response.header(b"x-big")[0]), 60 * 1024)


class ConnectionListTests(_Hardening):
    @inlineCallbacks
    def closes(self, extra):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        client = yield connectClient(self.net, balancer.port)
        client.send(get(extra=extra + b"X-Foo: secret\r\n"))
        response = yield client.readResponse()
        self.assertEqual(response.header(b"connection"), [b"close"])
        yield client.waitForClose()
        self.assertEqual(backend.requests[0].header(b"x-foo"), [])

    def test_closeInAList(self):
        return self.closes(b"Connection: close, X-Foo\r\n")

    def test_closeOnASecondLine(self):
        return self.closes(b"Connection: X-Foo\r\nConnection: close\r\n")

    def test_closeAnyCase(self):
        return self.closes(b"Connection: X-Foo ,  CLOSE\r\n")


class TargetTests(_Hardening):
    def test_notATarget(self):
        return self.refusedAll(
            [
                b"GET @evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET http://user@a.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
            ],
            400,
        )

    @inlineCallbacks
    def refusedAll(self, requests, code):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        for request in requests:
            response = yield exchange(self.net, balancer.port, request)
            self.assertEqual(response.code, code, request)
        self.assertEqual(backend.requests, [])

    @inlineCallbacks
    def test_absoluteFormAuthority(self):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        yield exchange(
            self.net, balancer.port, b"GET http://a.example/p?q=1 HTTP/1.1\r\nHost: b.example\r\n\r\n"
        )
        received = backend.requests[0]
        self.assertEqual((received.target, received.header(b"host")), (b"/p?q=1", [b"a.example"]))

    @inlineCallbacks
    def test_absoluteFormQueryWithoutPath(self):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        yield exchange(
            self.net, balancer.port, b"GET http://a.example?q=1 HTTP/1.1\r\nHost: b\r\n\r\n"
        )
        received = backend.requests[0]
        self.assertEqual((received.target, received.header(b"host")), (b"/?q=1", [b"a.example"]))

    @inlineCallbacks
    def test_optionsStar(self):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(self.net, balancer.port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.requests[0].target, b"*")

    @inlineCallbacks
    def test_longTarget(self):
        yield self.refused(b"GET /" + b"a" * (64 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414)


class FramingTests(_Hardening):
    def test_identitySmuggling(self):
        return self.refused(
            b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n"
            b"GET /t-SMUGGLED HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        )

    @inlineCallbacks
    def test_chunkedAndIdentityAnyLayout(self):
        for layout in (
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: identity, chunked\r\n",
            b"Transfer-Encoding: chunked, identity\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ):
            yield self.refused(
                b"POST /t HTTP/1.1\r\nHost: a\r\n" + layout + b"\r\n"
                b"5\r\nhello\r\n0\r\n\r\nGET /t-SMUGGLED HTTP/1.1\r\nHost: a\r\n\r\n",
                400,
            )

    @inlineCallbacks
    def test_unknownCoding(self):
        yield self.refused(
            b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            400,
        )
        yield self.refused(
            b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: br\r\n\r\n0\r\n\r\n",
            400,
        )

    def test_chunkedOnHTTP10(self):
        return self.refused(
            b"POST /t HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400
        )

    def test_noHost(self):
        return self.refused(b"GET / HTTP/1.1\r\n\r\n", 400)

    def test_twoHosts(self):
        return self.refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)

    @inlineCallbacks
    def test_http10WithoutHost(self):
        backend = self.backend(reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(self.net, balancer.port, b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(response.code, 200)


class UpgradeTests(_Hardening):
    @inlineCallbacks
    def test_h2cNeverTunnelled(self):
        """
        An h2c upgrade is not passed on, and a backend that switches
        protocols anyway gets the client a 502, never a tunnel.
        """

        def switcher(connection, request):
            if request.header(b"upgrade"):
                connection.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                    b"PRI * HTTP/2.0\r\n"
                )
            else:
                connection.write(ok())

        backend = self.backend(switcher)
        balancer = yield startBalancer(self.net, [backend.url])
        request = get(
            extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        )
        response = yield exchange(self.net, balancer.port, request)
        self.assertEqual(response.code, 200)
        received = backend.requests[0]
        self.assertEqual((received.header(b"upgrade"), received.header(b"http2-settings")), ([], []))
        # Not named in Connection, HTTP2-Settings is still not passed on.
        yield exchange(self.net, balancer.port, get(extra=b"HTTP2-Settings: AAMAAABk\r\n"))
        self.assertEqual(backend.requests[-1].header(b"http2-settings"), [])

        def always(connection, request):
            connection.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )

        other = self.backend(always)
        balancer.group.add(BackendConfig(other.url))
        balancer.group.remove(balancer.group.byURL(backend.url))
        response = yield exchange(self.net, balancer.port, request)
        self.assertEqual(response.code, 502)


class OutOfFileDescriptorsTests(TwistdMixin, unittest.TestCase):
    """
    A balancer run with a low C{ulimit -n}, flooded with idle connections
    until it can accept no more, keeps the ones it has, and serves again
    once they are gone.
    """

    timeout = 60

    def test_floodThenRecover(self):
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--demo", "--admin", "none",
            "--no-health-checks", "--port", "tcp:0:interface=127.0.0.1",
            command=["sh", "-c", 'ulimit -n 64 && exec "$@"', "sh"] + twistdCommand(),
        )
        port = self.listeningPort(process)
        self.assertDemoRotation(process, port)
        flood = []
        try:
            for _ in range(100):
                s = socket.create_connection(("127.0.0.1", port), timeout=3)
                flood.append(s)
            # The kernel queues what the balancer cannot accept; a request
            # now may wait, and must not bring the balancer down.
            time.sleep(0.5)
            self.assertIsNone(process.poll(), self.describe(process))
        finally:
            for s in flood:
                s.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                status, body = blockingGet(port)
                if status == 200:
                    break
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "not serving again" + self.describe(process))
            time.sleep(0.1)
        self.assertDemoRotation(process, port)
        self.assertIsNone(process.poll(), self.describe(process))
        out, err = self.output(process)
        # The flood did reach the limit: Twisted closed what it could not keep.
        self.assertIn("EMFILE", out + err)
        self.assertNotIn("Traceback", out + err, self.describe(process))
        self.assertStopsCleanly(process)
