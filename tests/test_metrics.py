"""
Tests for L{rrbalancer.metrics} and for what the backends keep for it and
for the dashboard (L{rrbalancer.backends.BackendStats}, draining, removal),
all on a L{Clock}.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from treq.testing import StubTreq

from rrbalancer.backends import (
    DISABLED,
    DRAINING,
    HISTORY_POINTS,
    HISTORY_STEP,
    MAX_SAMPLES,
    UP,
    BackendGroup,
    BackendStats,
    percentile,
    statusClass,
)
from rrbalancer.config import BackendConfig, HealthConfig
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openMetricsFamilies,
)

from rrbalancer.metrics import Metrics, MetricsResource


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


class StatsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.stats = BackendStats(self.clock)

    def test_statusClass(self):
        self.assertEqual([statusClass(c) for c in (101, 200, 302, 404, 503, 0)],
                         ["1xx", "2xx", "3xx", "4xx", "5xx", "error"])

    def test_percentile(self):
        self.assertIsNone(percentile([], 0.5))
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 0.5), 50)
        self.assertEqual(percentile(values, 0.99), 99)
        self.assertEqual(percentile([7], 0.99), 7)

    def test_latencyWindow(self):
        """
        p50 and p99 are over the last minute only.
        """
        for ms in range(1, 101):
            self.stats.recordResponse(200, ms / 1000, 0, 0)
        self.assertEqual(self.stats.latency(), {"p50": 50.0, "p99": 99.0})
        self.clock.advance(30)
        for _ in range(100):
            self.stats.recordResponse(200, 0.5, 0, 0)
        self.assertEqual(self.stats.latency(), {"p50": 100.0, "p99": 500.0})
        self.clock.advance(31)
        self.assertEqual(self.stats.latency(), {"p50": 500.0, "p99": 500.0})
        self.clock.advance(60)
        self.assertEqual(self.stats.latency(), {"p50": None, "p99": None})

    def test_samplesBounded(self):
        for _ in range(MAX_SAMPLES + 10):
            self.stats.recordResponse(200, 0.001, 0, 0)
        self.assertEqual(len(self.stats._samples), MAX_SAMPLES)

    def test_requestsPerSecond(self):
        self.clock.advance(100)
        for _ in range(50):
            self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.requestsPerSecond(), 5.0)
        self.clock.advance(11)
        self.assertEqual(self.stats.requestsPerSecond(), 0.0)

    def test_requestsPerSecondWhenNew(self):
        """
        A new backend's rate is over the time it has existed.
        """
        self.clock.advance(2)
        for _ in range(10):
            self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.requestsPerSecond(), 5.0)

    def test_errorRate(self):
        """
        5xx answers, broken exchanges and failed connections are errors.
        """
        self.assertEqual(self.stats.errorRate(), 0.0)
        for code in (200, 200, 200, 404, 503, 0):
            self.stats.recordResponse(code, 0.01, 0, 0)
        self.stats.recordFailure()
        self.stats.recordResponse(200, 0.01, 0, 0)
        self.assertEqual(self.stats.errorRate(), 3 / 8)
        self.clock.advance(61)
        self.assertEqual(self.stats.errorRate(), 0.0)

    def test_history(self):
        """
        The history has the last minutes in steps, oldest first, whole
        steps only.
        """
        self.clock.advance(HISTORY_STEP * HISTORY_POINTS)
        start = self.clock.seconds()
        for _ in range(20):
            self.stats.recordResponse(200, 0.002, 0, 0)
        self.stats.recordResponse(500, 0.004, 0, 0)
        history = self.stats.history()
        self.assertEqual(len(history), HISTORY_POINTS)
        self.assertEqual(sum(p["rps"] for p in history), 0)  # the step is not over
        self.clock.advance(HISTORY_STEP)
        history = self.stats.history()
        self.assertEqual(len(history), HISTORY_POINTS)
        self.assertEqual(history[-1]["t"], start)
        self.assertEqual(history[-1]["rps"], 21 / HISTORY_STEP)
        self.assertEqual(history[-1]["errors"], 1 / HISTORY_STEP)
        self.assertAlmostEqual(history[-1]["latency_ms"], (20 * 2 + 4) / 21, places=3)
        self.assertEqual([p["rps"] for p in history[:-1]], [0] * (HISTORY_POINTS - 1))
        self.assertIsNone(history[0]["latency_ms"])
        self.clock.advance(HISTORY_STEP * HISTORY_POINTS)
        self.assertEqual(sum(p["rps"] for p in self.stats.history()), 0)

    def test_historySinceStart(self):
        """
        A new backend's history starts when it does.
        """
        self.assertEqual(self.stats.history(), [])
        self.clock.advance(HISTORY_STEP * 2)
        history = self.stats.history()
        self.assertEqual(len(history), 2)
        self.assertEqual(history[0]["t"], 1000)

    def test_slotsBounded(self):
        for _ in range(int(HISTORY_STEP * HISTORY_POINTS * 3)):
            self.stats.recordResponse(200, 0.001, 0, 0)
            self.clock.advance(1)
        self.assertLessEqual(len(self.stats._slots), HISTORY_STEP * (HISTORY_POINTS + 1) + 1)

    def test_counters(self):
        self.stats.recordResponse(200, 0.003, 10, 100)
        self.stats.recordResponse(404, 0.2, 0, 5)
        self.stats.recordResponse(0, 40, 7, 1)
        self.assertEqual(self.stats.responses, {"2xx": 1, "4xx": 1, "error": 1})
        self.assertEqual((self.stats.bytesIn, self.stats.bytesOut), (17, 106))
        self.assertEqual(self.stats.durationCount, 3)
        self.assertAlmostEqual(self.stats.durationSum, 40.203)
        self.assertEqual(sum(self.stats.buckets), 3)
        self.assertEqual(self.stats.buckets[0], 1)  # <= 5 ms
        self.stats.recordResponse(200, 0.01, 0, 0)  # a bucket's bound is in it
        self.assertEqual(self.stats.buckets[1], 1)
        self.assertEqual(self.stats.buckets[-1], 1)  # +Inf


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
