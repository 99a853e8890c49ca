"""
Prometheus metrics, read from the backends at scrape time.

Nothing is counted twice: L{BalancerCollector} turns what the
L{BackendGroup} and its L{Backend}s already keep (see
L{rrbalancer.backends.BackendStats}) into metric families when Prometheus
asks, so the request path pays for no metrics library call, and a backend
added or removed at run time appears or disappears with its series.

prometheus_client's own Twisted resource serves the registry from a thread
pool and takes the global reactor; L{MetricsResource} is the few lines it
takes to serve it here, with the format the scraper asks for.
"""

from typing import Iterator, Optional

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource

from . import __version__
from .backends import ADMIN_STATES, DOWN, DURATION_BUCKETS, BackendGroup

STATES = ADMIN_STATES + (DOWN,)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class BalancerCollector:
    """
    A prometheus_client collector over one balancer's backends.

    @param site: the client-facing site, for the requests in flight on it
        (optional).
    @param clock: for the uptime (optional).
    """

    def __init__(self, group: BackendGroup, site=None, clock=None) -> None:
        self.group = group
        self.site = site
        self.clock = clock
        self.started = clock.seconds() if clock is not None else None

    def describe(self):
        # Nothing to check against other collectors: this one owns its
        # registry, and its series come and go with the backends.
        return []

    def collect(self) -> Iterator[Metric]:
        backends = list(self.group)
        labels = ["backend"]

        info = GaugeMetricFamily(
            "rrbalancer_info", "The balancer's version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        if self.site is not None:
            yield GaugeMetricFamily(
                "rrbalancer_in_flight_requests",
                "Client requests received and not yet answered.",
                value=self.site.inFlight,
            )
        if self.started is not None:
            yield GaugeMetricFamily(
                "rrbalancer_uptime_seconds",
                "Seconds since the balancer started.",
                value=self.clock.seconds() - self.started,
            )
        yield CounterMetricFamily(
            "rrbalancer_retries",
            "Requests that moved on to another backend after one failed them.",
            value=self.group.retries,
        )

        up = GaugeMetricFamily(
            "rrbalancer_backend_up",
            "1 if the backend takes new requests (healthy and enabled), else 0.",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "rrbalancer_backend_healthy",
            "1 if the health checks find the backend healthy, else 0.",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "rrbalancer_backend_state",
            "The backend's state: 1 for the one it is in.",
            labels=labels + ["state"],
        )
        weight = GaugeMetricFamily(
            "rrbalancer_backend_weight", "The backend's weight.", labels=labels
        )
        inFlight = GaugeMetricFamily(
            "rrbalancer_backend_in_flight",
            "Requests in flight on the backend.",
            labels=labels,
        )
        attempts = CounterMetricFamily(
            "rrbalancer_backend_attempts",
            "Requests sent to the backend (each try counts).",
            labels=labels,
        )
        responses = CounterMetricFamily(
            "rrbalancer_backend_requests",
            "Responses from the backend by status class ('error': broken "
            "after the response had started).",
            labels=labels + ["code"],
        )
        failures = CounterMetricFamily(
            "rrbalancer_backend_failures",
            "Requests the backend could not take (no connection, no answer).",
            labels=labels,
        )
        checks = CounterMetricFamily(
            "rrbalancer_health_checks",
            "Active health checks by result.",
            labels=labels + ["result"],
        )
        bytesIn = CounterMetricFamily(
            "rrbalancer_backend_request_bytes",
            "Request body bytes sent to the backend.",
            labels=labels,
        )
        bytesOut = CounterMetricFamily(
            "rrbalancer_backend_response_bytes",
            "Response body bytes from the backend sent to clients.",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "rrbalancer_backend_request_duration_seconds",
            "Time from a request's turn at the backend to its response's end.",
            labels=labels,
        )
        for backend in backends:
            name = [backend.url]
            stats = backend.stats
            up.add_metric(name, 1 if backend.available else 0)
            healthy.add_metric(name, 1 if backend.healthy else 0)
            current = backend.state
            for s in STATES:
                state.add_metric(name + [s], 1 if s == current else 0)
            weight.add_metric(name, backend.weight)
            inFlight.add_metric(name, backend.active)
            attempts.add_metric(name, backend.requests)
            for kind in STATUS_CLASSES:
                count = stats.responses.get(kind, 0)
                if count or kind in ("2xx", "5xx"):
                    responses.add_metric(name + [kind], count)
            failures.add_metric(name, backend.failures)
            checks.add_metric(name + ["pass"], backend.checksPassed)
            checks.add_metric(name + ["fail"], backend.checksFailed)
            bytesIn.add_metric(name, stats.bytesIn)
            bytesOut.add_metric(name, stats.bytesOut)
            cumulative = 0
            buckets = []
            for bound, count in zip(DURATION_BUCKETS, stats.buckets):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            duration.add_metric(name, buckets, stats.durationSum)
        yield from (
            up, healthy, state, weight, inFlight, attempts, responses, failures,
            checks, bytesIn, bytesOut, duration,
        )


def makeRegistry(group: BackendGroup, site=None, clock=None) -> CollectorRegistry:
    """
    A registry of the balancer's metrics only (not the process-wide
    default one, which other code in the process could fill).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(group, site, clock))
    return registry


class MetricsResource(Resource):
    """
    C{GET /metrics}: the registry in the Prometheus text format, or in
    OpenMetrics when the scraper asks for it.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept: Optional[bytes] = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(
            accept.decode("latin-1") if accept else ""
        )
        body = encoder(self.registry)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET
