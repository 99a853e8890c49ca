"""
Tests for L{rrbalancer.backends}: which backend the group picks, and the
rise/fall rule that takes backends down and brings them back.
"""

from collections import Counter
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from rrbalancer.backends import (
    DISABLED,
    DOWN,
    DRAINING,
    EJECTED,
    UP,
    BackendGroup,
    Ejection,
)
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.policies import PowerOfTwoChoices, RoundRobin
from rrbalancer.tunnel import Tunnel


def captureStateLogs(testCase):
    """
    Collect the backends' "is up"/"is down" log lines as (level, text).
    """
    events = []

    def observer(event):
        if event.get("log_namespace", "").startswith("rrbalancer.backends"):
            events.append((event.get("log_level"), formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class GroupMixin:
    def makeGroup(self, *specs, rise=2, fall=3, enabled=True, **options):
        """
        A group of backends named by their URLs' hosts: C{("a", 5)} is
        http://a with weight 5, C{("z", 1, True)} a backup.

        @param options: the group's other parameters (C{ejection},
            C{slowStart}, C{panicThreshold}).
        """
        self.clock = Clock()
        self.clock.advance(1000)
        group = BackendGroup(
            HealthConfig(rise=rise, fall=fall, enabled=enabled), self.clock, **options
        )
        backends = {}
        for spec in specs:
            if not isinstance(spec, tuple):
                spec = (spec,)
            name, weight, backup = spec + (1, False)[len(spec) - 1 :]
            backends[name] = group.add(
                BackendConfig(url=f"http://{name}", weight=weight, backup=backup)
            )
        return group, backends

    def picks(self, group, n, exclude=()):
        names = []
        for _ in range(n):
            backend = group.pick(exclude)
            names.append(None if backend is None else backend.url[len("http://"):])
        return names

    def down(self, backend):
        for _ in range(backend._health.fall):
            backend.recordCheck(False, "HTTP 500")
        self.assertFalse(backend.available)


class PickTests(GroupMixin, TestCase):
    def test_roundRobin(self):
        group, _ = self.makeGroup("a", "b", "c")
        self.assertEqual("".join(self.picks(group, 9)), "abcabcabc")

    def test_weights(self):
        group, _ = self.makeGroup(("a", 5), "b", "c")
        self.assertEqual("".join(self.picks(group, 14)), "aabacaa" * 2)

    def test_emptyGroup(self):
        group, _ = self.makeGroup()
        self.assertIsNone(group.pick())
        self.assertIsNone(group.pick())

    def test_downSkipped(self):
        """
        A backend that is down is skipped; the others keep rotating.
        """
        group, b = self.makeGroup("a", "b", "c")
        self.down(b["b"])
        self.assertEqual("".join(self.picks(group, 6)), "acacac")
        self.assertIsNotNone(group.pick())

    def test_allDown(self):
        group, b = self.makeGroup("a", "b")
        self.down(b["a"])
        self.down(b["b"])
        self.assertIsNone(group.pick())
        self.assertIsNone(group.pick())

    def test_adminStatesSkipped(self):
        """
        A draining or disabled backend takes no new request.
        """
        group, b = self.makeGroup("a", "b", "c")
        b["a"].adminState = DRAINING
        b["c"].adminState = DISABLED
        self.assertEqual(self.picks(group, 3), ["b", "b", "b"])
        self.assertEqual(b["a"].state, DRAINING)
        self.assertEqual(b["c"].state, DISABLED)

    def test_backupsUnusedWhilePrimaryUp(self):
        group, b = self.makeGroup("a", "b", ("z", 1, True))
        self.assertNotIn("z", self.picks(group, 20))
        self.down(b["a"])
        self.assertEqual(self.picks(group, 4), ["b"] * 4)

    def test_backupsWhenNoPrimary(self):
        """
        Backups take the traffic, in turn, only once every primary is
        unavailable, and hand it back when one primary returns.
        """
        group, b = self.makeGroup("a", "b", ("y", 1, True), ("z", 1, True))
        self.down(b["a"])
        self.down(b["b"])
        self.assertEqual(sorted(self.picks(group, 4)), ["y", "y", "z", "z"])
        b["a"].recordCheck(True, "HTTP 200")
        b["a"].recordCheck(True, "HTTP 200")
        self.assertEqual(self.picks(group, 3), ["a", "a", "a"])

    def test_backupAfterEveryPrimaryFailedTheRequest(self):
        """
        A request that every up primary has failed moves on to a backup, as
        in NGINX; other requests still go to the primaries.
        """
        group, b = self.makeGroup("a", "b", ("z", 1, True))
        self.assertEqual(self.picks(group, 1, exclude=[b["a"], b["b"]]), ["z"])
        self.assertNotIn("z", self.picks(group, 6))

    def test_backupsWhenPrimaryDisabled(self):
        group, b = self.makeGroup("a", ("z", 1, True))
        b["a"].adminState = DISABLED
        self.assertEqual(self.picks(group, 2), ["z", "z"])

    def test_backupDownToo(self):
        group, b = self.makeGroup("a", ("y", 1, True), ("z", 1, True))
        self.down(b["a"])
        self.down(b["y"])
        self.assertEqual(self.picks(group, 3), ["z", "z", "z"])
        self.down(b["z"])
        self.assertIsNone(group.pick())

    def test_onlyBackups(self):
        """
        A group of backups only still serves (there is no primary up).
        """
        group, _ = self.makeGroup(("y", 1, True), ("z", 1, True))
        self.assertEqual(sorted(self.picks(group, 2)), ["y", "z"])

    def test_exclude(self):
        """
        A retry skips the backends this request already tried.
        """
        group, b = self.makeGroup("a", "b", "c")
        for _ in range(6):
            self.assertNotIn(group.pick(exclude=[b["a"], b["b"]]), (b["a"], b["b"]))
        self.assertIsNone(group.pick(exclude=list(b.values())))

    def test_weightChange(self):
        group, b = self.makeGroup("a", "b")
        b["a"].weight = 3
        counts = Counter(self.picks(group, 40))
        self.assertEqual(counts, Counter({"a": 30, "b": 10}))

    def test_weightedTiesInOrderAdded(self):
        """
        A few weighted backends get NGINX's exact sequence, its ties broken
        in the order the backends were added, even after one went down and
        came back.
        """
        group, b = self.makeGroup(("a", 2), ("b", 2), "c")
        self.assertEqual("".join(self.picks(group, 5)), "abcab")
        self.down(b["a"])
        for _ in range(2):
            b["a"].recordCheck(True, "HTTP 200")
        self.assertTrue(b["a"].available)
        self.assertEqual(Counter(self.picks(group, 50)), Counter({"a": 20, "b": 20, "c": 10}))

    def test_addAndRemove(self):
        group, b = self.makeGroup("a", "b")
        c = group.add(BackendConfig(url="http://c"))
        self.assertEqual(sorted(self.picks(group, 3)), ["a", "b", "c"])
        group.remove(b["a"])
        self.assertEqual(sorted(self.picks(group, 4)), ["b", "b", "c", "c"])
        self.assertIsNone(group.get(b["a"].id))
        self.assertIs(group.byURL("http://c"), c)
        self.assertEqual(len(group), 2)
        self.assertRaises(ValueError, group.add, BackendConfig(url="http://c"))


class OwnerTests(GroupMixin, TestCase):
    """
    A backend listed by several owners (the config file, the API, each
    discovery source) leaves only when the last of them drops it.
    """

    def test_addedWithOwner(self):
        group, _ = self.makeGroup()
        backend = group.add(BackendConfig(url="http://a"), owner="config")
        self.assertEqual(backend.owners, ("config",))
        self.assertEqual(group.add(BackendConfig(url="http://b")).owners, ())

    def test_claimOnce(self):
        group, _ = self.makeGroup()
        backend = group.add(BackendConfig(url="http://a"), owner="config")
        group.claim(backend, "dns+a://web.example.com:80")
        group.claim(backend, "dns+a://web.example.com:80")
        self.assertEqual(backend.owners, ("config", "dns+a://web.example.com:80"))

    def test_lastOwnerRemoves(self):
        """
        Released by one of two owners, a backend stays as it was; released
        by the last, it drains and goes once its requests in flight end.
        """
        group, _ = self.makeGroup()
        backend = group.add(BackendConfig(url="http://a"), owner="config")
        group.claim(backend, "api")
        backend.active = 1
        self.assertFalse(group.release(backend, "config", "gone from the file"))
        self.assertEqual((backend.state, backend.removing), (UP, False))
        self.assertEqual(backend.owners, ("api",))
        self.assertTrue(group.release(backend, "api", "deleted"))
        self.assertEqual((backend.state, backend.removing), (DRAINING, True))
        self.assertIs(group.byURL("http://a"), backend)
        backend.active = 0
        self.assertIsNone(group.byURL("http://a"))

    def test_releaseByStranger(self):
        """
        Releasing a backend one does not own changes nothing: one owner
        never removes another's backend.
        """
        group, _ = self.makeGroup()
        backend = group.add(BackendConfig(url="http://a"), owner="api")
        self.assertFalse(group.release(backend, "config", "gone from the file"))
        self.assertEqual((backend.owners, backend.removing), (("api",), False))
        self.assertIs(group.byURL("http://a"), backend)

    def test_removalLogLines(self):
        """
        A backend removed at once logs one line, with the reason; one that
        drains first, when it starts and when it ends: never a line of its
        own for the draining (thousands are removed in one bulk call).
        """
        events = captureStateLogs(self)
        group, b = self.makeGroup("a", "b")
        group.retire(b["a"], "deleted by 127.0.0.1")
        self.assertEqual([text for _, text in events], ["backend http://a removed: deleted by 127.0.0.1"])
        del events[:]
        b["b"].active = 1
        group.retire(b["b"], "bulk change by 127.0.0.1")
        b["b"].active = 0
        self.assertEqual(
            [text for _, text in events],
            [
                "backend http://b is being removed (1 in flight, 0 tunnels): bulk change by 127.0.0.1",
                "backend http://b removed: bulk change by 127.0.0.1",
            ],
        )

    def test_removedConnectionsCloseInTurns(self):
        """
        The kept connections of backends removed together close a batch
        per turn of the loop, not all in the turn that removed them; and
        what still waits closes when the group stops.
        """
        closed = []
        connection = lambda: SimpleNamespace(abort=lambda: closed.append(1))

        class Pool(_Pool):
            def retire(self, close):
                close([connection(), connection()])

        group, b = self.makeGroup(upstream=lambda config: SimpleNamespace(pool=Pool()))
        backends = [group.add(BackendConfig(url=f"http://b{i}")) for i in range(150)]
        for backend in backends:
            group.retire(backend, "deleted")
        self.assertEqual(len(closed), 200)
        self.clock.advance(0)
        self.assertEqual(len(closed), 300)
        for backend in [group.add(BackendConfig(url=f"http://c{i}")) for i in range(150)]:
            group.retire(backend, "deleted")
        group.stop()
        self.assertEqual((len(closed), self.clock.getDelayedCalls()), (600, []))

    def test_releaseWhileRemoving(self):
        """
        A backend already on its way out (deleted through the API) is not
        retired twice.
        """
        group, _ = self.makeGroup()
        backend = group.add(BackendConfig(url="http://a"), owner="config")
        backend.active = 1
        group.retire(backend, "deleted")
        self.assertFalse(group.release(backend, "config", "gone from the file"))
        self.assertEqual(backend.owners, ())
        backend.active = 0
        self.assertIsNone(group.byURL("http://a"))


class RemovalWithTunnelsTests(GroupMixin, TestCase):
    """
    A backend being removed waits for its tunnels as for its requests in
    flight, for the group's C{tunnelGrace} at most; then they are closed.
    """

    def openTunnel(self, backend):
        tunnel = Tunnel(self.clock, 3600.0, (backend.tunnels,))
        backend.tunnelOpened(tunnel)
        transports = StringTransport(), StringTransport()
        tunnel.start(*transports)
        return tunnel, transports

    def lose(self, tunnel):
        for end in (tunnel.client, tunnel.backend):
            end.connectionLost(None)

    def test_waitsForTunnels(self):
        group, b = self.makeGroup("a", "b", tunnelGrace=30.0)
        tunnel, _ = self.openTunnel(b["a"])
        removed = group.retire(b["a"], "deleted")
        self.assertNoResult(removed)
        self.assertEqual((b["a"].state, b["a"].load), (DRAINING, 1))
        self.clock.advance(29)
        self.assertIs(group.byURL("http://a"), b["a"])
        self.lose(tunnel)
        self.assertIs(self.successResultOf(removed), b["a"])
        self.assertIsNone(group.byURL("http://a"))
        # Nothing is left to close them.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedAfterGrace(self):
        """
        Tunnels still open after the grace are closed (once what is
        buffered for them is written), and the backend goes when they have.
        """
        group, b = self.makeGroup("a", tunnelGrace=30.0)
        tunnels = [self.openTunnel(b["a"]) for _ in range(2)]
        removed = group.retire(b["a"], "deleted")
        self.clock.advance(29.9)
        self.assertFalse(any(t.disconnecting for _, ts in tunnels for t in ts))
        self.clock.advance(0.1)
        self.assertTrue(all(t.disconnecting for _, ts in tunnels for t in ts))
        self.assertNoResult(removed)
        for tunnel, _ in tunnels:
            self.lose(tunnel)
        self.successResultOf(removed)
        self.assertEqual((b["a"].tunnels.open, b["a"].tunnels.opened), (0, 2))

    def test_requestThatBecomesATunnel(self):
        """
        An upgrade in flight when the removal began, switched since, is
        waited for and closed like the tunnels open then.
        """
        group, b = self.makeGroup("a", tunnelGrace=30.0)
        b["a"].active = 1
        removed = group.retire(b["a"], "deleted")
        tunnel, (client, backend) = self.openTunnel(b["a"])
        b["a"].active = 0
        self.assertNoResult(removed)
        self.clock.advance(30)
        self.assertTrue(client.disconnecting and backend.disconnecting)
        self.lose(tunnel)
        self.successResultOf(removed)

    def test_keptAgain(self):
        """
        A removal called off (the file lists the backend again) closes
        nothing.
        """
        group, b = self.makeGroup("a", tunnelGrace=30.0)
        tunnel, (client, _) = self.openTunnel(b["a"])
        group.retire(b["a"], "gone from the file")
        group.keep(b["a"], "back in the file")
        self.clock.advance(60)
        self.assertFalse(client.disconnecting)
        self.assertEqual(b["a"].state, UP)

    def test_idleAtOnce(self):
        group, b = self.makeGroup("a")
        self.successResultOf(group.retire(b["a"], "deleted"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CountingExclude(frozenset):
    """
    An C{exclude} that counts the backends a pick looks at: each one it
    considers is tested against it.
    """

    looks = 0

    def __contains__(self, item):
        self.looks += 1
        return frozenset.__contains__(self, item)

    def __bool__(self):
        return True

    def __len__(self):
        return max(1, frozenset.__len__(self))


class WalkCountingDict(dict):
    """
    The group's backends, counting every walk over all of them.
    """

    walks = 0

    def values(self):
        self.walks += 1
        return dict.values(self)

    def __iter__(self):
        self.walks += 1
        return dict.__iter__(self)


class ScaleTests(GroupMixin, TestCase):
    """
    What a pick and a change cost does not grow with the number of
    backends.
    """

    def bigGroup(self, n=10000, weight=lambda i: 1):
        group, _ = self.makeGroup()
        backends = [
            group.add(BackendConfig(url=f"http://10.{i // 250}.{i % 250}.1", weight=weight(i)))
            for i in range(n)
        ]
        walks = WalkCountingDict(group._backends)
        group._backends = walks
        return group, backends, walks

    def test_pickLooksAtOneBackend(self):
        for weight in (lambda i: 1, lambda i: 1 + i % 3):
            group, backends, walks = self.bigGroup(weight=weight)
            for b in backends[:3000]:
                self.down(b)
            for b in backends[3000:3100]:
                b.setAdminState(DRAINING, "test")
            exclude = CountingExclude()
            chosen = [group.pick(exclude) for _ in range(1000)]
            self.assertEqual(exclude.looks, 1000)
            self.assertTrue(all(b.available for b in chosen))
            self.assertEqual(walks.walks, 0)

    def test_roundRobinOverEveryAvailable(self):
        group, backends, walks = self.bigGroup(n=1000)
        for b in backends[::2]:
            self.down(b)
        chosen = [group.pick() for _ in range(1000)]
        self.assertEqual(Counter(chosen), Counter({b: 2 for b in backends[1::2]}))

    def test_backupsOnlyWhenNoPrimaryLeft(self):
        group, backends, walks = self.bigGroup(n=2000)
        for b in backends[:1000]:
            b.backup = True
        primaries = backends[1000:]
        tried = CountingExclude(primaries[:3])
        self.assertNotIn(group.pick(tried), primaries[:3])
        self.assertFalse(group.pick(tried).backup)
        self.assertLessEqual(tried.looks, 8)
        for b in primaries:
            b.setAdminState(DRAINING, "test")
        self.assertTrue(group.pick().backup)
        primaries[7].setAdminState(UP, "test")
        self.assertEqual({group.pick() for _ in range(5)}, {primaries[7]})
        self.assertEqual(walks.walks, 0)

    def test_changesTouchOneBackend(self):
        """
        Adding, draining, failing, recovering, re-weighting and removing a
        backend never walks the others.
        """
        group, backends, walks = self.bigGroup(weight=lambda i: 1 + i % 2)
        b = backends[1234]
        b.setAdminState(DRAINING, "test")
        b.setAdminState(UP, "test")
        self.down(b)
        for _ in range(3):
            b.recordCheck(True, "HTTP 200")
        group.reconfigure(b, 5, False)
        new = group.add(BackendConfig(url="http://10.99.0.1"))
        group.remove(b)
        self.assertIs(group.byURL("http://10.99.0.1"), new)
        self.assertIsNone(group.byURL(b.url))
        self.assertGreater(group.availableCount(), 0)
        self.assertEqual(group.availableCount(), 10000)
        self.assertEqual(walks.walks, 0)


class IdleBackendTests(GroupMixin, TestCase):
    def test_idleBackendHoldsLittle(self):
        """
        A backend that has had no request yet holds no containers for its
        recent figures, and its figures read as empty.
        """
        group, b = self.makeGroup("a")
        stats = b["a"].stats
        self.assertEqual((stats._slots, stats._samples), ((), ()))
        self.assertIsNone(b["a"]._idleWaiters)
        self.assertFalse(hasattr(stats, "__dict__"))
        self.assertFalse(hasattr(b["a"], "__dict__"))
        self.assertEqual(list(stats.buckets), [0] * 16)
        self.assertEqual(stats.requestsPerSecond(), 0)
        self.assertEqual(stats.latency(), {"p50": None, "p99": None})
        self.assertEqual(stats.errorRate(), 0.0)
        stats.recordResponse(200, 0.02, 0, 10)
        self.assertEqual(sum(stats.buckets), 1)
        self.assertEqual(stats.latency()["p50"], 20.0)
        self.successResultOf(b["a"].whenIdle())


class RiseFallTests(GroupMixin, TestCase):
    def setUp(self):
        self.logs = captureStateLogs(self)

    def test_startsUp(self):
        _, b = self.makeGroup("a")
        self.assertTrue(b["a"].available)
        self.assertEqual(b["a"].state, UP)
        self.assertEqual(self.logs, [])

    def test_fall(self):
        """
        C{fall} failed checks in a row take a backend down, and that is
        logged once, however many more failures follow.
        """
        _, b = self.makeGroup("a", fall=3)
        a = b["a"]
        a.recordCheck(False, "HTTP 500")
        a.recordCheck(False, "HTTP 500")
        self.assertTrue(a.healthy)
        self.assertEqual(a.state, UP)
        self.assertEqual(self.logs, [])
        self.clock.advance(5)
        a.recordCheck(False, "connection refused")
        self.assertFalse(a.healthy)
        self.assertEqual(a.state, DOWN)
        self.assertEqual(a.lastChange, 1005)
        self.assertEqual(a.lastChangeReason, "connection refused")
        self.assertEqual(a.lastError, "connection refused")
        for _ in range(5):
            a.recordCheck(False, "connection refused")
        self.assertEqual(
            self.logs,
            [(LogLevel.warn, "backend http://a is down: connection refused")],
        )

    def test_rise(self):
        """
        C{rise} passing checks in a row bring a down backend back, logged
        once.
        """
        _, b = self.makeGroup("a", rise=2, fall=1)
        a = b["a"]
        a.recordCheck(False, "HTTP 503")
        self.assertFalse(a.available)
        a.recordCheck(True, "HTTP 200")
        self.assertFalse(a.available)
        a.recordCheck(True, "HTTP 204")
        self.assertTrue(a.available)
        self.assertEqual(a.lastChangeReason, "HTTP 204")
        for _ in range(5):
            a.recordCheck(True, "HTTP 200")
        self.assertEqual(
            self.logs,
            [
                (LogLevel.warn, "backend http://a is down: HTTP 503"),
                (LogLevel.info, "backend http://a is up: HTTP 204"),
            ],
        )

    def test_interleavedFailuresDoNotFall(self):
        """
        A pass resets the failure count: failures that are not consecutive
        never take a backend down.
        """
        _, b = self.makeGroup("a", fall=3)
        a = b["a"]
        for _ in range(10):
            a.recordCheck(False, "timeout")
            a.recordCheck(False, "timeout")
            a.recordCheck(True, "HTTP 200")
        self.assertTrue(a.available)
        self.assertEqual(self.logs, [])

    def test_interleavedPassesDoNotRise(self):
        """
        A failure resets the pass count: passes that are not consecutive
        never bring a backend back.
        """
        _, b = self.makeGroup("a", rise=3, fall=1)
        a = b["a"]
        a.recordCheck(False, "HTTP 500")
        for _ in range(10):
            a.recordCheck(True, "HTTP 200")
            a.recordCheck(True, "HTTP 200")
            a.recordCheck(False, "HTTP 500")
        self.assertFalse(a.available)
        self.assertEqual(len(self.logs), 1)
        a.recordCheck(True, "HTTP 200")
        a.recordCheck(True, "HTTP 200")
        a.recordCheck(True, "HTTP 200")
        self.assertTrue(a.available)
        self.assertEqual(len(self.logs), 2)

    def test_riseAndFallOfOne(self):
        _, b = self.makeGroup("a", rise=1, fall=1)
        a = b["a"]
        a.recordCheck(False, "x")
        self.assertFalse(a.available)
        a.recordCheck(True, "y")
        self.assertTrue(a.available)
        self.assertEqual(
            [text for _, text in self.logs],
            ["backend http://a is down: x", "backend http://a is up: y"],
        )

    def test_eachChangeLoggedOnce(self):
        """
        Several round trips: exactly one line per state change.
        """
        _, b = self.makeGroup("a", rise=2, fall=2)
        a = b["a"]
        results = [False, False, False, True, True, True, False, True, False, False, True, True]
        for ok in results:
            a.recordCheck(ok, "ok" if ok else "bad")
        self.assertEqual(
            [text for _, text in self.logs],
            [
                "backend http://a is down: bad",
                "backend http://a is up: ok",
                "backend http://a is down: bad",
                "backend http://a is up: ok",
            ],
        )

    def test_passiveFailuresLeaveChecksAlone(self):
        """
        Failures on client requests do not count as failed checks: the
        checks' rise/fall state is their own.
        """
        group, b = self.makeGroup("a", "b", fall=1, ejection=Ejection(after=0))
        for _ in range(5):
            b["a"].recordPassiveFailure("connection refused")
        self.assertTrue(b["a"].available)
        self.assertEqual(b["a"].state, UP)
        self.assertEqual(b["a"].failures, 5)
        self.assertEqual(b["a"].lastError, "connection refused")
        self.assertEqual(self.logs, [])

    def test_lastCheck(self):
        _, b = self.makeGroup("a")
        self.assertIsNone(b["a"].lastCheck)
        self.clock.advance(3)
        b["a"].recordCheck(True, "HTTP 200")
        self.assertEqual(b["a"].lastCheck, 1003)


class EjectionTests(GroupMixin, TestCase):
    """
    Failures in a row on client requests set a backend aside for a while,
    apart from the active checks.
    """

    def setUp(self):
        self.logs = captureStateLogs(self)

    def fail(self, backend, n):
        for _ in range(n):
            backend.recordPassiveFailure("connection refused")

    def test_ejectedAfterFailuresInARow(self):
        group, b = self.makeGroup("a", "b", "c", ejection=Ejection(after=3, time=30))
        self.fail(b["a"], 2)
        self.assertTrue(b["a"].available)
        self.fail(b["a"], 1)
        self.assertFalse(b["a"].available)
        self.assertEqual(b["a"].state, EJECTED)
        self.assertEqual(b["a"].ejectedUntil, 1030)
        self.assertEqual(group.ejected, 1)
        self.assertEqual(self.picks(group, 4), ["b", "c", "b", "c"])
        self.clock.advance(29.9)
        self.assertFalse(b["a"].available)
        self.clock.advance(0.1)
        self.assertTrue(b["a"].available)
        self.assertEqual(group.ejected, 0)
        self.assertEqual(
            [text for _, text in self.logs],
            [
                "backend http://a ejected for 30 s after 3 failed requests in a row: "
                "connection refused",
                "backend http://a is back from its ejection",
            ],
        )

    def test_successResetsTheCount(self):
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=3))
        self.fail(b["a"], 2)
        b["a"].recordResponse(200, 0.01, 0, 10)
        self.fail(b["a"], 2)
        self.assertTrue(b["a"].available)

    def test_cutShortCounts(self):
        """
        A response cut short is a failure; a 5xx answer only with
        C{on5xx}; a 4xx never.
        """
        group, b = self.makeGroup("a", "b", "c", ejection=Ejection(after=2))
        b["a"].recordResponse(0, 0.01, 0, 10)
        b["a"].recordResponse(0, 0.01, 0, 10)
        self.assertEqual(b["a"].state, EJECTED)
        for _ in range(5):
            b["b"].recordResponse(503, 0.01, 0, 10)
            b["b"].recordResponse(404, 0.01, 0, 10)
        self.assertEqual(b["b"].state, UP)

    def test_on5xx(self):
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=2, on5xx=True))
        b["a"].recordResponse(502, 0.01, 0, 10)
        b["a"].recordResponse(500, 0.01, 0, 10)
        self.assertEqual(b["a"].state, EJECTED)

    def test_longerEachTime(self):
        """
        The n-th ejection lasts n times the first, up to 300 s; after 300 s
        without one the count starts again.
        """
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=1, time=100))
        durations = []
        for _ in range(4):
            start = self.clock.seconds()
            self.fail(b["a"], 1)
            durations.append(b["a"].ejectedUntil - start)
            self.clock.advance(durations[-1])
            self.assertTrue(b["a"].available)
        self.assertEqual(durations, [100, 200, 300, 300])
        self.clock.advance(301)
        self.fail(b["a"], 1)
        self.assertEqual(b["a"].ejectedUntil - self.clock.seconds(), 100)

    def test_maxEjectedPercent(self):
        """
        No more than that share of the group is ejected at once, rounded
        down: a backend alone is never ejected at 50%.
        """
        group, b = self.makeGroup("a", "b", "c", "d", ejection=Ejection(after=1, maxPercent=50))
        for name in "abcd":
            self.fail(b[name], 1)
        self.assertEqual([b[n].state for n in "abcd"], [EJECTED, EJECTED, UP, UP])
        self.assertEqual(group.ejected, 2)
        self.clock.advance(30)
        self.assertEqual(group.ejected, 0)

        group, b = self.makeGroup("a", ejection=Ejection(after=1))
        self.fail(b["a"], 3)
        self.assertTrue(b["a"].available)

    def test_off(self):
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=0))
        self.fail(b["a"], 100)
        self.assertTrue(b["a"].available)

    def test_withoutHealthChecks(self):
        """
        With active checks off, an ejection is what takes a failing backend
        out, and time brings it back.
        """
        group, b = self.makeGroup("a", "b", enabled=False, ejection=Ejection(after=2, time=10))
        self.fail(b["a"], 2)
        self.assertEqual(self.picks(group, 2), ["b", "b"])
        self.clock.advance(10)
        self.assertEqual(sorted(self.picks(group, 2)), ["a", "b"])

    def test_checksKeepTheirOwnState(self):
        """
        An ejected backend is still checked: checks that take it down keep
        it down after the ejection ends.
        """
        group, b = self.makeGroup("a", "b", fall=2, ejection=Ejection(after=1, time=10))
        self.fail(b["a"], 1)
        self.down(b["a"])
        self.assertEqual(b["a"].state, DOWN)
        self.clock.advance(10)
        self.assertEqual(b["a"].state, DOWN)
        self.assertFalse(b["a"].available)

    def test_removedWhileEjected(self):
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=1))
        self.fail(b["a"], 1)
        group.remove(b["a"])
        self.assertEqual(group.ejected, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopCancelsTimers(self):
        group, b = self.makeGroup("a", "b", ejection=Ejection(after=1), slowStart=10)
        self.fail(b["a"], 1)
        group.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowStartTests(GroupMixin, TestCase):
    """
    A backend that comes up ramps from a tenth of its weight to all of it.
    """

    def share(self, group, name, n=1000):
        return Counter(self.picks(group, n))[name] / n

    def test_startingBackendsTakeFullWeight(self):
        group, b = self.makeGroup("a", "b", slowStart=60)
        self.assertEqual(group.rampFraction(b["a"]), 1.0)
        self.assertEqual(self.share(group, "a"), 0.5)

    def test_recoveredBackendRamps(self):
        group, b = self.makeGroup("a", "b", fall=1, rise=1, slowStart=100)
        b["a"].recordCheck(False, "bad")
        b["a"].recordCheck(True, "ok")
        self.assertAlmostEqual(group.rampFraction(b["a"]), 0.1)
        # a's weight 0.1 against b's 1.
        self.assertAlmostEqual(self.share(group, "a", 1100), 0.1 / 1.1, places=2)
        self.clock.pump([1] * 50)
        self.assertAlmostEqual(group.rampFraction(b["a"]), 0.55)
        self.assertAlmostEqual(self.share(group, "a", 1550), 0.55 / 1.55, places=2)
        self.clock.pump([1] * 50)
        self.assertEqual(group.rampFraction(b["a"]), 1.0)
        self.assertEqual(self.share(group, "a"), 0.5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reenabledAndAddedRamp(self):
        group, b = self.makeGroup("a", "b", enabled=False, slowStart=10)
        b["a"].setAdminState(DISABLED, "test")
        b["a"].setAdminState(UP, "test")
        self.assertAlmostEqual(group.rampFraction(b["a"]), 0.1)
        c = group.add(BackendConfig(url="http://c"), awaitCheck=True)
        self.assertAlmostEqual(group.rampFraction(c), 0.1)
        self.clock.advance(10)
        self.assertEqual(group.rampFraction(b["a"]), 1.0)
        self.assertEqual(group.rampFraction(c), 1.0)

    def test_everyPolicy(self):
        """
        The ramp is in the weights the policies see.
        """
        from rrbalancer.policies import LeastConnections

        group, b = self.makeGroup("a", "b", fall=1, rise=1, slowStart=100,
                                  policy=LeastConnections())
        b["a"].recordCheck(False, "bad")
        b["a"].recordCheck(True, "ok")
        b["a"].active = 1
        b["b"].active = 5
        # a: 1 / 0.1 = 10 in flight for its weight, b: 5.
        self.assertEqual(group.pick().url, "http://b")

    def test_off(self):
        group, b = self.makeGroup("a", "b", fall=1, rise=1)
        b["a"].recordCheck(False, "bad")
        b["a"].recordCheck(True, "ok")
        self.assertEqual(self.share(group, "a"), 0.5)


class PanicTests(GroupMixin, TestCase):
    """
    Under the panic threshold, every enabled primary takes traffic whatever
    its health.
    """

    def setUp(self):
        self.logs = captureStateLogs(self)

    def test_panic(self):
        group, b = self.makeGroup("a", "b", "c", "d", fall=1, panicThreshold=50)
        self.down(b["a"])
        self.down(b["b"])
        self.assertFalse(group.panicking)
        self.assertEqual(sorted(set(self.picks(group, 4))), ["c", "d"])
        self.down(b["c"])
        self.assertTrue(group.panicking)
        self.assertEqual(sorted(self.picks(group, 4)), ["a", "b", "c", "d"])
        b["c"].recordCheck(True, "ok")
        b["c"].recordCheck(True, "ok")
        self.assertFalse(group.panicking)
        self.assertEqual(group.panics, 1)
        self.assertEqual(
            [text for _, text in self.logs if "panic" in text],
            [
                "panic: 1 of 4 primaries up, under 50%; balancing over all of them "
                "whatever their health",
                "panic over: 2 of 4 primaries up",
            ],
        )

    def test_disabledAndDrainingStayOut(self):
        group, b = self.makeGroup("a", "b", "c", fall=1, panicThreshold=100)
        b["a"].setAdminState(DISABLED, "test")
        b["b"].setAdminState(DRAINING, "test")
        self.down(b["c"])
        self.assertTrue(group.panicking)
        self.assertEqual(self.picks(group, 2), ["c", "c"])

    def test_backupsComeFirst(self):
        """
        While a backup is up, the backups take the traffic, as without a
        threshold.
        """
        group, b = self.makeGroup("a", "b", ("z", 1, True), fall=1, panicThreshold=50)
        self.down(b["a"])
        self.down(b["b"])
        self.assertFalse(group.panicking)
        self.assertEqual(self.picks(group, 2), ["z", "z"])
        self.down(b["z"])
        self.assertTrue(group.panicking)
        self.assertEqual(sorted(self.picks(group, 2)), ["a", "b"])

    def test_off(self):
        group, b = self.makeGroup("a", "b", fall=1)
        self.down(b["a"])
        self.down(b["b"])
        self.assertFalse(group.panicking)
        self.assertIsNone(group.pick())


class _Unread:
    """
    The answers waiting unread, as an L{rrbalancer._unread.UnreadAnswers}
    would count them at the next refresh.
    """

    def __init__(self):
        self.next = {}
        self.counts = {}
        self.refreshes = 0

    def refresh(self):
        self.refreshes += 1
        self.counts = dict(self.next)

    def waiting(self, pool):
        return self.counts.get(pool, 0)

    def close(self):
        pass


class _Pool:
    """
    What the group sets on a backend's connection pool.
    """

    stampArrivals = False
    unread = None

    def readAsAsked(self):
        pass


class UnansweredTests(GroupMixin, TestCase):
    """
    A backend's load less the answers waiting unread, for a policy that
    times answers; the watch the group keeps for it.
    """

    def makeTimedGroup(self, *specs):
        group, backends = self.makeGroup(
            *specs,
            policy=PowerOfTwoChoices(Clock()),
            upstream=lambda config: SimpleNamespace(pool=_Pool()),
        )
        self.addCleanup(group.stop)
        return group, backends

    def test_poolsShareTheWatch(self):
        """
        The group's one watch is every pool's while the policy times
        answers, and none's (closed) once it does not.
        """
        group, backends = self.makeTimedGroup("a", "b")
        a, b = backends["a"], backends["b"]
        self.assertIsNotNone(a.pool.unread)
        self.assertIs(a.pool.unread, b.pool.unread)
        watch = a.pool.unread
        group.rebalance(RoundRobin(), Ejection(), slowStart=0, panicThreshold=0)
        self.assertEqual((a.pool.unread, b.pool.unread), (None, None))
        self.assertIsNone(watch._epoll)

    def test_countedAtEachPick(self):
        """
        Each pick counts again, and a backend's C{unanswered} is its load
        less its answers waiting, as of that count.
        """
        group, backends = self.makeTimedGroup("a", "b")
        a = backends["a"]
        group._unread.close()
        unread = group._unread = a.pool.unread = backends["b"].pool.unread = _Unread()
        a.active = 6
        unread.next = {a.pool: 5}
        self.assertEqual(a.unanswered, 6)
        group.pick()
        self.assertEqual((unread.refreshes, a.unanswered, a.load), (1, 1, 6))
        unread.next = {}
        group.pick()
        self.assertEqual((unread.refreshes, a.unanswered), (2, 6))

    def test_loadWithoutTiming(self):
        """
        Under a policy that does not time answers, nothing is counted.
        """
        group, backends = self.makeGroup("a")
        backends["a"].active = 3
        group.pick()
        self.assertEqual((group._unread, backends["a"].unanswered), (None, 3))
