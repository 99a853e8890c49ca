"""
Tests for L{rrbalancer.policies}: each policy's choices, deterministic (a
L{Clock}, seeded randomness), and a policy offered by a plugin.
"""

import os
import random
import sys

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer import plugins as pluginsPackage
from rrbalancer.backends import BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig, buildConfig
from rrbalancer.policies import (
    ConsistentHash,
    LeastConnections,
    PowerOfTwoChoices,
    WeightedRandom,
    policyFor,
    policyNames,
    requestKey,
)
from rrbalancer.settings import ConfigError
from rrbalancer.tunnel import Tunnel

from .support import MemoryBalancer


def group(policy, *weights, clock=None):
    g = BackendGroup(HealthConfig(enabled=False), clock or Clock(), policy=policy)
    backends = [
        g.add(BackendConfig(f"http://127.0.0.1:{8081 + n}", weight=w)) for n, w in enumerate(weights)
    ]
    return g, backends


def openTunnels(backend, n):
    """
    C{n} tunnels to C{backend}, started on string transports.
    """
    tunnels = []
    for _ in range(n):
        tunnel = Tunnel(Clock(), 3600.0, (backend.tunnels,))
        backend.tunnelOpened(tunnel)
        tunnel.start(StringTransport(), StringTransport())
        tunnels.append(tunnel)
    return tunnels


class _Request:
    """
    What the hash keys read of a request.
    """

    def __init__(self, path=b"/", client="192.0.2.7", headers=None, cookies=None):
        from twisted.internet.address import IPv4Address
        from twisted.web.http_headers import Headers

        self.path = path
        self._client = IPv4Address("TCP", client, 40000)
        self.requestHeaders = Headers(headers or {})
        self._cookies = cookies or {}

    def getClientAddress(self):
        return self._client

    def getCookie(self, name):
        return self._cookies.get(name)


def byPath(n):
    return [_Request(path=b"/user/%d" % (i,)) for i in range(n)]


class ConsistentHashTests(SynchronousTestCase):
    def policy(self, balance=1.25):
        return ConsistentHash(requestKey("path"), balance)

    def placement(self, g, requests):
        return [g.pick(request=r) for r in requests]

    def test_sameKeySameBackend(self):
        g, backends = group(self.policy(), 1, 1, 1)
        requests = byPath(300)
        first = self.placement(g, requests)
        self.assertEqual(self.placement(g, requests), first)
        # Spread over all of them, roughly evenly.
        counts = [first.count(b) for b in backends]
        self.assertTrue(all(60 < c < 140 for c in counts), counts)

    def test_addingMovesOnlyItsShare(self):
        """
        A new backend takes keys from the others, and no key moves between
        two old backends; removing it gives exactly those keys back.
        """
        g, backends = group(self.policy(), 1, 1, 1)
        requests = byPath(1000)
        before = self.placement(g, requests)
        new = g.add(BackendConfig("http://127.0.0.1:9999"))
        after = self.placement(g, requests)
        moved = [(a, b) for a, b in zip(before, after) if a is not b]
        self.assertTrue(all(b is new for _, b in moved))
        self.assertTrue(150 < len(moved) < 350, len(moved))
        g.remove(new)
        self.assertEqual(self.placement(g, requests), before)

    def test_downBackendKeysComeBack(self):
        g, (a, b, c) = group(self.policy(), 1, 1, 1)
        requests = byPath(500)
        before = self.placement(g, requests)
        b.setAdminState("draining", "test")
        during = self.placement(g, requests)
        self.assertNotIn(b, during)
        self.assertEqual(
            [x for x, y in zip(before, during) if x is not y and x is not b], []
        )
        b.setAdminState("up", "test")
        self.assertEqual(self.placement(g, requests), before)

    def test_boundedLoad(self):
        """
        One hot key cannot pile more than the bound onto its backend: with
        its backend over 1.25 × the mean in flight, the key goes on round
        the ring.
        """
        g, (a, b, c, d) = group(self.policy(1.25), 1, 1, 1, 1)
        hot = _Request(path=b"/hot")
        placed = []
        for _ in range(40):
            backend = g.pick(request=hot)
            backend.active += 1
            placed.append(backend)
        counts = sorted(placed.count(x) for x in (a, b, c, d))
        # Never over 1.25 × (40 / 4) + 1.
        self.assertLessEqual(counts[-1], 13)
        self.assertEqual(sum(counts), 40)
        # Once the load is gone the key is home again.
        home = placed[0]
        for x in (a, b, c, d):
            x.active = 0
        self.assertIs(g.pick(request=hot), home)

    def test_tunnelsCountInTheBound(self):
        """
        A key's backend holding many tunnels is over the bound: the key
        goes on round the ring.
        """
        g, backends = group(self.policy(1.25), 1, 1, 1, 1)
        hot = _Request(path=b"/hot")
        home = g.pick(request=hot)
        openTunnels(home, 8)
        other = g.pick(request=hot)
        self.assertIsNot(other, home)

    def test_weights(self):
        g, (a, b) = group(self.policy(balance=100), 1, 3)
        placed = self.placement(g, byPath(2000))
        share = placed.count(b) / 2000
        self.assertTrue(0.67 < share < 0.83, share)

    def test_excludeAndNoKey(self):
        g, (a, b) = group(ConsistentHash(requestKey("header:X-User")), 1, 1)
        user = _Request(headers={b"x-user": [b"alice"]})
        home = g.pick(request=user)
        other = g.pick(exclude=[home], request=user)
        self.assertIsNotNone(other)
        self.assertIsNot(other, home)
        # Without the header: round robin, not one backend for all.
        self.assertEqual({g.pick(request=_Request()) for _ in range(4)}, {a, b})

    def test_keys(self):
        request = _Request(
            path=b"/p", client="198.51.100.9", headers={b"x-user": [b"a", b"b"]},
            cookies={b"sid": b"s1"},
        )
        self.assertEqual(requestKey("client-ip")(request), b"198.51.100.9")
        self.assertEqual(requestKey("path")(request), b"/p")
        self.assertEqual(requestKey("header:X-User")(request), b"a,b")
        self.assertEqual(requestKey("cookie:sid")(request), b"s1")
        self.assertIsNone(requestKey("cookie:other")(request))

    def test_settings(self):
        config = buildConfig({"backend": ["http://a:1"], "balance": "hash",
                              "hash_key": "cookie:sid", "hash_balance": 2})
        policy = policyFor(config, Clock())
        self.assertIsInstance(policy, ConsistentHash)
        self.assertEqual(policy.balance, 2.0)
        for bad in ("ip", "header:", "cookie:a b"):
            e = self.assertRaises(ConfigError, buildConfig,
                                  {"backend": ["http://a:1"], "hash_key": bad})
            self.assertIn("is not a hash key", str(e))
        self.assertRaises(ConfigError, buildConfig, {"backend": ["http://a:1"], "hash_balance": 0.5})


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

    def test_tunnelsCount(self):
        """
        An open tunnel weighs as a request in flight: a backend holding
        tunnels and no request is not idle.
        """
        g, (a, b) = group(LeastConnections(), 1, 1)
        openTunnels(a, 3)
        b.active = 2
        self.assertEqual(({g.pick() for _ in range(4)}, a.active, a.load), ({b}, 0, 3))
        b.active = 4
        self.assertEqual({g.pick() for _ in range(4)}, {a})

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

    def test_oneSlowAnswerDoesNotMakeAFastBackendSlow(self):
        """
        Under load (an answer every millisecond), one slow answer among a
        fast backend's many is averaged in and soon outweighed: the fast
        backend does not look slower than a backend that is slow on every
        answer, and keeps the requests.
        """
        clock = Clock()
        policy = PowerOfTwoChoices(clock, decay=10.0, random=random.Random(9).random)
        g, (fast, slow) = group(policy, 1, 1, clock=clock)
        for i in range(200):
            clock.advance(0.001)
            policy.finished(fast, 0.060 if i == 100 else 0.010, False)
            policy.finished(slow, 0.040, False)
        self.assertLess(policy.latency(fast), 0.011)
        self.assertAlmostEqual(policy.latency(slow), 0.040, delta=0.001)
        self.assertEqual({g.pick() for _ in range(50)}, {fast})

    def test_slowdownShowsWithinAFewAnswers(self):
        """
        A fast backend that gets slow loses its requests after a few slow
        answers, however many fast ones it gave before.
        """
        clock = Clock()
        policy = PowerOfTwoChoices(clock, decay=10.0, random=random.Random(4).random)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        for _ in range(1000):
            clock.advance(0.001)
            policy.finished(a, 0.010, False)
            policy.finished(b, 0.020, False)
        self.assertEqual({g.pick() for _ in range(20)}, {a})
        for _ in range(4):
            clock.advance(0.001)
            policy.finished(a, 0.200, False)
        self.assertGreater(policy.latency(a), 0.040)
        self.assertEqual({g.pick() for _ in range(20)}, {b})

    def test_answersWaitingUnreadLeftOut(self):
        """
        The load weighed is what the backend has yet to answer: six in
        flight of which five wait unread cost less than three unanswered.
        """
        clock = Clock()
        policy = PowerOfTwoChoices(clock, random=random.Random(5).random)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        for backend in (a, b):
            policy.finished(backend, 0.004, False)
        a.active, b.active = 6, 3
        self.assertEqual({g.pick() for _ in range(20)}, {b})
        self.patch(type(a), "unanswered", property(lambda self: 1 if self is a else self.load))
        self.assertEqual({g.pick() for _ in range(20)}, {a})

    def test_loadCounts(self):
        clock = Clock()
        policy = PowerOfTwoChoices(clock, random=random.Random(5).random)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        policy.finished(a, 0.01, False)
        policy.finished(b, 0.01, False)
        a.active = 20
        self.assertEqual({g.pick() for _ in range(50)}, {b})

    def test_tunnelsAreLoadNotLatency(self):
        """
        An open tunnel weighs in the cost as a request in flight; its
        handshake's answer is a latency sample, and the tunnel's life,
        however long, is none.
        """
        clock = Clock()
        policy = PowerOfTwoChoices(clock, random=random.Random(5).random)
        g, (a, b) = group(policy, 1, 1, clock=clock)
        policy.finished(b, 0.01, False)
        a.recordResponse(101, 0.01, 0, 0)
        [tunnel] = openTunnels(a, 1)
        self.assertEqual(policy.cost(a, 1), 0.01 * 2)
        self.assertEqual({g.pick() for _ in range(50)}, {b})
        clock.advance(600)
        tunnel.close()
        for end in (tunnel.client, tunnel.backend):
            end.connectionLost(None)
        self.assertEqual((a.load, a.tunnels.open), (0, 0))
        self.assertLess(policy.latency(a), 0.01)

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

    def pick(self, candidates, exclude, request):
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
