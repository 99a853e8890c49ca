"""
Tests for L{rrbalancer.logs}: JSON log lines that parse back, with the
event's fields, and never a C{b'...'}.
"""

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.logs import eventAsJSON, jsonLineObserver

from .test_plugin import TwistdMixin


class JSONLineTests(SynchronousTestCase):
    def lines(self, log):
        out = io.StringIO()
        log(Logger(namespace="rrbalancer.test", observer=jsonLineObserver(out)))
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_fields(self):
        [record] = self.lines(
            lambda log: log.warn("backend {url} is down: {reason}", url="http://a:1", reason="HTTP 503")
        )
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "rrbalancer.test")
        self.assertEqual(record["message"], "backend http://a:1 is down: HTTP 503")
        self.assertEqual((record["url"], record["reason"]), ("http://a:1", "HTTP 503"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    def test_bytesAsText(self):
        [record] = self.lines(lambda log: log.info("got {method}", method=b"GET", raw=[b"a", 1]))
        self.assertEqual(record["method"], "GET")
        self.assertEqual(record["raw"], ["a", 1])
        self.assertNotIn("b'", json.dumps(record))

    def test_failure(self):
        def log(logger):
            try:
                1 / 0
            except ZeroDivisionError:
                logger.failure("it broke")

        [record] = self.lines(log)
        self.assertEqual(record["level"], "critical")
        self.assertIn("division", record["error"])
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_unserializable(self):
        record = json.loads(eventAsJSON({"log_format": "x", "thing": object()}))
        self.assertTrue(record["thing"].startswith("<object object"))


class TwistdJSONTests(TwistdMixin, TestCase):
    timeout = 30

    def test_twistdLogger(self):
        """
        C{twistd --logger rrbalancer.logs.jsonLogger}: every line the
        balancer writes is a JSON object.
        """
        process = self.start(
            "--logger", "rrbalancer.logs.jsonLogger", "-n", "--pidfile=",
            "rrbalancer", "--demo", "--admin", "none", "--port", "tcp:0:interface=127.0.0.1",
        )
        self.listeningPort(process)
        self.assertStopsCleanly(process)
        out, err = self.output(process)
        records = [json.loads(line) for line in out.splitlines()]
        [listener] = [r for r in records if r.get("role") == "client"]
        self.assertEqual(listener["namespace"], "rrbalancer.listeners.Listener")
        self.assertTrue(listener["address"].startswith("127.0.0.1:"))
        self.assertNotIn("b'", out)
