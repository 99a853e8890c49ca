"""
How late the event loop runs.

Everything the balancer times (a health check's timeout above all) is
measured on the event loop: when the loop is busy, a timer fires late and
an answer that arrived in time sits unread.  A L{LagMonitor} measures that
lateness, so that a timeout the balancer caused itself is not blamed on a
backend, and so that an operator can see an overloaded balancer.
"""

from collections import deque
from typing import Deque, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class LagMonitor:
    """
    Schedules a call every C{every} seconds and measures how much later
    than asked it runs.

    @ivar lag: the lateness measured last, in seconds.
    @ivar maxLag: the largest lateness measured since the monitor started.
    @ivar samples: lateness measurements taken.
    """

    def __init__(self, clock: IReactorTime, every: float = 0.25, keep: float = 60.0) -> None:
        self._clock = clock
        self.every = every
        self._keep = keep
        self.lag = 0.0
        self.maxLag = 0.0
        self.samples = 0
        # (when measured, lateness), for the last C{keep} seconds.
        self._recent: Deque[Tuple[float, float]] = deque()
        self._expected = 0.0
        self._call: Optional[IDelayedCall] = None

    @property
    def running(self) -> bool:
        return self._call is not None

    def start(self) -> None:
        if self._call is None:
            self._schedule()

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _schedule(self) -> None:
        self._expected = self._clock.seconds() + self.every
        self._call = self._clock.callLater(self.every, self._tick)

    def _tick(self) -> None:
        now = self._clock.seconds()
        lag = max(0.0, now - self._expected)
        self.lag = lag
        self.samples += 1
        if lag > self.maxLag:
            self.maxLag = lag
        recent = self._recent
        if lag > 0.0:
            recent.append((now, lag))
        horizon = now - self._keep
        while recent and recent[0][0] < horizon:
            recent.popleft()
        self._schedule()

    def lateSince(self, since: float) -> float:
        """
        The largest lateness the loop showed from C{since} to now: the
        measurements taken since then, and the measurement now overdue, if
        any.
        """
        now = self._clock.seconds()
        late = 0.0
        if self._call is not None:
            late = max(0.0, now - self._expected)
        for when, lag in reversed(self._recent):
            if when < since:
                break
            if lag > late:
                late = lag
        return late
