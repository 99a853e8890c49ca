"""
Tests for L{rrbalancer._channel}: the commands a worker answers its parent
with, over in-memory transports (L{twisted.test.iosim}), and the backend
set made the same in a worker started again.
"""

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer._channel import (
    JSON,
    Apply,
    Backends,
    Checked,
    Render,
    Snapshot,
    Sync,
    WorkerChannel,
    listing,
    syncGroup,
)
from rrbalancer.admin import AdminAPI
from rrbalancer.backends import DISABLED, DRAINING, UP, BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.metrics import Metrics


class Echo(amp.Command):
    arguments = [(b"value", JSON())]
    response = [(b"value", JSON())]


class EchoServer(amp.AMP):
    @Echo.responder
    def echo(self, value):
        return {"value": value}


def group(*urls, clock=None):
    clock = clock or Clock()
    g = BackendGroup(HealthConfig(enabled=False), clock)
    for url in urls:
        g.add(BackendConfig(url))
    return g


class Worker:
    """
    A worker's channel over its own group, reached by an AMP client in
    memory.
    """

    def __init__(self, *urls) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.group = group(*urls, clock=self.clock)
        self.api = AdminAPI(self.group, self.clock)
        self.server = WorkerChannel(self.api, Metrics(self.group))
        self.client = amp.AMP()
        self.pump = connect(
            self.server, makeFakeServer(self.server), self.client, makeFakeClient(self.client)
        )

    def call(self, command, **arguments):
        results = []
        self.client.callRemote(command, **arguments).addBoth(results.append)
        self.pump.flush()
        [result] = results
        if not isinstance(result, dict):
            result.raiseException()
        return result


class JSONArgumentTests(SynchronousTestCase):
    def test_largerThanOneValue(self):
        """
        A value longer than AMP carries in one key arrives whole.
        """
        server, client = EchoServer(), amp.AMP()
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client))
        big = {"backends": ["x" * 1000 + str(n) for n in range(300)], "note": "é"}
        results = []
        client.callRemote(Echo, value=big).addCallback(results.append)
        pump.flush()
        self.assertEqual(results, [{"value": big}])

    def test_small(self):
        server, client = EchoServer(), amp.AMP()
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client))
        results = []
        client.callRemote(Echo, value=None).addCallback(results.append)
        pump.flush()
        self.assertEqual(results, [{"value": None}])


class WorkerChannelTests(SynchronousTestCase):
    def test_snapshot(self):
        worker = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        worker.group.get("2").requests = 7
        answer = worker.call(Snapshot, status=False)["answer"]
        self.assertEqual([b["url"] for b in answer["backends"]],
                         ["http://127.0.0.1:8081", "http://127.0.0.1:8082"])
        self.assertEqual(answer["backends"][1]["requests"], 7)
        self.assertNotIn("status", answer)
        answer = worker.call(Snapshot, status=True)["answer"]
        self.assertEqual(answer["status"]["totals"]["backends"], 2)

    def test_snapshotOfSome(self):
        """
        Only the backends asked for (those there), and briefly if asked.
        """
        worker = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        answer = worker.call(Snapshot, status=False, ids=["2", "9"])["answer"]
        self.assertEqual([b["id"] for b in answer["backends"]], ["2"])
        self.assertIn("history", answer["backends"][0])
        answer = worker.call(Snapshot, status=False, brief=True)["answer"]
        self.assertEqual(answer["backends"][1], {
            "id": "2", "url": "http://127.0.0.1:8082", "state": "up", "healthy": True,
            "removing": False,
        })

    def test_render(self):
        worker = Worker("http://127.0.0.1:8081")
        text = worker.call(Render, openMetrics=False)["text"]
        self.assertIn('rrbalancer_backend_up{backend="http://127.0.0.1:8081"} 1', text)
        self.assertTrue(worker.call(Render, openMetrics=True)["text"].endswith("# EOF\n"))

    def test_applyChange(self):
        """
        A change runs the admin API's own code, and says which id its
        first new backend took.
        """
        worker = Worker("http://127.0.0.1:8081")
        answer = worker.call(Apply, call={
            "method": "addBackend", "args": [{"url": "http://127.0.0.1:8082"}, "peer"]})["answer"]
        self.assertEqual(answer["next_id"], 2)
        self.assertEqual(answer["value"]["id"], "2")
        self.assertEqual(worker.group.get("2").url, "http://127.0.0.1:8082")
        worker.call(Apply, call={
            "method": "changeBackend", "args": ["1", {"state": "draining"}, "peer"]})
        self.assertEqual(worker.group.get("1").adminState, DRAINING)

    def test_applyRefused(self):
        """
        A change the API refuses comes back as its code and message, and
        changes nothing.
        """
        worker = Worker("http://127.0.0.1:8081")
        answer = worker.call(Apply, call={
            "method": "addBackend", "args": [{"url": "http://127.0.0.1:8081"}, "peer"]})["answer"]
        self.assertEqual(answer["code"], 409)
        self.assertIn("already exists", answer["error"])
        answer = worker.call(Apply, call={
            "method": "changeBackend", "args": ["1", {"weight": 0}, "peer"]})["answer"]
        self.assertEqual(answer["code"], 400)
        self.assertEqual(worker.group.get("1").weight, 1)

    def test_applyUnknown(self):
        """
        Only the admin API's changes can be applied, with their arguments.
        """
        worker = Worker("http://127.0.0.1:8081")
        for call in ({"method": "status", "args": []},
                     {"method": "removeBackend", "args": ["1"]},
                     {"method": "__init__", "args": [1, 2]}):
            answer = worker.call(Apply, call=call)["answer"]
            self.assertEqual(answer["code"], 400, call)
        self.assertEqual(len(worker.group), 1)

    def test_applyNumbersAsTold(self):
        """
        A worker told where the first worker's ids went on numbers its new
        backends the same.
        """
        worker = Worker("http://127.0.0.1:8081")
        answer = worker.call(Apply, call={
            "method": "bulk",
            "args": [{"add": [{"url": "http://127.0.0.1:8082"}, {"url": "http://127.0.0.1:8083"}]},
                     "peer"],
            "next_id": 5,
        })["answer"]
        self.assertEqual(answer["value"]["added"], ["5", "6"])
        self.assertEqual(worker.group.nextID, 7)

    def test_applyIDsTaken(self):
        """
        Ids another worker would reuse are refused rather than overwritten.
        """
        worker = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        answer = worker.call(Apply, call={
            "method": "addBackend", "args": [{"url": "http://127.0.0.1:8083"}, "p"],
            "next_id": 2})["answer"]
        self.assertEqual(answer["code"], 500)
        self.assertEqual(len(worker.group), 2)

    def test_backendsAndSync(self):
        """
        The backend set one worker gives, another is made to have.
        """
        first = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        first.api.addBackend({"url": "http://127.0.0.1:8083", "weight": 3}, "p")
        first.api.changeBackend("1", {"state": "disabled"}, "p")
        first.api.removeBackend("2", "p")
        wanted = first.call(Backends)["answer"]
        again = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        again.call(Sync, listing=wanted)
        self.assertEqual(listing(again.group), listing(first.group))


class SyncGroupTests(SynchronousTestCase):
    def test_addChangeRetire(self):
        source = group("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")
        source.retire(source.get("2"), "gone")
        source.reconfigure(source.get("3"), 4, True)
        source.get("1").setAdminState(DISABLED, "off")
        source.add(BackendConfig("http://127.0.0.1:9"))
        target = group("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")
        counts, toCheck = syncGroup(target, listing(source), "sync")
        self.assertEqual(counts, {"added": 1, "changed": 2, "retired": 1})
        self.assertEqual(
            [(b.id, b.url, b.weight, b.backup, b.adminState) for b in target],
            [("1", "http://127.0.0.1:1", 1, False, DISABLED),
             ("3", "http://127.0.0.1:3", 4, True, UP),
             ("4", "http://127.0.0.1:9", 1, False, UP)],
        )
        self.assertEqual([b.id for b in toCheck], ["4"])
        self.assertEqual(target.nextID, 5)

    def test_sameURLNewID(self):
        """
        A backend removed and added again has a new id: the old one goes,
        the new one comes with the id the others gave it.
        """
        source = group("http://127.0.0.1:1")
        source.retire(source.get("1"), "gone")
        source.add(BackendConfig("http://127.0.0.1:1"))
        target = group("http://127.0.0.1:1")
        syncGroup(target, listing(source), "sync")
        self.assertEqual([(b.id, b.url) for b in target], [("2", "http://127.0.0.1:1")])

    def test_nothingToDo(self):
        source = group("http://127.0.0.1:1", "http://127.0.0.1:2")
        target = group("http://127.0.0.1:1", "http://127.0.0.1:2")
        counts, toCheck = syncGroup(target, listing(source), "sync")
        self.assertEqual(counts, {"added": 0, "changed": 0, "retired": 0})
        self.assertEqual(toCheck, [])

    def test_enabledAgainIsChecked(self):
        source = group("http://127.0.0.1:1")
        target = group("http://127.0.0.1:1")
        target.get("1").setAdminState(DISABLED, "off")
        _, toCheck = syncGroup(target, listing(source), "sync")
        self.assertEqual(toCheck, [target.get("1")])
        self.assertEqual(target.get("1").adminState, UP)


class SharedChecksTests(SynchronousTestCase):
    """
    The checking worker's results, batched to the parent, passed on to
    the other workers, and taken by them.
    """

    def test_sharerBatches(self):
        """
        Results within the delay go in one message.
        """
        from rrbalancer._channel import CheckSharer, ParentChannel

        clock = Clock()
        checking = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        received = []

        class Pool:
            channels = {}

            def _channelUp(self, index, channel):
                self.channels[index] = channel

            def _channelDown(self, index, channel):
                del self.channels[index]

        pool = Pool()
        parent = ParentChannel(pool, 1)
        other = amp.AMP()
        other.callRemote = lambda command, **kw: received.append((command, kw))
        pump = connect(checking.server, makeFakeServer(checking.server), parent,
                       makeFakeClient(parent))
        pool.channels[2] = other
        sharer = CheckSharer(checking.server, clock, delay=0.05)
        one, two = checking.group.get("1"), checking.group.get("2")
        sharer(one, False, "HTTP 503", 503, 0.01)
        sharer(two, True, "HTTP 200", 200, 0.02)
        pump.flush()
        self.assertEqual(received, [])
        clock.advance(0.05)
        pump.flush()
        [(command, arguments)] = received
        self.assertIs(command, Checked)
        self.assertEqual(
            [(r["id"], r["url"], r["ok"], r["code"]) for r in arguments["results"]],
            [("1", one.url, False, 503), ("2", two.url, True, 200)],
        )

    def test_workerTakesResults(self):
        """
        A worker counts results of its own backends, by id and URL, and
        ignores the rest.
        """
        worker = Worker("http://127.0.0.1:8081", "http://127.0.0.1:8082")
        results = [
            {"id": "1", "url": "http://127.0.0.1:8081", "ok": False, "reason": "HTTP 503",
             "code": 503, "duration": 0.01},
            {"id": "2", "url": "http://127.0.0.1:9999", "ok": False, "reason": "x",
             "code": None, "duration": 0.01},
            {"id": "7", "url": "http://127.0.0.1:8087", "ok": False, "reason": "x",
             "code": None, "duration": 0.01},
        ]
        for _ in range(3):
            worker.client.callRemote(Checked, results=results)
        worker.pump.flush()
        one, two = worker.group.get("1"), worker.group.get("2")
        self.assertEqual((one.checksFailed, one.healthy, one.lastError), (3, False, "HTTP 503"))
        self.assertEqual((two.checksFailed, two.healthy), (0, True))
