"""
Tests for L{rrbalancer.workers}: shared listening sockets, worker restart,
graceful stop.  The integration tests run real worker processes.
"""

import os
import signal

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rrbalancer.config import BackendConfig, Config, ConfigError, HealthConfig, buildConfig
from rrbalancer.service import makeService
from rrbalancer.workers import WorkerPool, checkShareable


class ShareableTests(SynchronousTestCase):
    def config(self, *ports):
        return Config(
            backends=(BackendConfig("http://127.0.0.1:1"),), ports=ports, admin=None
        )

    def test_tcpUnixAndProxied(self):
        checkShareable(
            self.config("tcp:8000", "tcp6:8000", "unix:/tmp/x.sock", "haproxy:tcp:8001")
        )

    def test_tlsRefused(self):
        e = self.assertRaises(
            ConfigError, checkShareable, self.config("ssl:8443:privateKey=k.pem")
        )
        self.assertIn("ssl:8443", str(e))

    def test_workersSetting(self):
        self.assertEqual(buildConfig({"demo": True, "workers": "3"}).workers, 3)
        self.assertEqual(buildConfig({"demo": True}).workers, 1)
        self.assertEqual(
            buildConfig({"demo": True, "workers": "auto"}).workers, os.cpu_count()
        )
        self.assertRaises(ConfigError, buildConfig, {"demo": True, "workers": 0})

    def test_oneWorkerIsTheBalancerItself(self):
        service = makeService(self.config("tcp:0:interface=127.0.0.1"), reactor)
        self.assertFalse(any(isinstance(s, WorkerPool) for s in service))

    def test_severalWorkersAreAPool(self):
        config = Config(
            backends=(BackendConfig("http://127.0.0.1:1"),),
            ports=("tcp:0:interface=127.0.0.1",),
            workers=2,
            admin=None,
        )
        pools = [s for s in makeService(config, reactor) if isinstance(s, WorkerPool)]
        self.assertEqual([p.count for p in pools], [2])


class Named(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"backend " + str(os.getpid()).encode()


class WorkerProcessTests(TestCase):
    """
    Real workers on a real socket.
    """

    timeout = 60

    @inlineCallbacks
    def poll(self, predicate, seconds=20.0):
        for _ in range(int(seconds / 0.1)):
            if (yield predicate()):
                return
            yield deferLater(reactor, 0.1, lambda: None)
        self.fail("condition not reached in time")

    @inlineCallbacks
    def get(self, url):
        try:
            response = yield treq.get(url, timeout=2, persistent=False)
            body = yield response.content()
            return response.code, body
        except Exception:
            return None, b""

    def setUp(self):
        backend = reactor.listenTCP(0, Site(Named()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        config = Config(
            backends=(BackendConfig(f"http://127.0.0.1:{backend.getHost().port}"),),
            ports=("tcp:0:interface=127.0.0.1",),
            health=HealthConfig(enabled=False),
            shutdownGrace=2,
            workers=2,
            admin=None,
        )
        self.pool = WorkerPool(config, reactor, 2)
        self.pool.startService()
        self.url = f"http://127.0.0.1:{self.pool._ports[0].getHost().port}/"

    def tearDown(self):
        if self.pool.running:
            return self.pool.stopService()

    @inlineCallbacks
    def test_serveRestartStop(self):
        """
        Both workers serve the shared port; one killed is started again;
        stopping ends every worker.
        """
        ok = lambda: self.get(self.url).addCallback(lambda r: r[0] == 200)
        yield self.poll(ok)
        first = self.pool.workers[1].transport.pid
        os.kill(first, signal.SIGKILL)
        yield self.poll(
            lambda: deferLater(
                reactor,
                0,
                lambda: 1 in self.pool.workers
                and self.pool.workers[1].transport.pid not in (None, first),
            )
        )
        yield self.poll(ok)
        pids = [w.transport.pid for w in self.pool.workers.values()]
        yield self.pool.stopService()
        self.assertEqual(self.pool.workers, {})
        for pid in pids:
            self.assertRaises(OSError, os.kill, pid, 0)
