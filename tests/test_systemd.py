"""
Tests for L{rrbalancer._systemd}: socket activation through Twisted's
C{systemd:} endpoint, under Debian's real C{systemd-socket-activate}, and
C{sd_notify} messages received on a test socket.
"""

import os
import shutil
import signal
import socket
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer._systemd import nameInheritedSockets, notify

from .test_plugin import STARTUP_TIMEOUT, TwistdMixin, twistdCommand

ACTIVATE = shutil.which("systemd-socket-activate")


def shortFolder(testCase) -> str:
    """
    A folder for UNIX sockets, whose paths may not exceed 107 bytes: the
    test's own temporary folder can be deeper than that, wherever the
    checkout lies.
    """
    folder = tempfile.mkdtemp(prefix="rr-")
    testCase.addCleanup(shutil.rmtree, folder, True)
    return folder


class NotifySocket:
    """
    A datagram socket standing in for systemd's, collecting messages.
    """

    def __init__(self, testCase) -> None:
        self.path = os.path.join(shortFolder(testCase), "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(STARTUP_TIMEOUT)
        testCase.addCleanup(self.socket.close)

    def receive(self) -> str:
        return self.socket.recv(4096).decode("utf-8")


class UnitTests(SynchronousTestCase):
    def test_namesGivenWhenMissing(self):
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2"}
        nameInheritedSockets(environ)
        self.assertEqual(environ["LISTEN_FDNAMES"], "unknown:unknown")

    def test_namesKept(self):
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
        nameInheritedSockets(environ)
        self.assertEqual(environ["LISTEN_FDNAMES"], "http")

    def test_notForThisProcess(self):
        environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
        nameInheritedSockets(environ)
        self.assertNotIn("LISTEN_FDNAMES", environ)

    def test_notify(self):
        receiver = NotifySocket(self)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": receiver.path}))
        self.assertEqual(receiver.receive(), "READY=1")

    def test_notifyWithoutManager(self):
        self.assertFalse(notify("READY=1", {}))


class ActivationTests(TwistdMixin, TestCase):
    """
    The real balancer under C{systemd-socket-activate}, telling a test
    socket its state.
    """

    timeout = 60

    # Skipped without it, except under CI (CI set), which installs it.
    if ACTIVATE is None and not os.environ.get("CI"):
        skip = "systemd-socket-activate is not installed (Debian's systemd package)"

    def test_activatedAndNotified(self):
        receiver = NotifySocket(self)
        listening = os.path.join(shortFolder(self), "rr.sock")
        env = dict(self.env, NOTIFY_SOCKET=receiver.path)
        path = self.writeConfig(
            'port = "systemd:domain=UNIX:index=0"\nadmin = "none"\ndemo = true\n'
            "[health]\nenabled = false\n"
        )
        process = self.start(
            ACTIVATE, "-l", listening, "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH",
            *twistdCommand(), "-n", "--pidfile=", "rrbalancer", "--config", path,
            env=env, command=[],
        )
        # systemd-socket-activate starts the service on the first connection.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(STARTUP_TIMEOUT)
            try:
                client.connect(listening)
                break
            except OSError:
                client.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(receiver.receive(), "READY=1", self.describe(process))
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
        client.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"demo backend", answer)

        process.send_signal(signal.SIGHUP)
        reloading = receiver.receive()
        self.assertTrue(reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading)
        self.assertEqual(receiver.receive(), "READY=1")

        process.send_signal(signal.SIGTERM)
        self.assertEqual(receiver.receive(), "STOPPING=1")
        deadline = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(process.returncode, 0, self.describe(process))
