"""
Prometheus metrics, read from the backends at scrape time.

Nothing is counted twice: L{Metrics} turns what the L{BackendGroup} and its
L{Backend}s already keep (see L{rrbalancer.backends.BackendStats}) into the
exposition text when Prometheus asks, so the request path pays for no
metrics call, and a backend added or removed at run time appears or
disappears with its series.

The text is written here rather than through prometheus_client's metric
objects: a fleet of ten thousand backends is over a hundred thousand
series, and building an object per sample made a scrape take seconds.
Both formats a scraper may ask for are written: Prometheus text 0.0.4 and
OpenMetrics 1.0 (the tests read both back with prometheus_client's
parsers).
"""

import math
from typing import Callable, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import __version__
from .backends import STATES, Backend, BackendGroup
from .queue import WAIT_BUCKETS
from .stats import DURATION_BUCKETS

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


BOUNDS = [_bound(bound) for bound in DURATION_BUCKETS]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else "%d" % (value,)


# Per-backend families: (name, type, help, samples); samples(backend) gives
# (suffix of labels, value) pairs, the backend's own label put first.
Samples = Callable[[Backend], List[Tuple[str, object]]]


def _one(value: Callable[[Backend], object]) -> Samples:
    return lambda b: [("", value(b))]


def _state(b: Backend):
    current = b.state
    return [(f',state="{s}"', 1 if s == current else 0) for s in STATES]


def _responses(b: Backend):
    # Only the classes seen: a fleet of idle backends would otherwise be
    # mostly zeros (a missing counter reads as 0 in rate() and increase()).
    return [(f',code="{kind}"', count) for kind, count in b.stats.responses.items()]


def _checks(b: Backend):
    return [(',result="pass"', b.checksPassed), (',result="fail"', b.checksFailed)]


def _directions(counts):
    return [(',direction="to_backend"', counts.toBackend),
            (',direction="to_client"', counts.toClient)]


BACKEND_FAMILIES = [
    ("rrbalancer_backend_up", "gauge",
     "1 if the backend takes new requests (healthy and enabled), else 0.",
     _one(lambda b: 1 if b.available else 0)),
    ("rrbalancer_backend_healthy", "gauge",
     "1 if the health checks find the backend healthy, else 0.",
     _one(lambda b: 1 if b.healthy else 0)),
    ("rrbalancer_backend_state", "gauge", "The backend's state: 1 for the one it is in.", _state),
    ("rrbalancer_backend_weight", "gauge", "The backend's weight.", _one(lambda b: b.weight)),
    ("rrbalancer_backend_in_flight", "gauge", "Requests in flight on the backend.",
     _one(lambda b: b.active)),
    ("rrbalancer_backend_attempts", "counter", "Requests sent to the backend (each try counts).",
     _one(lambda b: b.requests)),
    ("rrbalancer_backend_requests", "counter",
     "Responses from the backend by status class ('error': broken after the response had "
     "started).", _responses),
    ("rrbalancer_backend_failures", "counter",
     "Requests the backend could not take (no connection, no answer).",
     _one(lambda b: b.failures)),
    ("rrbalancer_backend_protocol_errors", "counter",
     "Responses from the backend that broke HTTP (bad framing, oversized head).",
     _one(lambda b: b.protocolErrors)),
    ("rrbalancer_health_checks", "counter", "Active health checks by result.", _checks),
    ("rrbalancer_backend_ejected", "gauge",
     "1 while failures on client requests keep the backend ejected, else 0.",
     _one(lambda b: 0 if b.ejectedUntil is None else 1)),
    ("rrbalancer_backend_ejections", "counter",
     "Times failures on client requests ejected the backend.", _one(lambda b: b.ejections)),
    ("rrbalancer_backend_weight_ramp", "gauge",
     "The share of its weight the backend takes now (below 1 while it slow-starts).",
     lambda b: [("", b._group.rampFraction(b) if b._group is not None else 1.0)]),
    ("rrbalancer_backend_request_bytes", "counter", "Request body bytes sent to the backend.",
     _one(lambda b: b.stats.bytesIn)),
    ("rrbalancer_backend_response_bytes", "counter",
     "Response body bytes from the backend sent to clients.",
     _one(lambda b: b.stats.bytesOut)),
    ("rrbalancer_backend_tunnels_open", "gauge",
     "Tunnels (WebSocket and other upgraded connections) open to the backend.",
     _one(lambda b: b.tunnels.open)),
    ("rrbalancer_backend_tunnels", "counter", "Tunnels opened to the backend.",
     _one(lambda b: b.tunnels.opened)),
    ("rrbalancer_backend_tunnel_bytes", "counter",
     "Bytes carried by the backend's tunnels, by direction.",
     lambda b: _directions(b.tunnels)),
]
# Per discovery source, as the per-backend families; samples(status) of its
# L{rrbalancer.discovery.SourceStatus}.
DISCOVERY_STATES = ("starting", "ok", "failing")
DISCOVERY_FAMILIES = [
    ("rrbalancer_discovery_up", "gauge",
     "1 if the discovery source's last lookup was answered, else 0.",
     lambda s: [("", 1 if s.state == "ok" else 0)]),
    ("rrbalancer_discovery_state", "gauge",
     "The discovery source's state: 1 for the one it is in.",
     lambda s: [(f',state="{state}"', 1 if s.state == state else 0)
                for state in DISCOVERY_STATES]),
    ("rrbalancer_discovery_state_since_timestamp_seconds", "gauge",
     "When the discovery source entered its state (Unix seconds).",
     lambda s: [("", float(s.since))]),
    ("rrbalancer_discovery_last_answer_timestamp_seconds", "gauge",
     "When the discovery source last answered (Unix seconds); absent before its first answer.",
     lambda s: [("", float(s.lastAnswer))] if s.lastAnswer is not None else []),
    ("rrbalancer_discovery_backends", "gauge",
     "Backends in the discovery source's current set.",
     lambda s: [("", s.backends)]),
    ("rrbalancer_discovery_lookups", "counter",
     "Lookups of the discovery source by result.",
     lambda s: [(',result="ok"', s.lookups - s.failures), (',result="fail"', s.failures)]),
]
DURATION = (
    "rrbalancer_backend_request_duration_seconds",
    "Time from a request's turn at the backend to its response's end.",
)


class Metrics:
    """
    The balancer's metrics, rendered when asked.

    @param site: the client-facing site, for the requests in flight on it
        (optional).
    @param clock: for the uptime (optional).
    @param perBackend: write the per-backend series; without them, the
        totals only (for fleets where that many series are unwanted).
    @param health: the health checker, for the event loop's lateness it
        measures (optional).
    @param discovery: the discovery sources' service, for how each is doing
        (optional).
    @param pools: the balancer's L{rrbalancer.pools.Pools}; with pools
        besides the default, the backend counts and series are every
        pool's, each series labelled with its pool (optional).
    """

    def __init__(
        self,
        group: BackendGroup,
        site=None,
        clock=None,
        perBackend: bool = True,
        health=None,
        discovery=None,
        limits=None,
        pools=None,
    ) -> None:
        self.group = group
        self.pools = pools
        self.limits = limits
        self.site = site
        self.health = health
        self.discovery = discovery
        self.clock = clock
        self.perBackend = perBackend
        self.started = clock.seconds() if clock is not None else None

    def render(self, openMetrics: bool = False) -> bytes:
        return "".join(self._lines(openMetrics)).encode("utf-8")

    def _head(self, name: str, kind: str, help: str, openMetrics: bool) -> str:
        shown = name + "_total" if kind == "counter" and not openMetrics else name
        help = help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {shown} {help}\n# TYPE {shown} {kind}\n"

    def _groups(self) -> List[Tuple[Optional[str], BackendGroup]]:
        """
        The groups whose backends are shown, with their pool's name; no
        name (and no pool label) for a balancer of one pool, so that its
        series are what they always were.
        """
        pools = self.pools
        if pools is None or not pools.config.pools:
            return [(None, self.group)]
        return [(name, b.group) for name, b in pools.balancers.items()]

    def _pools(self, groups, openMetrics: bool) -> Iterator[str]:
        """
        What each pool's group counts apart from its backends: retries, the
        panic threshold and the queue; a series a pool, labelled with it
        when the balancer has pools.
        """
        head = self._head
        pools = [("" if name is None else f'pool="{_label(name)}"', group) for name, group in groups]

        def family(name: str, kind: str, help: str, value, among) -> Iterator[str]:
            yield head(name, kind, help, openMetrics)
            sample = name + "_total" if kind == "counter" else name
            for pool, group in among:
                labels = f"{{{pool}}}" if pool else ""
                yield f"{sample}{labels} {_number(value(group))}\n"

        yield from family("rrbalancer_retries", "counter",
                          "Requests that moved on to another backend after one failed them.",
                          lambda group: group.retries, pools)
        yield from family("rrbalancer_panic", "gauge",
                          "1 while under the panic threshold (every enabled primary is picked "
                          "whatever its health), else 0.",
                          lambda group: 1 if group.panicking else 0, pools)
        yield from family("rrbalancer_panics", "counter",
                          "Times the panic threshold was crossed.", lambda group: group.panics,
                          pools)
        queued = [(pool, group) for pool, group in pools if group.requestQueue is not None]
        if not queued:
            return
        yield from family("rrbalancer_queue_length", "gauge",
                          "Requests waiting for a backend with room (--max-conns).",
                          lambda group: len(group.requestQueue), queued)
        yield from family("rrbalancer_queue_peak", "gauge",
                          "The most requests that have waited at once.",
                          lambda group: group.requestQueue.peak, queued)
        yield head("rrbalancer_queue_requests", "counter",
                   "Requests that left the queue, by how: served, rejected (the queue "
                   "was full), timeouts, abandoned (the client left).", openMetrics)
        for pool, group in queued:
            for outcome, count in group.requestQueue.counts.items():
                labels = f'{pool},outcome="{outcome}"' if pool else f'outcome="{outcome}"'
                yield f"rrbalancer_queue_requests_total{{{labels}}} {count}\n"
        yield head("rrbalancer_queue_wait_seconds", "histogram",
                   "How long served requests waited in the queue.", openMetrics)
        for pool, group in queued:
            queue, cumulative = group.requestQueue, 0
            for bound, count in zip(WAIT_BUCKETS + (math.inf,), queue.waits):
                cumulative += count
                labels = f'{pool},le="{_bound(bound)}"' if pool else f'le="{_bound(bound)}"'
                yield f"rrbalancer_queue_wait_seconds_bucket{{{labels}}} {cumulative}\n"
            labels = f"{{{pool}}}" if pool else ""
            yield f"rrbalancer_queue_wait_seconds_count{labels} {cumulative}\n"
            yield f"rrbalancer_queue_wait_seconds_sum{labels} {_number(float(queue.waitSum))}\n"

    def _lines(self, openMetrics: bool) -> Iterator[str]:
        head = self._head
        groups = self._groups()
        backends = [b for _, group in groups for b in group]

        def one(name: str, kind: str, help: str, value, labels: str = "") -> str:
            sample = name + "_total" if kind == "counter" else name
            return head(name, kind, help, openMetrics) + f"{sample}{labels} {_number(value)}\n"

        yield one("rrbalancer_info", "gauge", "The balancer's version.", 1,
                  f'{{version="{_label(__version__)}"}}')
        site, health = self.site, self.health
        if site is not None:
            yield one("rrbalancer_in_flight_requests", "gauge",
                      "Client requests received and not yet answered.", site.inFlight)
            yield one("rrbalancer_shed_requests", "counter",
                      "Requests answered 503 at once because too many were in flight.",
                      site.shed)
            tunnels = site.tunnelCounts
            yield one("rrbalancer_tunnels_open", "gauge",
                      "Tunnels (WebSocket and other upgraded connections) open.",
                      tunnels.open)
            yield one("rrbalancer_tunnels", "counter", "Tunnels opened.", tunnels.opened)
            yield head("rrbalancer_tunnel_bytes", "counter",
                       "Bytes carried by tunnels, by direction.", openMetrics)
            for suffix, value in _directions(tunnels):
                yield f"rrbalancer_tunnel_bytes_total{{{suffix[1:]}}} {value}\n"
        if health is not None:
            monitor = health.lagMonitor
            yield one("rrbalancer_event_loop_lag_seconds", "gauge",
                      "How late the event loop ran its last timer.", float(monitor.lag))
            yield one("rrbalancer_event_loop_lag_max_seconds", "gauge",
                      "The latest the event loop has run a timer.", float(monitor.maxLag))
            yield one("rrbalancer_health_checks_late", "counter",
                      "Health checks not counted because the event loop was late.",
                      health.lateChecks)
        if self.started is not None:
            yield one("rrbalancer_uptime_seconds", "gauge", "Seconds since the balancer started.",
                      self.clock.seconds() - self.started)
        yield from self._pools(groups, openMetrics)
        limiters = self.limits.limiters if self.limits else ()
        if limiters:
            yield head("rrbalancer_rate_limit_requests", "counter",
                       "Requests a rate limit saw, by outcome (passed, delayed, rejected, "
                       "dry_run: would have been rejected, unkeyed: without the key).",
                       openMetrics)
            for limiter in limiters:
                for outcome, count in limiter.counts.items():
                    yield (f'rrbalancer_rate_limit_requests_total{{limit="{limiter.name}",'
                           f'outcome="{outcome}"}} {count}\n')
            yield head("rrbalancer_rate_limit_keys", "gauge",
                       "Keys a rate limit remembers now (bounded by its max_keys).", openMetrics)
            for limiter in limiters:
                yield f'rrbalancer_rate_limit_keys{{limit="{limiter.name}"}} {len(limiter)}\n'
        mirrors = self.pools.mirrors if self.pools is not None else None
        if mirrors is not None and mirrors.counts:
            yield from self._mirrors(mirrors, openMetrics)

        if self.discovery is not None:
            yield from self._discovery(openMetrics)
        counts = dict.fromkeys(STATES, 0)
        for backend in backends:
            counts[backend.state] += 1
        yield head("rrbalancer_backends", "gauge", "Backends in each state.", openMetrics)
        for state, count in counts.items():
            yield f'rrbalancer_backends{{state="{state}"}} {count}\n'
        if groups[0][0] is not None:
            yield head("rrbalancer_pool_backends", "gauge",
                       "Backends in each state, by pool.", openMetrics)
            for pool, group in groups:
                counts = dict.fromkeys(STATES, 0)
                for backend in group:
                    counts[backend.state] += 1
                for state, count in counts.items():
                    yield (f'rrbalancer_pool_backends{{pool="{_label(pool)}",'
                           f'state="{state}"}} {count}\n')
        if self.perBackend:
            names = [
                f'{{backend="{_label(b.url)}"'
                + (f',pool="{_label(pool)}"' if pool is not None else "")
                for pool, group in groups
                for b in group
            ]
            for name, kind, help, samples in BACKEND_FAMILIES:
                yield head(name, kind, help, openMetrics)
                sample = name + "_total" if kind == "counter" else name
                for backend, label in zip(backends, names):
                    for suffix, value in samples(backend):
                        yield f"{sample}{label}{suffix}}} {_number(value)}\n"
            yield from self._durations(backends, names, openMetrics)
        if openMetrics:
            yield "# EOF\n"

    def _mirrors(self, mirrors, openMetrics: bool) -> Iterator[str]:
        head = self._head
        yield head("rrbalancer_mirror_in_flight", "gauge",
                   "Mirror copies sent and not yet answered.", openMetrics)
        yield f"rrbalancer_mirror_in_flight {mirrors.inFlight}\n"
        for name, help, value in (
            ("rrbalancer_mirror_copies", "Copies of requests sent to a mirror pool.",
             lambda counts: counts.mirrored),
            ("rrbalancer_mirror_failed", "Mirror copies sent that got no whole answer (no "
             "connection, a timeout, a broken response).", lambda counts: counts.failed),
        ):
            yield head(name, "counter", help, openMetrics)
            for pool, counts in mirrors.counts.items():
                yield f'{name}_total{{pool="{_label(pool)}"}} {value(counts)}\n'
        yield head("rrbalancer_mirror_skipped", "counter",
                   "Mirror copies not sent, by reason: in_flight (too many copies in "
                   "flight), body_too_large (over mirror_max_body), no_backend (none "
                   "of the pool's could take it), upgrade (a WebSocket handshake).",
                   openMetrics)
        for pool, counts in mirrors.counts.items():
            for reason, count in counts.skipped.items():
                yield (f'rrbalancer_mirror_skipped_total{{pool="{_label(pool)}",'
                       f'reason="{reason}"}} {count}\n')

    def _discovery(self, openMetrics: bool) -> Iterator[str]:
        sources = [
            (f'{{source="{_label(source.config.url)}"', source.status)
            for source in self.discovery.sources
        ]
        for name, kind, help, samples in DISCOVERY_FAMILIES:
            yield self._head(name, kind, help, openMetrics)
            sample = name + "_total" if kind == "counter" else name
            for label, status in sources:
                for suffix, value in samples(status):
                    yield f"{sample}{label}{suffix}}} {_number(value)}\n"

    def _durations(self, backends, names, openMetrics: bool) -> Iterator[str]:
        name, help = DURATION
        yield self._head(name, "histogram", help, openMetrics)
        for backend, label in zip(backends, names):
            stats = backend.stats
            if not stats.durationCount:
                continue
            cumulative = 0
            for bound, count in zip(BOUNDS, stats.buckets):
                cumulative += count
                yield f'{name}_bucket{label},le="{bound}"}} {cumulative}\n'
            yield f"{name}_count{label}}} {stats.durationCount}\n"
            yield f"{name}_sum{label}}} {_number(float(stats.durationSum))}\n"


# With several workers (L{mergeMetrics}): the families that say what one
# worker sees, given a worker label, and those the same in every worker.
PER_WORKER = frozenset({
    "rrbalancer_backend_up", "rrbalancer_backend_healthy", "rrbalancer_backend_state",
    "rrbalancer_backend_ejected", "rrbalancer_backend_weight_ramp", "rrbalancer_backends",
    "rrbalancer_event_loop_lag_seconds", "rrbalancer_event_loop_lag_max_seconds",
    "rrbalancer_panic", "rrbalancer_queue_peak",
})
NOT_SUMMED = frozenset({"rrbalancer_info", "rrbalancer_uptime_seconds", "rrbalancer_backend_weight"})


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def mergeMetrics(texts, openMetrics: bool, workers: int) -> str:
    """
    The metrics of several workers (C{(index, text)} pairs, each from
    L{Metrics.render}) as one balancer's: counters, histograms and
    requests in flight summed; what each worker sees on its own (health,
    state, the event loop, panic) given a C{worker} label; the rest (the
    version, uptime, weights) the largest of the workers'.
    """
    # family -> (head lines, {series: value})
    families = {}
    for index, text in texts:
        family = None
        for line in text.splitlines():
            if not line or line == "# EOF":
                continue
            if line.startswith("#"):
                family = line.split(" ", 3)[2]
                if not openMetrics and family.endswith("_total"):
                    family = family[: -len("_total")]
                if family not in families:
                    families[family] = ([], {})
                head = families[family][0]
                if len(head) < 2:
                    head.append(line)
                continue
            series, _, number = line.rpartition(" ")
            value = _value(number)
            samples = families[family][1]
            if family in PER_WORKER:
                name, brace, labels = series.partition("{")
                series = f'{name}{{worker="{index}"' + ("," + labels if brace else "}")
                samples[series] = value
            elif family in NOT_SUMMED:
                samples[series] = max(samples.get(series, value), value)
            else:
                samples[series] = samples.get(series, 0) + value
    out = []
    for head, samples in families.values():
        out.extend(line + "\n" for line in head)
        out.extend(f"{series} {_number(value)}\n" for series, value in samples.items())
    out.append("# HELP rrbalancer_workers Worker processes that answered this scrape.\n"
               "# TYPE rrbalancer_workers gauge\n"
               f"rrbalancer_workers {workers}\n")
    if openMetrics:
        out.append("# EOF\n")
    return "".join(out)


class MetricsResource(Resource):
    """
    C{GET /metrics}: Prometheus text, or OpenMetrics when the scraper asks
    for it.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        accept: Optional[bytes] = request.getHeader(b"accept")
        openMetrics = accept is not None and b"application/openmetrics-text" in accept
        request.setHeader(b"content-type", OPENMETRICS if openMetrics else TEXT)
        request.setHeader(b"cache-control", b"no-store")
        text = self.metrics.render(openMetrics)
        if not isinstance(text, Deferred):
            return text
        # The parent of several workers, who must ask them first.
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def send(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure) -> bytes:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            message = getattr(failure.value, "message", None) or failure.getErrorMessage()
            return f"metrics unavailable: {message}\n".encode("utf-8")

        text.addErrback(failed).addCallback(send)
        return NOT_DONE_YET

    render_HEAD = render_GET
