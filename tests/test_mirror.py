"""
Tests for L{rrbalancer.mirror}: a route's copies to a mirror pool, on real
sockets, and the C{mirror} key of C{[[route]]}.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.admin import AdminAPI
from rrbalancer.config import ConfigError, buildConfig
from rrbalancer.metrics import Metrics

from .support import Net, ScriptedBackend, closeWithoutAnswer, exchange, ok, reply
from .test_admin import poll
from .test_routing import readmeExample, startRouted


def _settings(primary, shadow, route=None, **settings):
    route = dict(
        {"path_prefix": "/api", "pool": "default",
         "mirror": [{"pool": "shadow", "percent": 100}]},
        **(route or {}),
    )
    return dict(
        backend=[primary.url],
        pool=[{"name": "shadow", "backend": [shadow.url]}],
        route=[route],
        **settings,
    )


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path, len(body), extra, body)
    )


class ParseTests(SynchronousTestCase):
    def error(self, route, pools=("shadow",)):
        settings = {
            "backend": ["http://127.0.0.1:1"],
            "pool": [{"name": n, "backend": ["http://127.0.0.1:2"]} for n in pools],
            "route": [dict({"pool": "default"}, **route)],
            "admin": "none",
        }
        with self.assertRaises(ConfigError) as caught:
            buildConfig(settings)
        return str(caught.exception)

    def test_valid(self):
        config = buildConfig({
            "backend": ["http://127.0.0.1:1"],
            "pool": [{"name": "shadow", "backend": ["http://127.0.0.1:2"]}],
            "route": [{"pool": "default", "mirror_max_body": 10,
                       "mirror": [{"pool": "shadow", "percent": 12.5}]}],
            "admin": "none",
        })
        (route,) = config.routes
        self.assertEqual(route.mirror, (("shadow", 12.5),))
        self.assertEqual(route.mirrorMaxBody, 10)
        self.assertEqual(
            route.describe(), "route 1 (every request) -> pool default; mirror shadow 12.5%"
        )
        self.assertEqual((config.mirrorMaxBody, config.mirrorMaxInflight), (65536, 100))

    def test_unknownPool(self):
        """
        A mirror to a pool that does not exist stops the start, naming the
        route and the pool.
        """
        self.assertEqual(
            self.error({"path_prefix": "/api", "mirror": [{"pool": "shadw"}]}),
            "route 1 (path_prefix /api): no pool named 'shadw' (the pools are "
            "default, shadow; did you mean 'shadow'?)",
        )

    def test_mistakes(self):
        for mirror, message in [
            ({"pool": "shadow"}, "expected a list"),
            ([], "expected a list"),
            (["shadow"], "each part needs a pool"),
            ([{"pool": "shadow", "percent": 101}], "more than 100"),
            ([{"pool": "shadow", "percent": -1}], "must be at least 0"),
            ([{"pool": "shadow", "percnt": 5}], "did you mean 'percent'"),
            ([{"pool": "shadow"}, {"pool": "shadow"}], "named twice"),
        ]:
            self.assertIn(message, self.error({"mirror": mirror}), mirror)
        self.assertIn("mirror_max_body", self.error({"mirror_max_body": -1}))


class MirrorTests(TestCase):
    """
    Copies on real sockets: the client's answers never wait for them.
    """

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def start(self, settings):
        service, port = yield startRouted(self.net, settings)
        self.addCleanup(lambda: poll(lambda: service.pools.mirrors.inFlight == 0,
                                     what="the copies in flight to end"))
        return service, port

    @inlineCallbacks
    def test_slowMirrorDelaysNothing(self):
        """
        A mirror that takes 1.5 s to answer: every client answer arrives
        before the first of the mirror's, and the mirror receives a copy of
        every request with its method, path (stripped as the primary's),
        headers and body.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        answered = []

        def slowly(connection, request):
            def answer():
                answered.append(request)
                connection.write(ok(b"shadow"))

            reactor.callLater(1.5, answer)

        shadow = ScriptedBackend(self.net, slowly)
        service, port = yield self.start(
            _settings(primary, shadow, {"strip_prefix": True})
        )
        sent = [
            (b"GET", b"/api/items?page=2", b""),
            (b"POST", b"/api/items", b'{"name": "pen"}'),
            (b"PUT", b"/api/items/7", b"x" * 5000),
            (b"DELETE", b"/api/items/7", b""),
        ]
        for method, target, body in sent:
            response = yield exchange(
                self.net, port,
                b"%s %s HTTP/1.1\r\nHost: shop.example.com\r\nX-Trace: %s\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (method, target, method, len(body), body),
            )
            self.assertEqual((response.code, response.body), (200, b"primary"))
        # Nothing waited for the mirror, which has not answered yet.
        self.assertEqual(answered, [])
        yield shadow.waitFor(lambda: len(shadow.requests) == len(sent))
        self.assertEqual(len(primary.requests), len(sent))
        for (method, target, body), copy, original in zip(
            sent, shadow.requests, primary.requests
        ):
            self.assertEqual((copy.method, copy.target, copy.body),
                             (method, target[4:], body))
            self.assertEqual(copy.header(b"x-trace"), [method])
            self.assertEqual(copy.header(b"host"), [b"shop.example.com"])
            self.assertEqual(copy.header(b"x-forwarded-prefix"), [b"/api"])
            self.assertEqual(copy.header(b"x-request-id"), original.header(b"x-request-id"))
            self.assertEqual(original.body, body)
        counts = service.pools.mirrors.counts["shadow"]
        self.assertEqual((counts.mirrored, counts.failed), (len(sent), 0))
        yield poll(lambda: len(answered) == len(sent), what="the mirror's answers")

    @inlineCallbacks
    def test_largeBody(self):
        """
        A body too large to go out with the head (and spooled to a file by
        twisted.web) reaches the primary whole, as it does without a
        mirror, and the mirror a whole copy.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        shadow = ScriptedBackend(self.net, reply(ok(b"shadow")))
        service, port = yield self.start(_settings(primary, shadow, mirror_max_body=1 << 20))
        body = bytes(range(256)) * 1000
        response = yield exchange(self.net, port, _post(b"/api/upload", body))
        self.assertEqual((response.code, response.body), (200, b"primary"))
        yield shadow.waitFor(lambda: len(shadow.requests) == 1)
        self.assertEqual(primary.requests[0].body, body)
        self.assertEqual(shadow.requests[0].body, body)

    @inlineCallbacks
    def test_notForRefused(self):
        """
        A request a rate limit refuses is not copied: the copy leaves only
        with a request forwarded.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        shadow = ScriptedBackend(self.net, reply(ok(b"shadow")))
        service, port = yield self.start(_settings(primary, shadow, limit=["1/m,burst=1"]))
        codes = []
        for i in range(3):
            response = yield exchange(self.net, port, _post(b"/api/x", b"%d" % i))
            codes.append(response.code)
        self.assertEqual(codes, [200, 429, 429])
        yield shadow.waitFor(lambda: len(shadow.requests) == 1)
        yield poll(lambda: service.pools.mirrors.inFlight == 0, what="the copy")
        self.assertEqual(service.pools.mirrors.counts["shadow"].mirrored, 1)

    @inlineCallbacks
    def test_failingMirrorChangesNothing(self):
        """
        A mirror that refuses connections, or closes them without an
        answer: the client's answers are the primary's all the same, and
        the failures are counted.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        closing = ScriptedBackend(self.net, closeWithoutAnswer)
        refusing = f"http://127.0.0.1:{self.net.refusingPort()}"
        service, port = yield self.start({
            "backend": [primary.url],
            "pool": [
                {"name": "closing", "backend": [closing.url]},
                {"name": "refusing", "backend": [refusing]},
            ],
            "route": [{"pool": "default", "mirror": [
                {"pool": "closing"}, {"pool": "refusing"},
            ]}],
            "eject_after": 0,
        })
        for i in range(3):
            response = yield exchange(self.net, port, _post(b"/x", b"body %d" % i))
            self.assertEqual((response.code, response.body), (200, b"primary"))
        mirrors = service.pools.mirrors
        yield poll(lambda: mirrors.inFlight == 0, what="the copies to fail")
        self.assertEqual(len(closing.requests), 3)
        for name in ("closing", "refusing"):
            counts = mirrors.counts[name]
            self.assertEqual((counts.mirrored, counts.failed), (3, 3), name)

    @inlineCallbacks
    def test_bounds(self):
        """
        Copies in flight stop at C{mirror_max_inflight}, and bodies over
        C{mirror_max_body} are not copied; both are counted as skipped,
        and the client is served the same.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        held = []

        def hold(connection, request):
            if held is None:
                connection.write(ok())
            else:
                held.append(connection)

        shadow = ScriptedBackend(self.net, hold)
        service, port = yield self.start(
            _settings(primary, shadow, mirror_max_inflight=2, mirror_max_body=100)
        )
        for i in range(5):
            response = yield exchange(self.net, port, _post(b"/api/x", b"%d" % i))
            self.assertEqual(response.code, 200)
        response = yield exchange(self.net, port, _post(b"/api/big", b"b" * 101))
        self.assertEqual(response.code, 200)
        self.assertEqual(primary.requests[-1].body, b"b" * 101)
        yield shadow.waitFor(lambda: len(shadow.requests) == 2)
        mirrors = service.pools.mirrors
        counts = mirrors.counts["shadow"]
        self.assertEqual(mirrors.inFlight, 2)
        self.assertEqual(counts.mirrored, 2)
        self.assertEqual(
            counts.skipped,
            {"in_flight": 3, "body_too_large": 1, "no_backend": 0, "upgrade": 0},
        )
        self.assertEqual([r.body for r in shadow.requests], [b"0", b"1"])

        text = Metrics(service.group, service.site, reactor, pools=service.pools).render()
        for line in [
            b"rrbalancer_mirror_in_flight 2",
            b'rrbalancer_mirror_copies_total{pool="shadow"} 2',
            b'rrbalancer_mirror_failed_total{pool="shadow"} 0',
            b'rrbalancer_mirror_skipped_total{pool="shadow",reason="in_flight"} 3',
            b'rrbalancer_mirror_skipped_total{pool="shadow",reason="body_too_large"} 1',
        ]:
            self.assertIn(line + b"\n", text)
        status = AdminAPI(service.group, reactor, service=service).status()
        self.assertEqual(status["mirrors"], {
            "in_flight": 2, "max_in_flight": 2,
            "pools": {"shadow": {"mirrored": 2, "failed": 0, "skipped": counts.skipped}},
        })

        for connection in held:
            connection.write(ok())
        held = None
        yield poll(lambda: mirrors.inFlight == 0, what="the held copies to end")
        response = yield exchange(self.net, port, _post(b"/api/x", b"again"))
        self.assertEqual(response.code, 200)
        yield shadow.waitFor(lambda: len(shadow.requests) == 3)

    @inlineCallbacks
    def test_percent(self):
        """
        A mirror of a percent copies the requests for which the random
        source falls under it; requests off the route are never copied.
        """
        primary = ScriptedBackend(self.net, reply(ok(b"primary")))
        shadow = ScriptedBackend(self.net, reply(ok(b"shadow")))
        service, port = yield self.start(
            _settings(primary, shadow, {"mirror": [{"pool": "shadow", "percent": 25}]})
        )
        draws = iter([0.1, 0.5, 0.249, 0.25, 0.9])
        service.pools.mirrors.random = lambda: next(draws)
        for i in range(5):
            yield exchange(self.net, port, _post(b"/api/x", b"%d" % i))
        yield exchange(self.net, port, _post(b"/other", b"off the route"))
        yield shadow.waitFor(lambda: len(shadow.requests) == 2)
        yield poll(lambda: service.pools.mirrors.inFlight == 0, what="the copies")
        self.assertEqual([r.body for r in shadow.requests], [b"0", b"2"])
        self.assertEqual(len(primary.requests), 6)


class ReadmeTests(SynchronousTestCase):
    def test_workedExample(self):
        """
        The README's mirror example is valid and says what it says.
        """
        _, config = readmeExample("### Mirrors")
        (route,) = config.routes
        self.assertEqual((route.mirror, route.mirrorMaxBody), ((("shadow", 10.0),), 1048576))
