"""
Tests for L{rrbalancer.discovery._etcd} and L{rrbalancer.discovery._etcdclient}:
what a key's value may say, the retries' backoff, and the C{etcd://}
source on a fake client and a L{Clock}; then, against a real etcd (Debian's
C{etcd-server}, started by the test on loopback ports with a temporary data
directory), the source following the keys, keeping its set through an
outage, resuming its watch, reading again after a compaction, and a
balancer fed by it.
"""

import os
import shutil
import signal
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from rrbalancer.backends import BackendGroup
from rrbalancer.config import HealthConfig
from rrbalancer.discovery import IDiscoverySource, SourceStatus, parseSource
from rrbalancer.discovery._etcd import (
    EtcdBackend,
    EtcdSource,
    etcdURLs,
    formatValue,
    parseValue,
)
from rrbalancer.discovery._etcdclient import (
    Compacted,
    EtcdClient,
    TreqClient,
    prefixEnd,
)
from rrbalancer.values import BackendConfig

from .support import restartablePort
from .test_admin import (
    balancerConfig,
    call,
    makeClient,
    poll,
    settleConnections,
    startBackend,
    startWithAdmin,
)

ETCD = "/usr/bin/etcd"
URL = "etcd://127.0.0.1:2379/services/web/"


# -- values ------------------------------------------------------------------------


class ValueTests(SynchronousTestCase):
    def test_url(self):
        self.assertEqual(
            parseValue(b"/k", b" http://127.0.0.1:8081\n"),
            EtcdBackend("http://127.0.0.1:8081", key=b"/k"),
        )

    def test_object(self):
        backend = parseValue(
            b"/k",
            b'{"url": "http://10.0.0.1:80", "weight": 3, "backup": true, '
            b'"state": "draining", "zone": "a"}',
        )
        self.assertEqual(
            (backend.url, backend.weight, backend.backup, backend.state),
            ("http://10.0.0.1:80", 3, True, "draining"),
        )
        self.assertIsInstance(backend, BackendConfig)

    def test_refused(self):
        for value, reason in [
            (b"not a url", "must start with http://"),
            (b"ftp://127.0.0.1", "http"),
            (b"{nope", "not JSON"),
            (b"[1]", "must start with http://"),
            (b'{"weight": 2}', 'no "url"'),
            (b'{"url": "http://a:1", "weight": 0}', "weight"),
            (b'{"url": "http://a:1", "weight": "x"}', "weight"),
            (b'{"url": "http://a:1", "state": "gone"}', "state"),
            (b"\xff\xfe", "UTF-8"),
        ]:
            e = self.assertRaises(ValueError, parseValue, b"/k", value)
            self.assertIn(reason, str(e), value)

    def test_format(self):
        backend = BackendConfig("http://10.0.0.1:80", 2, True)
        self.assertEqual(
            parseValue(b"/k", formatValue(backend, "disabled")),
            EtcdBackend("http://10.0.0.1:80", 2, True, "disabled", b"/k"),
        )
        self.assertEqual(
            formatValue(BackendConfig("http://10.0.0.1:80"), None),
            b'{"url": "http://10.0.0.1:80"}',
        )

    def test_prefixEnd(self):
        self.assertEqual(prefixEnd(b"/services/web/"), b"/services/web0")
        self.assertEqual(prefixEnd(b"a\xff"), b"b")
        self.assertEqual(prefixEnd(b"\xff\xff"), b"\x00")


# -- the source on a fake client ----------------------------------------------------------


class FakeWatch:
    def __init__(self, start, onResult):
        self.start = start
        self.onResult = onResult
        self.done = Deferred()
        self.stopped = False

    def stop(self):
        self.stopped = True
        if not self.done.called:
            self.done.callback(None)

    def deliver(self, result):
        # As the real watch: a result the source refuses ends it.
        try:
            self.onResult(result)
        except Exception:
            self.done.errback()

    def created(self, revision, cluster="1"):
        self.deliver({"header": {"revision": str(revision), "cluster_id": cluster},
                      "created": True})

    def events(self, *events):
        self.deliver({"header": {}, "events": list(events)})


def put(key, value, revision):
    from rrbalancer.discovery._etcdclient import encode

    return {"kv": {"key": encode(key), "value": encode(value), "mod_revision": str(revision)}}


def delete(key, revision):
    from rrbalancer.discovery._etcdclient import encode

    return {"type": "DELETE", "kv": {"key": encode(key), "mod_revision": str(revision)}}


class FakeClient:
    """
    Reads answer what the test set in C{keys}; watches are kept for the
    test to feed; C{down} fails every call.
    """

    base = "http://127.0.0.1:2379"

    def __init__(self):
        self.keys = {}
        self.revision = 1
        self.rotated = 0
        self.down = False
        self.reads = 0
        self.watches = []
        self.puts = []
        self.probes = []

    def range(self, prefix):
        self.reads += 1
        if self.down:
            return fail(ConnectionRefusedError())
        return succeed((self.revision, sorted(self.keys.items())))

    def put(self, key, value, lease=None, keepLease=False):
        self.puts.append((key, value, keepLease))
        if self.down:
            return fail(ConnectionRefusedError())
        return succeed(self.revision)

    def rotate(self):
        self.rotated += 1

    def status(self):
        d = Deferred()
        self.probes.append(d)
        return d

    def watch(self, prefix, start, onResult):
        watch = FakeWatch(start, onResult)
        self.watches.append(watch)
        if self.down:
            watch.done.errback(ConnectionRefusedError())
        return watch


class SourceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.client.keys = {b"/services/web/a": b"http://127.0.0.1:1"}
        self.client.revision = 5
        self.source = EtcdSource(parseSource(URL), self.client, self.clock, random=lambda: 0.0)
        self.events = []
        self.source.log = Logger(observer=self.events.append)
        self.sets = []
        self.source.start(self.sets.append)

    def urls(self, backends=None):
        return sorted(b.url for b in (self.sets[-1] if backends is None else backends))

    def logged(self, level):
        return [formatEvent(e) for e in self.events if e["log_level"].name == level]

    def test_readThenWatch(self):
        """
        The prefix is read, then watched from the next revision; each
        change of the keys gives the whole set again.
        """
        self.assertEqual(self.urls(), ["http://127.0.0.1:1"])
        [watch] = self.client.watches
        self.assertEqual(watch.start, 6)
        watch.created(5)
        self.assertEqual(len(self.sets), 1)
        watch.events(put(b"/services/web/b", b'{"url": "http://127.0.0.1:2", "weight": 4}', 6))
        self.assertEqual(self.urls(), ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        watch.events(
            delete(b"/services/web/a", 7), put(b"/services/web/c", b"http://127.0.0.1:3", 7)
        )
        self.assertEqual(self.urls(), ["http://127.0.0.1:2", "http://127.0.0.1:3"])
        self.assertEqual(self.source.revision, 7)
        self.assertEqual(self.source.status.state, SourceStatus.OK)
        self.assertEqual(self.source.status.backends, 2)

    def test_badValuesSkipped(self):
        """
        A value that is no backend is logged once and skipped; the others
        count.
        """
        [watch] = self.client.watches
        watch.events(put(b"/services/web/b", b"nonsense", 6))
        watch.events(put(b"/services/web/c", b"http://127.0.0.1:3", 7))
        self.assertEqual(self.urls(), ["http://127.0.0.1:1", "http://127.0.0.1:3"])
        [warning] = self.logged("warn")
        self.assertIn("key /services/web/b skipped", warning)
        watch.events(put(b"/services/web/b", b"http://127.0.0.1:2", 8))
        self.assertEqual(len(self.urls()), 3)

    def test_outageKeepsTheSet(self):
        """
        A watch that breaks keeps the set, is said once however many
        retries fail, and resumes from the revision after the last seen;
        the waits double up to 30 s.
        """
        [watch] = self.client.watches
        watch.events(put(b"/services/web/b", b"http://127.0.0.1:2", 6))
        self.client.down = True
        watch.done.callback(None)
        waits = []
        for _ in range(9):
            waits.append(self.source.status.nextLookup - self.clock.seconds())
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [0.5, 1, 2, 4, 8, 16, 30, 30, 30])
        self.assertEqual(self.urls(), ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        self.assertEqual(self.source.status.state, SourceStatus.FAILING)
        self.assertEqual(self.source.status.backends, 2)
        [warning] = self.logged("warn")
        self.assertIn("keeping its 2 backends", warning)
        self.assertEqual(self.client.reads, 1)
        self.client.down = False
        self.clock.advance(30)
        last = self.client.watches[-1]
        self.assertEqual(last.start, 7)
        last.created(6)
        self.assertEqual(self.source.status.state, SourceStatus.OK)
        self.assertIn("answers again", self.logged("info")[-1])
        self.assertEqual(len(self.sets), 2)

    def test_jitter(self):
        self.source._random = lambda: 0.999
        self.source._failuresInRow = 3
        self.assertAlmostEqual(self.source.retryDelay(), 1.0, places=2)
        self.source._failuresInRow = 20
        self.assertAlmostEqual(self.source.retryDelay(), 15.0, places=1)

    def test_unreachableFromTheStart(self):
        client = FakeClient()
        client.down = True
        source = EtcdSource(parseSource(URL), client, self.clock, random=lambda: 0.0)
        source.log = Logger(observer=self.events.append)
        source.start(self.sets.append)
        self.assertIn("no backends from it yet", self.logged("warn")[-1])
        client.down = False
        self.clock.advance(0.5)
        self.assertEqual(client.reads, 2)
        self.assertEqual(source.status.state, SourceStatus.OK)

    def test_compacted(self):
        """
        A watch whose revision was compacted away reads the prefix again.
        """
        [watch] = self.client.watches
        self.client.keys = {b"/services/web/z": b"http://127.0.0.1:26"}
        self.client.revision = 40
        watch.done.errback(Compacted(30))
        self.assertEqual(self.urls(), ["http://127.0.0.1:26"])
        self.assertEqual(self.client.watches[-1].start, 41)
        self.assertEqual(self.source.status.state, SourceStatus.OK)

    def test_anotherStore(self):
        """
        A store whose revision is behind the one seen, or of another
        cluster, is read again whole.
        """
        [watch] = self.client.watches
        watch.created(5, cluster="1")
        self.client.down = True
        watch.done.errback(ConnectionRefusedError())
        self.client.down = False
        self.client.keys = {}
        self.client.revision = 1
        self.clock.advance(0.5)
        self.client.watches[-1].created(1)
        self.assertEqual(self.sets[-1], frozenset())
        self.assertEqual(self.client.reads, 2)
        self.client.watches[-1].created(1, cluster="2")
        self.client.revision = 3
        self.client.watches[-1].created(3, cluster="3")
        self.assertEqual(self.client.reads, 3)

    def test_interface(self):
        verifyObject(IDiscoverySource, self.source)

    def test_probe(self):
        """
        While watching, etcd is asked every 10 s whether it answers; no
        answer within 5 s ends the watch as a failure, and it resumes
        later.
        """
        [watch] = self.client.watches
        watch.created(5)
        self.clock.advance(10)
        [probe] = self.client.probes
        probe.callback({})
        self.clock.advance(9.9)
        self.assertEqual(len(self.client.probes), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.probes), 2)
        self.clock.advance(5)
        self.assertTrue(watch.stopped)
        self.assertEqual(self.source.status.state, SourceStatus.FAILING)
        self.assertEqual(self.source.status.lastError,
                         "watching http://127.0.0.1:2379: no answer in time")
        self.assertEqual(self.client.rotated, 1)
        self.assertEqual(self.urls(), ["http://127.0.0.1:1"])
        self.clock.advance(0.5)
        resumed = self.client.watches[-1]
        self.assertEqual(resumed.start, 6)
        resumed.created(5)
        self.assertEqual(self.source.status.state, SourceStatus.OK)
        self.source.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_share(self):
        """
        An operator's change is written back to the backend's key, keeping
        its lease, and keeping what the change does not touch; a failure to
        write is logged.
        """
        group = BackendGroup(HealthConfig(enabled=False), self.clock)
        [watch] = self.client.watches
        watch.events(put(b"/services/web/b", b'{"url": "http://127.0.0.1:2", "weight": 3, '
                                               b'"backup": true, "zone": "x"}', 6))
        b = group.add(BackendConfig("http://127.0.0.1:2"))
        self.successResultOf(self.source.share(b, "draining", None))
        self.successResultOf(self.source.share(b, None, 7))
        self.assertEqual(self.client.puts, [
            (b"/services/web/b",
             b'{"backup": true, "state": "draining", "url": "http://127.0.0.1:2", "weight": 3}',
             True),
            (b"/services/web/b", b'{"backup": true, "url": "http://127.0.0.1:2", "weight": 7}',
             True),
        ])
        self.client.down = True
        self.successResultOf(self.source.share(b, "up", None))
        self.assertIn("could not write /services/web/b", self.logged("warn")[-1])
        elsewhere = group.add(BackendConfig("http://127.0.0.1:9"))
        self.successResultOf(self.source.share(elsewhere, "up", None))
        self.assertEqual(len(self.client.puts), 3)

    def test_stop(self):
        [watch] = self.client.watches
        self.successResultOf(self.source.stop())
        self.assertTrue(watch.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- against a real etcd ----------------------------------------------------------------


class EtcdServer:
    """
    A real etcd on loopback ports, its data in a temporary directory, for
    one test; L{stop} and L{start} again keep its data.  Alone, or a member
    of a cluster (L{EtcdCluster}).
    """

    def __init__(self, testCase, name="test"):
        if not os.path.exists(ETCD) and not os.environ.get("CI"):
            raise SkipTest(f"{ETCD} is missing (Debian's etcd-server)")
        self.testCase = testCase
        self.name = name
        self.dataDir = tempfile.mkdtemp(prefix="rrbalancer-etcd-")
        testCase.addCleanup(shutil.rmtree, self.dataDir, True)
        self.clientPort = restartablePort()
        self.peerPort = restartablePort()
        self.url = f"http://127.0.0.1:{self.clientPort}"
        self.peerURL = f"http://127.0.0.1:{self.peerPort}"
        self.cluster = f"{name}={self.peerURL}"
        # One member on loopback elects itself in 0.1 s rather than 1 s (no
        # follower can miss its heartbeats); a cluster's get more room.
        self.timing = ("10", "100")
        self.process = None
        self.http = TreqClient(reactor)
        self.client = EtcdClient(self.http, self.url, reactor, timeout=2.0)
        testCase.addCleanup(self.http.close)
        testCase.addCleanup(self.stop)

    def sourceURL(self, prefix):
        return f"etcd://127.0.0.1:{self.clientPort}{prefix}"

    def spawn(self):
        peer = self.peerURL
        self.process = subprocess.Popen(
            [
                ETCD, "--name", self.name, "--data-dir", self.dataDir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.cluster, "--log-level", "error",
                "--heartbeat-interval", self.timing[0], "--election-timeout", self.timing[1],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self):
        self.spawn()
        return self.answering()

    @inlineCallbacks
    def answering(self):
        deadline = reactor.seconds() + 30
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"etcd exited with {self.process.returncode}")
            try:
                yield self.client.range(b"/")
                return
            except Exception:
                if reactor.seconds() > deadline:
                    raise AssertionError("etcd did not answer within 30s")
                yield deferLater(reactor, 0.05, lambda: None)

    def stop(self, sig=signal.SIGTERM):
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=30)

    def put(self, key, value):
        if isinstance(value, str):
            value = value.encode("utf-8")
        return self.client.put(key.encode("utf-8"), value)

    def delete(self, key):
        return self.client.delete(key.encode("utf-8"))


class EtcdCluster:
    """
    Real etcd members, one cluster.
    """

    def __init__(self, testCase, size=3):
        self.members = [EtcdServer(testCase, f"m{n}") for n in range(size)]
        cluster = ",".join(m.cluster for m in self.members)
        for member in self.members:
            member.cluster = cluster
            member.timing = ("50", "500")

    @inlineCallbacks
    def start(self):
        for member in self.members:
            member.spawn()
        for member in self.members:
            yield member.answering()

    def sourceURL(self, prefix):
        members = ",".join(f"127.0.0.1:{m.clientPort}" for m in self.members)
        return f"etcd://{members}{prefix}"


class EtcdTestCase(TestCase):
    """
    A test with its own etcd, started before it.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        settleConnections(self)
        self.etcd = EtcdServer(self)
        yield self.etcd.start()


class RealEtcdTests(EtcdTestCase):

    @inlineCallbacks
    def test_followsTheKeys(self):
        """
        The source's set follows keys added, changed and removed, within
        a second of each change; a value that is no backend is skipped.
        Stopped, it leaves no connection open.
        """
        etcd = self.etcd
        yield etcd.put("/services/web/a", "http://127.0.0.1:1")
        yield etcd.put("/services/web/bad", "{nope")
        yield etcd.put("/services/website/x", "http://127.0.0.1:9")
        http = TreqClient(reactor)
        self.addCleanup(http.close)
        source = EtcdSource(
            parseSource(etcd.sourceURL("/services/web/")),
            EtcdClient(http, etcd.url, reactor),
            reactor,
        )
        sets = []
        source.start(lambda backends: sets.append(sorted((b.url, b.weight) for b in backends)))
        self.addCleanup(source.stop)

        def following(*expected):
            return poll(lambda: sets and sets[-1] == list(expected), timeout=1.0,
                        what=f"the set to be {expected}")

        yield following(("http://127.0.0.1:1", 1))
        yield etcd.put("/services/web/b", '{"url": "http://127.0.0.1:2", "weight": 5}')
        yield following(("http://127.0.0.1:1", 1), ("http://127.0.0.1:2", 5))
        yield etcd.put("/services/web/a", '{"url": "http://127.0.0.1:1", "weight": 2}')
        yield following(("http://127.0.0.1:1", 2), ("http://127.0.0.1:2", 5))
        yield etcd.delete("/services/web/b")
        yield following(("http://127.0.0.1:1", 2))
        yield etcd.put("/services/web/a", "???")
        yield following()
        self.assertEqual(source.status.state, SourceStatus.OK)
        yield source.stop()

    @inlineCallbacks
    def test_outageAndCompaction(self):
        """
        etcd stopped: the set stays, the source says it fails; etcd back:
        the watch resumes from the next revision and brings what was
        written meanwhile.  A revision compacted away meanwhile: the prefix
        is read again.  (The retries wait on a test clock here, so that
        the writes happen while the source is not watching.)
        """
        etcd = self.etcd
        yield etcd.put("/services/web/a", "http://127.0.0.1:1")
        yield etcd.put("/services/web/b", "http://127.0.0.1:2")
        http = TreqClient(reactor)
        self.addCleanup(http.close)
        clock = Clock()
        clock.advance(reactor.seconds())
        source = EtcdSource(
            parseSource(etcd.sourceURL("/services/web/")),
            EtcdClient(http, etcd.url, reactor),
            clock,
        )
        sets = []
        source.start(lambda backends: sets.append(sorted(b.url for b in backends)))
        self.addCleanup(source.stop)
        yield poll(lambda: sets == [["http://127.0.0.1:1", "http://127.0.0.1:2"]], what="the set")
        reads = []
        read = source.client.range
        source.client.range = lambda prefix: reads.append(prefix) or read(prefix)

        etcd.stop()
        yield poll(lambda: source.status.state == SourceStatus.FAILING, what="the watch to end")
        self.assertEqual(source.status.backends, 2)
        self.assertEqual(sets[-1], ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        clock.advance(source.status.nextLookup - clock.seconds())
        yield poll(lambda: source.status.failures == 2, what="a refused retry")

        yield etcd.start()
        yield etcd.delete("/services/web/a")
        yield etcd.put("/services/web/c", "http://127.0.0.1:3")
        revision = source.revision
        clock.advance(source.status.nextLookup - clock.seconds())
        yield poll(lambda: sets[-1] == ["http://127.0.0.1:2", "http://127.0.0.1:3"],
                   timeout=2, what="the missed changes")
        self.assertEqual(source.status.state, SourceStatus.OK)
        self.assertEqual(reads, [], "resumed without reading again")
        self.assertGreater(source.revision, revision)

        # Compaction while the source is away.
        etcd.stop()
        yield poll(lambda: source.status.state == SourceStatus.FAILING, what="the watch to end")
        yield etcd.start()
        yield etcd.put("/services/web/d", "http://127.0.0.1:4")
        last = yield etcd.put("/services/web/e", "http://127.0.0.1:5")
        yield etcd.client.compact(last)
        clock.advance(source.status.nextLookup - clock.seconds())
        yield poll(lambda: sets[-1] == ["http://127.0.0.1:2", "http://127.0.0.1:3",
                                        "http://127.0.0.1:4", "http://127.0.0.1:5"],
                   timeout=2, what="the prefix read again")
        self.assertEqual(source.revision, last)
        self.assertEqual(reads, [b"/services/web/"])
        yield source.stop()

    @inlineCallbacks
    def test_hungEtcd(self):
        """
        etcd that stops answering without closing the watch (SIGSTOP here,
        a partition in life) is noticed by the probe: the source says it
        fails, keeps its set, and follows the keys again once etcd answers.
        """
        etcd = self.etcd
        yield etcd.put("/services/web/a", "http://127.0.0.1:1")
        http = TreqClient(reactor)
        self.addCleanup(http.close)
        source = EtcdSource(
            parseSource(etcd.sourceURL("/services/web/")),
            EtcdClient(http, etcd.url, reactor, timeout=0.5),
            reactor,
            probe=(0.2, 0.5),
        )
        sets = []
        source.start(lambda backends: sets.append(sorted(b.url for b in backends)))
        self.addCleanup(source.stop)
        yield poll(lambda: source.status.state == SourceStatus.OK, what="the watch")
        etcd.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: etcd.process and etcd.process.send_signal(signal.SIGCONT))
        stopped = reactor.seconds()
        yield poll(lambda: source.status.state == SourceStatus.FAILING, timeout=5,
                   what="the probe to notice")
        self.assertLess(reactor.seconds() - stopped, 1.5)
        self.assertEqual(sets, [["http://127.0.0.1:1"]])
        etcd.process.send_signal(signal.SIGCONT)
        yield etcd.put("/services/web/b", "http://127.0.0.1:2")
        yield poll(lambda: sets[-1] == ["http://127.0.0.1:1", "http://127.0.0.1:2"], timeout=10,
                   what="the watch to resume")
        yield source.stop()

    @inlineCallbacks
    def test_balancer(self):
        """
        A balancer whose backends are the keys of a prefix sends them
        traffic; etcd away, it keeps serving them, and its admin API and
        metrics say that the source fails and why.
        """
        etcd = self.etcd
        backends = [startBackend(self, name) for name in "ab"]
        for name, (_, url) in zip("ab", backends):
            yield etcd.put(f"/services/web/{name}", url)
        url = etcd.sourceURL("/services/web/")
        service, base, admin = yield startWithAdmin(
            self, balancerConfig([], discover=(parseSource(url),))
        )
        client = makeClient(self)
        yield poll(lambda: len(service.group) == 2, what="both backends")
        bodies = set()
        for _ in range(4):
            response = yield client.get(base + "/")
            bodies.add((yield response.text()))
        self.assertEqual(bodies, {"a /\n", "b /\n"})

        etcd.stop()
        yield poll(lambda: service.discovery.sources[0].status.state == "failing",
                   what="the source to fail")
        code, answer = yield call(client, "GET", admin + "/api/discovery")
        [shown] = answer["sources"]
        self.assertEqual((shown["url"], shown["kind"], shown["state"], shown["backends"]),
                         (url, "etcd", "failing", 2))
        self.assertIn("watching", shown["last_error"])
        response = yield client.get(admin + "/metrics")
        metrics = yield response.text()
        self.assertIn(f'rrbalancer_discovery_up{{source="{url}"}} 0', metrics)
        response = yield client.get(base + "/")
        self.assertEqual(response.code, 200)
        yield response.text()


class ClusterTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_failover(self):
        """
        A source given the three members of a cluster goes on with the next
        one when the one it watches through stops: no backend lost, and
        what is written meanwhile followed.
        """
        settleConnections(self)
        cluster = EtcdCluster(self)
        yield cluster.start()
        first, second, third = cluster.members
        yield third.put("/services/web/a", "http://127.0.0.1:1")
        http = TreqClient(reactor)
        self.addCleanup(http.close)
        config = parseSource(cluster.sourceURL("/services/web/"))
        source = EtcdSource(config, EtcdClient(http, etcdURLs(config), reactor), reactor)
        sets = []
        source.start(lambda backends: sets.append(sorted(b.url for b in backends)))
        self.addCleanup(source.stop)
        yield poll(lambda: sets == [["http://127.0.0.1:1"]], what="the set")
        self.assertEqual(source.client.base, first.url)

        first.stop()
        # (Retried: if the first was the leader, a write waits for the next.)
        deadline = reactor.seconds() + 10
        while True:
            try:
                yield third.put("/services/web/b", "http://127.0.0.1:2")
                break
            except Exception:
                if reactor.seconds() > deadline:
                    raise
                yield deferLater(reactor, 0.05, lambda: None)
        yield poll(lambda: sets[-1] == ["http://127.0.0.1:1", "http://127.0.0.1:2"],
                   timeout=10, what="the watch to go on through the second member")
        self.assertEqual(source.client.base, second.url)
        self.assertEqual(source.status.state, SourceStatus.OK)
        yield source.stop()
