"""
Tests for L{rrbalancer.signals} and the signals a running balancer takes:
SIGHUP reloads (or, without a config file, changes nothing) and reopens
the access log, SIGUSR1 reopens it; neither ends the process, with or
without workers.
"""

import os
import signal

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.config import buildConfig
from rrbalancer.service import makeService
from rrbalancer.signals import SignalHandlers

from .test_plugin import TwistdMixin, get, noAdmin

if not hasattr(signal, "SIGUSR1"):  # pragma: no cover
    skip = "POSIX signals are needed"


class Immediate(Clock):
    """
    A clock whose callFromThread runs at once, as the reactor's would on
    its next turn.
    """

    def callFromThread(self, f, *args):
        f(*args)


class SignalHandlersTests(SynchronousTestCase):
    def test_installedAndRestored(self):
        previous = signal.getsignal(signal.SIGHUP)
        handlers = SignalHandlers(Immediate(), {"SIGHUP": lambda: None})
        handlers.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), handlers._received)
        handlers.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_notInstalledWhenTold(self):
        previous = signal.getsignal(signal.SIGHUP)
        handlers = SignalHandlers(Immediate(), {"SIGHUP": lambda: None})
        handlers.install = False
        handlers.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)
        handlers.stopService()

    def test_realSignal(self):
        """
        A real signal reaches its handler through the reactor's thread.
        """
        received = []
        handlers = SignalHandlers(Immediate(), {"SIGUSR1": lambda: received.append(1)})
        handlers.startService()
        self.addCleanup(handlers.stopService)
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertEqual(received, [1])

    def test_failingHandlerLogged(self):
        events = []
        handlers = SignalHandlers(Immediate(), {"SIGHUP": lambda: 1 / 0})
        handlers.log = Logger(observer=events.append)
        handlers.deliver("SIGHUP")
        [event] = events
        self.assertEqual(event["signal"], "SIGHUP")
        self.assertIsInstance(event["log_failure"].value, ZeroDivisionError)


class ServiceSignalTests(TestCase):
    """
    The balancer service's handlers, called as the signals would call them.
    """

    def service(self, **settings):
        settings.setdefault("backend", ["http://127.0.0.1:9"])
        settings.setdefault("admin", "none")
        settings.setdefault("health", {"enabled": False})
        settings.setdefault("port", "tcp:0:interface=127.0.0.1")
        service = makeService(buildConfig(settings), reactor)
        service.signals.install = False
        return service

    def test_hangupWithoutConfigChangesNothing(self):
        service = self.service()
        events = []
        service.log = Logger(observer=events.append)
        before = [b.url for b in service.group]
        service.signals.deliver("SIGHUP")
        self.assertEqual([b.url for b in service.group], before)
        self.assertEqual(len(events), 1)
        self.assertIn("no file to reload", events[0]["log_format"])

    @inlineCallbacks
    def test_accessLogReopened(self):
        """
        After logrotate renamed the access log, SIGUSR1 (and SIGHUP) make
        the balancer write to a new file of the old name.
        """
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "access.log")
        service = self.service(access_log=path)
        service.startService()
        self.addCleanup(service.stopService)
        yield waitForListener(service)
        port = service.listeners[0].port.getHost().port
        from .support import Net, exchange

        net = Net(self)
        yield exchange(net, port, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        os.rename(path, path + ".1")
        for name, target in [("SIGUSR1", b"/two"), ("SIGHUP", b"/three")]:
            service.signals.deliver(name)
            yield exchange(net, port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            with open(path) as f:
                self.assertIn(target.decode(), f.read().splitlines()[-1])
            os.rename(path, path + "." + name)
        with open(path + ".1") as f:
            self.assertEqual(len(f.read().splitlines()), 1)


def waitForListener(service) -> Deferred:
    d = Deferred()

    def check():
        if service.listeners[0].port is not None:
            d.callback(None)
        else:
            reactor.callLater(0.01, check)

    check()
    return d


class ProcessSignalTests(TwistdMixin, TestCase):
    """
    Real twistd processes, sent real signals.
    """

    timeout = 60

    def test_hangupWithoutConfig(self):
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--demo", *noAdmin(),
            "--port", "tcp:0:interface=127.0.0.1",
        )
        port = self.listeningPort(process)
        self.assertDemoRotation(process, port)
        process.send_signal(signal.SIGHUP)
        self.waitForLog(process, "no file to reload")
        process.send_signal(signal.SIGUSR1)
        self.assertEqual(get(port)[0], 200)
        self.assertIsNone(process.poll(), self.describe(process))
        self.assertStopsCleanly(process)

    def test_hangupReloads(self):
        path = self.writeConfig(
            'port = "tcp:0:interface=127.0.0.1"\nadmin = "none"\ndemo = true\n'
            'backend = ["http://127.0.0.1:9"]\n[health]\nenabled = false\n'
        )
        process = self.start("-n", "--pidfile=", "rrbalancer", "--config", path)
        self.listeningPort(process)
        text = open(path).read().replace('"http://127.0.0.1:9"', '"http://127.0.0.1:10"')
        with open(path, "w") as f:
            f.write(text)
        process.send_signal(signal.SIGHUP)
        self.waitForLog(process, "added ['http://127.0.0.1:10']")
        self.assertIsNone(process.poll(), self.describe(process))
        self.assertStopsCleanly(process)

    def test_workersSurviveHangup(self):
        """
        With workers, SIGHUP and SIGUSR1 reach every worker and none dies.
        """
        process = self.start(
            "-n", "--pidfile=", "rrbalancer", "--demo", "--workers", "2", *noAdmin(),
            "--port", "tcp:0:interface=127.0.0.1",
        )
        self.waitForLog(process, "client listener on", count=2)
        port = self.listeningPort(process, count=2)
        process.send_signal(signal.SIGHUP)
        self.waitForLog(process, "no file to reload", count=2)
        process.send_signal(signal.SIGUSR1)
        self.assertEqual(get(port)[0], 200)
        out, err = self.output(process)
        self.assertNotIn("restarting", out + err, self.describe(process))
        self.assertStopsCleanly(process)
