"""
Tests for L{rrbalancer.memory}: L{HeapGuard} on a L{Clock} over a fake
collector whose heap the tests set, and the binding to PyPy's collector
(on a fake C{gc} module, and on the real one under PyPy); L{CollectorWatch}
fed the collections CPython's collector reports.
"""

import gc
import platform
import weakref
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer.memory import GROWTH, CollectorWatch, HeapGuard, collectorWatch, heapGuard, pypyHeap

MB = 1024 * 1024


class FakeCollector:
    """
    A heap that grows when the test says, and a major collection that
    takes C{steps} steps and leaves C{live} bytes.
    """

    def __init__(self, size: int, steps: int = 3) -> None:
        self.size = size
        self.live = size
        self.steps = steps
        self.stepsTaken = 0
        self._left = 0

    def heapSize(self) -> int:
        return self.size

    def collectStep(self) -> bool:
        self.stepsTaken += 1
        if self._left == 0:
            self._left = self.steps
        self._left -= 1
        if self._left == 0:
            self.size = self.live
            return True
        return False


class HeapGuardTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.heap = FakeCollector(40 * MB)
        self.guard = HeapGuard(
            self.clock, self.heap.heapSize, self.heap.collectStep, interval=1.0, growth=2.0
        )
        self.guard.startService()
        self.addCleanup(self.guard.stopService)

    def finishCollection(self) -> None:
        """
        Turn the event loop until no step is waiting (bounded).
        """
        for _ in range(100):
            if not self.guard.collecting:
                return
            self.clock.advance(0)
        self.fail("the collection never ended")

    def test_boundFromTheStart(self):
        """
        The bound is twice what the old generation held at start.
        """
        self.assertEqual(self.guard.floor, 40 * MB)
        self.assertEqual(self.guard.bound, 80 * MB)
        self.assertEqual(GROWTH, 2.0)

    def test_belowTheBound(self):
        """
        Up to the bound, nothing is collected, however long it runs.
        """
        self.heap.size = 80 * MB
        for _ in range(60):
            self.clock.advance(1.0)
        self.assertEqual((self.heap.stepsTaken, self.guard.collections), (0, 0))

    def test_pastTheBound(self):
        """
        Past the bound, the next check runs a collection to its end.
        """
        self.heap.size = 81 * MB
        self.heap.live = 50 * MB
        self.clock.advance(0.9)
        self.assertEqual(self.heap.stepsTaken, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.heap.stepsTaken, 3)
        self.assertFalse(self.guard.collecting)
        self.assertEqual(self.guard.collections, 1)
        self.assertEqual(self.guard.lastLive, 50 * MB)

    def test_stepByStep(self):
        """
        Each step is a call of its own on the event loop: what else is due
        (a request's data, its timers) runs between two steps.
        """
        order = []
        step = self.heap.collectStep

        def recordedStep():
            order.append("step")
            return step()

        self.guard._collectStep = recordedStep
        self.clock.callLater(1.0, order.append, "other")
        self.clock.callLater(1.0, order.append, "other")
        self.heap.size = 100 * MB
        self.clock.advance(1.0)
        self.assertEqual(order, ["step", "other", "other", "step", "step"])

    def test_boundFollowsTheLiveHeap(self):
        """
        After a collection the bound is twice what it left: a heap that
        holds more (more backends, more connections) is not collected
        over and over.
        """
        self.heap.size = 200 * MB
        self.heap.live = 100 * MB
        self.clock.advance(1.0)
        self.finishCollection()
        self.assertEqual(self.guard.bound, 200 * MB)
        self.heap.size = 200 * MB
        self.clock.advance(5.0)
        self.assertEqual(self.guard.collections, 1)
        self.heap.size = 201 * MB
        self.clock.advance(1.0)
        self.finishCollection()
        self.assertEqual(self.guard.collections, 2)

    def test_neverBelowTheStart(self):
        """
        A collection that leaves less than the start held does not lower
        the bound under twice the start.
        """
        self.heap.size = 90 * MB
        self.heap.live = 10 * MB
        self.clock.advance(1.0)
        self.finishCollection()
        self.assertEqual(self.guard.bound, 80 * MB)

    def test_growthUnderLoad(self):
        """
        A heap that grows by 5 MB a second, 30 MB of it live, is kept
        under the bound: a collection about every ten seconds, and never
        more than the bound plus one interval's growth.
        """
        self.heap.live = 30 * MB
        biggest = 0
        for _ in range(120):
            self.clock.advance(1.0)
            self.finishCollection()
            self.heap.size += 5 * MB
            biggest = max(biggest, self.heap.size)
        self.assertLessEqual(biggest, 85 * MB)
        self.assertIn(self.guard.collections, range(10, 15))

    def test_oneCollectionAtATime(self):
        """
        A check while a collection runs starts no other.
        """
        step = self.heap.collectStep

        def checkingStep():
            self.guard.check()
            return step()

        self.guard._collectStep = checkingStep
        self.heap.size = 100 * MB
        self.clock.advance(1.0)
        self.assertEqual((self.heap.stepsTaken, self.guard.collections), (3, 1))

    def test_stop(self):
        """
        Stopping ends the checks and a collection under way.
        """
        step = self.heap.collectStep

        def stoppingStep():
            if self.heap.stepsTaken == 1:
                self.guard.stopService()
            return step()

        self.guard._collectStep = stoppingStep
        self.heap.size = 100 * MB
        self.clock.advance(1.0)
        self.assertEqual(self.heap.stepsTaken, 2)
        self.assertFalse(self.guard.collecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.heap.size = 200 * MB
        self.clock.advance(10.0)
        self.assertEqual((self.heap.stepsTaken, self.guard.collections), (2, 0))

    def test_givesUp(self):
        """
        A collection that never says it is done is left to the interpreter
        after C{maxSteps} steps, with a warning, and the bound is raised as
        if it had ended.
        """
        self.guard.stopService()
        heap = FakeCollector(40 * MB, steps=10**9)
        guard = HeapGuard(self.clock, heap.heapSize, heap.collectStep, maxSteps=5)
        guard.startService()
        self.addCleanup(guard.stopService)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        heap.size = 100 * MB
        self.clock.advance(1.0)
        for _ in range(10):
            self.clock.advance(0)
        self.assertEqual(heap.stepsTaken, 5)
        self.assertFalse(guard.collecting)
        self.assertEqual([e["steps"] for e in events if "steps" in e], [5])
        # Not tried again until the heap has doubled once more.
        self.assertEqual(guard.bound, 200 * MB)
        self.clock.advance(1.0)
        self.assertEqual(heap.stepsTaken, 5)
        heap.size = 201 * MB
        self.clock.advance(1.0)
        self.assertEqual(heap.stepsTaken, 10)


    def test_failingStep(self):
        """
        A step that raises (the interpreter runs collection hooks in it) is
        logged, and leaves the guard ready for the next collection rather
        than stuck in this one.
        """
        calls = []

        def failingStep():
            calls.append(None)
            if len(calls) == 2:
                raise RuntimeError("a hook failed")
            return self.heap.collectStep()

        self.guard._collectStep = failingStep
        self.heap.size = 100 * MB
        self.clock.advance(1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.guard.collecting)
        self.assertEqual((len(calls), self.guard.collections, self.guard.bound), (2, 0, 200 * MB))
        self.heap.size = 201 * MB
        self.clock.advance(1.0)
        self.assertEqual(self.guard.collections, 1)


class PyPyBindingTests(SynchronousTestCase):
    def fakeGC(self, steps):
        done = iter(steps)
        return SimpleNamespace(
            _get_stats=lambda: SimpleNamespace(
                total_arena_memory=30 * MB, total_rawmalloced_memory=5 * MB, nursery_size=64 * MB
            ),
            collect_step=lambda: SimpleNamespace(major_is_done=next(done)),
        )

    def test_heapSize(self):
        """
        The old generation is the arenas and the large objects; the
        nursery is left out.
        """
        heapSize, collectStep = pypyHeap(self.fakeGC([]))
        self.assertEqual(heapSize(), 35 * MB)

    def test_collectStep(self):
        heapSize, collectStep = pypyHeap(self.fakeGC([False, True]))
        self.assertEqual((collectStep(), collectStep()), (False, True))

    def test_noCollector(self):
        """
        Without PyPy's functions (on CPython) there is no guard.
        """
        self.assertIsNone(pypyHeap(SimpleNamespace(collect=lambda: 0)))
        self.assertIsNone(heapGuard(Clock(), SimpleNamespace(collect=lambda: 0)))

    def test_guard(self):
        guard = heapGuard(Clock(), self.fakeGC([True]))
        self.assertIsInstance(guard, HeapGuard)

    def test_thisInterpreter(self):
        """
        On PyPy the real collector is bound, and a collection run a step
        at a time ends; on CPython there is nothing to bind.
        """
        heap = pypyHeap(gc)
        if platform.python_implementation() != "PyPy":
            self.assertIsNone(heap)
            return
        heapSize, collectStep = heap
        self.assertGreater(heapSize(), 0)
        for _ in range(MAX_TEST_STEPS):
            if collectStep():
                break
        else:
            self.fail(f"no major collection ended in {MAX_TEST_STEPS} steps")


MAX_TEST_STEPS = 100_000


class _Node:
    other = None


class CollectorWatchTests(SynchronousTestCase):
    """
    L{CollectorWatch} on a L{Clock}, fed collections as CPython's
    collector reports them, with a timer the tests move.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.callbacks = []
        self.now = 0.0
        # Full settles, and settles of what is new.
        self.full = []
        self.settled = []
        self.watch = CollectorWatch(
            self.clock,
            self.callbacks,
            settle=lambda: self.full.append(self.clock.seconds()),
            freeze=lambda: self.settled.append(self.clock.seconds()),
            timer=lambda: self.now,
            slow=0.005,
            fullSpacing=600,
        )
        self.watch.startService()
        self.addCleanup(self.watch.stopService)

    def collect(self, generation: int, took: float) -> None:
        for callback in list(self.callbacks):
            callback("start", {"generation": generation})
        self.now += took
        for callback in list(self.callbacks):
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})

    def test_quickCollections(self):
        """
        Full collections that stay short settle nothing.
        """
        self.clock.advance(120)
        for _ in range(10):
            self.collect(2, 0.001)
        self.clock.advance(0)
        self.assertEqual(self.settled, [])

    def test_youngCollections(self):
        """
        Only full collections count: a slow young one settles nothing.
        """
        self.clock.advance(120)
        self.collect(1, 0.02)
        self.clock.advance(0)
        self.assertEqual(self.settled, [])

    def test_slowFullCollection(self):
        """
        A slow full collection freezes what survived it as it ends, inside
        the collector's callback: a turn of the event loop later, the
        traffic of that turn would be frozen with it.
        """
        self.clock.advance(120)
        self.collect(2, 0.02)
        self.assertEqual(self.settled, [1120])
        self.assertEqual(self.watch.settles, 1)
        self.clock.advance(0)
        self.assertEqual(self.settled, [1120])
        self.assertEqual(self.full, [])

    def test_everySlowCollection(self):
        """
        A freeze costs no collection of its own, so none waits for
        another: each slow full collection freezes what is new since.
        """
        self.collect(2, 0.02)
        self.clock.advance(1)
        self.collect(2, 0.02)
        self.collect(2, 0.001)
        self.assertEqual(self.settled, [1000, 1001])

    def test_stop(self):
        """
        Stopped, the watch leaves the collector's callbacks and settles
        nothing it had planned.
        """
        self.clock.advance(600)
        self.collect(2, 0.02)
        self.watch.stopService()
        self.clock.advance(0)
        self.assertEqual(self.callbacks, [])
        self.assertEqual(self.full, [])

    def test_thisInterpreter(self):
        """
        On CPython the watch is on the real collector's callbacks; PyPy has
        no generation to settle, and no watch.
        """
        watch = collectorWatch(self.clock)
        if platform.python_implementation() == "PyPy":
            self.assertIsNone(watch)
            return
        watch.slow = 0.0  # every full collection counts as slow
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        watch.startService()
        try:
            self.assertIn(watch._observe, gc.callbacks)
            kept, dead = [_Node()], _Node()
            kept[0].other = kept
            dead.other = dead
            dead = weakref.ref(dead)
            gc.collect()
            frozen = gc.get_freeze_count()
        finally:
            watch.stopService()
        self.assertNotIn(watch._observe, gc.callbacks)
        # Frozen from the collector's callback: what lived, not what the
        # collection freed.
        self.assertGreaterEqual(watch.settles, 1)
        self.assertGreater(frozen, 0)
        self.assertIsNone(dead())
        self.assertIsNone(collectorWatch(self.clock, SimpleNamespace(callbacks=[])))

    def test_fullSettleSpacing(self):
        """
        Slow collections freeze what is new, but one at least
        C{fullSpacing} seconds after the last full settle (the service's
        own at start counting) has the event loop thaw and collect
        everything instead.
        """
        for _ in range(12):
            self.clock.advance(60)
            self.collect(2, 0.02)
            self.clock.advance(0)
        self.assertEqual(self.full, [1600])
        self.assertEqual(len(self.settled), 11)
        self.assertEqual(self.watch.settles, 12)
        self.assertNotIn(1600, self.settled)
