"""
Tests for L{rrbalancer.poolconfig}: C{[[pool]]} tables parsed, and the
config each pool's balancer runs with.
"""

from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.config import BackendConfig, ConfigError, buildConfig
from rrbalancer.poolconfig import PoolConfig
from rrbalancer.settings import parsePools

ONE = ["http://127.0.0.1:8081"]
API = {"name": "api", "backend": [{"url": "http://127.0.0.1:9001", "weight": 2},
                                  "http://127.0.0.1:9002,backup"]}


def config(**settings):
    settings.setdefault("backend", ONE)
    settings.setdefault("admin", "none")
    return buildConfig(settings)


class ParseTests(SynchronousTestCase):
    def test_backendsAsTopLevel(self):
        """
        A pool's backends are written as the top-level ones, tables or the
        command line's strings, and parsed by the same function.
        """
        (pool,) = parsePools([API])
        self.assertEqual(pool, PoolConfig("api", (
            BackendConfig("http://127.0.0.1:9001", weight=2),
            BackendConfig("http://127.0.0.1:9002", backup=True),
        )))

    def test_defaultsAreTopLevel(self):
        """
        Without balance or [pool.health], a pool balances and checks as the
        top level does; what it gives replaces only those keys.
        """
        c = config(
            balance="p2c", health={"interval": 7, "path": "/up"},
            pool=[API, dict(API, name="b", balance="random", health={"interval": 1, "rise": 4})],
        )
        first, second = (p.configFor(c) for p in c.pools)
        self.assertEqual((first.balance, first.health), ("p2c", c.health))
        self.assertEqual(second.balance, "random")
        self.assertEqual(
            second.health, replace(c.health, interval=1.0, rise=4)
        )
        self.assertEqual(second.health.path, "/up")
        self.assertEqual(second.backends, c.pools[1].backends)
        self.assertEqual((second.pools, second.routes, second.limits), ((), (), ()))

    def test_poolsAloneAreEnough(self):
        """
        Pools without top-level backends make a balancer without a default
        pool.
        """
        c = buildConfig({"pool": [API], "route": [{"pool": "api"}], "admin": "none"})
        self.assertEqual((c.backends, len(c.pools)), ((), 1))

    def test_mistakes(self):
        for pools, message in [
            ({"name": "api"}, "pool: a single [pool] table; write [[pool]] (one per pool)"),
            ([{"backend": ONE}], "pool 1: every pool needs a name"),
            ([{"name": "a b", "backend": ONE}], "pool 1: name 'a b' is not a pool name"),
            ([{"name": "api"}], "pool api: no backends; give it at least one [[pool.backend]]"),
            ([{"name": "api", "backend": []}], "pool api: no backends"),
            ([{"name": "default", "backend": ONE}], "pool default: the top-level [[backend]]"),
            ([API, API], "pool api: two pools have that name"),
            ([dict(API, balanse="p2c")], "pool 1: unknown key 'balanse' (did you mean 'balance'?)"),
            ([dict(API, balance="fastest")], "pool api: balance: 'fastest' is not a policy"),
            ([dict(API, health={"interval": 0})], "pool api: health.interval: must be greater than 0"),
            ([dict(API, health={"intervl": 1})], "pool api: health: unknown setting 'intervl'"),
            ([dict(API, backend=["ftp://x"])], "pool api: backend: 'ftp://x' must start with"),
            ([dict(API, backend=[ONE[0], ONE[0]])], "pool api: pool.backend: http://127.0.0.1:8081 is listed twice"),
        ]:
            e = self.assertRaises(ConfigError, buildConfig, {"backend": ONE, "pool": pools})
            self.assertIn(message, str(e))
