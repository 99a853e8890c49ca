"""
Tests for L{rrbalancer.policies}: each policy's choices, deterministic (a
L{Clock}, seeded randomness), and a policy offered by a plugin.
"""

import os
import random
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer import plugins as pluginsPackage
from rrbalancer.backends import BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig, buildConfig
from rrbalancer.policies import (
    LeastConnections,
    PowerOfTwoChoices,
    WeightedRandom,
    policyFor,
    policyNames,
)
from rrbalancer.settings import ConfigError

from .support import MemoryBalancer


def group(policy, *weights, clock=None):
    g = BackendGroup(HealthConfig(enabled=False), clock or Clock(), policy=policy)
    backends = [
        g.add(BackendConfig(f"http://127.0.0.1:{8081 + n}", weight=w)) for n, w in enumerate(weights)
    ]
    return g, backends


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewestInFlightForTheWeight(self):
        g, (a, b, c) = group(LeastConnections(), 1, 1, 2)
        a.active, b.active, c.active = 2, 1, 3
        self.assertIs(g.pick(), b)
        c.active = 1  # 1 / 2 beats 1 / 1
        self.assertIs(g.pick(), c)

    def test_tiesTakeTurns(self):
        g, backends = group(LeastConnections(), 1, 1, 1)
        picks = [g.pick() for _ in range(6)]
        self.assertEqual(set(picks[:3]), set(backends))
        self.assertEqual(picks[:3], picks[3:])

    def test_excludeAndDown(self):
        g, (a, b, c) = group(LeastConnections(), 1, 1, 1)
        a.active = 5
        b.setAdminState("draining", "test")
        self.assertIs(g.pick(exclude=[c]), a)


class WeightedRandomTests(SynchronousTestCase):
    def test_shareFollowsWeight(self):
        g, (a, b) = group(WeightedRandom(random.Random(7).random), 1, 3)
        picks = [g.pick() for _ in range(4000)]
        share = picks.count(b) / len(picks)
        self.assertTrue(0.72 < share < 0.78, share)

    def test_exclude(self):
        g, (a, b, c) = group(WeightedRandom(random.Random(1).random), 1, 1, 1)
        self.assertEqual({g.pick(exclude=[a, b]) for _ in range(50)}, {c})
        self.assertIsNone(g.pick(exclude=[a, b, c]))


class PowerOfTwoChoicesTests(SynchronousTestCase):
    def test_slowBackendAvoidedThenForgiven(self):
        """
        A backend that answered slowly gets few requests while its latency
        is fresh, and its share back once the slowness has decayed.
        """
        clock = Clock()
        policy = PowerOfTwoChoices(clock, decay=10.0, random=random.Random(3).random)
        g, (slow, fast) = group(policy, 1, 1, clock=clock)
        policy.finished(slow, 2.0, False)
        policy.finished(fast, 0.01, False)
        picks = [g.pick() for _ in range(200)]
        self.assertLess(picks.count(slow), 10)
        clock.advance(120)
        policy.finished(fast, 0.01, False)
        self.assertLess(policy.latency(slow), 0.001)
        picks = [g.pick() for _ in range(200)]
        self.assertGreater(picks.count(slow), 50)

    def test_loadCounts(self):
        clock = Clock()
        policy = PowerOfTwoChoices(clock, random=random.Random(5).random)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        policy.finished(a, 0.01, False)
        policy.finished(b, 0.01, False)
        a.active = 20
        self.assertEqual({g.pick() for _ in range(50)}, {b})

    def test_failureIsSlow(self):
        clock = Clock()
        policy = PowerOfTwoChoices(clock, penalty=1.0)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        a.recordPassiveFailure("refused")
        self.assertEqual(policy.latency(a), 1.0)

    def test_forgetOnRemoval(self):
        clock = Clock()
        policy = PowerOfTwoChoices(clock)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        policy.finished(a, 0.5, False)
        g.remove(a)
        self.assertNotIn(a, policy._ewma)

    def test_responsesFeedIt(self):
        clock = Clock()
        policy = PowerOfTwoChoices(clock)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        a.recordResponse(200, 0.25, 0, 0)
        self.assertEqual(policy.latency(a), 0.25)


class SettingTests(SynchronousTestCase):
    def test_names(self):
        self.assertTrue({"round-robin", "least-conn", "random", "p2c"} <= set(policyNames()))
        config = buildConfig({"backend": ["http://a:1"], "balance": "p2c", "ewma_decay": 4})
        policy = policyFor(config, Clock())
        self.assertIsInstance(policy, PowerOfTwoChoices)
        self.assertEqual(policy.decay, 4.0)

    def test_unknown(self):
        e = self.assertRaises(ConfigError, buildConfig, {"backend": ["http://a:1"], "balance": "fastest"})
        self.assertIn("'fastest' is not a policy", str(e))
        self.assertIn("least-conn", str(e))

    def test_throughTheBalancer(self):
        """
        The balancer built from the settings picks with the policy: with
        least-conn, a request goes to the backend with none in flight.
        """
        balancer = MemoryBalancer(("http://127.0.0.1:8081", "http://127.0.0.1:8082"), balance="least-conn")
        self.assertIsInstance(balancer.group.policy, LeastConnections)
        one, two = balancer.backends
        one.active = 3
        self.assertIs(balancer.group.pick(), two)


PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import provider
from rrbalancer.policies import IBalancingPolicyFactory, RoundRobin


class First(RoundRobin):
    """Always the first candidate there is."""

    name = "first"

    def pick(self, candidates, exclude):
        return next((b for b in candidates if b not in exclude), None)


@provider(IPlugin, IBalancingPolicyFactory)
class firstFactory:
    name = "first"

    @staticmethod
    def build(config, clock):
        return First()
'''


class PluginTests(SynchronousTestCase):
    def test_pluginPolicy(self):
        """
        A module in the rrbalancer.plugins package path offering an
        IBalancingPolicyFactory is a policy --balance takes by its name.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "rr_test_first.py"), "w") as f:
            f.write(PLUGIN)
        pluginsPackage.__path__.append(folder)
        self.addCleanup(pluginsPackage.__path__.remove, folder)
        self.addCleanup(sys.modules.pop, "rrbalancer.plugins.rr_test_first", None)
        self.assertIn("first", policyNames())
        config = buildConfig(
            {"backend": ["http://a:1", "http://a:2"], "balance": "first", "admin": "none"}
        )
        g = BackendGroup(HealthConfig(enabled=False), Clock(), policy=policyFor(config, Clock()))
        a = g.add(BackendConfig("http://a:1"))
        g.add(BackendConfig("http://a:2"))
        self.assertEqual({g.pick() for _ in range(5)}, {a})
