"""
Tests for L{rrbalancer.lag.LagMonitor}, on a L{Clock}: a jump of the clock
past a scheduled call is exactly what a busy event loop looks like.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.lag import LagMonitor


class LagMonitorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.monitor = LagMonitor(self.clock, every=0.25, keep=10.0)
        self.monitor.start()
        self.addCleanup(self.monitor.stop)

    def test_onTime(self):
        for _ in range(8):
            self.clock.advance(0.25)
        self.assertEqual((self.monitor.lag, self.monitor.maxLag), (0.0, 0.0))
        self.assertEqual(self.monitor.samples, 8)
        self.assertEqual(self.monitor.lateSince(0.0), 0.0)

    def test_late(self):
        """
        A call that runs late measures how late; the next, scheduled from
        then, is on time again; C{maxLag} keeps the largest.
        """
        self.clock.advance(1.0)
        self.assertAlmostEqual(self.monitor.lag, 0.75)
        self.clock.advance(0.25)
        self.assertEqual(self.monitor.lag, 0.0)
        self.assertAlmostEqual(self.monitor.maxLag, 0.75)
        self.clock.advance(0.5)
        self.assertAlmostEqual(self.monitor.lag, 0.25)
        self.assertAlmostEqual(self.monitor.maxLag, 0.75)

    def test_lateSince(self):
        """
        The lateness seen from a given time on: measurements taken since,
        and the measurement overdue now.
        """
        self.clock.advance(1.0)  # 0.75 late, measured at 1.0
        self.clock.advance(0.25)
        self.assertAlmostEqual(self.monitor.lateSince(0.5), 0.75)
        self.assertEqual(self.monitor.lateSince(1.1), 0.0)
        # The next call is due at 1.5; at 1.9 it is 0.4 overdue.
        self.clock.rightNow = 1.9
        self.assertAlmostEqual(self.monitor.lateSince(1.1), 0.4)

    def test_forgetsOldLateness(self):
        self.clock.advance(1.0)
        for _ in range(60):
            self.clock.advance(0.25)
        self.assertEqual(self.monitor.lateSince(0.0), 0.0)
        self.assertEqual(len(self.monitor._recent), 0)
        self.assertAlmostEqual(self.monitor.maxLag, 0.75)

    def test_stop(self):
        self.assertTrue(self.monitor.running)
        self.monitor.stop()
        self.assertFalse(self.monitor.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.monitor.stop()
        self.clock.advance(5)
        self.assertEqual(self.monitor.lateSince(0.0), 0.0)
        self.monitor.start()
        self.monitor.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
