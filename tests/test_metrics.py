"""
Tests for L{rrbalancer.metrics} and for what the backends keep for it and
for the dashboard (L{rrbalancer.backends.BackendStats}, draining, removal),
all on a L{Clock}.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from treq.testing import StubTreq

from rrbalancer import __version__
from rrbalancer.backends import DISABLED, DRAINING, UP, BackendGroup
from rrbalancer.config import BackendConfig, HealthConfig
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openMetricsFamilies,
)

from rrbalancer.metrics import Metrics, MetricsResource
from rrbalancer.tunnel import TunnelCounts


def makeGroup(urls=("http://127.0.0.1:8081", "http://127.0.0.1:8082"), health=None):
    clock = Clock()
    clock.advance(10_000)
    group = BackendGroup(health or HealthConfig(), clock)
    for url in urls:
        group.add(BackendConfig(url))
    return group, clock


class FakeSite:
    inFlight = 3
    shed = 2

    def __init__(self) -> None:
        self.tunnelCounts = TunnelCounts()
        self.tunnelCounts.open = 2
        self.tunnelCounts.opened = 9
        self.tunnelCounts.toBackend = 300
        self.tunnelCounts.toClient = 4000


def scrape(group, site=None, clock=None, openMetrics=False, perBackend=True):
    """
    The metrics as Prometheus would parse them: {name: {labels: value}}.
    """
    text = Metrics(group, site, clock, perBackend).render(openMetrics).decode("utf-8")
    parse = openMetricsFamilies if openMetrics else text_string_to_metric_families
    samples = {}
    for family in parse(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples, text


class BackendLifeTests(SynchronousTestCase):
    def test_retireWaitsForInFlight(self):
        group, clock = makeGroup()
        backend = group.get("1")
        backend.active += 1
        backend.active += 1
        done = group.retire(backend, "test")
        self.assertNoResult(done)
        self.assertEqual(backend.state, DRAINING)
        self.assertTrue(backend.removing)
        self.assertEqual({group.pick() for _ in range(3)}, {group.get("2")})
        backend.active -= 1
        self.assertIs(group.get("1"), backend)
        backend.active -= 1
        self.assertIs(self.successResultOf(done), backend)
        self.assertIsNone(group.get("1"))

    def test_keep(self):
        """
        A removal can be called off while the backend drains.
        """
        group, clock = makeGroup(health=HealthConfig(enabled=False))
        backend = group.get("1")
        backend.active = 1
        done = group.retire(backend, "test")
        group.keep(backend, "kept")
        backend.active = 0
        self.successResultOf(done)
        self.assertIs(group.get("1"), backend)
        self.assertEqual(backend.state, UP)

    def test_firstCheck(self):
        """
        A backend added at run time waits for one passing check; if its
        first check fails, the usual rise count applies.
        """
        group, clock = makeGroup(health=HealthConfig(rise=3, fall=2))
        new = group.add(BackendConfig("http://127.0.0.1:8083"), awaitCheck=True)
        self.assertFalse(new.available)
        new.recordCheck(True, "HTTP 200")
        self.assertTrue(new.available)
        other = group.add(BackendConfig("http://127.0.0.1:8084"), awaitCheck=True)
        other.recordCheck(False, "refused")
        self.assertEqual(other.lastChangeReason, "first health check failed: refused")
        other.recordCheck(True, "HTTP 200")
        other.recordCheck(True, "HTTP 200")
        self.assertFalse(other.available)
        other.recordCheck(True, "HTTP 200")
        self.assertTrue(other.available)
        self.assertEqual((other.checksPassed, other.checksFailed), (3, 1))

    def test_awaitCheckWithoutHealthChecks(self):
        group, clock = makeGroup(health=HealthConfig(enabled=False))
        new = group.add(BackendConfig("http://127.0.0.1:8083"), awaitCheck=True)
        self.assertTrue(new.available)

    def test_stateChangeTimeAndReason(self):
        group, clock = makeGroup()
        backend = group.get("1")
        clock.advance(5)
        backend.setAdminState(DISABLED, "disabled by 127.0.0.1:5000")
        self.assertEqual(backend.lastChange, clock.seconds())
        self.assertEqual(backend.lastChangeReason, "disabled by 127.0.0.1:5000")
        self.assertRaises(ValueError, backend.setAdminState, "sideways", "?")

    def test_passiveFailuresAreNotChecks(self):
        group, clock = makeGroup()
        backend = group.get("1")
        backend.recordPassiveFailure("refused")
        self.assertEqual((backend.checksPassed, backend.checksFailed), (0, 0))
        self.assertEqual(backend.failures, 1)

    def test_retriesCounted(self):
        group, clock = makeGroup()
        first = group.pick()
        self.assertEqual(group.retries, 0)
        group.pick(exclude=[first])
        self.assertEqual(group.retries, 1)
        group.pick(exclude=list(group))  # nothing left: no retry happens
        self.assertEqual(group.retries, 1)


class CollectorTests(SynchronousTestCase):
    def setUp(self):
        self.group, self.clock = makeGroup()
        self.one, self.two = self.group
        self.one.requests = 4
        self.one.active = 2
        self.one.recordResponse(200, 0.004, 100, 1000)
        self.one.recordResponse(201, 0.3, 0, 10)
        self.one.recordResponse(503, 2.0, 0, 5)
        self.one.recordResponse(0, 0.01, 0, 3)
        self.one.recordPassiveFailure("refused")
        self.one.recordCheck(True, "HTTP 200")
        self.one.recordCheck(False, "HTTP 500")
        self.one.tunnels.open = 1
        self.one.tunnels.opened = 5
        self.one.tunnels.toBackend = 60
        self.one.tunnels.toClient = 700
        self.two.adminState = DRAINING
        self.group.retries = 7

    def test_namesArePrefixed(self):
        samples, text = scrape(self.group, FakeSite(), self.clock)
        for name in samples:
            self.assertTrue(name.startswith("rrbalancer_"), name)

    def test_requestsByStatusClass(self):
        samples, _ = scrape(self.group)
        requests = samples["rrbalancer_backend_requests_total"]
        url = self.one.url
        self.assertEqual(requests[(("backend", url), ("code", "2xx"))], 2)
        self.assertEqual(requests[(("backend", url), ("code", "5xx"))], 1)
        self.assertEqual(requests[(("backend", url), ("code", "error"))], 1)
        # A class never seen has no series (it reads as 0).
        self.assertNotIn((("backend", self.two.url), ("code", "2xx")), requests)
        self.assertEqual(
            samples["rrbalancer_backend_attempts_total"][(("backend", url),)], 4
        )
        self.assertEqual(
            samples["rrbalancer_backend_failures_total"][(("backend", url),)], 1
        )

    def test_duration(self):
        samples, _ = scrape(self.group)
        url = self.one.url
        buckets = samples["rrbalancer_backend_request_duration_seconds_bucket"]
        self.assertEqual(buckets[(("backend", url), ("le", "0.005"))], 1)
        self.assertEqual(buckets[(("backend", url), ("le", "0.01"))], 2)
        self.assertEqual(buckets[(("backend", url), ("le", "0.5"))], 3)
        self.assertEqual(buckets[(("backend", url), ("le", "+Inf"))], 4)
        self.assertEqual(
            samples["rrbalancer_backend_request_duration_seconds_count"][(("backend", url),)], 4
        )
        self.assertAlmostEqual(
            samples["rrbalancer_backend_request_duration_seconds_sum"][(("backend", url),)],
            2.314,
        )

    def test_gauges(self):
        samples, _ = scrape(self.group, FakeSite(), self.clock)
        one, two = (("backend", self.one.url),), (("backend", self.two.url),)
        self.assertEqual(samples["rrbalancer_backend_in_flight"][one], 2)
        self.assertEqual(samples["rrbalancer_backend_up"][one], 1)
        self.assertEqual(samples["rrbalancer_backend_up"][two], 0)
        self.assertEqual(samples["rrbalancer_backend_healthy"][two], 1)
        self.assertEqual(samples["rrbalancer_backend_weight"][one], 1)
        state = samples["rrbalancer_backend_state"]
        self.assertEqual(state[(("backend", self.two.url), ("state", "draining"))], 1)
        self.assertEqual(state[(("backend", self.two.url), ("state", "up"))], 0)
        self.assertEqual(state[(("backend", self.one.url), ("state", "up"))], 1)
        self.assertEqual(samples["rrbalancer_in_flight_requests"][()], 3)
        self.assertEqual(samples["rrbalancer_shed_requests_total"][()], 2)
        self.assertEqual(samples["rrbalancer_uptime_seconds"][()], 0)

    def test_ejectionRampPanic(self):
        from rrbalancer.backends import Ejection

        clock = Clock()
        group = BackendGroup(HealthConfig(enabled=False), clock, ejection=Ejection(after=1),
                             slowStart=10, panicThreshold=100)
        one = group.add(BackendConfig("http://127.0.0.1:8081"))
        two = group.add(BackendConfig("http://127.0.0.1:8082"))
        one.recordPassiveFailure("refused")
        samples, _ = scrape(group)
        a, b = (("backend", one.url),), (("backend", two.url),)
        self.assertEqual(samples["rrbalancer_backend_ejected"][a], 1)
        self.assertEqual(samples["rrbalancer_backend_ejected"][b], 0)
        self.assertEqual(samples["rrbalancer_backend_ejections_total"][a], 1)
        self.assertEqual(samples["rrbalancer_backend_state"][a + (("state", "ejected"),)], 1)
        self.assertEqual(samples["rrbalancer_backends"][(("state", "ejected"),)], 1)
        self.assertEqual(samples["rrbalancer_panic"][()], 1)
        self.assertEqual(samples["rrbalancer_panics_total"][()], 1)
        clock.advance(30)
        samples, _ = scrape(group)
        self.assertEqual(samples["rrbalancer_backend_weight_ramp"][a], 0.1)
        self.assertEqual(samples["rrbalancer_backend_weight_ramp"][b], 1)
        self.assertEqual(samples["rrbalancer_panic"][()], 0)

    def test_checksRetriesBytes(self):
        samples, _ = scrape(self.group)
        url = self.one.url
        checks = samples["rrbalancer_health_checks_total"]
        self.assertEqual(checks[(("backend", url), ("result", "pass"))], 1)
        self.assertEqual(checks[(("backend", url), ("result", "fail"))], 1)
        self.assertEqual(samples["rrbalancer_retries_total"][()], 7)
        self.assertEqual(samples["rrbalancer_backend_request_bytes_total"][(("backend", url),)], 100)
        self.assertEqual(
            samples["rrbalancer_backend_response_bytes_total"][(("backend", url),)], 1018
        )

    def test_tunnels(self):
        """
        Tunnels open and opened, and the bytes they carried each way: per
        backend, and for the balancer (from its site, which outlives any
        backend).
        """
        for openMetrics in (False, True):
            samples, _ = scrape(self.group, FakeSite(), self.clock, openMetrics=openMetrics)
            one, two = (("backend", self.one.url),), (("backend", self.two.url),)
            self.assertEqual(samples["rrbalancer_backend_tunnels_open"], {one: 1, two: 0})
            self.assertEqual(samples["rrbalancer_backend_tunnels_total"], {one: 5, two: 0})
            carried = samples["rrbalancer_backend_tunnel_bytes_total"]
            self.assertEqual(carried[one + (("direction", "to_backend"),)], 60)
            self.assertEqual(carried[one + (("direction", "to_client"),)], 700)
            self.assertEqual(carried[two + (("direction", "to_client"),)], 0)
            self.assertEqual(samples["rrbalancer_tunnels_open"][()], 2)
            self.assertEqual(samples["rrbalancer_tunnels_total"][()], 9)
            self.assertEqual(
                samples["rrbalancer_tunnel_bytes_total"],
                {(("direction", "to_backend"),): 300, (("direction", "to_client"),): 4000},
            )

    def test_removedBackendDisappears(self):
        self.group.remove(self.two)
        _, text = scrape(self.group)
        self.assertNotIn(self.two.url, text)
        self.assertIn(self.one.url, text)

    def test_readAtScrapeTime(self):
        """
        A backend added after the metrics were made has its series at the
        next scrape.
        """
        metrics = Metrics(self.group)
        self.group.add(BackendConfig("http://127.0.0.1:8083"))
        self.assertIn(b'backend="http://127.0.0.1:8083"', metrics.render())

    def test_openMetricsParses(self):
        text_samples, _ = scrape(self.group, FakeSite(), self.clock)
        om_samples, text = scrape(self.group, FakeSite(), self.clock, openMetrics=True)
        self.assertTrue(text.endswith("# EOF\n"))
        self.assertEqual(
            om_samples["rrbalancer_backend_requests_total"],
            text_samples["rrbalancer_backend_requests_total"],
        )

    def test_totalsOnly(self):
        """
        Without per-backend series, the totals by state remain.
        """
        samples, text = scrape(self.group, perBackend=False)
        self.assertNotIn(self.one.url, text)
        self.assertEqual(samples["rrbalancer_backends"][(("state", "up"),)], 1)
        self.assertEqual(samples["rrbalancer_backends"][(("state", "draining"),)], 1)

    def test_labelsEscaped(self):
        group, clock = makeGroup(urls=())
        group.add(BackendConfig("http://[::1]:8081"))
        samples, _ = scrape(group)
        self.assertIn((("backend", "http://[::1]:8081"),), samples["rrbalancer_backend_up"])


class ResourceTests(SynchronousTestCase):
    def get(self, headers=None):
        group, clock = makeGroup()
        group.get("1").recordResponse(200, 0.01, 0, 0)
        stub = StubTreq(MetricsResource(Metrics(group)))
        d = stub.get("http://127.0.0.1/metrics", headers=headers)
        stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(stub.content(response))
        return response, body.decode()

    def test_text(self):
        response, body = self.get()
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
        )
        self.assertIn("# TYPE rrbalancer_backend_requests_total counter", body)

    def test_openMetrics(self):
        response, body = self.get({b"Accept": [b"application/openmetrics-text; version=1.0.0"]})
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
        )
        self.assertTrue(body.endswith("# EOF\n"))


class DiscoveryMetricsTests(SynchronousTestCase):
    """
    Each discovery source as series: whether it answers, its state and
    since when, its last answer, its backends, its lookups.
    """

    def setUp(self):
        from twisted.logger import Logger
        from twisted.names import dns, error

        from rrbalancer.discovery import parseSource
        from rrbalancer.discovery._dns import DNSSource
        from rrbalancer.discovery._service import Discovery

        from .test_discovery_dns import FakeResolver, a

        self.group, self.clock = makeGroup(urls=())
        resolver = FakeResolver()
        name = "web.example.com"
        resolver.answers[(name, dns.A)] = [a(name, "192.0.2.1", 30), a(name, "192.0.2.2", 30)]
        self.one = DNSSource(parseSource(f"dns+a://{name}:8080"), resolver, self.clock)
        self.two = DNSSource(parseSource("dns+srv://_http._tcp.example.com"), resolver, self.clock)
        resolver.answers[("_http._tcp.example.com", dns.SRV)] = error.DNSNameError()
        for source in (self.one, self.two):
            source.log = Logger(observer=lambda event: None)
        self.discovery = Discovery(self.group, [self.one, self.two])
        self.discovery.startService()

    def scrape(self, openMetrics=False):
        text = Metrics(self.group, clock=self.clock, discovery=self.discovery).render(
            openMetrics
        ).decode("utf-8")
        parse = openMetricsFamilies if openMetrics else text_string_to_metric_families
        samples = {}
        for family in parse(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def test_series(self):
        for openMetrics in (False, True):
            samples = self.scrape(openMetrics)
            one = (("source", "dns+a://web.example.com:8080"),)
            two = (("source", "dns+srv://_http._tcp.example.com"),)
            self.assertEqual(samples[("rrbalancer_discovery_up", one)], 1)
            self.assertEqual(samples[("rrbalancer_discovery_up", two)], 0)
            self.assertEqual(
                samples[("rrbalancer_discovery_state", two + (("state", "failing"),))], 1
            )
            self.assertEqual(samples[("rrbalancer_discovery_state", two + (("state", "ok"),))], 0)
            self.assertEqual(
                samples[("rrbalancer_discovery_state_since_timestamp_seconds", two)], 10_000
            )
            self.assertEqual(
                samples[("rrbalancer_discovery_last_answer_timestamp_seconds", one)], 10_000
            )
            self.assertNotIn(("rrbalancer_discovery_last_answer_timestamp_seconds", two), samples)
            self.assertEqual(samples[("rrbalancer_discovery_backends", one)], 2)
            self.assertEqual(samples[("rrbalancer_discovery_backends", two)], 0)
            self.assertEqual(
                samples[("rrbalancer_discovery_lookups_total", (("result", "fail"),) + two)], 1
            )
            self.assertEqual(
                samples[("rrbalancer_discovery_lookups_total", (("result", "ok"),) + one)], 1
            )

    def test_noneWithoutDiscovery(self):
        text = Metrics(self.group).render().decode("utf-8")
        self.assertNotIn("rrbalancer_discovery", text)


class MergeTests(SynchronousTestCase):
    """
    L{mergeMetrics}: several workers' metrics as one balancer's, still
    valid in both formats.
    """

    def workers(self):
        one, clock = makeGroup()
        two, _ = makeGroup()
        one.get("1").recordResponse(200, 0.01, 10, 100)
        two.get("1").recordResponse(200, 0.02, 5, 50)
        two.get("1").recordResponse(503, 0.5, 0, 10)
        two.get("2").healthy = False
        return [(1, Metrics(one, FakeSite(), clock)), (2, Metrics(two, FakeSite(), clock))]

    def merged(self, openMetrics):
        from rrbalancer.metrics import mergeMetrics

        texts = [(i, m.render(openMetrics).decode("utf-8")) for i, m in self.workers()]
        text = mergeMetrics(texts, openMetrics, len(texts))
        parse = openMetricsFamilies if openMetrics else text_string_to_metric_families
        samples = {}
        for family in parse(text):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                    sample.value
                )
        return samples

    def check(self, samples):
        b1 = ("backend", "http://127.0.0.1:8081")
        b2 = ("backend", "http://127.0.0.1:8082")
        self.assertEqual(samples["rrbalancer_in_flight_requests"][()], 6)
        self.assertEqual(samples["rrbalancer_shed_requests_total"][()], 4)
        self.assertEqual(samples["rrbalancer_backend_requests_total"],
                         {(b1, ("code", "2xx")): 2, (b1, ("code", "5xx")): 1})
        self.assertEqual(samples["rrbalancer_backend_response_bytes_total"][(b1,)], 160)
        durations = samples["rrbalancer_backend_request_duration_seconds_bucket"]
        self.assertEqual(durations[(b1, ("le", "+Inf"))], 3)
        self.assertEqual(samples["rrbalancer_backend_request_duration_seconds_count"][(b1,)], 3)
        self.assertEqual(samples["rrbalancer_backend_weight"][(b1,)], 1)
        self.assertEqual(samples["rrbalancer_backend_up"],
                         {(b1, ("worker", "1")): 1, (b2, ("worker", "1")): 1,
                          (b1, ("worker", "2")): 1, (b2, ("worker", "2")): 0})
        self.assertEqual(samples["rrbalancer_backends"][(("state", "down"), ("worker", "2"))], 1)
        self.assertEqual(samples["rrbalancer_info"][(("version", __version__),)], 1)
        self.assertEqual(samples["rrbalancer_workers"][()], 2)

    def test_text(self):
        self.check(self.merged(False))

    def test_openMetrics(self):
        self.check(self.merged(True))
