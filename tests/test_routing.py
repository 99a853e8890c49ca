"""
Tests for L{rrbalancer.routing}: the order routes are tried in, and the
L{Router} that sends each request to a pool.

Precedence, one test per row (L{PrecedenceTests}); routes are listed in
file order, and pools are named x and y:

| row | routes, in file order | request | pool | because |
| --- | --- | --- | --- | --- |
| 1 | host a.example.com -> x; priority 10 (every request) -> y | a.example.com / | y | an explicit priority comes first |
| 2 | host *.example.com -> x; host a.example.com -> y | a.example.com / | y | an exact host before a wildcard |
| 3 | path_prefix /v2 -> x; host *.example.com -> y | a.example.com /v2 | y | a wildcard host before no host, whatever the prefix |
| 4 | path_prefix /v2 -> x; path_prefix /v2/admin -> y | /v2/admin/users | y | then the longest prefix |
| 5 | path_prefix /v2 methods POST -> x; path_prefix /v2 -> y | POST /v2 | x | then the file's order |
| 6 | path_prefix /v2 -> y; path_prefix /v2 methods POST -> x | POST /v2 | y | the same, the other way round |
| 7 | host a.example.com -> x | b.example.com / | default | nothing matched: the default pool |
| 8 | host a.example.com -> x, and no top-level backends | b.example.com / | 404 | no default pool |
"""

import json
import os
import random

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from rrbalancer.config import ConfigError, buildConfig, tomllib
from rrbalancer.routeconfig import byPrecedence, parseRoutes
from rrbalancer.routing import Router, _segments, requestHost
from rrbalancer.service import makeService

from .support import Net, ScriptedBackend, exchange, ok, reply, serve
from .test_plugin import TwistdMixin

ONE = ["http://127.0.0.1:8081"]


@inlineCallbacks
def startRouted(net, settings):
    """
    The service of L{makeService} for a settings dict with pools and routes
    (checks off unless given), listening on a loopback port the system
    chooses: (the service, its port).
    """
    settings = dict(
        {"health": {"enabled": False}}, port=["tcp:0:interface=127.0.0.1"],
        admin="none", shutdown_grace=2, **settings
    )
    service = makeService(buildConfig(settings), reactor)
    port = yield serve(net, service)
    return service, port


class _Pool(Resource):
    """
    A pool's resource that notes what the router handed it.
    """

    isLeaf = True

    def __init__(self, name):
        Resource.__init__(self)
        self.name = name
        self.seen = []

    def render(self, request):
        self.seen.append((list(request.prepath), list(request.postpath)))
        return self.name.encode("ascii")


def request(target=b"/", host=b"a.example.com", method=b"GET"):
    path = target.partition(b"?")[0]
    r = DummyRequest(path[1:].split(b"/") if path[:1] == b"/" else [])
    r.uri = target
    r.method = method
    if host is not None:
        r.requestHeaders.setRawHeaders(b"host", [host])
    return r


def router(routes, pools=("default", "x", "y"), random=random.random):
    resources = {name: _Pool(name) for name in pools}
    return Router(byPrecedence(parseRoutes(routes)), resources, random), resources


def send(r, req):
    """
    Render through the router; the pool's name, or the status of the
    router's own answer.
    """
    result = r.render(req)
    if result is NOT_DONE_YET:
        return req.responseCode
    return result.decode("ascii")


class PrecedenceTests(SynchronousTestCase):
    def test_priorityFirst(self):
        r, _ = router([{"host": "a.example.com", "pool": "x"}, {"priority": 10, "pool": "y"}])
        self.assertEqual(send(r, request()), "y")

    def test_exactHostBeforeWildcard(self):
        r, _ = router([{"host": "*.example.com", "pool": "x"}, {"host": "a.example.com", "pool": "y"}])
        self.assertEqual(send(r, request()), "y")

    def test_wildcardBeforeNoHost(self):
        r, _ = router([{"path_prefix": "/v2", "pool": "x"}, {"host": "*.example.com", "pool": "y"}])
        self.assertEqual(send(r, request(b"/v2")), "y")

    def test_longestPrefix(self):
        r, _ = router([{"path_prefix": "/v2", "pool": "x"}, {"path_prefix": "/v2/admin", "pool": "y"}])
        self.assertEqual(send(r, request(b"/v2/admin/users")), "y")
        self.assertEqual(send(r, request(b"/v2/users")), "x")

    def test_fileOrder(self):
        r, _ = router([{"path_prefix": "/v2", "methods": ["POST"], "pool": "x"},
                       {"path_prefix": "/v2", "pool": "y"}])
        self.assertEqual(send(r, request(b"/v2", method=b"POST")), "x")
        self.assertEqual(send(r, request(b"/v2", method=b"GET")), "y")

    def test_fileOrderReversed(self):
        r, _ = router([{"path_prefix": "/v2", "pool": "y"},
                       {"path_prefix": "/v2", "methods": ["POST"], "pool": "x"}])
        self.assertEqual(send(r, request(b"/v2", method=b"POST")), "y")

    def test_noMatchGoesToDefault(self):
        r, _ = router([{"host": "a.example.com", "pool": "x"}])
        self.assertEqual(send(r, request(host=b"b.example.com")), "default")

    def test_noMatchNoDefault(self):
        r, _ = router([{"host": "a.example.com", "pool": "x"}], pools=("x",))
        req = request(host=b"b.example.com")
        self.assertEqual(send(r, req), 404)
        self.assertEqual(b"".join(req.written), b"Not Found: no route matches this request\n")
        self.assertIsNone(req.pool)

    def test_orderComputedOnce(self):
        """
        The order is the routes' sort, whatever the file's; the file's order
        only breaks ties.
        """
        routes = parseRoutes([
            {"path_prefix": "/a", "pool": "x"},
            {"host": "*.example.com", "pool": "x"},
            {"host": "a.example.com", "path_prefix": "/a", "pool": "x"},
            {"priority": -1, "host": "b.example.com", "pool": "x"},
            {"path_prefix": "/a/b", "pool": "x"},
            {"host": "a.example.com", "pool": "x"},
        ])
        self.assertEqual([r.number for r in byPrecedence(routes)], [3, 6, 2, 5, 1, 4])


class MatchTests(SynchronousTestCase):
    """
    What one route matches.
    """

    def matches(self, route, target=b"/", host=b"a.example.com", method=b"GET"):
        r, _ = router([dict(route, pool="x")])
        return send(r, request(target, host, method)) == "x"

    def test_wholeSegments(self):
        route = {"path_prefix": "/v2"}
        for target in (b"/v2", b"/v2/", b"/v2/x", b"/v2?q=1", b"/v2/x/y?q=/z", b"/v%32/x"):
            self.assertTrue(self.matches(route, target), target)
        for target in (b"/", b"/v2x", b"/v", b"/x/v2", b"/V2", b"/v22/x"):
            self.assertFalse(self.matches(route, target), target)

    def test_pathBytesAsSegments(self):
        """
        Paths are matched as bytes (made canonical when they hold
        escapes): the same answer, for every prefix and path, as comparing
        their decoded segments.
        """
        prefixes = ["/", "/v2", "/v2/admin", "/a%2Fb", "/a%20b", "/%41pi", "/a%25b", "/a%252Fb"]
        targets = [
            b"/", b"/v2", b"/v2/", b"/v2x", b"/v2/admin", b"/v2/adminx", b"/v2/admin/u",
            b"//v2", b"/a/b", b"/a/b/c", b"/a%2Fb", b"/a%2fb/c", b"/a%20b/x",
            b"/Api", b"/Api/x", b"/%41pi", b"/v%32", b"*", b"/a%25b", b"/a%b", b"/a%252Fb/c",
            b"/a%25%2Fb", b"/a%2F%2Fb", b"/a%2F/b",
        ]
        for prefix in prefixes:
            r, _ = router([{"path_prefix": prefix, "pool": "x"}])
            segments = list(r.routes[0].segments)
            for target in targets:
                req = request(target, method=b"OPTIONS")
                path = target.partition(b"?")[0]
                same = _segments(path, 0)[:len(segments)] == segments
                self.assertEqual(send(r, req), "x" if same else "default", (prefix, target))
        r, _ = router([{"path_prefix": "/a%2Fb", "pool": "x"}])
        self.assertEqual(send(r, request(b"/a%2Fb/c")), "x")
        self.assertEqual(send(r, request(b"/a/b/c")), "default")

    def test_hostsRemembered(self):
        """
        The router keeps the hosts it has worked out, a bounded number of
        them.
        """
        r, _ = router([{"host": "a.example.com", "pool": "x"}])
        for i in range(3000):
            self.assertEqual(send(r, request(host=b"h%d.example.com" % i)), "default")
            self.assertLessEqual(len(r._hosts), 1024)
        self.assertEqual(send(r, request(host=b"A.example.com:80")), "x")

    def test_trailingSlashInConfig(self):
        self.assertTrue(self.matches({"path_prefix": "/v2/"}, b"/v2"))
        self.assertFalse(self.matches({"path_prefix": "/v2/"}, b"/v2x"))

    def test_rootPrefixMatchesAll(self):
        self.assertTrue(self.matches({"path_prefix": "/"}, b"/anything"))

    def test_hostExact(self):
        route = {"host": "a.example.com"}
        for host in (b"a.example.com", b"A.Example.COM", b"a.example.com:8000", b"a.example.com."):
            self.assertTrue(self.matches(route, host=host), host)
        for host in (b"b.example.com", b"x.a.example.com", b"example.com", None, b""):
            self.assertFalse(self.matches(route, host=host), host)

    def test_hostWildcard(self):
        route = {"host": "*.example.com"}
        for host in (b"a.example.com", b"a.b.example.com:81", b"WWW.EXAMPLE.COM"):
            self.assertTrue(self.matches(route, host=host), host)
        for host in (b"example.com", b"badexample.com", b"a.example.org", b".example.com"):
            self.assertFalse(self.matches(route, host=host), host)

    def test_hostAddress(self):
        self.assertTrue(self.matches({"host": "[::1]"}, host=b"[::1]:8000"))
        self.assertTrue(self.matches({"host": "127.0.0.1"}, host=b"127.0.0.1:8000"))
        self.assertFalse(self.matches({"host": "127.0.0.1"}, host=b"127.0.0.2"))

    def test_methods(self):
        route = {"methods": ["get", "HEAD"]}
        self.assertTrue(self.matches(route, method=b"GET"))
        self.assertTrue(self.matches(route, method=b"HEAD"))
        self.assertFalse(self.matches(route, method=b"POST"))

    def test_absoluteForm(self):
        """
        An absolute-form target names its host and path itself (RFC 9112
        section 3.2.2), whatever Host says.
        """
        route = {"host": "a.example.com", "path_prefix": "/v2"}
        self.assertTrue(self.matches(route, b"http://a.example.com/v2/x?q", host=b"other"))
        self.assertFalse(self.matches(route, b"http://b.example.com/v2/x", host=b"a.example.com"))

    def test_invalidTarget(self):
        r, _ = router([{"host": "a.example.com", "pool": "x"}])
        req = request(b"a.example.com/x")
        self.assertEqual(send(r, req), 400)

    def test_requestHost(self):
        for value, host in [
            (b"Example.COM:80", "example.com"),
            (b"[2001:DB8::1]:443", "2001:db8::1"),
            (b"[::1]", "::1"),
            (b"example.com.", "example.com"),
            (None, ""),
        ]:
            self.assertEqual(requestHost(value), host, value)


class StripTests(SynchronousTestCase):
    def test_stripMovesSegmentsToPrepath(self):
        """
        The matched segments become the resource's mount point, as if it
        had been put there with putChild: the balancer's resource sends the
        rest on and names the prefix in X-Forwarded-Prefix.
        """
        r, pools = router([{"path_prefix": "/api/v2", "strip_prefix": True, "pool": "x"}])
        self.assertEqual(send(r, request(b"/api/v2/users/7?full=1")), "x")
        self.assertEqual(pools["x"].seen, [([b"api", b"v2"], [b"users", b"7"])])

    def test_noStripLeavesThePath(self):
        r, pools = router([{"path_prefix": "/api", "pool": "x"}])
        send(r, request(b"/api/users"))
        self.assertEqual(pools["x"].seen, [([], [b"api", b"users"])])

    def test_poolNamedOnRequest(self):
        r, _ = router([{"path_prefix": "/api", "pool": "x"}])
        req = request(b"/api")
        send(r, req)
        self.assertEqual(req.pool, "x")
        req = request(b"/other")
        send(r, req)
        self.assertEqual(req.pool, "default")


class SplitTests(SynchronousTestCase):
    def test_weights(self):
        """
        An 80/20 split sends 80% of the requests, within 3 points, to the
        first pool over 1,000 requests.
        """
        source = random.Random(20261204)
        r, _ = router(
            [{"path_prefix": "/", "split": [{"pool": "x", "weight": 80}, {"pool": "y", "weight": 20}]}],
            random=source.random,
        )
        chosen = [send(r, request(b"/p")) for _ in range(1000)]
        self.assertEqual(set(chosen), {"x", "y"})
        self.assertLessEqual(abs(chosen.count("x") / 10 - 80), 3)

    def test_zeroWeightNeverChosen(self):
        r, _ = router(
            [{"split": [{"pool": "x", "weight": 0}, {"pool": "y", "weight": 1}]}],
            random=random.Random(1).random,
        )
        self.assertEqual({send(r, request()) for _ in range(200)}, {"y"})

    def test_badSplits(self):
        for split, mention in [
            ([], "expected a list"),
            ([{"pool": "x", "weight": 0}], "every weight is 0"),
            ([{"weight": 1}], "needs a pool"),
            ([{"pool": "x"}, {"pool": "x"}], "named twice"),
            ([{"pool": "x", "weight": -1}], "must be at least 0"),
            ([{"pool": "x", "share": 1}], "unknown key 'share'"),
        ]:
            e = self.assertRaises(ConfigError, parseRoutes, [{"split": split}])
            self.assertIn(mention, str(e))


def readmeExample(heading: str):
    """
    The README from C{heading} on, and the config its first TOML example
    makes.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    part = text[text.index(heading):]
    example = part[part.index("```toml\n") + 8:part.index("```\n\n")]
    return part, buildConfig(dict(tomllib.loads(example), admin="none"))


class ReadmeTests(SynchronousTestCase):
    def test_workedExample(self):
        """
        The README's example config is valid, and its table of requests
        says where the router sends them.
        """
        part, config = readmeExample("### Pools and routes")
        r = Router(byPrecedence(config.routes), {n: _Pool(n) for n in ("default", "api", "static")})
        for method, target, host, pool, prepath in [
            (b"GET", b"/v1/users", b"API.example.com:8000", "api", []),
            (b"GET", b"/assets/app.css", b"www.example.com", "static", [b"assets"]),
            (b"GET", b"/assetsx", b"www.example.com", "default", []),
            (b"GET", b"/v2/items", b"shop.test", "api", []),
            (b"POST", b"/v2/items", b"shop.test", "default", []),
        ]:
            req = request(target, host, method)
            self.assertEqual(send(r, req), pool, target)
            self.assertEqual(req.prepath, prepath, target)
        self.assertIn("| `GET /assets/app.css` with `Host: www.example.com` | `static` |", part)


class RoutedBalancerTests(TestCase):
    """
    Pools and routes on real sockets: three pools, routed by Host and path
    prefix.
    """

    def setUp(self):
        self.net = Net(self)

    def start(self, settings):
        return startRouted(self.net, settings)

    @inlineCallbacks
    def test_threePools(self):
        web = ScriptedBackend(self.net, reply(ok(b"web")))
        api = ScriptedBackend(self.net, reply(ok(b"api")))
        static = ScriptedBackend(self.net, reply(ok(b"static")))
        log = os.path.abspath(self.mktemp())
        service, port = yield self.start({
            "backend": [web.url],
            "access_log": log,
            "access_log_format": "json",
            "pool": [
                {"name": "api", "backend": [{"url": api.url}], "balance": "least-conn"},
                {"name": "static", "backend": [static.url]},
            ],
            "route": [
                {"host": "api.example.com", "pool": "api"},
                {"path_prefix": "/static", "strip_prefix": True, "pool": "static"},
                {"host": "*.cdn.example.com", "path_prefix": "/img", "pool": "static"},
            ],
        })
        cases = [
            (b"/index.html", b"www.example.com", web, b"/index.html", None, "default"),
            (b"/v1/users?id=7", b"API.example.com:8000", api, b"/v1/users?id=7", None, "api"),
            (b"/static/css/a.css?v=3", b"www.example.com", static, b"/css/a.css?v=3",
             b"/static", "static"),
            (b"/static", b"www.example.com", static, b"/", b"/static", "static"),
            (b"/staticx/a", b"www.example.com", web, b"/staticx/a", None, "default"),
            (b"/img/1.png", b"eu.cdn.example.com", static, b"/img/1.png", None, "static"),
            (b"/img/1.png", b"cdn.example.com", web, b"/img/1.png", None, "default"),
            (b"http://api.example.com/static/x", b"api.example.com", api, b"/static/x", None,
             "api"),
            (b"http://www.example.com/static/x?y", b"www.example.com", static, b"/x?y",
             b"/static", "static"),
        ]
        for target, host, backend, received, prefix, pool in cases:
            before = len(backend.requests)
            response = yield exchange(
                self.net, port, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host)
            )
            self.assertEqual(response.code, 200, target)
            self.assertEqual(len(backend.requests), before + 1, target)
            got = backend.requests[-1]
            self.assertEqual(got.target, received, target)
            self.assertEqual(got.header(b"host"), [host], target)
            self.assertEqual(got.header(b"x-forwarded-prefix"), [prefix] if prefix else [], target)
        self.assertEqual(
            (len(web.requests), len(api.requests), len(static.requests)), (3, 2, 4)
        )
        self.assertEqual(service.pools.balancers["api"].group.policy.name, "least-conn")
        yield service.stopService()
        with open(log) as f:
            logged = [json.loads(line)["pool"] for line in f]
        self.assertEqual(logged, [case[-1] for case in cases])

    @inlineCallbacks
    def test_noMatchNoDefault(self):
        api = ScriptedBackend(self.net, reply(ok(b"api")))
        service, port = yield self.start({
            "pool": [{"name": "api", "backend": [api.url]}],
            "route": [{"host": "api.example.com", "pool": "api"}],
        })
        response = yield exchange(
            self.net, port, b"GET /x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(response.body, b"Not Found: no route matches this request\n")
        self.assertEqual(api.requests, [])
        response = yield exchange(
            self.net, port, b"GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        )
        self.assertEqual((response.code, response.body), (200, b"api"))


class CheckTests(TwistdMixin, TestCase):
    """
    A route to a pool that does not exist stops the balancer before it
    starts, and C{--check} says so in the same line.
    """

    CONFIG = (
        'port = ["tcp:0:interface=127.0.0.1"]\nadmin = "none"\n'
        'backend = ["http://127.0.0.1:1"]\n'
        '[[pool]]\nname = "api"\nbackend = ["http://127.0.0.1:2"]\n'
        '[[route]]\nhost = "api.example.com"\npool = "apii"\n'
    )
    LINE = (
        "rrbalancer: route 1 (host api.example.com): no pool named 'apii' "
        "(the pools are default, api; did you mean 'api'?)"
    )

    def test_unknownPoolChecked(self):
        path = self.writeConfig(self.CONFIG)
        result = self.plugin("--check", "--config", path)
        self.assertEqual(result[0], 1)
        self.assertEqual(self.assertOneLineError(result, "apii"), self.LINE)

    def test_unknownPoolRefusedAtStart(self):
        path = self.writeConfig(self.CONFIG)
        line = self.assertOneLineError(self.plugin("--config", path), "apii")
        self.assertEqual(line, self.LINE)

    def test_validCounted(self):
        path = self.writeConfig(self.CONFIG.replace('"apii"', '"api"'))
        code, out, err = self.plugin("--check", "--config", path)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(
            out.strip(),
            "rrbalancer: configuration OK (1 backend, 1 listener, 1 more pool, 1 route)",
        )
