"""
Tests for L{rrbalancer.pools}: the balancer each C{[[pool]]} table
becomes.
"""

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openMetricsFamilies,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from treq.testing import StubTreq

from rrbalancer.admin import AdminAPI, AdminResource
from rrbalancer.config import ConfigError, buildConfig
from rrbalancer.metrics import MetricsResource
from rrbalancer.reload import Reloader
from rrbalancer.service import makeService
from rrbalancer.settings import parsePools

from .support import (
    Net, ScriptedBackend, connectClient, exchange, memoryReactor, ok, reply,
)
from .test_admin import InMemoryAdmin, poll
from .test_poolconfig import API, ONE, config
from .test_routing import startRouted

API_POOL = parsePools([API])[0]


class PoolsServiceTests(SynchronousTestCase):
    def test_stickyCookiePerPool(self):
        """
        Each pool has a sticky cookie of its own, so that a client keeps its
        backend in each pool it visits.
        """
        service = makeService(config(pool=[API], sticky_cookie="rr"), memoryReactor())
        balancers = service.pools.balancers
        self.assertEqual(
            (balancers["default"].resource().sticky.name, balancers["api"].resource().sticky.name),
            (b"rr", b"rr-api"),
        )
        self.assertIsNone(API_POOL.configFor(config()).stickyCookie)

    def build(self, **settings):
        settings.setdefault("port", "tcp:0:interface=127.0.0.1")
        return makeService(config(**settings), memoryReactor())

    def test_eachPoolABalancer(self):
        """
        Each pool is a balancer of its own with its backends, policy and
        health checks; client rate limits are the service's, shared.
        """
        service = self.build(
            health={"interval": 3}, limit=[{"rate": 5}],
            pool=[dict(API, balance="least-conn", health={"interval": 11})],
        )
        default, api = service.pools.balancers["default"], service.pools.balancers["api"]
        self.assertIs(default, service.balancer)
        self.assertEqual([b.url for b in api.group], ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
        self.assertEqual([b.url for b in default.group], ONE)
        self.assertEqual(api.group.policy.name, "least-conn")
        self.assertEqual(default.group.policy.name, "round-robin")
        self.assertEqual((api.config.health.interval, default.config.health.interval), (11, 3))
        self.assertIsNotNone(api.healthChecker)
        self.assertIsNot(api.healthChecker, default.healthChecker)
        self.assertIs(api.resource().limits, default.limits)
        self.assertEqual(len(default.limits.limiters), 1)
        self.assertIs(service.site.resource, service.pools.router)

    def test_startsAndStopsWithTheService(self):
        service = self.build(pool=[API])
        api = service.pools.balancers["api"]
        service.startService()
        self.assertTrue(api.running)
        service.stopService()
        self.assertFalse(api.running)

    def test_status(self):
        """
        C{GET /api/status} lists the pools with their backends' counts,
        and the routes in the order they are tried.
        """
        service = self.build(
            pool=[API],
            route=[{"path_prefix": "/api", "pool": "api"},
                   {"host": "*.example.com", "pool": "default", "methods": ["GET"]}],
        )
        api = service.pools.balancers["api"]
        api.group.byServer(api.config.backends[0]).healthy = True
        api.group.retries = 4
        status = AdminAPI(service.group, Clock(), service=service).status()
        self.assertEqual(
            [(p["name"], p["backends"], p["balance"], p["retries"]) for p in status["pools"]],
            [("default", 1, "round-robin", 0), ("api", 2, "round-robin", 4)],
        )
        self.assertEqual(
            [r["route"] for r in status["routes"]], [2, 1]
        )
        self.assertEqual(status["routes"][0], {
            "route": 2, "host": "*.example.com", "path_prefix": None, "methods": ["GET"],
            "pool": "default", "split": None, "strip_prefix": False, "priority": 0,
            "mirror": None,
        })

    def test_noDefault(self):
        service = self.build(backend=[], pool=[API], route=[{"pool": "api"}])
        self.assertEqual(list(service.pools.balancers), ["api"])
        self.assertEqual(len(service.group), 0)


class ReloadTests(SynchronousTestCase):
    def test_withoutPoolsReported(self):
        """
        A reloader given no pools to apply the file's to reports a change
        to them as needing a restart, and applies the rest.
        """
        old = config(pool=[API], route=[{"path_prefix": "/a", "pool": "api"}])
        new = config(
            backend=ONE + ["http://127.0.0.1:8082"],
            pool=[dict(API, balance="random")],
            route=[{"path_prefix": "/b", "pool": "api"}],
        )
        service = makeService(old, memoryReactor())
        events = []
        reloader = Reloader(old, service.group, load=lambda: new)
        reloader.log = reloader.log.__class__(observer=events.append)
        result = reloader.reload()
        self.assertEqual(result["added"], ["http://127.0.0.1:8082"])
        self.assertEqual(sorted(result["ignored"]), ["pools", "routes"])
        self.assertIn("needs a restart, not applied: pools, routes", formatEvent(events[-1]))

    def test_poolsAndRoutesApplied(self):
        """
        A reload adds the pools the file adds, removes those it drops,
        brings the others' backends and policy to the file's, swaps the
        routes, and reports a pool's changed checks as needing a restart.
        """
        other = {"name": "other", "backend": ["http://127.0.0.1:9101"]}
        old = config(
            pool=[API, other],
            route=[{"path_prefix": "/a", "pool": "api"},
                   {"path_prefix": "/o", "pool": "other"}],
        )
        fresh = {"name": "fresh", "backend": ["http://127.0.0.1:9201"]}
        new = config(
            pool=[
                dict(API, balance="least-conn", health={"path": "/healthz"},
                     backend=[{"url": "http://127.0.0.1:9001", "weight": 3},
                              "http://127.0.0.1:9003"]),
                fresh,
            ],
            route=[{"path_prefix": "/a", "pool": "api",
                    "mirror": [{"pool": "fresh", "percent": 100}]},
                   {"path_prefix": "/o", "pool": "fresh"}],
            mirror_max_inflight=7,
        )
        service = makeService(old, memoryReactor())
        pools = service.pools
        api = pools.balancers["api"]
        events = []
        reloader = Reloader(old, service.group, load=lambda: new, pools=pools)
        reloader.log = reloader.log.__class__(observer=events.append)
        result = reloader.reload()
        self.assertEqual(result["added"], ["pool api: http://127.0.0.1:9003", "pool fresh"])
        self.assertEqual(result["removed"], ["pool other", "pool api: http://127.0.0.1:9002"])
        self.assertEqual(
            result["changed"],
            ["pool api: http://127.0.0.1:9001", "balancing of pool api", "routes"],
        )
        self.assertEqual(result["ignored"], ["pool api health"])
        self.assertIn("needs a restart, not applied: pool api health", formatEvent(events[-1]))
        self.assertEqual(list(pools.balancers), ["default", "api", "fresh"])
        self.assertIs(pools.balancers["api"], api)
        self.assertEqual(api.group.policy.name, "least-conn")
        self.assertEqual(api.config.health.path, "/")
        self.assertEqual(
            {(b.url, b.weight, b.state) for b in api.group},
            {("http://127.0.0.1:9001", 3, "up"), ("http://127.0.0.1:9003", 1, "down")},
        )
        # A new pool's backends wait for a check to pass, as a new one's do.
        self.assertEqual(
            [(b.url, b.state) for b in pools.balancers["fresh"].group],
            [("http://127.0.0.1:9201", "down")],
        )
        router = pools.router
        self.assertIs(service.site.resource, router)
        self.assertEqual([r.pool for r in router.routes], ["api", "fresh"])
        self.assertEqual(set(router.pools), {"default", "api", "fresh"})
        self.assertIs(router.pools["fresh"], pools.balancers["fresh"].resource())
        self.assertEqual(pools.mirrors.maxInFlight, 7)
        self.assertIs(pools.mirrors.pickers["fresh"], pools.balancers["fresh"].group)
        self.assertEqual([p["name"] for p in pools.status()["pools"]],
                         ["default", "api", "fresh"])
        # Nothing left to do a second time; the checks still differ.
        again = Reloader(new, service.group, load=lambda: new, pools=pools).reload()
        self.assertEqual(
            (again["added"], again["removed"], again["changed"], again["ignored"]),
            ([], [], [], ["pool api health"]),
        )

    def test_defaultPoolComesAndGoes(self):
        """
        A file that drops the top-level backends leaves no default pool:
        unrouted requests then get 404; one that brings them back brings
        it back.
        """
        routes = [{"path_prefix": "/a", "pool": "api"}]
        withDefault = config(pool=[API], route=routes)
        without = config(backend=[], pool=[API], route=routes)
        service = makeService(withDefault, memoryReactor())
        reloader = Reloader(withDefault, service.group, load=lambda: without,
                            pools=service.pools)
        reloader.reload()
        self.assertEqual(list(service.pools.balancers), ["api"])
        self.assertIsNone(service.pools.router.default)
        reloader._load = lambda: withDefault
        reloader.reload()
        self.assertEqual(list(service.pools.balancers), ["default", "api"])
        self.assertIs(service.pools.router.default, service.balancer.resource())

    def test_inheritedBalancingFollows(self):
        """
        A reload's balancing settings reach the pools that take them from
        the top level, and only those.
        """
        old = config(pool=[API, dict(API, name="own", balance="random")])
        new = config(
            pool=[API, dict(API, name="own", balance="random")],
            balance="least-conn", slow_start=30,
        )
        service = makeService(old, memoryReactor())
        self.assertIs(service.reloader.pools, service.pools)
        result = Reloader(old, service.group, load=lambda: new, pools=service.pools).reload()
        self.assertEqual(
            result["changed"], ["balancing", "balancing of pool api", "balancing of pool own"]
        )
        self.assertEqual(result["ignored"], [])
        api, own = service.pools.balancers["api"], service.pools.balancers["own"]
        self.assertEqual(
            (service.group.policy.name, api.group.policy.name, own.group.policy.name),
            ("least-conn", "least-conn", "random"),
        )
        self.assertEqual((api.group.slowStart, own.group.slowStart), (30, 30))
        self.assertEqual(api.config.balance, "least-conn")
        again = Reloader(new, service.group, load=lambda: new, pools=service.pools).reload()
        self.assertEqual(again["changed"], [])


class ReloadOnSocketsTests(TestCase):
    """
    A reload of pools and routes under traffic, on real sockets.
    """

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def test_removedPoolDrains(self):
        """
        A reload that drops a pool while one of its requests is in flight,
        and routes its path to a new pool: the request in flight is
        answered whole, the next ones go to the new pool, and the old pool
        stops once drained.
        """
        web = ScriptedBackend(self.net, reply(ok(b"web")))
        held = []
        old = ScriptedBackend(self.net, lambda connection, request: held.append(connection))
        fresh = ScriptedBackend(self.net, reply(ok(b"fresh")))
        service, port = yield startRouted(self.net, {
            "backend": [web.url],
            "pool": [{"name": "old", "backend": [old.url]}],
            "route": [{"path_prefix": "/api", "pool": "old"}],
        })
        pools = service.pools
        oldPool = pools.balancers["old"]
        client = yield connectClient(self.net, port)
        client.send(b"GET /api/slow HTTP/1.1\r\nHost: h\r\n\r\n")
        yield old.waitFor(lambda: len(held) == 1)
        new = buildConfig({
            "backend": [web.url], "admin": "none", "health": {"enabled": False},
            "pool": [{"name": "fresh", "backend": [fresh.url]}],
            "route": [{"path_prefix": "/api", "pool": "fresh"}],
        })
        result = Reloader(
            service.config, service.group, load=lambda: new, pools=pools
        ).reload()
        self.assertEqual(
            (result["added"], result["removed"]), (["pool fresh"], ["pool old"])
        )
        for backend in pools.balancers["fresh"].group:
            self.net.trackFactory(backend.pool)
        self.assertTrue(oldPool.running)
        for _ in range(3):
            response = yield exchange(self.net, port, b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
            self.assertEqual((response.code, response.body), (200, b"fresh"))
        response = yield exchange(self.net, port, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual((response.code, response.body), (200, b"web"))
        self.assertEqual(len(old.requests), 1)
        held[0].write(ok(b"old, whole"))
        response = yield client.readResponse()
        self.assertEqual((response.code, response.body), (200, b"old, whole"))
        yield poll(lambda: not oldPool.running, timeout=5, what="the old pool to stop")
        self.assertEqual(len(oldPool.group), 0)
        self.assertNotIn(oldPool, list(pools))


class PoolHealthTests(TestCase):
    """
    A pool's checks are its own, on real sockets.
    """

    def setUp(self):
        self.net = Net(self)

    @inlineCallbacks
    def test_ownChecks(self):
        """
        With checks off at the top level and on in [pool.health], the
        pool's dead backend is taken out and its requests go to the live
        one, while the default pool's dead backend, unchecked, stays up.
        """
        live = ScriptedBackend(self.net, reply(ok(b"live")))
        dead = f"http://127.0.0.1:{self.net.refusingPort()}"
        service, port = yield startRouted(self.net, {
            "backend": [f"http://127.0.0.1:{self.net.refusingPort()}"],
            "eject_after": 0,
            "pool": [{
                "name": "api", "backend": [dead, live.url],
                "health": {"enabled": True, "interval": 0.05, "timeout": 1, "fall": 1,
                           "rise": 1, "jitter": 0},
            }],
            "route": [{"path_prefix": "/api", "pool": "api"}],
        })
        api = service.pools.balancers["api"].group
        (deadBackend,) = [b for b in api if b.url == dead]
        yield poll(lambda: deadBackend.state == "down", timeout=5, what="the check")
        retries = api.retries
        for _ in range(4):
            response = yield exchange(
                self.net, port, b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            self.assertEqual((response.code, response.body), (200, b"live"))
        # Never tried: the check had taken it out.
        self.assertEqual((api.retries, deadBackend.state), (retries, "down"))
        self.assertEqual([b.state for b in service.group], ["up"])
        self.assertIsNone(service.balancer.healthChecker)


class MetricsTests(SynchronousTestCase):
    def scrape(self, service, openMetrics=False):
        text = service.metrics.render(openMetrics).decode("utf-8")
        parse = openMetricsFamilies if openMetrics else text_string_to_metric_families
        samples = {}
        for family in parse(text):
            for sample in family.samples:
                key = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[key] = sample.value
        return samples

    def test_seriesByPool(self):
        """
        With pools, every pool's backends are counted and have their series,
        labelled with their pool (a URL in two pools is two series).
        """
        shared = dict(API, name="b", backend=[ONE[0]])
        service = makeService(config(pool=[API, shared]), memoryReactor())
        for openMetrics in (False, True):
            samples = self.scrape(service, openMetrics)
            self.assertEqual(samples["rrbalancer_backends"][(("state", "up"),)], 4)
            pools = samples["rrbalancer_pool_backends"]
            self.assertEqual(
                {pool: count for ((_, pool), (_, state)), count in pools.items() if state == "up"},
                {"default": 1, "api": 2, "b": 1},
            )
            weights = samples["rrbalancer_backend_weight"]
            self.assertEqual(weights, {
                (("backend", ONE[0]), ("pool", "default")): 1,
                (("backend", "http://127.0.0.1:9001"), ("pool", "api")): 2,
                (("backend", "http://127.0.0.1:9002"), ("pool", "api")): 1,
                (("backend", ONE[0]), ("pool", "b")): 1,
            })

    def test_retriesPanicQueueByPool(self):
        """
        Retries, the panic threshold and the queue are each pool's own, a
        series a pool.
        """
        service = makeService(config(pool=[API], max_conns=1), memoryReactor())
        service.pools.balancers["api"].group.retries = 3
        service.pools.balancers["api"].group.requestQueue.peak = 2
        for openMetrics in (False, True):
            samples = self.scrape(service, openMetrics)
            self.assertEqual(
                samples["rrbalancer_retries_total"],
                {(("pool", "default"),): 0, (("pool", "api"),): 3},
            )
            self.assertEqual(
                samples["rrbalancer_queue_peak"],
                {(("pool", "default"),): 0, (("pool", "api"),): 2},
            )
            self.assertEqual(len(samples["rrbalancer_panic"]), 2)
            buckets = samples["rrbalancer_queue_wait_seconds_bucket"]
            self.assertEqual({dict(k)["pool"] for k in buckets}, {"default", "api"})

    def test_onePoolUnlabelled(self):
        """
        A balancer without pools keeps the series it always had.
        """
        service = makeService(config(), memoryReactor())
        samples = self.scrape(service)
        self.assertNotIn("rrbalancer_pool_backends", samples)
        self.assertEqual(
            list(samples["rrbalancer_backend_weight"]), [(("backend", ONE[0]),)]
        )


class PoolAdmin(InMemoryAdmin):
    """
    The admin resource of a whole service with pools, reached with
    L{StubTreq}.
    """

    def __init__(self, **settings):
        self.clock = Clock()
        self.service = makeService(config(**settings), memoryReactor())
        self.group = self.service.group
        self.api = AdminAPI(self.group, self.clock, service=self.service)
        self.events = []
        self.api.log = Logger(observer=self.events.append)
        self.resource = AdminResource(self.api, MetricsResource(self.service.metrics))
        self.stub = StubTreq(self.resource)


class PoolAdminTests(SynchronousTestCase):
    def setUp(self):
        self.admin = PoolAdmin(pool=[API], health={"enabled": False})
        self.api = self.admin.service.pools.balancers["api"].group

    def test_listAPool(self):
        code, body, _, _ = self.admin.request("GET", "/api/backends?pool=api")
        self.assertEqual(code, 200)
        self.assertEqual(
            [b["url"] for b in body["backends"]],
            ["http://127.0.0.1:9001", "http://127.0.0.1:9002"],
        )
        code, body, _, _ = self.admin.request("GET", "/api/backends")
        self.assertEqual([b["url"] for b in body["backends"]], ONE)
        code, body, _, _ = self.admin.request("GET", "/api/backends?pool=default")
        self.assertEqual([b["url"] for b in body["backends"]], ONE)

    def test_addAndRemoveInAPool(self):
        """
        A pool field adds to that pool only; ?pool= names it to change and
        remove, and the log names it.
        """
        code, body, response, _ = self.admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:9003", "pool": "api", "weight": 3}
        )
        self.assertEqual(code, 201, body)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/api/backends/3?pool=api"])
        self.assertEqual([b.url for b in self.api][-1], "http://127.0.0.1:9003")
        self.assertEqual([b.url for b in self.admin.group], ONE)
        self.assertIn("of pool api", formatEvent(self.admin.events[-1]))
        code, body, _, _ = self.admin.request("PATCH", "/api/backends/3?pool=api", {"weight": 5})
        self.assertEqual((code, body["weight"]), (200, 5))
        code, _, _, _ = self.admin.request("DELETE", "/api/backends/3?pool=api")
        self.assertEqual(code, 204)
        self.assertIn("backend 3 http://127.0.0.1:9003 of pool api once", formatEvent(self.admin.events[-1]))
        self.assertIsNone(self.api.get("3"))
        code, body, _, _ = self.admin.request("GET", "/api/backends/3")
        self.assertEqual(code, 404, body)

    def test_bulkInAPool(self):
        code, body, _, _ = self.admin.request(
            "POST", "/api/backends/bulk",
            {"pool": "api", "add": [{"url": "http://127.0.0.1:9004"}], "remove": ["1"]},
        )
        self.assertEqual((code, body["added"], body["removed"]), (200, ["3"], ["1"]))
        self.assertIn("bulk change of pool api: 1 added", formatEvent(self.admin.events[-1]))
        self.assertIsNone(self.api.get("1"))
        self.assertEqual([b.url for b in self.admin.group], ONE)

    def test_unknownPool(self):
        for method, path, body in [
            ("GET", "/api/backends?pool=nope", None),
            ("POST", "/api/backends", {"url": "http://127.0.0.1:9005", "pool": "nope"}),
            ("DELETE", "/api/backends/1?pool=nope", None),
        ]:
            code, answer, _, _ = self.admin.request(method, path, body)
            self.assertEqual((code, answer), (404, {"error": "pool: no pool named 'nope'"}))
        code, answer, _, _ = self.admin.request(
            "POST", "/api/backends", {"url": "http://127.0.0.1:9005", "pool": ["api"]}
        )
        self.assertEqual(code, 400, answer)
        self.assertEqual(len(self.api), 2)


class ReachTests(SynchronousTestCase):
    def test_nothingReachable(self):
        """
        Pools without routes and without a default pool would answer every
        request 404: refused.
        """
        e = self.assertRaises(ConfigError, buildConfig, {"pool": [API], "admin": "none"})
        self.assertIn("every request would get 404", str(e))

    def test_unroutedPoolWarned(self):
        service = makeService(
            config(pool=[API, dict(API, name="b")], route=[{"path_prefix": "/b", "pool": "b"}]),
            memoryReactor(),
        )
        events = []
        service.pools.log = Logger(observer=events.append)
        service.pools.startService()
        self.addCleanup(service.pools.stopService)
        warned = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
        self.assertEqual(warned, ["pool api: no route leads to it, so it takes no requests"])


class EmbeddingTests(SynchronousTestCase):
    def test_balancerIsOnePool(self):
        """
        Pools and routes given to a L{Balancer} of one's own would be
        ignored: refused, saying what to do instead.
        """
        from rrbalancer import Balancer

        for settings in ({"pool": [API]}, {"route": [{"pool": "default"}]}):
            e = self.assertRaises(ConfigError, Balancer, ONE, memoryReactor(), **settings)
            self.assertIn("a Balancer is one pool", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('backend = ["http://127.0.0.1:8081"]\n[[route]]\npool = "default"\n')
        e = self.assertRaises(ConfigError, Balancer.fromConfig, path, memoryReactor())
        self.assertIn("a Balancer is one pool", str(e))
