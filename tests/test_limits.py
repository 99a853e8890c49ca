"""
Tests for L{rrbalancer.limits}: the token buckets on a L{Clock}, and the
limits through a real balancer on loopback sockets (two client addresses:
127.0.0.1 and 127.0.0.2).
"""

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

import ipaddress

from rrbalancer.config import ConfigError, buildConfig
from rrbalancer.limits import DELAY, Limits, RateLimit, RateLimiter, clientAddress

from .support import (
    WAIT,
    Net,
    RawClient,
    connectClient,
    ScriptedBackend,
    exchange,
    get,
    ok,
    reply,
    startBalancer,
    withTimeout,
)


class _Request:
    def __init__(self, client="192.0.2.7", headers=None):
        self._client = IPv4Address("TCP", client, 40000)
        self.requestHeaders = Headers(headers or {})
        self.responseHeaders = Headers()
        self._finished = []

    def getClientAddress(self):
        return self._client

    def notifyFinish(self):
        d = Deferred()
        self._finished.append(d)
        return d

    def finish(self):
        for d in self._finished:
            d.callback(None)


class RateLimiterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def limiter(self, **options):
        options.setdefault("rate", 5)
        return RateLimiter(RateLimit(**options), self.clock)

    def test_bucket(self):
        """
        A burst passes, then one request per 1/rate seconds.
        """
        limiter = self.limiter(rate=5, period=1, burst=5)
        request = _Request()
        verdicts = [limiter.check(request) for _ in range(7)]
        self.assertEqual([v.refused for v in verdicts], [False] * 5 + [True] * 2)
        self.assertEqual(verdicts[5].retryAfter, 1)
        self.clock.advance(0.2)
        self.assertFalse(limiter.check(request).refused)
        self.assertTrue(limiter.check(request).refused)
        self.clock.advance(10)
        self.assertEqual([limiter.check(request).refused for _ in range(6)], [False] * 5 + [True])
        self.assertEqual(limiter.counts["passed"], 11)
        self.assertEqual(limiter.counts["rejected"], 4)

    def test_retryAfterWholeSeconds(self):
        limiter = self.limiter(rate=1, period=60, burst=1)
        request = _Request()
        limiter.check(request)
        self.assertEqual(limiter.check(request).retryAfter, 60)
        self.clock.advance(59.5)
        self.assertEqual(limiter.check(request).retryAfter, 1)

    def test_keysApart(self):
        limiter = self.limiter(rate=1, burst=1)
        self.assertFalse(limiter.check(_Request("192.0.2.1")).refused)
        self.assertTrue(limiter.check(_Request("192.0.2.1")).refused)
        self.assertFalse(limiter.check(_Request("192.0.2.2")).refused)

    def test_headerKeyAndUnkeyed(self):
        """
        A request without the key is not limited, and counted.
        """
        limiter = self.limiter(rate=1, burst=1, key="header:X-Api-Key")
        alice = _Request(headers={b"x-api-key": [b"alice"]})
        self.assertFalse(limiter.check(alice).refused)
        self.assertTrue(limiter.check(alice).refused)
        for _ in range(5):
            self.assertFalse(limiter.check(_Request()).refused)
        self.assertEqual(limiter.counts["unkeyed"], 5)

    def test_delay(self):
        limiter = self.limiter(rate=10, burst=1, mode=DELAY, maxDelay=0.25)
        request = _Request()
        self.assertEqual(limiter.check(request).delay, 0)
        self.assertAlmostEqual(limiter.check(request).delay, 0.1)
        self.assertAlmostEqual(limiter.check(request).delay, 0.2)
        refused = limiter.check(request)
        self.assertTrue(refused.refused)
        self.assertEqual(limiter.counts["delayed"], 2)

    def test_maxInflight(self):
        limiter = self.limiter(rate=100, maxInflight=2)
        request = _Request()
        first, _ = limiter.check(request), limiter.check(request)
        self.assertTrue(limiter.check(request).refused)
        first.release()
        self.assertFalse(limiter.check(request).refused)

    def test_dryRun(self):
        limiter = self.limiter(rate=1, burst=1, dryRun=True)
        request = _Request()
        self.assertEqual([limiter.check(request).refused for _ in range(3)], [False] * 3)
        self.assertEqual(limiter.counts["dry_run"], 2)

    def test_keysBounded(self):
        """
        A flood of distinct addresses leaves at most max_keys remembered;
        the least recently seen go first.
        """
        limiter = self.limiter(rate=1, burst=1, maxKeys=1000)
        hot = _Request("198.51.100.1")
        limiter.check(hot)
        for n in range(100_000):
            limiter.check(_Request(str(ipaddress.ip_address(0x0A000000 + n))))
            if n % 500 == 0:
                limiter.check(hot)
        self.assertEqual(len(limiter), 1000)
        # The address seen all along is still remembered (and limited).
        self.assertTrue(limiter.check(hot).refused)

    def test_headers(self):
        limiter = self.limiter(rate=5, period=1, burst=5, headers=True)
        request = _Request()
        limiter.check(request)
        limiter.check(request)
        self.assertEqual(
            limiter.headers(request),
            [(b"ratelimit-policy", b'"limit0";q=5;w=1'), (b"ratelimit", b'"limit0";r=3;t=1')],
        )
        self.assertEqual(self.limiter(rate=5).headers(request), [])


class ClientAddressTests(SynchronousTestCase):
    def test_trustedProxies(self):
        trusted = (ipaddress.ip_network("192.0.2.0/24"),)
        request = _Request("192.0.2.10", {b"x-forwarded-for": [b"203.0.113.5, 192.0.2.11"]})
        self.assertEqual(clientAddress(request, trusted), "203.0.113.5")
        # From an untrusted peer the chain is not believed.
        request = _Request("198.51.100.3", {b"x-forwarded-for": [b"203.0.113.5"]})
        self.assertEqual(clientAddress(request, trusted), "198.51.100.3")
        self.assertEqual(clientAddress(request, ()), "198.51.100.3")


class GateTests(SynchronousTestCase):
    def test_delayedThenForwarded(self):
        clock = Clock()
        limits = Limits([RateLimiter(RateLimit(rate=10, burst=1, mode=DELAY), clock)], clock)
        forwarded, refused = [], []
        for _ in range(2):
            limits.gate(_Request(), lambda: forwarded.append(clock.seconds()),
                        lambda after, reason: refused.append(after))
        self.assertEqual(forwarded, [0])
        clock.advance(0.1)
        self.assertEqual(forwarded, [0, 0.1])

    def test_inFlightReleasedWhenFinished(self):
        clock = Clock()
        limiter = RateLimiter(RateLimit(rate=100, maxInflight=1), clock)
        limits = Limits([limiter], clock)
        first = _Request()
        refused = []
        limits.gate(first, lambda: None, lambda after, reason: refused.append(reason))
        limits.gate(_Request(), lambda: None, lambda after, reason: refused.append(reason))
        self.assertEqual(refused, ["1 requests in flight"])
        first.finish()
        limits.gate(_Request(), lambda: None, lambda after, reason: refused.append(reason))
        self.assertEqual(len(refused), 1)


class SettingTests(SynchronousTestCase):
    def test_flagAndTable(self):
        config = buildConfig({"backend": ["http://a:1"], "limit": [
            "10/s,burst=20", {"rate": 100, "period": 60, "key": "header:X-Api-Key"},
        ]})
        self.assertEqual(config.limits[0], RateLimit(rate=10, period=1, burst=20))
        self.assertEqual(config.limits[1].key, "header:X-Api-Key")
        self.assertEqual(config.limits[1].period, 60)

    def test_refused(self):
        for bad, message in [
            ("10", "is not a rate"),
            ("10/s,burst=x", "burst: expected a whole number"),
            ("10/s,mode=wait", "mode"),
            ({"period": 1}, "needs a rate"),
        ]:
            e = self.assertRaises(ConfigError, buildConfig, {"backend": ["http://a:1"], "limit": [bad]})
            self.assertIn(message, str(e))


class ThroughTheBalancerTests(TestCase):
    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def fromAddress(self, port, host, request):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT,
                                      bindAddress=(host, 0))
        client = self.net.track(RawClient(), client=True)
        yield withTimeout(connectProtocol(endpoint, client))
        client.send(request)
        response = yield client.readResponse()
        return response

    @inlineCallbacks
    def test_perClientAddress(self):
        """
        rate 5/s, burst 5: of 30 quick requests from one address, 5 to 12
        pass and the rest get 429 with Retry-After; another address is not
        affected.
        """
        backend = ScriptedBackend(self.net, reply(ok()))
        limit = buildConfig({"backend": [backend.url], "limit": ["5/s,burst=5,headers"]}).limits
        balancer = yield startBalancer(self.net, [backend.url], limits=limit)
        responses = yield gatherResults(
            [self.fromAddress(balancer.port, "127.0.0.1", get()) for _ in range(30)]
        )
        codes = [r.code for r in responses]
        self.assertTrue(5 <= codes.count(200) <= 12, codes)
        self.assertEqual(codes.count(200) + codes.count(429), 30)
        refused = [r for r in responses if r.code == 429]
        self.assertEqual(refused[0].header(b"retry-after"), [b"1"])
        self.assertEqual(refused[0].body, b"Too Many Requests\n")
        passed = [r for r in responses if r.code == 200][0]
        self.assertEqual(passed.header(b"ratelimit-policy"), [b'"limit0";q=5;w=1'])
        other = yield self.fromAddress(balancer.port, "127.0.0.2", get())
        self.assertEqual(other.code, 200)
        text = balancer.service.metrics.render().decode()
        self.assertIn('rrbalancer_rate_limit_requests_total{limit="0",outcome="rejected"} '
                      f'{codes.count(429)}', text)

    @inlineCallbacks
    def test_inFlightPerClient(self):
        """
        max_inflight 1: a second request while the first is held gets 429;
        once the first is answered (the request over, its place freed),
        the next one passes.
        """
        held = []
        backend = ScriptedBackend(self.net, lambda connection, request: held.append(connection))
        limit = buildConfig(
            {"backend": [backend.url], "limit": ["1000/s,max_inflight=1"]}
        ).limits
        balancer = yield startBalancer(self.net, [backend.url], limits=limit)
        first = yield connectClient(self.net, balancer.port)
        first.send(get())
        yield backend.waitFor(lambda: len(held) == 1)
        refused = yield exchange(self.net, balancer.port, get())
        self.assertEqual(refused.code, 429)
        held[0].write(ok())
        self.assertEqual((yield first.readResponse()).code, 200)
        later = exchange(self.net, balancer.port, get())
        yield backend.waitFor(lambda: len(held) == 2)
        held[1].write(ok())
        self.assertEqual((yield later).code, 200)

    @inlineCallbacks
    def test_none(self):
        backend = ScriptedBackend(self.net, reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        responses = yield gatherResults(
            [exchange(self.net, balancer.port, get()) for _ in range(20)]
        )
        self.assertEqual({r.code for r in responses}, {200})
        self.assertNotIn("rate_limit", balancer.service.metrics.render().decode())
