"""
Slow start: a backend that comes up takes its weight a share at a time.

A backend that has just come up (recovered, re-enabled, added at run time)
has cold caches and no connections yet; sent its whole share of the traffic
at once, it may fall over again.  So its weight ramps up from a tenth to
all of it over the group's C{slow_start} seconds, as NGINX Plus's
C{slow_start} and HAProxy's C{slowstart} do.
"""

from typing import Callable, Optional, Set

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class SlowStart:
    """
    The ramps under way in one group, and the one timer that moves them on.

    The candidates a policy picks from hold each backend's weight as it was
    when the backend was last placed among them, so that a pick never
    computes a weight.  A ramping backend is therefore placed again as its
    share grows, every step (ten steps a ramp at least, a second apart at
    most): the cost is per ramping backend and step, not per pick.

    A backend ramps while its C{rampStart} is set; it is among the ramping
    ones exactly then.

    @ivar seconds: how long a ramp lasts; 0 is off.  Ramps under way when it
        is turned off end at their next step.
    """

    def __init__(
        self, clock: IReactorTime, seconds: float, replace: Callable[[object], None]
    ) -> None:
        """
        @param replace: places a backend among the candidates again, with
            its weight as it is now (the group's C{_place}).
        """
        self.seconds = seconds
        self._clock = clock
        self._replace = replace
        self._ramping: Set = set()
        self._call: Optional[IDelayedCall] = None

    def begin(self, backend) -> None:
        """
        C{backend} has just joined the candidates: it ramps from now on.
        """
        backend.rampStart = self._clock.seconds()
        self._ramping.add(backend)
        self._schedule()

    def end(self, backend) -> None:
        """
        C{backend} has left the candidates (down, ejected, disabled, gone):
        should it come back, it ramps from the start again.
        """
        backend.rampStart = None
        self._ramping.discard(backend)

    def weight(self, backend, weight: int) -> float:
        """
        The share of C{weight} a ramping C{backend} takes now: a tenth when
        it joined, all of it C{seconds} later (when its ramp ends).
        """
        elapsed = self._clock.seconds() - backend.rampStart
        if elapsed >= self.seconds:
            self.end(backend)
            return weight
        return weight * (0.1 + 0.9 * elapsed / self.seconds)

    def fraction(self, backend) -> float:
        """
        The share of its weight C{backend} takes now, as the figures show
        it: 1 unless it ramps.  Unlike L{weight}, this reads the ramp
        without moving it on.
        """
        if backend.rampStart is None or not self.seconds:
            return 1.0
        elapsed = self._clock.seconds() - backend.rampStart
        return min(1.0, 0.1 + 0.9 * elapsed / self.seconds)

    def stop(self) -> None:
        """
        Cancel the timer, as the balancer stops.
        """
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _schedule(self) -> None:
        if self._call is None and self._ramping:
            # Ten steps at least, a second apart at most.
            step = min(1.0, self.seconds / 10)
            self._call = self._clock.callLater(step, self._step)

    def _step(self) -> None:
        self._call = None
        for backend in list(self._ramping):
            self._replace(backend)
        self._schedule()
