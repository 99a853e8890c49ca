"""
What a backend's responses looked like: counters since start (for
Prometheus) and recent figures (for the admin API and the dashboard).

Kept apart from the server model (L{rrbalancer.backends}): the model
decides where requests go, these figures only describe what happened.
"""

import math
from bisect import bisect_left
from collections import deque
from itertools import chain
from typing import Dict, List, Optional, Sequence

from twisted.internet.interfaces import IReactorTime

# Recent statistics: latency percentiles and the error rate are over the
# last WINDOW seconds, requests per second over the last RATE_WINDOW, and
# the history keeps HISTORY_POINTS steps of HISTORY_STEP seconds.
WINDOW = 60.0
RATE_WINDOW = 10.0
HISTORY_STEP = 10.0
HISTORY_POINTS = 30
# At most this many latency samples are kept for the percentiles (the most
# recent ones): enough for a p99 that means something, bounded in memory.
MAX_SAMPLES = 4096

# Upper bounds, in seconds, of the request duration histogram's buckets
# (the Prometheus client's defaults, and 30 s: the default backend timeout).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 30.0, math.inf,
)


_NO_DURATIONS = (0,) * len(DURATION_BUCKETS)


def statusClass(code: int) -> str:
    """
    C{"2xx"} for 204 and so on; C{"error"} for an exchange that broke after
    its response had started (code 0).
    """
    if 100 <= code <= 599:
        return f"{code // 100}xx"
    return "error"


def percentile(ordered: List[float], fraction: float) -> Optional[float]:
    """
    The nearest-rank percentile of sorted values, or None without any.
    """
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class BackendStats:
    """
    What a backend's responses looked like: counters since start (for
    Prometheus) and recent figures (for the admin API and the dashboard).

    Recent counts are kept in one-second slots for the last C{WINDOW}
    seconds (the rate and the error rate are read from them), and before
    that in steps of C{HISTORY_STEP} seconds, as long as the history goes
    back; latencies as samples for the last C{WINDOW} seconds.

    A balancer may have thousands of backends that take few requests (or
    only backups that take none): what a backend without recent requests
    holds is kept small, its recent figures allocated on first use.
    """

    __slots__ = (
        "_clock",
        "started",
        "responses",
        "buckets",
        "durationSum",
        "durationCount",
        "bytesIn",
        "bytesOut",
        "_slots",
        "_steps",
        "_samples",
    )

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.started = clock.seconds()
        # Since start.
        self.responses: Dict[str, int] = {}
        self.buckets: Sequence[int] = _NO_DURATIONS
        self.durationSum = 0.0
        self.durationCount = 0
        self.bytesIn = 0
        self.bytesOut = 0
        # Recent: (second, requests, errors, latency sum, latency count)
        # slots, the same by step before them, and (when, seconds) samples;
        # empty tuples until the first.
        self._slots: Sequence[tuple] = ()
        self._steps: Sequence[tuple] = ()
        self._samples: Sequence[tuple] = ()

    def _count(self, now: float, errors: int, seconds: float, answered: int) -> None:
        """
        Add one request to the current second's slot.

        A slot is a tuple, replaced rather than changed: the collector
        stops tracking a tuple of numbers at its first look, where it would
        walk a list for as long as the history keeps it.  With thousands of
        backends each request opens a slot of its own, kept five minutes:
        lists, they were hundreds of thousands of objects that every full
        collection walked, a pause of a tenth of a second and more.

        Past the window a slot is folded into its step of the history: a
        backend taking a request every few seconds keeps a minute of
        slots and five of steps, not five minutes of slots (at ten
        thousand backends, a million tuples).
        """
        second = math.floor(now)
        slots = self._slots
        if not slots:
            slots = self._slots = deque()
        elif slots[-1][0] == second:
            _, requests, errs, total, count = slots[-1]
            slots[-1] = (second, requests + 1, errs + errors, total + seconds, count + answered)
            return
        slots.append((second, 1, errors, seconds, answered))
        horizon = second - WINDOW
        while slots[0][0] < horizon:
            self._fold(slots.popleft())

    def _fold(self, slot: tuple) -> None:
        """
        Add a slot that has left the window to its step of the history.
        """
        second, requests, errors, total, count = slot
        step = math.floor(second / HISTORY_STEP) * HISTORY_STEP
        steps = self._steps
        if not steps:
            steps = self._steps = deque()
        elif steps[-1][0] == step:
            _, r, e, t, c = steps[-1]
            steps[-1] = (step, r + requests, e + errors, t + total, c + count)
            return
        steps.append((step, requests, errors, total, count))
        horizon = step - HISTORY_STEP * (HISTORY_POINTS + 1)
        while steps[0][0] < horizon:
            steps.popleft()

    def recordResponse(self, code: int, seconds: float, bytesIn: int, bytesOut: int) -> None:
        kind = statusClass(code)
        self.responses[kind] = self.responses.get(kind, 0) + 1
        seconds = max(0.0, seconds)
        buckets = self.buckets
        if buckets is _NO_DURATIONS:
            buckets = self.buckets = list(_NO_DURATIONS)
        # The first bucket whose upper bound is at least C{seconds}.
        buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.durationSum += seconds
        self.durationCount += 1
        self.bytesIn += bytesIn
        self.bytesOut += bytesOut
        now = self._clock.seconds()
        self._count(now, 1 if kind in ("5xx", "error") else 0, seconds, 1)
        samples = self._samples
        if not samples:
            samples = self._samples = deque()
        samples.append((now, seconds))
        # Older than the window, a sample is of no use: dropped here, not
        # only when the percentiles are read, which for most of ten
        # thousand backends is never (each kept every sample up to
        # MAX_SAMPLES, for hours, the balancer growing by megabytes a
        # minute under load).
        horizon = now - WINDOW
        while samples[0][0] < horizon:
            samples.popleft()
        if len(samples) > MAX_SAMPLES:
            samples.popleft()

    def recordFailure(self) -> None:
        """
        A request this backend could not take (no connection, no answer):
        it counts as a request and an error in the recent figures.
        """
        self._count(self._clock.seconds(), 1, 0.0, 0)

    def _recent(self, seconds: float):
        since = self._clock.seconds() - seconds
        return [s for s in self._slots if s[0] >= since]

    def requestsPerSecond(self) -> float:
        now = self._clock.seconds()
        span = min(RATE_WINDOW, max(1.0, now - self.started))
        return sum(s[1] for s in self._recent(span)) / span

    def errorRate(self) -> float:
        """
        The share of the last minute's requests that failed (5xx, broken or
        never answered); 0 without requests.
        """
        slots = self._recent(WINDOW)
        total = sum(s[1] for s in slots)
        return sum(s[2] for s in slots) / total if total else 0.0

    def latency(self) -> Dict[str, Optional[float]]:
        """
        p50 and p99 in milliseconds over the last minute (None without any
        response in it).
        """
        since = self._clock.seconds() - WINDOW
        samples = self._samples
        while samples and samples[0][0] < since:
            samples.popleft()
        ordered = sorted(s for _, s in samples)
        result = {}
        for name, fraction in (("p50", 0.5), ("p99", 0.99)):
            value = percentile(ordered, fraction)
            result[name] = None if value is None else round(value * 1000, 3)
        return result

    def history(self) -> List[dict]:
        """
        The last C{HISTORY_POINTS} whole steps, oldest first (fewer for a
        backend that has not been there that long): requests per second,
        errors per second and mean latency (ms) in each.
        """
        now = self._clock.seconds()
        current = math.floor(now / HISTORY_STEP) * HISTORY_STEP
        first = current - HISTORY_STEP * HISTORY_POINTS
        steps = [[0, 0, 0.0, 0] for _ in range(HISTORY_POINTS)]
        for second, requests, errors, latency, count in chain(self._steps, self._slots):
            index = int((second - first) // HISTORY_STEP)
            if 0 <= index < HISTORY_POINTS:
                step = steps[index]
                step[0] += requests
                step[1] += errors
                step[2] += latency
                step[3] += count
        return [
            {
                "t": first + i * HISTORY_STEP,
                "rps": round(requests / HISTORY_STEP, 3),
                "errors": round(errors / HISTORY_STEP, 3),
                "latency_ms": round(latency / count * 1000, 3) if count else None,
            }
            for i, (requests, errors, latency, count) in enumerate(steps)
            if first + (i + 1) * HISTORY_STEP > self.started
        ]


class RateMeter:
    """
    Events a second over the last L{RATE_WINDOW} seconds (a listener's
    requests), at the cost of a comparison and an addition per event.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._slots: deque = deque()
        self.started = clock.seconds()
        self.total = 0

    def mark(self) -> None:
        self.total += 1
        second = math.floor(self._clock.seconds())
        slots = self._slots
        if slots and slots[-1][0] == second:
            slots[-1][1] += 1
            return
        slots.append([second, 1])
        while slots[0][0] < second - RATE_WINDOW:
            slots.popleft()

    def perSecond(self) -> float:
        # Marks are kept by whole second, so the window starts on one: a
        # mark made in the second that the window's start falls in counts,
        # and so does the part of that second it covers.
        now = self._clock.seconds()
        start = math.floor(now - min(RATE_WINDOW, max(1.0, now - self.started)))
        count = sum(count for second, count in self._slots if second >= start)
        return count / max(1.0, now - max(start, self.started))
