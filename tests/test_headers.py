"""
What the balancer changes in headers, and nothing more: the functions of
L{rrbalancer.headers} on their own, then the same rules end to end through
a running balancer.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from rrbalancer.headers import LocationRewriter, requestHead, responseHeaders, upgradeOffer

from rrbalancer.config import BackendConfig

from .support import (
    Net,
    ScriptedBackend,
    connectClient,
    exchange,
    get,
    ok,
    receivedThrough,
    reply,
    startBalancer,
)

HOP_BY_HOP_REQUEST = (
    b"Connection: keep-alive, X-Secret\r\n"
    b"X-Secret: 1\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: websocket\r\n"
)


class RequestHeadTests(unittest.SynchronousTestCase):
    def head(self, headers, method=b"GET", body=0, hadBody=False, host=b"client.example"):
        return requestHead(
            method, b"/p?q=1", headers, host, b"192.0.2.1", b"http", body, hadBody
        )

    def lines(self, head):
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        return head[:-4].split(b"\r\n")

    def test_exactHead(self):
        head = self.head(
            [
                (b"Host", [b"client.example"]),
                (b"Accept", [b"*/*"]),
                (b"X-Multi", [b"a", b"b"]),
            ]
        )
        self.assertEqual(
            head,
            b"GET /p?q=1 HTTP/1.1\r\n"
            b"Host: client.example\r\n"
            b"Accept: */*\r\n"
            b"X-Multi: a\r\n"
            b"X-Multi: b\r\n"
            b"X-Forwarded-For: 192.0.2.1\r\n"
            b"X-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: client.example\r\n"
            b"\r\n",
        )

    def test_hopByHopDropped(self):
        lines = self.lines(
            self.head(
                [
                    (b"Host", [b"client.example"]),
                    (b"Connection", [b"Keep-Alive, x-secret", b" X-Other "]),
                    (b"X-Secret", [b"1"]),
                    (b"X-Other", [b"2"]),
                    (b"Keep-Alive", [b"timeout=5"]),
                    (b"Proxy-Connection", [b"keep-alive"]),
                    (b"Te", [b"trailers"]),
                    (b"Trailer", [b"X-Checksum"]),
                    (b"Transfer-Encoding", [b"chunked"]),
                    (b"Upgrade", [b"websocket"]),
                    (b"X-Kept", [b"yes"]),
                ],
                method=b"POST",
                body=3,
                hadBody=True,
            )
        )
        names = [line.split(b":")[0].lower() for line in lines[1:]]
        self.assertEqual(
            names,
            [
                b"host",
                b"x-kept",
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-forwarded-host",
                b"content-length",
            ],
        )
        self.assertIn(b"Content-Length: 3", lines)

    def test_forwardedForAppended(self):
        lines = self.lines(
            self.head(
                [
                    (b"Host", [b"h"]),
                    (b"X-Forwarded-For", [b"203.0.113.1, 198.51.100.2", b"203.0.113.3"]),
                ]
            )
        )
        self.assertIn(
            b"X-Forwarded-For: 203.0.113.1, 198.51.100.2, 203.0.113.3, 192.0.2.1", lines
        )
        self.assertEqual(sum(line.startswith(b"X-Forwarded-For") for line in lines), 1)

    def test_clientCannotSetProxyHeaders(self):
        """
        The client's own Content-Length, X-Forwarded-Proto and
        X-Forwarded-Host are replaced, never passed on.
        """
        lines = self.lines(
            self.head(
                [
                    (b"Host", [b"real.example"]),
                    (b"X-Forwarded-Proto", [b"https"]),
                    (b"X-Forwarded-Host", [b"spoofed.example"]),
                    (b"Content-Length", [b"999"]),
                ],
                body=0,
                hadBody=True,
            )
        )
        self.assertIn(b"X-Forwarded-Proto: http", lines)
        self.assertIn(b"X-Forwarded-Host: real.example", lines)
        self.assertIn(b"Content-Length: 0", lines)
        joined = b"\n".join(lines)
        self.assertNotIn(b"https", joined)
        self.assertNotIn(b"spoofed", joined)
        self.assertNotIn(b"999", joined)

    def test_hostGiven(self):
        lines = self.lines(
            self.head([(b"Host", [b"client.example"])], host=b"10.0.0.5:8081")
        )
        self.assertEqual(lines[1], b"Host: 10.0.0.5:8081")
        self.assertIn(b"X-Forwarded-Host: client.example", lines)

    def test_bodyFraming(self):
        def length(method, body, hadBody):
            lines = self.lines(self.head([(b"Host", [b"h"])], method, body, hadBody))
            return [l for l in lines if l.lower().startswith(b"content-length")]

        self.assertEqual(length(b"GET", 0, False), [])
        self.assertEqual(length(b"GET", 0, True), [b"Content-Length: 0"])
        self.assertEqual(length(b"POST", 0, False), [b"Content-Length: 0"])
        self.assertEqual(length(b"PUT", 7, True), [b"Content-Length: 7"])


class UpgradeOfferTests(unittest.SynchronousTestCase):
    """
    C{Upgrade} and C{Connection: upgrade} pass as a pair, or not at all.
    """

    def test_websocket(self):
        self.assertEqual(upgradeOffer(b"HTTP/1.1", [b"Upgrade"], [b"websocket"]), b"websocket")
        self.assertEqual(
            upgradeOffer(b"HTTP/1.1", [b"keep-alive", b" upgrade "], [b"WebSocket"]),
            b"WebSocket",
        )

    def test_severalProtocols(self):
        self.assertEqual(
            upgradeOffer(b"HTTP/1.1", [b"upgrade"], [b"foo/2, ,bar", b"baz/1.0"]),
            b"foo/2, bar, baz/1.0",
        )

    def test_h2cNeverPassed(self):
        """
        h2c upgrades this one connection to HTTP/2: hop-by-hop only.
        """
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"Upgrade, HTTP2-Settings"], [b"h2c"]))
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"upgrade"], [b"H2C"]))
        self.assertEqual(
            upgradeOffer(b"HTTP/1.1", [b"upgrade"], [b"h2c, websocket"]), b"websocket"
        )

    def test_noPair(self):
        """
        Without C{Connection: upgrade}, from HTTP/1.0, or malformed: none.
        """
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", None, [b"websocket"]))
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"keep-alive"], [b"websocket"]))
        self.assertIsNone(upgradeOffer(b"HTTP/1.0", [b"upgrade"], [b"websocket"]))
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"upgrade"], None))
        self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"upgrade"], [b""]))
        for bad in (b"web socket", b"a/", b"/1", b"a/b/c", b"x\x00"):
            self.assertIsNone(upgradeOffer(b"HTTP/1.1", [b"upgrade"], [bad]), bad)

    def test_inTheHead(self):
        """
        The pair is the only hop-by-hop header sent on; whatever else the
        client's C{Connection} named stays behind.
        """
        head = requestHead(
            b"GET",
            b"/chat",
            [
                (b"Connection", [b"Upgrade, X-Secret"]),
                (b"Upgrade", [b"websocket"]),
                (b"X-Secret", [b"1"]),
                (b"Sec-WebSocket-Key", [b"dGhlIHNhbXBsZSBub25jZQ=="]),
            ],
            b"h",
            b"192.0.2.1",
            b"http",
            0,
            False,
            upgrade=b"websocket",
        )
        lines = head[:-4].split(b"\r\n")
        self.assertIn(b"Connection: upgrade", lines)
        self.assertIn(b"Upgrade: websocket", lines)
        self.assertIn(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", lines)
        self.assertEqual(
            [line for line in lines if line.split(b":")[0].lower() in (b"connection", b"upgrade", b"x-secret")],
            [b"Connection: upgrade", b"Upgrade: websocket"],
        )


class ResponseHeadersTests(unittest.SynchronousTestCase):
    rewrite = LocationRewriter("http://10.0.0.5:8081")

    def test_endToEndKeptInOrder(self):
        headers = [
            (b"Set-Cookie", b"a=1"),
            (b"X-A", b"1"),
            (b"Set-Cookie", b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
            (b"Server", b"backend/1"),
            (b"Set-Cookie", b"c=3"),
        ]
        self.assertEqual(responseHeaders(headers, self.rewrite, b"http://c"), headers)

    def test_hopByHopAndLengthDropped(self):
        headers = [
            (b"Connection", b"X-Private, close"),
            (b"connection", b"x-other"),
            (b"X-Private", b"1"),
            (b"X-Other", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"h2c"),
            (b"Content-Length", b"5"),
            (b"X-Public", b"yes"),
        ]
        self.assertEqual(
            responseHeaders(headers, self.rewrite, b"http://c"), [(b"X-Public", b"yes")]
        )

    def test_locationRewritten(self):
        headers = [
            (b"Location", b"http://10.0.0.5:8081/next?a=1"),
            (b"Content-Location", b"http://10.0.0.5:8081/doc"),
            (b"Link", b"<http://10.0.0.5:8081/x>"),
        ]
        self.assertEqual(
            responseHeaders(headers, self.rewrite, b"https://public.example"),
            [
                (b"Location", b"https://public.example/next?a=1"),
                (b"Content-Location", b"https://public.example/doc"),
                (b"Link", b"<http://10.0.0.5:8081/x>"),
            ],
        )


class LocationRewriterTests(unittest.SynchronousTestCase):
    def test_pointsAtBackend(self):
        rewrite = LocationRewriter("http://10.0.0.5:8081")
        base = b"http://public.example"
        for value, expected in [
            (b"http://10.0.0.5:8081/x/y?z#f", b"http://public.example/x/y?z#f"),
            (b"http://10.0.0.5:8081", b"http://public.example"),
            (b"http://10.0.0.5:8081?q", b"http://public.example?q"),
            (b"http://10.0.0.5:8081#f", b"http://public.example#f"),
            (b"HTTP://10.0.0.5:8081/Case", b"http://public.example/Case"),
        ]:
            self.assertEqual(rewrite(value, base), expected)

    def test_othersUntouched(self):
        rewrite = LocationRewriter("http://10.0.0.5:8081")
        for value in [
            b"/relative",
            b"relative",
            b"http://10.0.0.5:80810/x",
            b"http://10.0.0.5:8081.evil.example/x",
            b"http://10.0.0.5/x",
            b"https://10.0.0.5:8081/x",
            b"http://other.example/x",
            b"//10.0.0.5:8081/x",
        ]:
            self.assertEqual(rewrite(value, b"http://public.example"), value)

    def test_noClientHost(self):
        rewrite = LocationRewriter("http://10.0.0.5:8081")
        self.assertEqual(rewrite(b"http://10.0.0.5:8081/x", None), b"http://10.0.0.5:8081/x")

    def test_defaultPorts(self):
        base = b"http://p"
        self.assertEqual(LocationRewriter("http://b")(b"http://b:80/x", base), b"http://p/x")
        self.assertEqual(LocationRewriter("http://b:80")(b"http://b/x", base), b"http://p/x")
        self.assertEqual(
            LocationRewriter("https://b")(b"https://b:443/x", base), b"http://p/x"
        )
        self.assertEqual(
            LocationRewriter("http://[::1]")(b"http://[::1]:80/x", base), b"http://p/x"
        )
        self.assertEqual(
            LocationRewriter("http://[::1]:8080")(b"http://[::1]:8080/x", base),
            b"http://p/x",
        )
        self.assertEqual(LocationRewriter("http://b")(b"http://b:8080/x", base), b"http://b:8080/x")


class EndToEndHeaderTests(unittest.TestCase):
    """
    The header rules through a running balancer, as the backend and the
    client see them.
    """

    timeout = 15

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def roundTrip(self, answer, request, method=b"GET", **settings):
        backend = ScriptedBackend(self.net, reply(answer))
        balancer = yield startBalancer(self.net, [backend.url], **settings)
        response = yield exchange(self.net, balancer.port, request, method)
        return backend, response

    @inlineCallbacks
    def test_requestHopByHopRemoved(self):
        backend, response = yield self.roundTrip(
            ok(),
            b"POST / HTTP/1.1\r\nHost: balancer.example\r\n"
            + HOP_BY_HOP_REQUEST
            + b"X-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        received = backend.requests[0]
        self.assertEqual(
            sorted(received.names()),
            sorted(
                [
                    b"host",
                    b"x-kept",
                    b"x-forwarded-for",
                    b"x-forwarded-proto",
                    b"x-forwarded-host",
                    b"content-length",
                    b"x-request-id",
                    b"via",
                ]
            ),
        )
        self.assertEqual(received.body, b"abc")

    @inlineCallbacks
    def test_responseHopByHopRemoved(self):
        backend, response = yield self.roundTrip(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: X-Private, Keep-Alive\r\n"
            b"X-Private: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Public: yes\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n",
            get(),
        )
        self.assertEqual(response.body, b"abc")
        self.assertEqual(response.header(b"x-public"), [b"yes"])
        # The only framing is the balancer's own.
        self.assertEqual(response.header(b"transfer-encoding"), [b"chunked"])
        for name in (b"connection", b"x-private", b"keep-alive", b"proxy-connection",
                     b"te", b"trailer", b"upgrade"):
            self.assertNotIn(name, response.names())
        self.assertNotIn(b"secret", response.raw)
        self.assertNotIn(b"X-Checksum", response.raw)

    @inlineCallbacks
    def test_responseTransferEncodingRemoved(self):
        """
        A backend's Transfer-Encoding never reaches the client as such (here
        the answer to a HEAD, which the balancer does not frame at all).
        """
        backend, response = yield self.roundTrip(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: balancer.example\r\n\r\n",
            method=b"HEAD",
        )
        self.assertEqual(response.header(b"x-a"), [b"1"])
        self.assertNotIn(b"transfer-encoding", response.names())

    @inlineCallbacks
    def test_forwardingHeaders(self):
        backend, response = yield self.roundTrip(
            ok(),
            get(
                host=b"public.example:8443",
                extra=b"X-Forwarded-For: 203.0.113.9\r\n"
                b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed.example\r\n",
            ),
        )
        received = backend.requests[0]
        self.assertEqual(received.header(b"x-forwarded-for"), [b"203.0.113.9, 127.0.0.1"])
        self.assertEqual(received.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(received.header(b"x-forwarded-host"), [b"public.example:8443"])
        self.assertEqual(received.header(b"host"), [b"public.example:8443"])

    @inlineCallbacks
    def test_forwardedForSet(self):
        backend, response = yield self.roundTrip(ok(), get())
        self.assertEqual(backend.requests[0].header(b"x-forwarded-for"), [b"127.0.0.1"])

    @inlineCallbacks
    def test_backendHostHeader(self):
        """
        With host_header = "backend" the backend gets its own host:port, and
        the client's Host only as X-Forwarded-Host.
        """
        backend = ScriptedBackend(self.net, reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url], hostHeader="backend")
        yield exchange(self.net, balancer.port, get(host=b"public.example"))
        received = backend.requests[0]
        self.assertEqual(received.header(b"host"), [b"127.0.0.1:%d" % backend.port])
        self.assertEqual(received.header(b"x-forwarded-host"), [b"public.example"])

    @inlineCallbacks
    def test_repeatedRequestHeadersKept(self):
        backend, response = yield self.roundTrip(
            ok(),
            get(
                extra=b"X-Multi: a\r\nAccept: text/html\r\nX-Multi: b, c\r\n"
                b"Cookie: x=1\r\nCookie: y=2\r\n"
            ),
        )
        received = backend.requests[0]
        self.assertEqual(received.header(b"x-multi"), [b"a", b"b, c"])
        self.assertEqual(received.header(b"cookie"), [b"x=1", b"y=2"])
        self.assertEqual(received.header(b"accept"), [b"text/html"])

    @inlineCallbacks
    def test_repeatedSetCookiePassedThrough(self):
        cookies = [
            b"a=1; Path=/",
            b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly",
            b"c=3",
        ]
        backend, response = yield self.roundTrip(
            ok(extra=b"".join(b"Set-Cookie: %s\r\n" % c for c in cookies)), get()
        )
        self.assertEqual(response.header(b"set-cookie"), cookies)

    @inlineCallbacks
    def test_statusAndReasonPassedThrough(self):
        answers = {
            b"/299": b"HTTP/1.1 299 Custom Reason Here\r\nContent-Length: 0\r\n\r\n",
            b"/404": b"HTTP/1.1 404 Nope\r\nContent-Length: 0\r\n\r\n",
            b"/599": b"HTTP/1.0 599 \r\nContent-Length: 0\r\n\r\n",
            b"/418": b"HTTP/1.1 418\r\nContent-Length: 0\r\n\r\n",
        }
        backend = ScriptedBackend(self.net, lambda c, r: c.write(answers[r.target]))
        balancer = yield startBalancer(self.net, [backend.url])
        for target, status in [
            (b"/299", b"HTTP/1.1 299 Custom Reason Here\r\n"),
            (b"/404", b"HTTP/1.1 404 Nope\r\n"),
            (b"/599", b"HTTP/1.1 599 \r\n"),
            (b"/418", b"HTTP/1.1 418 \r\n"),
        ]:
            response = yield exchange(self.net, balancer.port, get(target))
            self.assertTrue(response.raw.startswith(status), response.raw)

    @inlineCallbacks
    def test_serverAndDateOfBackend(self):
        backend, response = yield self.roundTrip(
            ok(extra=b"Server: backend/1.0\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n"),
            get(),
        )
        self.assertEqual(response.header(b"server"), [b"backend/1.0"])
        self.assertEqual(response.header(b"date"), [b"Tue, 01 Jan 2030 00:00:00 GMT"])

    @inlineCallbacks
    def test_noContentTypeAdded(self):
        backend, response = yield self.roundTrip(ok(b"x"), get())
        self.assertNotIn(b"content-type", response.names())

    @inlineCallbacks
    def test_locationRewritten(self):
        answers = {}
        backend = ScriptedBackend(self.net, lambda c, r: c.write(answers[r.target]))
        base = b"http://127.0.0.1:%d" % backend.port
        answers[b"/redirect"] = (
            b"HTTP/1.1 302 Found\r\nLocation: %s/next?a=1\r\n"
            b"Content-Location: %s\r\nLink: <%s/x>\r\nX-Origin: %s/y\r\n"
            b"Content-Length: 0\r\n\r\n" % (base, base, base, base)
        )
        answers[b"/others"] = (
            b"HTTP/1.1 301 Moved\r\nLocation: http://other.example/x\r\n"
            b"Content-Location: /relative\r\nContent-Length: 0\r\n\r\n"
        )
        answers[b"/prefix"] = (
            b"HTTP/1.1 301 Moved\r\nLocation: %s0/x\r\nContent-Length: 0\r\n\r\n" % (base,)
        )
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(
            self.net, balancer.port, get(b"/redirect", host=b"public.example:8080")
        )
        self.assertEqual(response.header(b"location"), [b"http://public.example:8080/next?a=1"])
        self.assertEqual(response.header(b"content-location"), [b"http://public.example:8080"])
        self.assertEqual(response.header(b"link"), [b"<%s/x>" % base])
        self.assertEqual(response.header(b"x-origin"), [b"%s/y" % base])
        response = yield exchange(self.net, balancer.port, get(b"/others"))
        self.assertEqual(response.header(b"location"), [b"http://other.example/x"])
        self.assertEqual(response.header(b"content-location"), [b"/relative"])
        response = yield exchange(self.net, balancer.port, get(b"/prefix"))
        self.assertEqual(response.header(b"location"), [b"%s0/x" % base])

    @inlineCallbacks
    def test_locationRewrittenWithoutHost(self):
        """
        A client that names no host (HTTP/1.0) is sent back to the address
        it reached, never to the backend's.
        """
        backend = ScriptedBackend(self.net, lambda c, r: c.write(
            b"HTTP/1.1 302 Found\r\nLocation: %s/next\r\nContent-Length: 0\r\n\r\n"
            % (backend.url.encode("ascii"),)
        ))
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(
            self.net, balancer.port, b"GET /redirect HTTP/1.0\r\n\r\n"
        )
        self.assertEqual(
            response.header(b"location"), [b"http://127.0.0.1:%d/next" % balancer.port]
        )

    @inlineCallbacks
    def test_connectionCloseAnswered(self):
        """
        A client that asks to close gets told the connection closes, and it
        does.
        """
        backend = ScriptedBackend(self.net, reply(ok(b"bye")))
        balancer = yield startBalancer(self.net, [backend.url])
        client = yield connectClient(self.net, balancer.port)
        client.send(get(extra=b"Connection: close\r\n"))
        response = yield client.readResponse()
        self.assertEqual(response.header(b"connection"), [b"close"])
        yield client.waitForClose()


class RequestIDTests(unittest.TestCase):
    """
    A request's id: kept from the client, made when absent or unusable,
    sent to the backend once, and off with C{request_id_header = none}.
    """

    timeout = 10

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def received(self, extra=b"", **settings):
        received = yield receivedThrough(self.net, get(extra=extra), **settings)
        return received.header(b"x-request-id")

    @inlineCallbacks
    def test_kept(self):
        ids = yield self.received(b"X-Request-ID: abc-123\r\n")
        self.assertEqual(ids, [b"abc-123"])

    @inlineCallbacks
    def test_made(self):
        first = yield self.received()
        second = yield self.received()
        self.assertEqual([len(first), len(second)], [1, 1])
        self.assertRegex(first[0].decode(), "^[0-9a-f]{32}$")
        self.assertNotEqual(first, second)

    @inlineCallbacks
    def test_unusableReplaced(self):
        ids = yield self.received(b"X-Request-ID: " + b"x" * 300 + b"\r\n")
        self.assertEqual(len(ids), 1)
        self.assertEqual(len(ids[0]), 32)

    @inlineCallbacks
    def test_otherHeader(self):
        backend = ScriptedBackend(self.net, reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url], requestIDHeader="Trace")
        yield exchange(self.net, balancer.port, get(extra=b"Trace: t1\r\n"))
        received = backend.requests[0]
        self.assertEqual((received.header(b"trace"), received.header(b"x-request-id")), ([b"t1"], []))

    @inlineCallbacks
    def test_off(self):
        ids = yield self.received(requestIDHeader=None)
        self.assertEqual(ids, [])


class ForwardingHeadersTests(unittest.TestCase):
    """
    RFC 7239 C{Forwarded} beside or instead of C{X-Forwarded-*}, and a
    client's chain kept only from the proxies named as trusted.
    """

    timeout = 10

    def setUp(self):
        self.net = Net(self)

    def received(self, extra=b"", **settings):
        return receivedThrough(self.net, get(extra=extra), **settings)

    @inlineCallbacks
    def test_forwarded(self):
        received = yield self.received(forwardedHeader="forwarded")
        self.assertEqual(
            received.header(b"forwarded"),
            [b'for=127.0.0.1;host=balancer.example;proto=http'],
        )
        self.assertEqual(received.header(b"x-forwarded-for"), [])

    @inlineCallbacks
    def test_both(self):
        received = yield self.received(
            b"Forwarded: for=192.0.2.60;proto=https\r\nX-Forwarded-For: 192.0.2.60\r\n",
            forwardedHeader="both",
        )
        self.assertEqual(
            received.header(b"forwarded"),
            [b'for=192.0.2.60;proto=https, for=127.0.0.1;host=balancer.example;proto=http'],
        )
        self.assertEqual(received.header(b"x-forwarded-for"), [b"192.0.2.60, 127.0.0.1"])

    @inlineCallbacks
    def test_chainKeptFromTrustedProxy(self):
        received = yield self.received(
            b"X-Forwarded-For: 198.51.100.7\r\n", trustedProxies=("127.0.0.0/8",)
        )
        self.assertEqual(received.header(b"x-forwarded-for"), [b"198.51.100.7, 127.0.0.1"])

    @inlineCallbacks
    def test_chainReplacedFromOthers(self):
        """
        With trusted proxies named, a client outside them cannot forge its
        address: its chain is replaced by its own address.
        """
        received = yield self.received(
            b"X-Forwarded-For: 198.51.100.7\r\nForwarded: for=198.51.100.7\r\n",
            trustedProxies=("203.0.113.0/24",),
        )
        self.assertEqual(received.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(received.header(b"forwarded"), [])

    @inlineCallbacks
    def test_withoutTrustedProxiesChainAppended(self):
        received = yield self.received(b"X-Forwarded-For: 198.51.100.7\r\n")
        self.assertEqual(received.header(b"x-forwarded-for"), [b"198.51.100.7, 127.0.0.1"])


class ForwardedValueTests(unittest.SynchronousTestCase):
    def test_ipv6AndUnix(self):
        head = requestHead(
            b"GET", b"/", [(b"Host", [b"[::1]:8000"])], b"b", b"::1", b"https", 0, False,
            style="forwarded",
        )
        self.assertIn(b'Forwarded: for="[::1]";host="[::1]:8000";proto=https\r\n', head)
        head = requestHead(b"GET", b"/", [], b"b", b"unix", b"http", 0, False, style="forwarded")
        self.assertIn(b"Forwarded: for=unknown;proto=http\r\n", head)


class ViaTests(unittest.TestCase):
    """
    C{Via} names the balancer on every request it forwards (RFC 9110
    section 7.6.3), and a request that comes back to it is a loop: 508.
    """

    timeout = 10

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def test_sentAndAppended(self):
        received = yield receivedThrough(self.net, get(), via="lb-one")
        self.assertEqual(received.header(b"via"), [b"1.1 lb-one"])
        received = yield receivedThrough(
            self.net, get(extra=b"Via: 1.0 edge, 1.1 cdn\r\n"), via="lb-one"
        )
        self.assertEqual(received.header(b"via"), [b"1.0 edge, 1.1 cdn, 1.1 lb-one"])

    @inlineCallbacks
    def test_off(self):
        received = yield receivedThrough(self.net, get(), via=None)
        self.assertEqual(received.header(b"via"), [])

    @inlineCallbacks
    def test_loopToItself(self):
        """
        A balancer whose backend is itself: the request comes back once,
        is answered 508 there, and the client gets that 508 at once.
        """
        placeholder = ScriptedBackend(self.net, reply(ok()))
        balancer = yield startBalancer(self.net, [placeholder.url])
        group = balancer.group
        group.add(BackendConfig(f"http://127.0.0.1:{balancer.port}"))
        group.remove(group.byURL(placeholder.url))
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.code, 508)
        self.assertIn(b"Loop Detected", response.body)
