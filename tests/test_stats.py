"""
Tests for L{rrbalancer.stats}: what a backend's responses looked like,
recent and since start, on a L{Clock}.
"""

import gc
import platform

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from rrbalancer.stats import (
    HISTORY_POINTS,
    HISTORY_STEP,
    MAX_SAMPLES,
    BackendStats,
    percentile,
    statusClass,
)


class StatsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.stats = BackendStats(self.clock)

    def test_statusClass(self):
        self.assertEqual([statusClass(c) for c in (101, 200, 302, 404, 503, 0)],
                         ["1xx", "2xx", "3xx", "4xx", "5xx", "error"])

    def test_percentile(self):
        self.assertIsNone(percentile([], 0.5))
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 0.5), 50)
        self.assertEqual(percentile(values, 0.99), 99)
        self.assertEqual(percentile([7], 0.99), 7)

    def test_latencyWindow(self):
        """
        p50 and p99 are over the last minute only.
        """
        for ms in range(1, 101):
            self.stats.recordResponse(200, ms / 1000, 0, 0)
        self.assertEqual(self.stats.latency(), {"p50": 50.0, "p99": 99.0})
        self.clock.advance(30)
        for _ in range(100):
            self.stats.recordResponse(200, 0.5, 0, 0)
        self.assertEqual(self.stats.latency(), {"p50": 100.0, "p99": 500.0})
        self.clock.advance(31)
        self.assertEqual(self.stats.latency(), {"p50": 500.0, "p99": 500.0})
        self.clock.advance(60)
        self.assertEqual(self.stats.latency(), {"p50": None, "p99": None})

    def test_samplesBounded(self):
        for _ in range(MAX_SAMPLES + 10):
            self.stats.recordResponse(200, 0.001, 0, 0)
        self.assertEqual(len(self.stats._samples), MAX_SAMPLES)

    def test_samplesKeptForTheWindowOnly(self):
        """
        Samples older than the window are dropped as new ones come, whether
        or not the percentiles are ever read: a backend taking a request
        every few seconds holds a minute of them, not hours'.
        """
        for _ in range(600):
            self.stats.recordResponse(200, 0.001, 0, 0)
            self.clock.advance(2.5)
        self.assertEqual(len(self.stats._samples), 25)

    def test_requestsPerSecond(self):
        self.clock.advance(100)
        for _ in range(50):
            self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.requestsPerSecond(), 5.0)
        self.clock.advance(11)
        self.assertEqual(self.stats.requestsPerSecond(), 0.0)

    def test_requestsPerSecondWhenNew(self):
        """
        A new backend's rate is over the time it has existed.
        """
        self.clock.advance(2)
        for _ in range(10):
            self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.requestsPerSecond(), 5.0)

    def test_errorRate(self):
        """
        5xx answers, broken exchanges and failed connections are errors.
        """
        self.assertEqual(self.stats.errorRate(), 0.0)
        for code in (200, 200, 200, 404, 503, 0):
            self.stats.recordResponse(code, 0.01, 0, 0)
        self.stats.recordFailure()
        self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.errorRate(), 3 / 8)
        self.clock.advance(61)
        self.assertEqual(self.stats.errorRate(), 0.0)

    def test_history(self):
        """
        The history has the last minutes in steps, oldest first, whole
        steps only.
        """
        self.clock.advance(HISTORY_STEP * HISTORY_POINTS)
        start = self.clock.seconds()
        for _ in range(20):
            self.stats.recordResponse(200, 0.002, 0, 0)
        self.stats.recordResponse(500, 0.004, 0, 0)
        history = self.stats.history()
        self.assertEqual(len(history), HISTORY_POINTS)
        self.assertEqual(sum(p["rps"] for p in history), 0)  # the step is not over
        self.clock.advance(HISTORY_STEP)
        history = self.stats.history()
        self.assertEqual(len(history), HISTORY_POINTS)
        self.assertEqual(history[-1]["t"], start)
        self.assertEqual(history[-1]["rps"], 21 / HISTORY_STEP)
        self.assertEqual(history[-1]["errors"], 1 / HISTORY_STEP)
        self.assertAlmostEqual(history[-1]["latency_ms"], (20 * 2 + 4) / 21, places=3)
        self.assertEqual([p["rps"] for p in history[:-1]], [0] * (HISTORY_POINTS - 1))
        self.assertIsNone(history[0]["latency_ms"])
        self.clock.advance(HISTORY_STEP * HISTORY_POINTS)
        self.assertEqual(sum(p["rps"] for p in self.stats.history()), 0)

    def test_historySinceStart(self):
        """
        A new backend's history starts when it does.
        """
        self.assertEqual(self.stats.history(), [])
        self.clock.advance(HISTORY_STEP * 2)
        history = self.stats.history()
        self.assertEqual(len(history), 2)
        self.assertEqual(history[0]["t"], 1000)

    def test_slotsBounded(self):
        for _ in range(int(HISTORY_STEP * HISTORY_POINTS * 3)):
            self.stats.recordResponse(200, 0.001, 0, 0)
            self.clock.advance(1)
        self.assertLessEqual(len(self.stats._slots), HISTORY_STEP * (HISTORY_POINTS + 1) + 1)

    def test_slotsFoldedIntoSteps(self):
        """
        Past the window, slots are folded into the history's steps: a
        backend taking a request every 2.5 s keeps a minute of slots and
        the history's steps, and its history is what it was.
        """
        self.clock.advance(HISTORY_STEP * HISTORY_POINTS)
        for _ in range(int(HISTORY_STEP * HISTORY_POINTS * 2 / 2.5)):
            self.stats.recordResponse(200, 0.002, 0, 0)
            self.clock.advance(2.5)
        self.assertLessEqual(len(self.stats._slots), 25)
        self.assertLessEqual(len(self.stats._steps), HISTORY_POINTS + 2)
        history = self.stats.history()
        self.assertEqual(len(history), HISTORY_POINTS)
        self.assertEqual({p["rps"] for p in history}, {4 / HISTORY_STEP})
        self.assertEqual({p["latency_ms"] for p in history}, {2.0})
        gc.collect()
        if platform.python_implementation() == "CPython":
            self.assertEqual([s for s in self.stats._steps if gc.is_tracked(s)], [])

    def test_slotsOutOfTheCollectorsWay(self):
        """
        What a backend keeps of its recent seconds is no work for CPython's
        cycle collector once it has looked at it: with thousands of
        backends, nearly every request opens a slot of its own, kept for
        minutes, and tracked objects by the hundred thousand made every
        full collection slow.
        """
        if platform.python_implementation() != "CPython":
            raise SkipTest("CPython's collector only")
        for _ in range(5):
            self.stats.recordResponse(200, 0.001, 0, 0)
            self.stats.recordFailure()
            self.clock.advance(1)
        gc.collect()
        self.assertEqual(len(self.stats._slots), 5)
        self.assertEqual([s for s in self.stats._slots if gc.is_tracked(s)], [])
        self.assertEqual(self.stats._slots[-1][1:3], (2, 1))

    def test_counters(self):
        self.stats.recordResponse(200, 0.003, 10, 100)
        self.stats.recordResponse(404, 0.2, 0, 5)
        self.stats.recordResponse(0, 40, 7, 1)
        self.assertEqual(self.stats.responses, {"2xx": 1, "4xx": 1, "error": 1})
        self.assertEqual((self.stats.bytesIn, self.stats.bytesOut), (17, 106))
        self.assertEqual(self.stats.durationCount, 3)
        self.assertAlmostEqual(self.stats.durationSum, 40.203)
        self.assertEqual(sum(self.stats.buckets), 3)
        self.assertEqual(self.stats.buckets[0], 1)  # <= 5 ms
        self.stats.recordResponse(200, 0.01, 0, 0)  # a bucket's bound is in it
        self.assertEqual(self.stats.buckets[1], 1)
        self.assertEqual(self.stats.buckets[-1], 1)  # +Inf


class RateMeterTests(SynchronousTestCase):
    def test_perSecond(self):
        from rrbalancer.stats import RateMeter

        clock = Clock()
        clock.advance(100)
        meter = RateMeter(clock)
        for _ in range(5):
            meter.mark()
        # Less than a second since it started: counted over one second.
        self.assertEqual(meter.perSecond(), 5)
        for _ in range(20):
            clock.advance(1)
            meter.mark()
        # Ten seconds' window from a whole second, both ends marked.
        self.assertEqual(meter.perSecond(), 1.1)
        self.assertEqual(meter.total, 25)
        clock.advance(60)
        self.assertEqual(meter.perSecond(), 0)

    def test_markInTheSecondBefore(self):
        """
        Marks made late in one second still count early in the next: the
        meter keeps whole seconds, and a window that starts part-way into
        one must not drop it.
        """
        from rrbalancer.stats import RateMeter

        clock = Clock()
        clock.advance(100.9)
        meter = RateMeter(clock)
        for _ in range(3):
            meter.mark()
        clock.advance(0.2)
        self.assertEqual(meter.perSecond(), 3)
        clock.advance(200)
        for _ in range(21):
            meter.mark()
            clock.advance(0.5)
        # Two marks a second; the window starts on the whole second before
        # the first of them and holds all 21, made over 10.6 s.
        self.assertAlmostEqual(meter.perSecond(), 21 / 10.6)
