"""
Memory the balancer holds for the long run, on either interpreter.

CPython frees most garbage at once (reference counting); what is left is
the cost of its cycle collector walking the balancer's long-lived objects,
which L{settleMemory} takes out of its way.

PyPy frees nothing until a collection.  Its generational collector starts
a major collection once the old generation reaches 1.82 times what the
last one left, but never below C{PYPY_GC_MIN}, which is eight times the
nursery; and it sizes the nursery from the cache size C{/proc/cpuinfo}
reports (half of it, when that is over 2 MB).  Many hosts report the L3
cache there, tens or hundreds of megabytes, and then the first major
collection waits until the heap is hundreds of megabytes or gigabytes
large.  Under load the balancer promotes a few hundred bytes per request
to the old generation (whatever was in flight at a minor collection, the
figures appended to long-lived structures), all of it garbage a moment
later: the process grows by megabytes a second for minutes, with nothing
to reclaim it but a collection that comes far too late.  Those knobs are
environment variables, read once at start, that a process cannot change
for itself; what it can do is run the major collection sooner.
L{HeapGuard} does, in steps, once the old generation has doubled since
the last collection (close to PyPy's own 1.82, without the floor of eight
nurseries), and never below twice what it held when the balancer started.
With a small nursery PyPy gets there first, and the guard has nothing to
do.
"""

import gc
import platform
import time
from typing import Callable, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import _twisted

# How often the heap is looked at (reading it costs tens of microseconds).
CHECK_INTERVAL = 1.0
# A collection once the old generation is this many times what the last
# collection left (or what the balancer held at start, if more).
GROWTH = 2.0
# On CPython, a full collection longer than this means the long-lived
# objects made since memory was last settled are worth freezing; with a
# few backends one takes well under a millisecond.
SLOW_COLLECTION = 0.005
# A settle that thaws and collects everything, so that cycles which died
# frozen are freed: at most this often.
FULL_SETTLE_SPACING = 600.0
# A major collection is a few dozen steps with a nursery of a megabyte (a
# step marks about twice the nursery); this many means something is wrong.
MAX_STEPS = 100_000


PYPY = platform.python_implementation() == "PyPy"


def readLightly(transport, receive=None, pypy: bool = PYPY) -> None:
    """
    On PyPy, have C{transport} read without spending 64 KiB of the nursery
    a read (L{rrbalancer._twisted.readIntoOneBuffer} says why): a third
    as many minor collections, and the old generation fills several times
    more slowly.  CPython frees a read's buffer at once, and keeps
    Twisted's own reads.

    @param receive: the protocol's own C{dataReceived}, for a caller that
        knows that whatever wraps its protocol only passes the bytes on:
        a plain TCP connection's reads then go to it directly, on either
        interpreter (L{rrbalancer._twisted.readDirect}).
    """
    if pypy:
        _twisted.readIntoOneBuffer(transport, receive)
    elif receive is not None:
        _twisted.readDirect(transport, receive)


def settleMemory() -> None:
    """
    Once built, the balancer's long-lived objects (backends, pools, the
    settings) need never be looked at by the collector again: frozen, a
    full collection costs what the request traffic leaves behind, not
    tens of milliseconds per thousand backends.  Done again after a
    reload, with what was frozen before thawed first, so that backends a
    reload removed are collected.  (CPython only: PyPy's collector has no
    such generation, and L{HeapGuard} looks after its heap.)
    """
    if hasattr(gc, "freeze"):
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def freezeTracked() -> None:
    """
    Freeze every object the collector tracks: as a full collection ends,
    what survived it.
    """
    if hasattr(gc, "freeze"):
        gc.freeze()


class CollectorWatch(Service):
    """
    Freezes what a full collection of CPython's cycle collector found
    alive, when that collection was slow.

    Settling once at start freezes what the balancer built, but not what
    it makes afterwards and keeps: its connections to the backends, opened
    when the checks and the traffic first reach each one.  With a thousand
    backends that is tens of thousands of objects, and every full
    collection walks them all: a pause of 5 to 20 ms, one every second or
    two under load, which is the p99 of every request it falls on.  Frozen,
    they are out of the way, and a full collection costs what the requests
    in flight leave, a fraction of a millisecond.

    The freeze is done in the collector's own callback, as the slow
    collection ends: what is tracked then is exactly what survived it, and
    freezing it only relinks the collector's lists.  (Left to the event
    loop, it needed a collection of its own first, to tell survivors from
    garbage made since: a second pause as long as the slow one.)  Cycles
    among frozen objects that die later stay until a full settle
    (C{settle}, L{settleMemory}), which thaws and collects everything: a
    third of a second at ten thousand backends, a pause every client
    sees, so it runs from the event loop, after a slow collection at least
    C{fullSpacing} seconds after the last.

    @ivar settles: how many times the watch froze or settled memory.
    """

    settles = 0

    def __init__(
        self,
        clock: IReactorTime,
        callbacks: list,
        settle: Callable[[], None] = settleMemory,
        timer: Callable[[], float] = time.perf_counter,
        slow: float = SLOW_COLLECTION,
        freeze: Callable[[], None] = freezeTracked,
        fullSpacing: float = FULL_SETTLE_SPACING,
    ) -> None:
        self._clock = clock
        self._callbacks = callbacks
        self._settle = settle
        self._freeze = freeze
        self._timer = timer
        self.slow = slow
        self.fullSpacing = fullSpacing
        self._began = 0.0
        self._lastFull: Optional[float] = None
        self._pending: Optional[IDelayedCall] = None

    def startService(self) -> None:
        Service.startService(self)
        # The service settles fully as it starts.
        self._lastFull = self._clock.seconds()
        self._callbacks.append(self._observe)

    def stopService(self):
        if self._observe in self._callbacks:
            self._callbacks.remove(self._observe)
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return Service.stopService(self)

    def _observe(self, phase: str, info: dict) -> None:
        # Called by the collector itself, in the middle of whatever code
        # allocated: a freeze is safe there (the collection is over, and it
        # allocates nothing), a collection is not.
        if phase == "start":
            self._began = self._timer()
            return
        if info.get("generation") != 2 or self._pending is not None:
            return
        if self._timer() - self._began < self.slow:
            return
        now = self._clock.seconds()
        if self._lastFull is None or now - self._lastFull >= self.fullSpacing:
            self._pending = self._clock.callLater(0, self._settleFully)
            return
        self.settles += 1
        self._freeze()

    def _settleFully(self) -> None:
        self._pending = None
        self._lastFull = self._clock.seconds()
        self.settles += 1
        self._settle()


def collectorWatch(clock: IReactorTime, gcModule=gc) -> Optional[CollectorWatch]:
    """
    A L{CollectorWatch} on CPython's collector, or None where there is no
    such collector to watch (PyPy).
    """
    if not hasattr(gcModule, "freeze"):
        return None
    return CollectorWatch(clock, gcModule.callbacks)


def pypyHeap(gcModule=gc) -> Optional[Tuple[Callable[[], int], Callable[[], bool]]]:
    """
    The two things L{HeapGuard} needs from PyPy's collector, or None on an
    interpreter without them (CPython).

    @return: C{(heapSize, collectStep)}: the bytes of the old generation
        (arenas and large objects, without the nursery, which is always
        there whole), and one step of a major collection, true when the
        collection is complete.
    """
    stats = getattr(gcModule, "_get_stats", None)
    step = getattr(gcModule, "collect_step", None)
    if stats is None or step is None:
        return None

    def heapSize() -> int:
        # _get_stats holds the numbers; get_stats formats them as text.
        s = stats()
        return s.total_arena_memory + s.total_rawmalloced_memory

    def collectStep() -> bool:
        return bool(step().major_is_done)

    return heapSize, collectStep


class HeapGuard(Service):
    """
    Runs a major collection whenever the old generation has grown to
    C{growth} times what the last collection left, or what the balancer
    held when it started, whichever is more.

    The collection runs a step at a time, the event loop turning between
    two steps, so that requests keep moving while it runs.  The size is
    read every C{interval} seconds; while PyPy runs a major collection of
    its own, the size it reports is small (it counts again from nothing
    while it sweeps), so the guard stays out of its way.

    @ivar floor: the old generation's size when the guard started.
    @ivar bound: the size past which the next collection starts.
    @ivar collections: the collections the guard ran.
    @ivar lastLive: the size a collection of the guard left last (None
        before the first).
    """

    log = Logger()

    floor = 0
    bound = 0
    collections = 0
    lastLive: Optional[int] = None

    def __init__(
        self,
        clock: IReactorTime,
        heapSize: Callable[[], int],
        collectStep: Callable[[], bool],
        interval: float = CHECK_INTERVAL,
        growth: float = GROWTH,
        maxSteps: int = MAX_STEPS,
    ) -> None:
        self._clock = clock
        self._heapSize = heapSize
        self._collectStep = collectStep
        self.interval = interval
        self.growth = growth
        self._maxSteps = maxSteps
        self._loop: Optional[LoopingCall] = None
        self._next: Optional[IDelayedCall] = None
        self._steps = 0
        self._collecting = False

    @property
    def collecting(self) -> bool:
        return self._collecting

    def startService(self) -> None:
        Service.startService(self)
        self.floor = self._heapSize()
        self.bound = int(self.floor * self.growth)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._collecting = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        return Service.stopService(self)

    def check(self) -> None:
        """
        Start a collection if the old generation is past the bound.
        """
        if self._collecting:
            return
        if self._heapSize() > self.bound:
            self._collecting = True
            self._steps = 0
            self._step()

    def _step(self) -> None:
        self._next = None
        self._steps += 1
        try:
            done = self._collectStep()
        except Exception:
            # A collection step runs the interpreter's collection hooks,
            # which may be anyone's code; the guard must not stay stuck in
            # a collection that will never end.
            self.log.failure("memory: a collection step failed")
            self._rebound(self._heapSize())
            return
        if done:
            self.collections += 1
            self.lastLive = self._heapSize()
            self._rebound(self.lastLive)
        elif not self._collecting:
            pass  # stopped during the step
        elif self._steps >= self._maxSteps:
            self.log.warn(
                "memory: a major collection was not done after {steps} steps; "
                "left to the interpreter",
                steps=self._steps,
            )
            # Not tried again before the heap has grown as much once more.
            self._rebound(self._heapSize())
        else:
            self._next = self._clock.callLater(0, self._step)

    def _rebound(self, size: int) -> None:
        self._collecting = False
        self.bound = int(max(size, self.floor) * self.growth)


def heapGuard(clock: IReactorTime, gcModule=gc) -> Optional[HeapGuard]:
    """
    A L{HeapGuard} on PyPy's collector, or None where there is no need
    for one (CPython).
    """
    heap = pypyHeap(gcModule)
    if heap is None:
        return None
    return HeapGuard(clock, *heap)
