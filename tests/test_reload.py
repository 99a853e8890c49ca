"""
Tests for L{rrbalancer.reload}: SIGHUP and C{POST /api/reload} read the
C{--config} file again and apply its backends, or, for a file that does not
validate, change nothing.
"""

import os
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

import treq

from rrbalancer.backends import DRAINING, UP, BackendGroup
from rrbalancer.config import BackendConfig, ConfigError, HealthConfig, loadConfig
from rrbalancer.reload import Reloader
from rrbalancer.service import makeService
from rrbalancer.settings import madeVia
from rrbalancer.tap import Options

from .test_admin import (
    FakeChecker,
    InMemoryAdmin,
    call,
    makeClient,
    poll,
    settleConnections,
    startBackend,
)


def toml(backends, extra=""):
    lines = [extra]
    for url, options in backends:
        lines.append("[[backend]]")
        lines.append(f'url = "{url}"')
        for key, value in options.items():
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


class ConfigFile:
    def __init__(self, testCase, text):
        self.path = os.path.abspath(testCase.mktemp() + ".toml")
        self.write(text)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)


HEADER = 'admin = "none"\n[health]\nenabled = false\n'


class ReloaderTests(SynchronousTestCase):
    def setUp(self):
        self.file = ConfigFile(self, toml(
            [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2}),
             ("http://127.0.0.1:8083", {})],
            HEADER,
        ))
        self.config = loadConfig(self.file.path)
        self.clock = Clock()
        self.group = BackendGroup(HealthConfig(), self.clock)
        for b in self.config.backends:
            self.group.add(b)
        self.added = []
        self.reloader = Reloader(self.config, self.group, onAdded=self.added.append)
        self.events = []
        self.reloader.log = Logger(observer=self.events.append)

    def state(self):
        return {b.url: (b.weight, b.backup, b.adminState, b.removing) for b in self.group}

    def test_configRemembersItsFile(self):
        self.assertEqual(self.config.configPath, self.file.path)

    def test_valid(self):
        """
        Added, removed and changed backends take effect; the rest stay as
        they are.
        """
        one, two, three = self.group
        three.active = 1  # a request in flight on the one to remove
        self.file.write(toml(
            [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 5, "backup": True}),
             ("http://127.0.0.1:8084", {})],
            HEADER,
        ))
        result = self.reloader.reload()
        self.assertEqual(result["added"], ["http://127.0.0.1:8084"])
        self.assertEqual(result["removed"], ["http://127.0.0.1:8083"])
        self.assertEqual(result["changed"], ["http://127.0.0.1:8082"])
        self.assertEqual(result["ignored"], [])
        self.assertEqual((two.weight, two.backup), (5, True))
        self.assertIs(self.group.byURL("http://127.0.0.1:8082"), two)
        # The removed one drains, and goes when its request ends.
        self.assertEqual((three.state, three.removing), (DRAINING, True))
        three.active = 0
        self.assertIsNone(self.group.byURL("http://127.0.0.1:8083"))
        new = self.group.byURL("http://127.0.0.1:8084")
        self.assertEqual(self.added, [new])
        self.assertFalse(new.available)  # until its first health check passes
        new.recordCheck(True, "HTTP 200")
        self.assertTrue(new.available)
        self.assertEqual(one.adminState, UP)
        text = formatEvent(self.events[-1])
        self.assertIn("added ['http://127.0.0.1:8084']", text)

    def test_manyNamedInBrief(self):
        """
        A reload that adds many backends names the first five in its line,
        and says how many more; the event carries the counts.
        """
        urls = [f"http://127.0.0.1:{9000 + i}" for i in range(8)]
        self.file.write(toml([(url, {}) for url in urls], HEADER))
        self.reloader.reload()
        event = self.events[-1]
        self.assertEqual(
            formatEvent(event),
            f"reload (SIGHUP): added {urls[:5]!r} and 3 more, removed "
            "['http://127.0.0.1:8081', 'http://127.0.0.1:8082', 'http://127.0.0.1:8083'], "
            "changed none",
        )
        self.assertEqual((event["addedCount"], event["removedCount"], event["changedCount"]), (8, 3, 0))

    def test_unchanged(self):
        before = self.state()
        result = self.reloader.reload()
        self.assertEqual(result, {"added": [], "removed": [], "changed": [], "ignored": []})
        self.assertEqual(self.state(), before)

    def test_runtimeBackendsKept(self):
        """
        Backends the file never listed (added through the API, the demo's)
        are not the file's to remove.
        """
        self.group.add(BackendConfig("http://127.0.0.1:9000"))
        self.reloader.reload()
        self.assertIsNotNone(self.group.byURL("http://127.0.0.1:9000"))

    def test_listedElsewhereKept(self):
        """
        A backend the file drops while another owner (the API, a discovery
        source) still lists it stays, and the file no longer owns it.
        """
        three = self.group.byURL("http://127.0.0.1:8083")
        self.group.claim(three, "dns+a://web.example.com:8083")
        self.file.write(toml(
            [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2})], HEADER
        ))
        result = self.reloader.reload()
        self.assertEqual(result["removed"], [])
        self.assertEqual((three.state, three.removing), (UP, False))
        self.assertEqual(three.owners, ("dns+a://web.example.com:8083",))

    def test_listedByTheFileToo(self):
        """
        A backend the API added that the file then lists is the file's too:
        dropped from the file again, it stays, the API's.
        """
        extra = self.group.add(BackendConfig("http://127.0.0.1:9000"), owner="api")
        listed = [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2}),
                  ("http://127.0.0.1:8083", {})]
        self.file.write(toml(listed + [("http://127.0.0.1:9000", {})], HEADER))
        self.reloader.reload()
        self.assertEqual(extra.owners, ("api", "config"))
        self.file.write(toml(listed, HEADER))
        self.assertEqual(self.reloader.reload()["removed"], [])
        self.assertEqual((extra.removing, extra.owners), (False, ("api",)))

    def test_removedThenListedAgain(self):
        """
        A backend on its way out that the file lists again stays.
        """
        three = self.group.byURL("http://127.0.0.1:8083")
        three.active = 1
        self.file.write(toml([("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2})], HEADER))
        self.reloader.reload()
        self.assertTrue(three.removing)
        self.file.write(toml(
            [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2}),
             ("http://127.0.0.1:8083", {})],
            HEADER,
        ))
        result = self.reloader.reload()
        self.assertEqual(result["changed"], ["http://127.0.0.1:8083"])
        three.active = 0
        self.assertIs(self.group.byURL("http://127.0.0.1:8083"), three)
        self.assertEqual((three.state, three.removing), (UP, False))

    def test_invalid(self):
        """
        A file that does not validate changes nothing, and says why.
        """
        before = self.state()
        for text in [
            "this is not toml [",
            toml([("http://127.0.0.1:8081", {"weight": 0})], HEADER),
            toml([("ftp://127.0.0.1:8081", {})], HEADER),
            toml([], HEADER),
            toml([("http://127.0.0.1:8081", {})], "bogus_setting = 1\n" + HEADER),
        ]:
            self.file.write(text)
            self.assertRaises(ConfigError, self.reloader.reload)
            self.assertEqual(self.state(), before)
        self.assertIn("failed, the running configuration stays", formatEvent(self.events[-1]))
        self.assertEqual(self.events[-1]["log_level"].name, "error")

    def test_missingFile(self):
        os.remove(self.file.path)
        e = self.assertRaises(ConfigError, self.reloader.reload)
        self.assertIn("no such file", str(e))

    def test_otherSettingsNeedARestart(self):
        self.file.write(toml(
            [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2}),
             ("http://127.0.0.1:8083", {})],
            'port = "tcp:9999"\nbackend_timeout = 3\n' + HEADER,
        ))
        result = self.reloader.reload()
        self.assertEqual(sorted(result["ignored"]), ["backendTimeout", "ports"])
        self.assertIn("needs a restart", formatEvent(self.events[-1]))

    def test_madeNameKept(self):
        """
        A file that still says C{via = "auto"} leaves the name the balancer
        made for it as it started: no change, nothing to restart for.  A
        name of one's own going back to auto is a change.
        """
        self.reloader.config = replace(self.config, via=madeVia())
        result = self.reloader.reload()
        self.assertEqual(result["ignored"], [])
        self.assertNotIn("needs a restart", formatEvent(self.events[-1]))
        self.reloader.config = replace(self.config, via="edge-1")
        self.assertEqual(self.reloader.reload()["ignored"], ["via"])

    def test_balancingSettings(self):
        """
        The policy and its parameters, slow start, ejection and the panic
        threshold are applied by a reload.
        """
        from rrbalancer.policies import ConsistentHash, RoundRobin

        self.assertIsInstance(self.group.policy, RoundRobin)
        backends = [("http://127.0.0.1:8081", {}), ("http://127.0.0.1:8082", {"weight": 2}),
                    ("http://127.0.0.1:8083", {})]
        self.file.write(toml(backends, 'balance = "hash"\nhash_key = "path"\nslow_start = 20\n'
                             'eject_after = 2\npanic_threshold = 50\n' + HEADER))
        result = self.reloader.reload()
        self.assertEqual((result["changed"], result["ignored"]), (["balancing"], []))
        self.assertIsInstance(self.group.policy, ConsistentHash)
        self.assertEqual(self.group.slowStart, 20)
        self.assertEqual(self.group.ejection.after, 2)
        one, two, three = self.group
        for backend in (one, two):
            backend.setAdminState("draining", "test")
        # Two of three primaries are draining (not enabled): one of one up.
        self.assertFalse(self.group.panicking)
        for _ in range(3):
            three.recordCheck(False, "bad")
        self.assertTrue(self.group.panicking)
        self.file.write(toml(backends, HEADER))
        self.reloader.reload()
        self.assertFalse(self.group.panicking)
        self.assertIsInstance(self.group.policy, RoundRobin)

    def test_commandLineStillOverrides(self):
        """
        The flags given with --config still override the file on reload.
        """
        options = Options()
        options.parseOptions(["--config", self.file.path, "--backend-timeout", "7"])
        self.assertEqual(options.config.configPath, self.file.path)
        reloader = Reloader(options.config, self.group)
        self.file.write(toml([("http://127.0.0.1:8081", {})], "backend_timeout = 3\n" + HEADER))
        self.assertEqual(reloader.load().backendTimeout, 7.0)

    def test_noFile(self):
        from rrbalancer.config import Config

        reloader = Reloader(Config(backends=self.config.backends), self.group)
        self.assertFalse(reloader.canReload)
        e = self.assertRaises(ConfigError, reloader.reload)
        self.assertIn("without --config", str(e))


class APIReloadTests(SynchronousTestCase):
    def setUp(self):
        self.file = ConfigFile(self, toml([("http://127.0.0.1:8081", {})], HEADER))
        self.admin = InMemoryAdmin(urls=("http://127.0.0.1:8081",), checker=FakeChecker())
        self.admin.api.reloader = Reloader(
            loadConfig(self.file.path), self.admin.group, onAdded=self.admin.api.checkNow
        )

    def test_valid(self):
        self.file.write(toml([("http://127.0.0.1:8082", {"weight": 3})], HEADER))
        code, body, _, _ = self.admin.request("POST", "/api/reload")
        self.assertEqual(code, 200)
        self.assertEqual(body, {
            "reloaded": True, "added": ["http://127.0.0.1:8082"],
            "removed": ["http://127.0.0.1:8081"], "changed": [], "ignored": [],
        })
        self.assertEqual([b.url for b in self.admin.group], ["http://127.0.0.1:8082"])

    def test_invalid(self):
        self.file.write(toml([("http://127.0.0.1:8082", {"weight": -1})], HEADER))
        code, body, _, _ = self.admin.request("POST", "/api/reload")
        self.assertEqual(code, 400)
        self.assertIn("weight", body["error"])
        self.assertIn("the running configuration stays", body["error"])
        self.assertEqual([b.url for b in self.admin.group], ["http://127.0.0.1:8081"])

    def test_noConfigFile(self):
        admin = InMemoryAdmin()
        code, body, _, _ = admin.request("POST", "/api/reload")
        self.assertEqual(code, 409)
        self.assertIn("without --config", body["error"])


class LiveReloadTests(TestCase):
    """
    A running balancer started from a file: a reload swaps a backend
    without closing the listener or cutting a request in flight.
    """

    timeout = 30

    @inlineCallbacks
    def test_reloadWhileServing(self):
        settleConnections(self)
        one, oneURL = startBackend(self, "one")
        two, twoURL = startBackend(self, "two")
        file = ConfigFile(self, toml(
            [(oneURL, {})],
            'port = "tcp:0:interface=127.0.0.1"\nadmin = "tcp:0:interface=127.0.0.1"\n'
            "shutdown_grace = 5\n[health]\nenabled = false\n",
        ))
        service = makeService(loadConfig(file.path), reactor)
        service.signals.install = False
        service.startService()
        self.addCleanup(service.stopService)
        yield poll(lambda: service.adminListener.address()
                   and service.listeners[0].address(), what="the listeners")
        balancer = "http://" + service.listeners[0].address()
        admin = "http://" + service.adminListener.address()
        port = service.listeners[0]._waitingForPort.result
        client = makeClient(self)

        slow = client.get(balancer + "/slow")
        yield poll(lambda: one.held, what="the slow request")
        file.write(file_text := toml(
            [(twoURL, {})],
            'port = "tcp:0:interface=127.0.0.1"\nadmin = "tcp:0:interface=127.0.0.1"\n'
            "shutdown_grace = 5\n[health]\nenabled = false\n",
        ))
        self.assertIn(twoURL, file_text)
        code, body = yield call(client, "POST", f"{admin}/api/reload")
        self.assertEqual(code, 200)
        self.assertEqual((body["added"], body["removed"]), ([twoURL], [oneURL]))
        response = yield client.get(balancer + "/after")
        self.assertEqual((yield treq.content(response)), b"two /after\n")
        self.assertIs(service.listeners[0]._waitingForPort.result, port)
        self.assertTrue(port.connected)
        one.release()
        response = yield slow
        self.assertEqual((response.code, (yield treq.content(response))), (200, b"one /slow\n"))
        yield poll(lambda: service.group.byURL(oneURL) is None, what="the removal")
