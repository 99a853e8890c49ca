"""
Tests for L{rrbalancer.listeners}.
"""

import io
import socket
import sys

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rrbalancer.listeners import Listener, cannotStart, describeAddress


class DescribeTests(SynchronousTestCase):
    def test_addresses(self):
        self.assertEqual(describeAddress(IPv4Address("TCP", "127.0.0.1", 8000)), "127.0.0.1:8000")
        self.assertEqual(describeAddress(IPv6Address("TCP", "::1", 8000)), "[::1]:8000")
        self.assertEqual(describeAddress(UNIXAddress(b"/run/rr.sock")), "unix:/run/rr.sock")
        self.assertIsNone(describeAddress(None))


class CannotStartTests(SynchronousTestCase):
    def test_oneLineOnTheTerminal(self):
        """
        The reason goes to the process's real standard error (twistd has
        redirected sys.stderr to its log by then), and the exit status is 1.
        """
        terminal = io.StringIO()
        self.patch(sys, "__stderr__", terminal)
        error = cannotStart("cannot listen on tcp:80: Permission denied")
        self.assertIsInstance(error, SystemExit)
        self.assertEqual(error.code, 1)
        self.assertEqual(
            terminal.getvalue(), "rrbalancer: cannot listen on tcp:80: Permission denied\n"
        )


class ListenerTests(TestCase):
    @inlineCallbacks
    def test_addressWhileListening(self):
        listener = Listener(
            "tcp:0:interface=127.0.0.1",
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            Factory(),
        )
        self.assertIsNone(listener.address())
        listener.startService()
        host, port = listener.address().rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")
        self.assertEqual(int(port), listener.port.getHost().port)
        yield listener.stopService()
        self.assertIsNone(listener.address())

    def test_portTaken(self):
        """
        A port already taken stops the start with one line naming the
        listener, with the label it was given.
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        terminal = io.StringIO()
        self.patch(sys, "__stderr__", terminal)
        listener = Listener(
            f"tcp:{port}:interface=127.0.0.1",
            TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"),
            Factory(),
            "admin",
        )
        self.assertRaises(SystemExit, listener.privilegedStartService)
        self.assertTrue(
            terminal.getvalue().startswith(
                f"rrbalancer: cannot listen on --admin tcp:{port}:interface=127.0.0.1: "
            ),
            terminal.getvalue(),
        )
        self.assertEqual(terminal.getvalue().count("\n"), 1)
