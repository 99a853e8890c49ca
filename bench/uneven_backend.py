"""
The backends of bench/uneven.py: HTTP/1.1 keep-alive servers on loopback
that answer each request after a fixed delay, so that a balancer in front
sees fast and slow servers whose own CPU is never the limit (the delay is a
timer, not work).  One process serves every port; run it under PyPy.

    pypy3 uneven_backend.py 9401:2 9402:2 9403:20
    pypy3 uneven_backend.py 9401:2 9402:2 9403:2:stall=10/2/4

PORT:DELAY_MS answers on 127.0.0.1:PORT after DELAY_MS milliseconds.
stall=EVERY/FOR/AT makes that backend stall for FOR seconds every EVERY
seconds, the first time AT seconds after the last reset: a request that
arrives during a stall is answered when the stall ends, plus the delay (a
garbage collection pause, or a noisy neighbour, seen from outside).

Each backend also answers, at once and without counting them:

- GET /__stats: {"served": N, "checks": N, "in_flight_max": N} since the
  last reset (checks are requests for /health, the balancers' health
  checks, kept apart from the requests counted as served);
- GET /__reset: zero the counts, and start the stall schedule again now,
  so that every balancer measured meets the stalls at the same moments.
"""

import argparse
import json
import math
import sys
from collections import deque

from twisted.internet.protocol import Factory, Protocol

MAX_HEAD = 65536


class Schedule:
    """
    When a backend answers a request that arrives at a given time: its
    delay, plus the rest of a stall under way.
    """

    def __init__(self, delay, every=0.0, stallFor=0.0, at=0.0):
        self.delay = delay
        self.every = every
        self.stallFor = stallFor
        self.at = at
        self.origin = 0.0

    def due(self, now):
        t = now - self.origin
        if self.every and t >= self.at:
            phase = (t - self.at) % self.every
            if phase < self.stallFor:
                return now + (self.stallFor - phase) + self.delay
        return now + self.delay


class Counts:
    def __init__(self):
        self.reset()

    def reset(self):
        self.served = 0
        self.checks = 0
        self.inFlight = 0
        self.inFlightMax = 0

    def asJSON(self):
        return json.dumps(
            {"served": self.served, "checks": self.checks, "in_flight_max": self.inFlightMax}
        ).encode("ascii")


class DelayedHTTP(Protocol):
    """
    One client connection: read request heads (and any Content-Length
    body), answer each in order, each no sooner than its schedule says.
    """

    def __init__(self, backend):
        self.backend = backend
        self._buffer = b""
        self._skip = 0
        self._last = 0.0
        self._pending = deque()

    def dataReceived(self, data):
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self.transport.loseConnection()
                return
            head = self._buffer[:end]
            rest = self._buffer[end + 4:]
            length = 0
            close = head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip() or 0)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            taken = min(length, len(rest))
            self._buffer = rest[taken:]
            self._skip = length - taken
            self.backend.arrived(self, head.split(b" ", 2)[1:2] or [b"/"], close)

    def schedule(self, path, close, now):
        """
        The time to answer: never before an earlier request's answer on
        this connection.
        """
        due = max(self._last, self.backend.schedule.due(now))
        self._last = due
        self._pending.append(close)
        return due

    def answer(self, path):
        if not self._pending:
            return  # the connection was lost before its answer
        close = self._pending.popleft()
        self.backend.answered(path)
        self.transport.write(self.backend.response)
        if close:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        # Requests still waiting for their answer are abandoned.
        self.backend.counts.inFlight -= len(self._pending)
        self._pending.clear()


class DelayedBackend(Factory):
    """
    One backend: its port, its schedule, its counts.
    """

    def __init__(self, name, schedule, clock):
        self.name = name
        self.schedule = schedule
        self.clock = clock
        self.counts = Counts()
        self._ticks = {}
        body = b"%s: answers after %g ms\n" % (name.encode("ascii"), schedule.delay * 1000)
        self.response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    def buildProtocol(self, addr):
        return DelayedHTTP(self)

    def arrived(self, protocol, target, close):
        path = target[0]
        if path == b"/__stats":
            protocol.transport.write(_plain(self.counts.asJSON()))
            return
        if path == b"/__reset":
            self.counts.reset()
            self.schedule.origin = self.clock.seconds()
            protocol.transport.write(_plain(b"reset\n"))
            return
        counts = self.counts
        counts.inFlight += 1
        counts.inFlightMax = max(counts.inFlightMax, counts.inFlight)
        now = self.clock.seconds()
        due = protocol.schedule(path, close, now)
        # Answers are sent by the millisecond tick: one timer per tick
        # rather than per request keeps the server's own cost low.
        tick = math.ceil(due * 1000)
        batch = self._ticks.get(tick)
        if batch is None:
            batch = self._ticks[tick] = []
            self.clock.callLater(max(0.0, tick / 1000 - now), self._flush, tick)
        batch.append((protocol, path))

    def _flush(self, tick):
        for protocol, path in self._ticks.pop(tick):
            protocol.answer(path)

    def answered(self, path):
        counts = self.counts
        counts.inFlight -= 1
        if path == b"/health":
            counts.checks += 1
        else:
            counts.served += 1


def _plain(body):
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body,
    )


def parseSpec(spec):
    """
    PORT:DELAY_MS[:stall=EVERY/FOR/AT] -> (port, Schedule).
    """
    parts = spec.split(":")
    try:
        port, delay = int(parts[0]), float(parts[1]) / 1000
        schedule = Schedule(delay)
        for extra in parts[2:]:
            key, _, value = extra.partition("=")
            if key != "stall":
                raise ValueError(extra)
            schedule.every, schedule.stallFor, schedule.at = (float(v) for v in value.split("/"))
    except (ValueError, IndexError):
        raise SystemExit(f"uneven_backend: bad backend {spec!r} (PORT:DELAY_MS[:stall=EVERY/FOR/AT])")
    return port, schedule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backends", nargs="+", metavar="PORT:DELAY_MS[:stall=EVERY/FOR/AT]")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    for n, spec in enumerate(args.backends, 1):
        port, schedule = parseSpec(spec)
        schedule.origin = reactor.seconds()
        reactor.listenTCP(port, DelayedBackend(f"backend-{n}", schedule, reactor),
                          backlog=4096, interface="127.0.0.1")
    print("serving " + " ".join(args.backends), file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
