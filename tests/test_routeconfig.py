"""
Tests for L{rrbalancer.routeconfig}: C{[[route]]} tables parsed, and
checked against the pools.
"""

from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.config import ConfigError, buildConfig
from rrbalancer.routeconfig import parseRoutes

ONE = ["http://127.0.0.1:8081"]


class ParseTests(SynchronousTestCase):
    def error(self, routes, **settings):
        settings = dict({"backend": ONE, "route": routes}, **settings)
        return str(self.assertRaises(ConfigError, buildConfig, settings))

    def test_valid(self):
        (route,) = parseRoutes([{"host": "API.example.com.", "path_prefix": "/v2/",
                                 "methods": "get", "pool": "api", "strip_prefix": True,
                                 "priority": 3}])
        self.assertEqual(
            (route.host, route.pathPrefix, route.methods, route.pool, route.stripPrefix,
             route.priority, route.number),
            ("api.example.com", "/v2", ("GET",), "api", True, 3, 1),
        )

    def test_unknownPool(self):
        message = self.error([{"path_prefix": "/a", "pool": "default"},
                              {"host": "api.example.com", "pool": "apii"}])
        self.assertEqual(
            message,
            "route 2 (host api.example.com): no pool named 'apii' (the pools are default)",
        )

    def test_defaultWithoutBackends(self):
        message = str(self.assertRaises(ConfigError, buildConfig, {
            "pool": [{"name": "api", "backend": ONE}],
            "route": [{"path_prefix": "/x", "pool": "default"}],
        }))
        self.assertIn("route 1 (path_prefix /x): no pool named 'default'", message)

    def test_identicalRoutes(self):
        message = self.error([
            {"host": "a.example.com", "path_prefix": "/v2", "pool": "default"},
            {"host": "A.example.com", "path_prefix": "/v2/", "pool": "default", "priority": 2},
        ])
        self.assertEqual(
            message,
            "route 2 (host a.example.com, path_prefix /v2, priority 2) -> pool default: "
            "matches the same requests as route 1 (host a.example.com, path_prefix /v2), "
            "so it could never be chosen",
        )

    def test_mistakes(self):
        for route, mention in [
            ({"host": "a.example.com"}, "route 1: give it a pool"),
            ({"pool": "default", "split": []}, "route 1: give it a pool"),
            ({"pool": "default", "hots": "a"}, "unknown key 'hots' (did you mean 'host'?)"),
            ({"pool": "default", "host": "a.example.com:80"}, "without a port"),
            ({"pool": "default", "host": "a b"}, "is not a host name"),
            ({"pool": "default", "host": "*."}, "is not a host name"),
            ({"pool": "default", "path_prefix": "v2"}, "must be an absolute path"),
            ({"pool": "default", "path_prefix": "/a//b"}, "no empty segment"),
            ({"pool": "default", "path_prefix": "/a/../b"}, ". or .. segments"),
            ({"pool": "default", "strip_prefix": True}, "strip_prefix needs a path_prefix"),
            ({"pool": "default", "methods": []}, "an empty list matches nothing"),
            ({"pool": "default", "methods": ["GE T"]}, "is not a method"),
            ({"pool": "default", "priority": "high"}, "priority: expected a whole number"),
        ]:
            self.assertIn(mention, self.error([route]), route)

    def test_singleTable(self):
        self.assertIn("write [[route]]", self.error({"pool": "default"}))
