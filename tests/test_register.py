"""
Tests for L{rrbalancer.register}, C{rrbalancer-register}: its command line,
and the real process against a real etcd: the key it puts is seen by the
balancers' sources, goes on SIGTERM at once and on SIGKILL within the
lease's TTL; two balancers watching one prefix both send a registered
backend traffic, and ride out an etcd restart without a client error.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import rrbalancer
from rrbalancer.config import HealthConfig
from rrbalancer.discovery import parseSource
from rrbalancer.register import Registrar
from rrbalancer.register import main, parseArguments
from rrbalancer.settings import ConfigError

from .test_admin import (
    balancerConfig,
    call,
    makeClient,
    poll,
    startBackend,
    startWithAdmin,
)
from .test_discovery_etcd import EtcdTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rrbalancer.__file__)))


class ArgumentTests(SynchronousTestCase):
    ARGS = ["--etcd", "http://127.0.0.1:2379", "--prefix", "/services/web/",
            "--url", "http://127.0.0.1:8081"]

    def test_parsed(self):
        registration = parseArguments(self.ARGS + ["--weight", "3", "--ttl", "5"])
        self.assertEqual(registration.key, b"/services/web/127.0.0.1:8081")
        self.assertEqual(registration.value, b'{"url": "http://127.0.0.1:8081", "weight": 3}')
        self.assertEqual((registration.etcd, registration.ttl), (["http://127.0.0.1:2379"], 5))
        cluster = parseArguments(
            ["--etcd", "http://127.0.0.1:2379/, http://127.0.0.2:2379"] + self.ARGS[2:]
        )
        self.assertEqual(cluster.etcd, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"])
        ipv6 = parseArguments(self.ARGS[:-1] + ["http://[::1]:81"])
        self.assertEqual(ipv6.key, b"/services/web/[::1]:81")

    def test_mistakes(self):
        for argv, mention in [
            (self.ARGS[:4], "--url"),
            (self.ARGS + ["--weight", "0"], "--weight"),
            (self.ARGS + ["--ttl", "x"], "whole numbers"),
            (self.ARGS + ["--ttl", "1"], "--ttl: must be at least 2"),
            (["--etcd", "127.0.0.1:2379"] + self.ARGS[2:], "--etcd"),
            (["--etcd", "http://127.0.0.1:2379,"] + self.ARGS[2:], "--etcd"),
            (["--etcd", "http://127.0.0.1:x"] + self.ARGS[2:], "--etcd"),
            (self.ARGS[:2] + ["--prefix", "services"] + self.ARGS[4:], "--prefix"),
            (self.ARGS[:4] + ["--url", "ftp://x"], "--url"),
            (self.ARGS + ["--bogus"], "--bogus"),
        ]:
            e = self.assertRaises(ConfigError, parseArguments, argv)
            self.assertIn(mention, str(e))

    def test_oneLineAndStatus2(self):
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        e = self.assertRaises(SystemExit, main, self.ARGS + ["--weight", "-1"])
        self.assertEqual(e.code, 2)
        self.assertEqual(
            stderr.getvalue(), "rrbalancer-register: --weight: must be at least 1, got -1\n"
        )


class RegistrarProcess:
    """
    C{rrbalancer-register} running as its own process.
    """

    def __init__(self, testCase, etcd, prefix, url, ttl=10):
        self.log = tempfile.NamedTemporaryFile(prefix="rrbalancer-register-", suffix=".log")
        testCase.addCleanup(self.log.close)
        self.key = f"{prefix}{url.split('://')[1]}".encode("utf-8")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rrbalancer.register", "--etcd", etcd.url,
             "--prefix", prefix, "--url", url, "--ttl", str(ttl)],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env,
        )
        testCase.addCleanup(self.kill)

    def kill(self, sig=signal.SIGKILL):
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def exited(self):
        return self.process.poll() is not None

    def output(self):
        with open(self.log.name) as f:
            return f.read()


class KeysTestCase(EtcdTestCase):
    @inlineCallbacks
    def keys(self, prefix="/services/web/"):
        revision, pairs = yield self.etcd.client.range(prefix.encode())
        return dict(pairs)

    @inlineCallbacks
    def keysUntil(self, predicate, timeout, what):
        """
        The keys under the prefix, once C{predicate} holds of them.
        """
        deadline = reactor.seconds() + timeout
        while True:
            keys = yield self.keys()
            if predicate(keys):
                return keys
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {keys}")
            yield deferLater(reactor, 0.02, lambda: None)



class RegisterTests(KeysTestCase):
    @inlineCallbacks
    def test_termDeletes(self):
        """
        The key is there while the registrar runs, gone as soon as SIGTERM
        stops it, and it exits 0.
        """
        registrar = RegistrarProcess(self, self.etcd, "/services/web/", "http://127.0.0.1:8081")
        found = yield self.keysUntil(bool, 30, "the key to be put")
        self.assertEqual(found, {b"/services/web/127.0.0.1:8081": b'{"url": "http://127.0.0.1:8081"}'})
        registrar.kill(signal.SIGTERM)
        yield poll(registrar.exited, timeout=15, what="the registrar to exit")
        self.assertEqual(registrar.process.returncode, 0, registrar.output())
        self.assertEqual((yield self.keys()), {})
        self.assertIn("/services/web/127.0.0.1:8081 deleted", registrar.output())
        # (SIGKILL, the lease expiring: see FleetTests.)


class Load:
    """
    Requests through one balancer, one after another, until stopped: which
    backend answered each, and every error a client met.
    """

    def __init__(self, testCase, url):
        self.client = makeClient(testCase)
        self.url = url
        self.answers = []
        self.errors = []
        self.running = True
        self.done = self._run()

    def servedBy(self, name, since=0.0):
        return [t for t, answered in self.answers if answered == name and t >= since]

    @inlineCallbacks
    def _run(self):
        while self.running:
            try:
                response = yield self.client.get(self.url)
                text = yield response.text()
            except Exception as e:
                self.errors.append(repr(e))
            else:
                if response.code != 200:
                    self.errors.append(f"HTTP {response.code}: {text}")
                else:
                    self.answers.append((reactor.seconds(), text.split()[0]))
            yield deferLater(reactor, 0.005, lambda: None)

    def stop(self):
        self.running = False
        return self.done


class FleetTests(KeysTestCase):
    """
    Two balancers, one etcd, steady load through both.
    """

    PREFIX = "/services/web/"

    @inlineCallbacks
    def startBalancer(self):
        config = balancerConfig(
            [],
            health=HealthConfig(interval=0.2, timeout=2.0, rise=1, fall=2, jitter=0.0),
            discover=(parseSource(self.etcd.sourceURL(self.PREFIX)),),
        )
        service, base, admin = yield startWithAdmin(self, config)
        return service, base, admin

    @inlineCallbacks
    def test_twoBalancers(self):
        """
        A backend that C{rrbalancer-register} lists takes traffic from both
        balancers within a second; SIGKILL of its registrar removes it from
        both within the TTL and a second; etcd stopped and started again
        meanwhile costs no client a request, nor either balancer a
        backend, and both watches resume.
        """
        etcd = self.etcd
        backends = {n: startBackend(self, n) for n in "abc"}
        yield etcd.put(self.PREFIX + "a", backends["a"][1])
        balancers = []
        for _ in range(2):
            balancers.append((yield self.startBalancer()))
        groups = [service.group for service, _, _ in balancers]

        def available(group, name):
            backend = group.byURL(backends[name][1])
            return backend is not None and backend.available

        yield poll(lambda: all(available(g, "a") for g in groups), what="a in both")
        loads = [Load(self, base + "/") for _, base, _ in balancers]
        self.addCleanup(lambda: [load.stop() for load in loads])

        registrar = RegistrarProcess(self, etcd, self.PREFIX, backends["b"][1], ttl=2)
        yield self.keysUntil(lambda keys: len(keys) == 2, 30, "b's key")
        listed = reactor.seconds()
        yield poll(lambda: all(load.servedBy("b") for load in loads), timeout=5,
                   what="b to take traffic from both")
        delays = [load.servedBy("b")[0] - listed for load in loads]
        self.assertLess(max(delays), 1.0, delays)

        # Drained through one balancer's API, b drains in both; enabled, it
        # takes traffic in both again.  Its key keeps its lease.
        admin = balancers[0][2]
        b = groups[0].byURL(backends["b"][1])
        code, _ = yield call(makeClient(self), "PATCH", f"{admin}/api/backends/{b.id}",
                             {"state": "draining"})
        self.assertEqual(code, 200)
        yield poll(lambda: all(g.byURL(backends["b"][1]).adminState == "draining" for g in groups),
                   timeout=1.0, what="b to drain in both")
        drained = reactor.seconds()
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([load.servedBy("b", since=drained + 0.05) for load in loads], [[], []])
        keys = yield self.keys()
        self.assertEqual(json.loads(keys[registrar.key]),
                         {"url": backends["b"][1], "state": "draining"})
        other = balancers[1][0].group.byURL(backends["b"][1])
        code, _ = yield call(makeClient(self), "PATCH", f"{balancers[1][2]}/api/backends/{other.id}",
                             {"state": "up", "weight": 2})
        self.assertEqual(code, 200)
        enabled = reactor.seconds()
        yield poll(lambda: all(load.servedBy("b", since=enabled) for load in loads), timeout=1.0,
                   what="b to take traffic in both again")
        self.assertEqual([g.byURL(backends["b"][1]).weight for g in groups], [2, 2])

        # etcd goes away and comes back: nothing changes for the clients.
        etcd.stop()
        sources = [service.discovery.sources[0] for service, _, _ in balancers]
        yield poll(lambda: all(s.status.state == "failing" for s in sources),
                   what="both sources to notice")
        served = [len(load.answers) for load in loads]
        yield poll(lambda: all(len(l.answers) > n + 20 for l, n in zip(loads, served)),
                   what="requests while etcd is away")
        self.assertTrue(all(available(g, n) for g in groups for n in "ab"))
        yield etcd.start()
        yield etcd.put(self.PREFIX + "c", backends["c"][1])
        yield poll(lambda: all(load.servedBy("c") for load in loads), timeout=40,
                   what="c, written after the restart, to take traffic from both")
        self.assertTrue(all(s.status.state == "ok" for s in sources))

        # The registrar dies: its lease takes b out of both.
        registrar.kill()
        killed = reactor.seconds()
        yield poll(lambda: all(g.byURL(backends["b"][1]) is None for g in groups),
                   timeout=10, what="b to leave both")
        self.assertLess(reactor.seconds() - killed, 3.0)
        yield deferLater(reactor, 0.1, lambda: None)
        for load in loads:
            yield load.stop()
            self.assertEqual(load.errors, [])
            self.assertEqual(load.servedBy("b", since=reactor.seconds() - 0.05), [])


class FakeEtcd:
    """
    The calls a L{rrbalancer.register.Registrar} makes, answered from
    memory; C{down} fails them all.
    """

    base = "http://127.0.0.1:2379"

    def __init__(self):
        self.keys = {}
        self.leases = {}
        self.down = False
        self.granted = 0
        self.rotated = 0

    def rotate(self):
        self.rotated += 1

    def _answer(self, result):
        if self.down:
            return fail(ConnectionRefusedError())
        return succeed(result)

    def grant(self, ttl):
        self.granted += 1
        lease = str(self.granted)
        if not self.down:
            self.leases[lease] = ttl
        return self._answer((lease, ttl))

    def put(self, key, value, lease=None):
        if not self.down:
            self.keys[key] = (value, lease)
        return self._answer(1)

    def keepAlive(self, lease):
        return self._answer(self.leases.get(lease, 0))

    def expire(self):
        self.leases.clear()
        self.keys.clear()

    def delete(self, key):
        if not self.down:
            self.keys.pop(key, None)
        return self._answer(1)

    def revoke(self, lease):
        if not self.down:
            self.leases.pop(lease, None)
        return self._answer({})


class RegistrarTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.registrar = Registrar(
            parseArguments(ArgumentTests.ARGS + ["--ttl", "9"]), self.etcd, self.clock
        )
        self.events = []
        self.registrar.log = Logger(observer=self.events.append)
        self.registrar.start()

    def logged(self):
        return [formatEvent(e) for e in self.events]

    def test_renewedEveryThirdOfTheTTL(self):
        key = b"/services/web/127.0.0.1:8081"
        self.assertEqual(self.etcd.keys, {key: (b'{"url": "http://127.0.0.1:8081"}', "1")})
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 3.0)
        self.clock.advance(3)
        self.clock.advance(3)
        self.assertEqual(self.etcd.granted, 1)

    def test_expiredLeaseRegistersAgain(self):
        """
        etcd away for longer than the TTL: the failures are said once, and
        the key is put again under a new lease when etcd is back.
        """
        self.etcd.down = True
        for _ in range(5):
            self.clock.advance(3)
        self.etcd.expire()
        self.etcd.down = False
        self.clock.advance(3)
        self.assertEqual(self.etcd.keys[b"/services/web/127.0.0.1:8081"][1], "2")
        logged = self.logged()
        self.assertEqual(len([line for line in logged if "trying again" in line]), 1)
        self.assertEqual(self.etcd.rotated, 5)
        self.assertIn("etcd http://127.0.0.1:2379 answers again", logged[-1])

    def test_stop(self):
        self.successResultOf(self.registrar.stop())
        self.assertEqual((self.etcd.keys, self.etcd.leases), ({}, {}))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("/services/web/127.0.0.1:8081 deleted", self.logged()[-1])

    def test_stopWithEtcdAway(self):
        self.etcd.down = True
        self.successResultOf(self.registrar.stop())
        self.assertIn("it goes with its lease", self.logged()[-1])
