"""
Tests for L{rrbalancer.register}, C{rrbalancer-register}: its command line,
and the real process against a real etcd: the key it puts is seen by the
balancers' sources, goes on SIGTERM at once and on SIGKILL within the
lease's TTL; two balancers watching one prefix both send a registered
backend traffic, and ride out an etcd restart without a client error.
"""

import io
import os
import signal
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

import rrbalancer
from rrbalancer.config import HealthConfig
from rrbalancer.discovery import parseSource
from rrbalancer.register import main, parseArguments
from rrbalancer.settings import ConfigError

from .test_admin import (
    balancerConfig,
    makeClient,
    poll,
    settleConnections,
    startBackend,
    startWithAdmin,
)
from .test_discovery_etcd import EtcdServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rrbalancer.__file__)))


class ArgumentTests(SynchronousTestCase):
    ARGS = ["--etcd", "http://127.0.0.1:2379", "--prefix", "/services/web/",
            "--url", "http://127.0.0.1:8081"]

    def test_parsed(self):
        registration = parseArguments(self.ARGS + ["--weight", "3", "--ttl", "5"])
        self.assertEqual(registration.key, b"/services/web/127.0.0.1:8081")
        self.assertEqual(registration.value, b'{"url": "http://127.0.0.1:8081", "weight": 3}')
        self.assertEqual((registration.etcd, registration.ttl), ("http://127.0.0.1:2379", 5))
        ipv6 = parseArguments(self.ARGS[:-1] + ["http://[::1]:81"])
        self.assertEqual(ipv6.key, b"/services/web/[::1]:81")

    def test_mistakes(self):
        for argv, mention in [
            (self.ARGS[:4], "--url"),
            (self.ARGS + ["--weight", "0"], "--weight"),
            (self.ARGS + ["--ttl", "x"], "whole numbers"),
            (self.ARGS + ["--ttl", "1"], "--ttl: must be at least 2"),
            (["--etcd", "127.0.0.1:2379"] + self.ARGS[2:], "--etcd"),
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
        self.assertEqual(stderr.getvalue(), "rrbalancer-register: --weight: must be at least 1, got -1\n")


class Registrar:
    """
    C{rrbalancer-register} running as its own process.
    """

    def __init__(self, testCase, etcd, prefix, url, ttl=10):
        self.log = tempfile.NamedTemporaryFile(prefix="rrbalancer-register-", suffix=".log")
        testCase.addCleanup(self.log.close)
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


class RegisterTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        settleConnections(self)
        self.etcd = EtcdServer(self)
        yield self.etcd.start()

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

    @inlineCallbacks
    def test_termDeletes(self):
        """
        The key is there while the registrar runs, gone as soon as SIGTERM
        stops it, and it exits 0.
        """
        registrar = Registrar(self, self.etcd, "/services/web/", "http://127.0.0.1:8081")
        found = yield self.keysUntil(bool, 30, "the key to be put")
        self.assertEqual(found, {b"/services/web/127.0.0.1:8081": b'{"url": "http://127.0.0.1:8081"}'})
        registrar.kill(signal.SIGTERM)
        yield poll(registrar.exited, timeout=15, what="the registrar to exit")
        self.assertEqual(registrar.process.returncode, 0, registrar.output())
        self.assertEqual((yield self.keys()), {})
        self.assertIn("/services/web/127.0.0.1:8081 deleted", registrar.output())

    @inlineCallbacks
    def test_killExpires(self):
        """
        SIGKILL leaves the key to its lease: gone within the TTL and a
        second.
        """
        registrar = Registrar(self, self.etcd, "/services/web/", "http://127.0.0.1:8082", ttl=2)
        yield self.keysUntil(bool, 30, "the key to be put")
        registrar.kill()
        killed = reactor.seconds()
        yield self.keysUntil(lambda keys: not keys, 10, "the key to expire")
        self.assertLess(reactor.seconds() - killed, 3.0)
