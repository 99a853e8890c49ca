"""
The queue of requests waiting for a backend with room (HAProxy's server
C{maxconn} and backend queue).

With C{--max-conns}, a backend with that many requests in flight is full:
no policy picks it.  A request that finds every backend full waits here, in
arrival order, for one of them to finish a request; a full queue refuses at
once, and a wait longer than C{--queue-timeout} gives up.  Both end in a
C{503} the client can tell apart by its text, and the log says which.
"""

from collections import deque
from typing import Deque, Dict, List

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


class QueueFull(Exception):
    """
    Every backend is full and so is the queue.
    """


class QueueTimeout(Exception):
    """
    The request waited its C{--queue-timeout} without a backend coming free.
    """


# Upper bounds (seconds) of the queue wait histogram.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)


class RequestQueue:
    """
    Requests waiting for room, served oldest first.

    @ivar counts: C{rejected} (the queue was full), C{timeouts},
        C{abandoned} (the client left while waiting), C{served}.
    @ivar waits: how many waits ended within each of L{WAIT_BUCKETS} (and
        their sum), for the served ones.
    """

    def __init__(self, size: int, timeout: float, clock: IReactorTime) -> None:
        self.size = size
        self.timeout = timeout
        self._clock = clock
        self._waiting: Deque[Deferred] = deque()
        self._since: Dict[Deferred, float] = {}
        self._timers: Dict[Deferred, object] = {}
        self.peak = 0
        self.counts = dict.fromkeys(("served", "rejected", "timeouts", "abandoned"), 0)
        self.waits: List[int] = [0] * (len(WAIT_BUCKETS) + 1)
        self.waitSum = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self, first: bool = False) -> Deferred:
        """
        A place in the queue: fires when it is this request's turn, fails
        with L{QueueFull} or L{QueueTimeout}; cancel it to leave.

        @param first: at the head of the queue (a request whose turn came
            and found the room taken again).
        """
        if len(self._waiting) >= self.size:
            self.counts["rejected"] += 1
            d = Deferred()
            d.errback(QueueFull())
            return d
        d = Deferred(self._leave)
        if first:
            self._waiting.appendleft(d)
        else:
            self._waiting.append(d)
        self._since.setdefault(d, self._clock.seconds())
        self._timers[d] = self._clock.callLater(self.timeout, self._expire, d)
        self.peak = max(self.peak, len(self._waiting))
        return d

    def _forget(self, d: Deferred) -> float:
        timer = self._timers.pop(d, None)
        if timer is not None and timer.active():
            timer.cancel()
        return self._clock.seconds() - self._since.pop(d, self._clock.seconds())

    def _leave(self, d: Deferred) -> None:
        # Cancelled: the client went away.
        if d in self._timers:
            self._waiting.remove(d)
            self._forget(d)
            self.counts["abandoned"] += 1

    def _expire(self, d: Deferred) -> None:
        del self._timers[d]
        self._waiting.remove(d)
        self._since.pop(d, None)
        self.counts["timeouts"] += 1
        d.errback(QueueTimeout())

    def serve(self) -> None:
        """
        A backend has room: the oldest request's turn.
        """
        if not self._waiting:
            return
        d = self._waiting.popleft()
        waited = self._forget(d)
        self.counts["served"] += 1
        self.waitSum += waited
        for i, bound in enumerate(WAIT_BUCKETS):
            if waited <= bound:
                self.waits[i] += 1
                break
        else:
            self.waits[-1] += 1
        d.callback(waited)

    def clear(self) -> None:
        """
        Stop every wait (the balancer stops): each gets L{QueueTimeout}.
        """
        while self._waiting:
            d = self._waiting.popleft()
            self._forget(d)
            d.errback(QueueTimeout())

