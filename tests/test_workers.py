"""
Tests for L{rrbalancer.workers}: shared listening sockets, worker restart,
graceful stop.  The integration tests run real worker processes.
"""

import http.client
import json
import os
import signal
import time

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from rrbalancer.config import BackendConfig, Config, ConfigError, HealthConfig, buildConfig
from rrbalancer.health import USER_AGENT
from rrbalancer.service import makeService
from rrbalancer.workers import WorkerPool, checkShareable

from .test_plugin import POLL_STEP, STARTUP_TIMEOUT, TwistdMixin, skipReason


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


class Constant(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name.encode()

    def render_GET(self, request):
        return self.name


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


class OtherCheckoutTests(TestCase):
    """
    Workers run the parent's code, even started in a folder that holds
    another copy of the package.
    """

    timeout = 60

    poll = WorkerProcessTests.poll
    get = WorkerProcessTests.get

    @inlineCallbacks
    def test_parentCode(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "rrbalancer"))
        with open(os.path.join(folder, "rrbalancer", "__init__.py"), "w") as f:
            f.write("raise SystemExit('the other copy was imported')\n")
        here = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, here)
        WorkerProcessTests.setUp(self)
        self.addCleanup(lambda: self.pool.running and self.pool.stopService())
        yield self.poll(lambda: self.get(self.url).addCallback(lambda r: r[0] == 200))


class WorkersAdminTests(TestCase):
    """
    The parent's admin listener over real worker processes.
    """

    timeout = 90

    def setUp(self):
        self.backends = {}
        for name in ("a", "b"):
            port = reactor.listenTCP(0, Site(Constant(name)), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.backends[name] = f"http://127.0.0.1:{port.getHost().port}"
        config = Config(
            backends=(BackendConfig(self.backends["a"]),),
            ports=("tcp:0:interface=127.0.0.1",),
            admin="tcp:0:interface=127.0.0.1",
            health=HealthConfig(enabled=False),
            shutdownGrace=2,
            workers=2,
        )
        self.service = makeService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        [self.pool] = [s for s in self.service if isinstance(s, WorkerPool)]
        [admin] = [s for s in self.service if getattr(s, "role", None) == "admin"]
        self.admin = "http://" + admin.address()
        self.url = f"http://127.0.0.1:{self.pool._ports[0].getHost().port}/"

    poll = WorkerProcessTests.poll
    get = WorkerProcessTests.get

    @inlineCallbacks
    def api(self, method, path, body=None):
        headers = {b"Content-Type": [b"application/json"]} if body is not None else {}
        response = yield treq.request(
            method, self.admin + path, data=json.dumps(body).encode() if body else None,
            headers=headers, timeout=15, persistent=False,
        )
        content = yield response.content()
        if response.headers.getRawHeaders(b"content-type", [b""])[0] == b"application/json":
            return response.code, json.loads(content)
        return response.code, content

    @inlineCallbacks
    def everyWorkerServes(self, backendID, name):
        """
        Send requests until each worker has sent some to the backend.
        """
        for _ in range(100):
            for _ in range(4):
                code, body = yield self.get(self.url)
                self.assertEqual((code, body), (200, name.encode()))
            _, backend = yield self.api("GET", f"/api/backends/{backendID}")
            if all(w["requests"] for w in backend["workers"]):
                return backend
        self.fail(f"not every worker served {name}: {backend['workers']}")

    @inlineCallbacks
    def test_changesReachEveryWorker(self):
        """
        Added, drained and removed through the parent's API, in every
        worker; the figures and metrics are the workers' summed; a worker
        started again has the backends as the others have them.
        """
        answering = lambda: self.api("GET", "/api/status").addCallback(
            lambda r: r[0] == 200 and all(w["answering"] for w in r[1]["workers"])
        )
        yield self.poll(answering)
        code, added = yield self.api("POST", "/api/backends", {"url": self.backends["b"]})
        self.assertEqual((code, added["id"], len(added["workers"])), (201, "2", 2))
        code, drained = yield self.api("PATCH", "/api/backends/1", {"state": "draining"})
        self.assertEqual(code, 200)
        self.assertEqual([w["state"] for w in drained["workers"]], ["draining", "draining"])
        backend = yield self.everyWorkerServes("2", "b")

        code, _ = yield self.api("DELETE", "/api/backends/1")
        self.assertEqual(code, 204)
        gone = lambda: self.api("GET", "/api/backends/1").addCallback(lambda r: r[0] == 404)
        yield self.poll(gone)

        code, text = yield self.api("GET", "/metrics")
        self.assertEqual(code, 200)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode("utf-8"))
            for s in family.samples
        }
        _, backend = yield self.api("GET", "/api/backends/2")
        self.assertEqual(
            samples[("rrbalancer_backend_attempts_total", (("backend", self.backends["b"]),))],
            backend["requests"],
        )
        self.assertEqual(backend["requests"], sum(w["requests"] for w in backend["workers"]))
        self.assertEqual(samples[("rrbalancer_workers", ())], 2)

        # Worker 1 started again from the settings holds backend "a" only
        # until it is made like worker 2.
        first = self.pool.workers[1].transport.pid
        os.kill(first, signal.SIGKILL)
        yield self.poll(
            lambda: self.api("GET", "/api/status").addCallback(
                lambda r: r[0] == 200 and r[1]["workers"][0]["answering"]
                and r[1]["workers"][0]["pid"] not in (None, first)
            )
        )
        _, page = yield self.api("GET", "/api/backends")
        self.assertEqual([(b["id"], b["url"]) for b in page["backends"]],
                         [("2", self.backends["b"])])
        self.assertEqual([w["worker"] for w in page["backends"][0]["workers"]], [1, 2])
        yield self.everyWorkerServes("2", "b")


class TwistdWorkersAdminTests(TwistdMixin, TestCase):
    """
    C{twistd rrbalancer --workers 2} with an admin listener: the parent's
    API reaches both worker processes.
    """

    skip = skipReason

    def api(self, port, method, path, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            content = response.read()
            return response.status, json.loads(content) if content else None
        finally:
            connection.close()

    def test_adminOverWorkers(self):
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--workers", "2",
            "--backend", "http://127.0.0.1:1", "--no-health-checks",
            "--port", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
        )
        admin = self.listeningPort(process, role="admin")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            code, status = self.api(admin, "GET", "/api/status")
            if code == 200 and all(w["answering"] for w in status["workers"]):
                break
            self.assertLess(time.monotonic(), deadline, self.describe(process))
            time.sleep(POLL_STEP)
        self.assertEqual(len(status["workers"]), 2)

        code, added = self.api(admin, "POST", "/api/backends", {"url": "http://127.0.0.1:2"})
        self.assertEqual((code, added["id"]), (201, "2"), added)
        self.assertEqual([w["worker"] for w in added["workers"]], [1, 2])
        code, drained = self.api(admin, "PATCH", "/api/backends/2", {"state": "draining"})
        self.assertEqual([w["state"] for w in drained["workers"]], ["draining", "draining"])
        self.assertEqual(self.api(admin, "DELETE", "/api/backends/1")[0], 204)
        code, page = self.api(admin, "GET", "/api/backends")
        self.assertEqual([b["id"] for b in page["backends"]], ["2"], page)
        self.assertEqual(self.api(admin, "GET", "/api/backends/1")[0], 404)
        out, err = self.output(process)
        self.assertNotIn("connection established", out + err)
        self.assertNotIn("Traceback", out + err)
        self.assertStopsCleanly(process)


class Checked(Resource):
    """
    A backend that counts the health checks it gets, and fails them when
    told.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.checks = 0
        self.failing = False

    def render_GET(self, request):
        if request.getHeader(b"user-agent") == USER_AGENT:
            self.checks += 1
        if self.failing:
            request.setResponseCode(503)
        return b"checked"


class SharedChecksTests(TestCase):
    """
    With workers, one of them checks each backend, and every worker takes
    its results.
    """

    timeout = 90
    interval = 0.2

    setUp = lambda self: None
    api = WorkersAdminTests.api
    poll = WorkerProcessTests.poll

    @inlineCallbacks
    def test_checkedOnceForAll(self):
        self.backend = Checked()
        port = reactor.listenTCP(0, Site(self.backend), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = Config(
            backends=(BackendConfig(f"http://127.0.0.1:{port.getHost().port}"),),
            ports=("tcp:0:interface=127.0.0.1",),
            admin="tcp:0:interface=127.0.0.1",
            health=HealthConfig(interval=self.interval, timeout=1.0, rise=1, fall=1),
            shutdownGrace=2,
            workers=2,
        )
        service = makeService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [admin] = [s for s in service if getattr(s, "role", None) == "admin"]
        self.admin = "http://" + admin.address()
        answering = lambda: self.api("GET", "/api/status").addCallback(
            lambda r: r[0] == 200 and all(w["answering"] for w in r[1]["workers"])
        )
        yield self.poll(answering)

        # One check per interval, not one per worker (with room for a
        # noisy machine: two workers checking would be twice as many).
        start, before = reactor.seconds(), self.backend.checks
        yield deferLater(reactor, 2.0, lambda: None)
        elapsed, checks = reactor.seconds() - start, self.backend.checks - before
        self.assertGreater(checks, 0)
        self.assertLess(checks, 1.5 * elapsed / self.interval + 2)

        # The worker that does not check learns the backend is down, and up
        # again, from the one that does.
        def states(wanted):
            return lambda: self.api("GET", "/api/backends/1").addCallback(
                lambda r: [w["state"] for w in r[1]["workers"]] == [wanted, wanted]
            )

        self.backend.failing = True
        yield self.poll(states("down"))
        self.backend.failing = False
        yield self.poll(states("up"))
