"""
Tests for L{rrbalancer.discovery._dns}: C{dns+a} and C{dns+srv} sources on
a fake resolver and a L{Clock} (what an answer becomes, when the next
lookup comes, what a failure keeps), and, on real loopback sockets, a
balancer whose backends come from a real DNS server (Twisted's, serving a
zone the test rewrites) over UDP and TCP.
"""

import os
import shutil
import signal
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.names import authority, dns, error, server
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rrbalancer.backends import DRAINING, UP
from rrbalancer.config import BackendConfig, HealthConfig
from rrbalancer.discovery import SourceStatus, parseSource
from rrbalancer.discovery import _dns
from rrbalancer.discovery._dns import (
    QUERY_TIMEOUT,
    DNSSource,
    SharedResolver,
    backendURL,
)

from .support import restartablePort
from .test_admin import (
    balancerConfig,
    call,
    makeClient,
    poll,
    settleConnections,
    startBackend,
    startWithAdmin,
)

# -- records -----------------------------------------------------------------------------


def a(name, address, ttl=60):
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


def aaaa(name, address, ttl=60):
    return dns.RRHeader(name, dns.AAAA, dns.IN, ttl, dns.Record_AAAA(address, ttl))


def cname(name, target, ttl=60):
    return dns.RRHeader(name, dns.CNAME, dns.IN, ttl, dns.Record_CNAME(target, ttl))


def srv(name, priority, weight, port, target, ttl=60):
    return dns.RRHeader(
        name, dns.SRV, dns.IN, ttl, dns.Record_SRV(priority, weight, port, target, ttl)
    )


class FakeResolver:
    """
    Answers from C{answers}: (name, type) to a list of records for the
    answer section, an (answers, authority, additional) tuple, or an
    exception to fail with; a name it does not know has no records of that
    type (NOERROR, no data).  While C{held} is a list, each query waits
    there as (Deferred, name, type) for the test to answer.

    @ivar asked: (type, name) of every query, in order.
    """

    def __init__(self):
        self.answers = {}
        self.asked = []
        self.held = None

    def _answer(self, name, kind):
        answer = self.answers.get((name, kind), [])
        if isinstance(answer, Exception):
            return fail(answer)
        if isinstance(answer, tuple):
            return succeed(answer)
        return succeed((answer, [], []))

    def _lookup(self, name, kind):
        self.asked.append((kind, name))
        if self.held is not None:
            d = Deferred()
            self.held.append((d, name, kind))
            return d
        return self._answer(name, kind)

    def release(self):
        """
        Answer every held query from C{answers} as they are now.
        """
        held, self.held = self.held, None
        for d, name, kind in held:
            self._answer(name, kind).chainDeferred(d)

    def lookupAddress(self, name, timeout=None):
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._lookup(name, dns.AAAA)

    def lookupService(self, name, timeout=None):
        return self._lookup(name, dns.SRV)


WEB = "web.example.com"
SERVICE = "_http._tcp.example.com"


class SourceMixin:
    def makeSource(self, url=f"dns+a://{WEB}:8080", minTTL=5.0, maxTTL=300.0):
        self.clock = Clock()
        self.clock.advance(1000)
        self.resolver = FakeResolver()
        self.source = DNSSource(parseSource(url), self.resolver, self.clock, minTTL, maxTTL)
        self.events = []
        self.source.log = Logger(observer=self.events.append)
        self.sets = []
        return self.source

    def start(self):
        self.source.start(self.sets.append)

    def urls(self, backends=None):
        if backends is None:
            backends = self.sets[-1]
        return sorted(b.url for b in backends)

    def nextLookupIn(self):
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    def logged(self, level):
        return [formatEvent(e) for e in self.events if e["log_level"].name == level]


# -- dns+a -------------------------------------------------------------------------------


class AddressTests(SourceMixin, SynchronousTestCase):
    def test_addresses(self):
        """
        Every A and AAAA address of the name is a backend on the port, of
        the source's weight and role.
        """
        self.makeSource(f"dns+a://{WEB}:8080,weight=3,backup")
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1"), a(WEB, "192.0.2.2")]
        self.resolver.answers[(WEB, dns.AAAA)] = [aaaa(WEB, "2001:db8::1")]
        self.start()
        self.assertEqual(
            self.sets,
            [frozenset({
                BackendConfig("http://192.0.2.1:8080", 3, True),
                BackendConfig("http://192.0.2.2:8080", 3, True),
                BackendConfig("http://[2001:db8::1]:8080", 3, True),
            })],
        )
        self.assertEqual(sorted(self.resolver.asked), [(dns.A, WEB), (dns.AAAA, WEB)])
        status = self.source.status
        self.assertEqual((status.state, status.backends, status.lastAnswer), ("ok", 3, 1000))

    def test_cname(self):
        """
        The addresses behind a CNAME count, and so does the CNAME's TTL.
        """
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = [
            cname(WEB, "lb.example.net", ttl=20), a("lb.example.net", "198.51.100.7", ttl=90)
        ]
        self.start()
        self.assertEqual(self.urls(), ["http://198.51.100.7:8080"])
        self.assertEqual(self.nextLookupIn(), 20)

    def test_ttlClamped(self):
        """
        The next lookup comes at the answer's TTL (the least of its
        records'), held between the minimum and the maximum.
        """
        for ttls, expected in [((60, 30), 30), ((1, 60), 5), ((0,), 5), ((86400,), 300)]:
            self.makeSource()
            self.resolver.answers[(WEB, dns.A)] = [
                a(WEB, f"192.0.2.{n}", ttl=ttl) for n, ttl in enumerate(ttls, 1)
            ]
            self.start()
            self.assertEqual(self.nextLookupIn(), expected, ttls)

    def test_noRecordsAskAgainAtTheMinimum(self):
        """
        An answer without a record (the name has no address now) is an
        empty set, asked about again at the minimum TTL.
        """
        self.makeSource(minTTL=7)
        self.start()
        self.assertEqual(self.sets, [frozenset()])
        self.assertEqual(self.nextLookupIn(), 7)
        self.assertEqual(self.source.status.state, "ok")

    def test_changesOnly(self):
        """
        The set is handed on after the first answer and then only when it
        changes.
        """
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=10)]
        self.start()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(self.sets), 1)
        self.assertEqual(self.source.status.lookups, 3)
        self.resolver.answers[(WEB, dns.A)] = [
            a(WEB, "192.0.2.1", ttl=10), a(WEB, "192.0.2.2", ttl=10)
        ]
        self.clock.advance(10)
        self.assertEqual(self.urls(), ["http://192.0.2.1:8080", "http://192.0.2.2:8080"])
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.2", ttl=10)]
        self.clock.advance(10)
        self.assertEqual(self.urls(), ["http://192.0.2.2:8080"])
        self.assertEqual(len(self.sets), 3)


class FailureTests(SourceMixin, SynchronousTestCase):
    def answering(self):
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=30), a(WEB, "192.0.2.2", ttl=30)]
        self.start()

    def test_failureKeepsTheLastSet(self):
        """
        A failed lookup (SERVFAIL, NXDOMAIN, no answer) hands on nothing:
        the backends of the last answer stay.
        """
        for exception in [
            error.DNSServerError(),
            error.DNSNameError(),
            error.DNSQueryTimeoutError(1),
            error.DNSQueryRefusedError(),
        ]:
            self.answering()
            self.resolver.answers[(WEB, dns.AAAA)] = exception
            self.clock.advance(30)
            self.assertEqual(len(self.sets), 1, exception)
            self.assertEqual(self.source.status.state, "failing")
            self.assertEqual(self.source.status.backends, 2)

    def test_reasons(self):
        self.makeSource()
        for exception, reason in [
            (error.DNSServerError(), f"A {WEB}: SERVFAIL"),
            (error.DNSNameError(), f"A {WEB}: NXDOMAIN (no such name)"),
            (error.DNSQueryTimeoutError(1), f"A {WEB}: no answer within {sum(QUERY_TIMEOUT)}s"),
            (error.DNSQueryRefusedError(), f"A {WEB}: REFUSED"),
            (OSError("No domain name servers available"),
             f"A {WEB}: No domain name servers available"),
        ]:
            self.resolver.answers[(WEB, dns.A)] = exception
            self.clock.advance(60)
            self.start()
            self.assertEqual(self.source.status.lastError, reason)

    def test_backoff(self):
        """
        After a failure the source asks again after 1 s, then twice as long
        each time, never longer than the minimum TTL; an answer brings back
        the TTL's schedule.
        """
        self.answering()
        self.resolver.answers[(WEB, dns.A)] = error.DNSServerError()
        self.clock.advance(30)
        waits = []
        for _ in range(6):
            waits.append(self.nextLookupIn())
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 5, 5, 5])
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=30)]
        self.clock.advance(self.nextLookupIn())
        self.assertEqual(self.nextLookupIn(), 30)
        self.resolver.answers[(WEB, dns.A)] = error.DNSServerError()
        self.clock.advance(30)
        self.assertEqual(self.nextLookupIn(), 1)

    def test_backoffWithinASmallMinimum(self):
        self.makeSource(minTTL=0.5)
        self.resolver.answers[(WEB, dns.A)] = error.DNSServerError()
        self.start()
        self.assertEqual(self.nextLookupIn(), 0.5)

    def test_statusSince(self):
        self.answering()
        self.resolver.answers[(WEB, dns.A)] = error.DNSServerError()
        self.clock.advance(30)
        self.clock.advance(self.nextLookupIn())
        status = self.source.status
        self.assertEqual(
            (status.state, status.since, status.lastAnswer, status.failures),
            ("failing", 1030, 1000, 2),
        )
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=30)]
        self.clock.advance(self.nextLookupIn())
        self.assertEqual((status.state, status.since, status.lastAnswer, status.lastError),
                         ("ok", 1033, 1033, None))

    def test_loggedOncePerChange(self):
        """
        A failure is logged when the source starts failing or fails for
        another reason, not at every retry; its recovery once.
        """
        self.answering()
        self.resolver.answers[(WEB, dns.A)] = error.DNSServerError()
        for _ in range(5):
            self.clock.advance(self.nextLookupIn())
        warnings = self.logged("warn")
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"discovery dns+a://{WEB}:8080: lookup failed: A {WEB}: SERVFAIL", warnings[0])
        self.assertIn("keeping the 2 backends of its last answer", warnings[0])
        self.resolver.answers[(WEB, dns.A)] = error.DNSQueryTimeoutError(1)
        self.clock.advance(self.nextLookupIn())
        self.clock.advance(self.nextLookupIn())
        self.assertEqual(len(self.logged("warn")), 2)
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=30)]
        self.clock.advance(self.nextLookupIn())
        self.clock.advance(30)
        infos = [line for line in self.logged("info") if "answers again" in line]
        self.assertEqual(infos, [f"discovery dns+a://{WEB}:8080: answers again (1 backends)"])

    def test_failingFromTheStart(self):
        """
        A source that never answered gives no backend and says so.
        """
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = error.DNSNameError()
        self.start()
        self.assertEqual(self.sets, [])
        self.assertEqual(self.source.status.state, "failing")
        self.assertIn("no backends from it yet", self.logged("warn")[0])

    def test_applyingFails(self):
        """
        An answer that could not be applied is logged, and given again with
        the next answer even if that one is the same.
        """
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=10)]
        calls = []

        def broken(backends):
            calls.append(backends)
            if len(calls) == 1:
                raise RuntimeError("boom")

        self.source.start(broken)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertTrue(failure.check(RuntimeError))
        self.clock.advance(10)
        self.assertEqual(len(calls), 2)
        self.clock.advance(10)
        self.assertEqual(len(calls), 2)


class StopTests(SourceMixin, SynchronousTestCase):
    def test_stop(self):
        self.makeSource()
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1", ttl=10)]
        self.start()
        d = self.source.stop()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.source.status.nextLookup)

    def test_stopWaitsForTheLookupInFlight(self):
        """
        Stopping while a lookup is in flight fires once it ends; its answer
        is not applied.
        """
        self.makeSource()
        self.resolver.held = []
        self.start()
        d = self.source.stop()
        self.assertNoResult(d)
        self.resolver.answers[(WEB, dns.A)] = [a(WEB, "192.0.2.1")]
        self.resolver.release()
        self.successResultOf(d)
        self.assertEqual(self.sets, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.source.status.state, SourceStatus.STARTING)


# -- dns+srv -------------------------------------------------------------------------------


class ServiceTests(SourceMixin, SynchronousTestCase):
    def test_priorityAndWeight(self):
        """
        The lowest priority present gives primaries, each higher one
        backups; the SRV weight is the weight, 0 the least there is.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = (
            [
                srv(SERVICE, 10, 60, 8081, "a.example.com"),
                srv(SERVICE, 10, 0, 8082, "b.example.com"),
                srv(SERVICE, 20, 5, 8083, "c.example.com"),
                srv(SERVICE, 30, 5, 8084, "d.example.com"),
            ],
            [],
            [
                a("a.example.com", "192.0.2.1"),
                a("b.example.com", "192.0.2.2"),
                aaaa("c.example.com", "2001:db8::3"),
                a("d.example.com", "192.0.2.4"),
            ],
        )
        self.start()
        self.assertEqual(
            self.sets[-1],
            frozenset({
                BackendConfig("http://192.0.2.1:8081", 60, False),
                BackendConfig("http://192.0.2.2:8082", 1, False),
                BackendConfig("http://[2001:db8::3]:8083", 5, True),
                BackendConfig("http://192.0.2.4:8084", 5, True),
            }),
        )
        # The additional section named every target: no query of its own.
        self.assertEqual(self.resolver.asked, [(dns.SRV, SERVICE)])

    def test_onlyHigherPrioritiesLeft(self):
        """
        Priorities are relative: when only priority 20 is left, it is the
        primaries.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = [srv(SERVICE, 20, 1, 8083, "c.example.com")]
        self.resolver.answers[("c.example.com", dns.A)] = [a("c.example.com", "192.0.2.3")]
        self.start()
        self.assertEqual(self.sets[-1], frozenset({BackendConfig("http://192.0.2.3:8083", 1, False)}))

    def test_targetsLookedUp(self):
        """
        Targets the additional section leaves out are looked up, A and AAAA;
        the lookup's TTL is the least of the SRV records' and the targets'.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = [
            srv(SERVICE, 0, 1, 8081, "a.example.com", ttl=120),
            srv(SERVICE, 0, 1, 8082, "b.example.com", ttl=120),
        ]
        self.resolver.answers[("a.example.com", dns.A)] = [a("a.example.com", "192.0.2.1", ttl=40)]
        self.resolver.answers[("b.example.com", dns.AAAA)] = [
            aaaa("b.example.com", "2001:db8::2", ttl=90)
        ]
        self.start()
        self.assertEqual(self.urls(), ["http://192.0.2.1:8081", "http://[2001:db8::2]:8082"])
        self.assertEqual(self.nextLookupIn(), 40)
        self.assertEqual(
            sorted(self.resolver.asked),
            sorted([(dns.SRV, SERVICE), (dns.A, "a.example.com"), (dns.AAAA, "a.example.com"),
                    (dns.A, "b.example.com"), (dns.AAAA, "b.example.com")]),
        )

    def test_noService(self):
        """
        A target of "." (RFC 2782: no such service here) gives no backend,
        nor does a target with no such name; neither fails the lookup.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = [
            srv(SERVICE, 0, 1, 8081, ""),  # "." on the wire
            srv(SERVICE, 0, 1, 8082, "gone.example.com"),
            srv(SERVICE, 0, 1, 8083, "a.example.com"),
        ]
        self.resolver.answers[("gone.example.com", dns.A)] = error.DNSNameError()
        self.resolver.answers[("gone.example.com", dns.AAAA)] = error.DNSNameError()
        self.resolver.answers[("a.example.com", dns.A)] = [a("a.example.com", "192.0.2.1")]
        self.start()
        self.assertEqual(self.urls(), ["http://192.0.2.1:8083"])
        self.assertEqual(self.source.status.state, "ok")

    def test_targetFailureFailsTheLookup(self):
        """
        A target that cannot be looked up (SERVFAIL, no answer) fails the
        whole lookup, which keeps the last set.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = [
            srv(SERVICE, 0, 1, 8081, "a.example.com", ttl=10),
            srv(SERVICE, 0, 1, 8082, "b.example.com", ttl=10),
        ]
        self.resolver.answers[("a.example.com", dns.A)] = [a("a.example.com", "192.0.2.1")]
        self.resolver.answers[("b.example.com", dns.A)] = [a("b.example.com", "192.0.2.2")]
        self.start()
        self.resolver.answers[("b.example.com", dns.A)] = error.DNSServerError()
        self.clock.advance(10)
        self.assertEqual(len(self.sets), 1)
        self.assertEqual(self.source.status.lastError, "A b.example.com: SERVFAIL")

    def test_serviceNameMissing(self):
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = error.DNSNameError()
        self.start()
        self.assertEqual(self.source.status.lastError, f"SRV {SERVICE}: NXDOMAIN (no such name)")

    def test_sameServerTwice(self):
        """
        One server named by two records (or two targets of one address)
        is one backend with the weight of both; a primary if either is.
        """
        self.makeSource(f"dns+srv://{SERVICE}")
        self.resolver.answers[(SERVICE, dns.SRV)] = (
            [
                srv(SERVICE, 0, 3, 8081, "a.example.com"),
                srv(SERVICE, 0, 4, 8081, "alias.example.com"),
                srv(SERVICE, 5, 9, 8081, "a.example.com"),
            ],
            [],
            [a("a.example.com", "192.0.2.1"), a("alias.example.com", "192.0.2.1")],
        )
        self.start()
        self.assertEqual(
            self.sets[-1], frozenset({BackendConfig("http://192.0.2.1:8081", 16, False)})
        )

    def test_noRecords(self):
        self.makeSource(f"dns+srv://{SERVICE}")
        self.start()
        self.assertEqual(self.sets, [frozenset()])


class HelperTests(SynchronousTestCase):
    def test_backendURL(self):
        self.assertEqual(backendURL("192.0.2.1", 80), "http://192.0.2.1:80")
        self.assertEqual(backendURL("2001:db8::1", 8080), "http://[2001:db8::1]:8080")

    def test_sharedResolverIsLazy(self):
        """
        Building the resolver reads no file and arms no timer (a balancer
        built for --check, or never started, leaves nothing behind); it is
        made at the first lookup, and closing it stops its re-reading of
        resolv.conf.
        """
        clock = Clock()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        shared = SharedResolver(clock, (), resolv=path)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.successResultOf(shared.close())
        shared._get()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.successResultOf(shared.close())
        self.assertEqual(clock.getDelayedCalls(), [])


# -- against a real DNS server -----------------------------------------------------------------


class Zone(authority.FileAuthority):
    """
    A zone held in memory that a test rewrites while the server runs:
    C{records} maps a lower-case name (bytes) to its records.
    """

    def loadFile(self, origin):
        self.soa = (
            origin,
            dns.Record_SOA(mname=b"ns." + origin, rname=b"hostmaster." + origin,
                           serial=1, minimum=1, expire=1, ttl=1),
        )
        self.records = {origin: [self.soa[1]]}

    def set(self, name, records):
        self.records[name.encode("ascii").lower()] = records


class ZoneServer(server.DNSServerFactory):
    """
    Serves one L{Zone}; while C{failing}, answers every query SERVFAIL, as
    a server whose zone cannot be loaded does.  An answer larger than a
    plain DNS datagram (512 bytes) is sent over UDP as no records and the
    truncation bit, as other servers do, where Twisted's own would send it
    whole.

    @ivar overTCP: the answers sent over TCP.
    """

    noisy = False
    failing = False
    overTCP = 0

    def __init__(self, zone):
        server.DNSServerFactory.__init__(self, authorities=[zone])

    def _empty(self, message, **flags):
        response = dns.Message(id=message.id, answer=1, **flags)
        response.queries = message.queries
        response.timeReceived = message.timeReceived
        return response

    def handleQuery(self, message, protocol, address):
        if not self.failing:
            return server.DNSServerFactory.handleQuery(self, message, protocol, address)
        self.sendReply(protocol, self._empty(message, rCode=dns.ESERVER), address)

    def sendReply(self, protocol, message, address):
        if address is None:
            self.overTCP += 1
        elif len(message.toStr()) > 512:
            message = self._empty(message, trunc=1, rCode=message.rCode)
        server.DNSServerFactory.sendReply(self, protocol, message, address)


@inlineCallbacks
def startDNSServer(testCase, zone):
    """
    Serve C{zone} on 127.0.0.1, UDP and TCP on one port the system chose;
    stopped after the test.

    @return: fires with (port, the L{ZoneServer})
    """
    factory = ZoneServer(zone)
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            yield udp.stopListening()
            continue
        break
    else:
        raise AssertionError("no port free for both UDP and TCP")

    @inlineCallbacks
    def stop():
        for connection in list(factory.connections):
            connection.transport.abortConnection()
        yield udp.stopListening()
        yield tcp.stopListening()

    testCase.addCleanup(stop)
    return port, factory


@inlineCallbacks
def get(client, url):
    """
    @return: fires with (status code, body text)
    """
    response = yield client.get(url)
    text = yield response.text()
    return response.code, text


def srvRecord(port, target, priority=0, weight=1):
    return dns.Record_SRV(priority, weight, port, target, ttl=0)


class RealServerTests(TestCase):
    """
    A balancer whose backends are the SRV records of a zone that Twisted's
    DNS server serves on 127.0.0.1; the test rewrites the zone while the
    balancer runs.
    """

    timeout = 60

    def configFor(self, dnsPort, url, **health):
        health = dict(dict(interval=0.2, timeout=2.0, rise=1, fall=2, jitter=0.0), **health)
        return balancerConfig(
            [],
            health=HealthConfig(**health),
            discover=(parseSource(url),),
            dnsServers=(("127.0.0.1", dnsPort),),
            dnsMinTTL=0.05,
            dnsMaxTTL=0.5,
        )

    @inlineCallbacks
    def test_membershipFollowsTheZone(self):
        """
        Two backends, then three, then one: each new one takes traffic once
        its first check has passed, and the ones dropped from the zone drain
        (a request in flight on one finishes whole) and go.  A zone that
        fails meanwhile changes nothing.
        """
        settleConnections(self)
        zone = Zone(b"example.com")
        dnsPort, dnsServer = yield startDNSServer(self, zone)
        name = "_http._tcp.web.example.com"
        backends = {}
        for n in "abc":
            resource, url = startBackend(self, n)
            backends[n] = (resource, int(url.rsplit(":", 1)[1]), url)
            zone.set(f"{n}.web.example.com", [dns.Record_A("127.0.0.1", ttl=0)])

        def publish(*names):
            zone.set(name, [srvRecord(backends[n][1], f"{n}.web.example.com") for n in names])

        # Nothing published yet: the name does not exist, and a request has
        # no backend to go to.
        service, base, admin = yield startWithAdmin(
            self, self.configFor(dnsPort, f"dns+srv://{name}")
        )
        client = makeClient(self)
        yield poll(lambda: service.discovery.sources[0].status.state == "failing",
                   what="the source to fail")
        code, _ = yield get(client, base + "/")
        self.assertEqual(code, 503)

        publish("a", "b")
        group = service.group

        def up(*names):
            urls = {backends[n][2] for n in names}
            return {b.url for b in group if b.available} == urls

        yield poll(lambda: up("a", "b"), what="a and b to take traffic")
        for _ in range(4):
            code, _ = yield get(client, base + "/")
            self.assertEqual(code, 200)
        self.assertEqual((backends["a"][0].served, backends["b"][0].served), (2, 2))

        # A third: it takes traffic only after its first check passed.
        publish("a", "b", "c")
        yield poll(lambda: group.byURL(backends["c"][2]) is not None, what="c to be added")
        c = group.byURL(backends["c"][2])
        yield poll(lambda: up("a", "b", "c"), what="c's first check")
        becameUp = c.lastChange
        self.assertEqual(c.owners, (f"dns+srv://{name}",))
        for _ in range(6):
            yield get(client, base + "/")
        self.assertEqual(backends["c"][0].served, 2)
        self.assertGreaterEqual(backends["c"][0].firstServedAt, becameUp)

        # A failing zone keeps them all.
        dnsServer.failing = True
        source = service.discovery.sources[0]
        yield poll(lambda: source.status.state == "failing", what="SERVFAIL")
        # (The SRV query, or a target's if the zone failed in between.)
        self.assertTrue(source.status.lastError.endswith("example.com: SERVFAIL"),
                        source.status.lastError)
        self.assertTrue(up("a", "b", "c"))
        dnsServer.failing = False
        yield poll(lambda: source.status.state == "ok", what="the zone to answer again")

        # One left: the requests in flight on a and b are not cut, and a and
        # b go once they have ended.
        held = [makeClient(self).get(base + "/slow") for _ in range(3)]
        yield poll(lambda: all(len(backends[n][0].held) == 1 for n in "abc"),
                   what="a slow request on each backend")
        a, b = (group.byURL(backends[n][2]) for n in "ab")
        publish("c")
        yield poll(lambda: up("c"), what="a and b to leave")
        self.assertEqual((a.state, a.removing, b.state, b.removing), (DRAINING, True, DRAINING, True))
        served = backends["c"][0].served
        for _ in range(3):
            code, _ = yield get(client, base + "/")
            self.assertEqual(code, 200)
        self.assertEqual(backends["c"][0].served, served + 3)
        for n in "abc":
            backends[n][0].release()
        bodies = []
        for d in held:
            response = yield d
            self.assertEqual(response.code, 200)
            bodies.append((yield response.text()))
        self.assertEqual(sorted(bodies), ["a /slow\n", "b /slow\n", "c /slow\n"])
        yield poll(lambda: [b.url for b in group] == [backends["c"][2]], what="a and b to go")
        self.assertEqual(group.byURL(backends["c"][2]).state, UP)

        code, answer = yield call(client, "GET", admin + "/api/discovery")
        self.assertEqual(code, 200)
        [shown] = answer["sources"]
        self.assertEqual(
            (shown["url"], shown["state"], shown["backends"]), (f"dns+srv://{name}", "ok", 1)
        )

    @inlineCallbacks
    def test_largeAnswerOverTCP(self):
        """
        An answer too large for a UDP datagram is asked again over TCP, and
        the connection is closed when the balancer stops.
        """
        settleConnections(self)
        zone = Zone(b"example.com")
        dnsPort, dnsServer = yield startDNSServer(self, zone)
        addresses = [f"127.0.0.{n}" for n in range(1, 61)]
        zone.set("many.example.com", [dns.Record_A(address, ttl=60) for address in addresses])
        config = self.configFor(dnsPort, "dns+a://many.example.com:9")
        config = config.__class__(**dict(config.__dict__, health=HealthConfig(enabled=False)))
        service, _, _ = yield startWithAdmin(self, config)
        group = service.group
        yield poll(lambda: len(group) == 60, what="sixty backends")
        self.assertEqual(sorted(b.url for b in group),
                         sorted(f"http://{address}:9" for address in addresses))
        self.assertEqual(dnsServer.overTCP, 1)
        yield service.stopService()
        yield poll(lambda: not dnsServer.connections, what="the TCP connection to close")


# -- against dnsmasq ------------------------------------------------------------------------


DNSMASQ = "/usr/sbin/dnsmasq"


class Dnsmasq:
    """
    A real dnsmasq (Debian's) on a loopback port, serving the SRV and host
    records of a config file and the addresses of a hosts file that the
    test writes: L{reload} (SIGHUP) re-reads the hosts file, L{restart}
    everything (dnsmasq reads its SRV records only when it starts).
    """

    def __init__(self, testCase):
        if not os.path.exists(DNSMASQ) and not os.environ.get("CI"):
            raise SkipTest(f"{DNSMASQ} is missing (Debian's dnsmasq)")
        self.dir = tempfile.mkdtemp(prefix="rrbalancer-dnsmasq-")
        testCase.addCleanup(shutil.rmtree, self.dir, True)
        # Readable by the user dnsmasq becomes after it starts as root.
        os.chmod(self.dir, 0o755)
        self.port = restartablePort()
        self.process = None
        self.log = os.path.join(self.dir, "log")
        testCase.addCleanup(self.stop)

    def _write(self, name, lines):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(path, 0o644)
        return path

    def configure(self, srv=(), hosts=()):
        """
        @param srv: (service name, target, port, priority, weight) for
            each SRV record; each target is 127.0.0.1.
        @param hosts: (address, name) for each line of the hosts file.
        """
        hostsFile = self._write("hosts", [f"{address} {name}" for address, name in hosts])
        # Answered here, never forwarded: no record is an empty answer.
        lines = [f"addn-hosts={hostsFile}", "local=/example.com/"]
        for name, target, port, priority, weight in srv:
            lines.append(f"srv-host={name},{target},{port},{priority},{weight}")
        for target in sorted({record[1] for record in srv}):
            lines.append(f"host-record={target},127.0.0.1")
        self._write("conf", lines)

    @inlineCallbacks
    def start(self):
        open(self.log, "w").close()
        self.process = subprocess.Popen(
            [
                DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--conf-file={os.path.join(self.dir, 'conf')}", "--local-ttl=1",
                f"--pid-file={os.path.join(self.dir, 'pid')}", f"--log-facility={self.log}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def started():
            if self.process.poll() is not None:
                raise AssertionError(f"dnsmasq exited with {self.process.returncode}")
            with open(self.log) as f:
                return "started" in f.read()

        yield poll(started, timeout=15, what="dnsmasq to start")

    def reload(self):
        self.process.send_signal(signal.SIGHUP)

    def stop(self):
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=15)

    def restart(self):
        self.stop()
        return self.start()


class DnsmasqTests(TestCase):
    """
    A balancer following the records dnsmasq serves, with a TTL of 1 s.
    """

    timeout = 60
    SERVICE = "_http._tcp.web.example.com"

    @inlineCallbacks
    def test_followsTheRecords(self):
        """
        SRV records added, changed (weight, priority) and removed, and
        addresses added to the hosts file, are followed within their TTL;
        dnsmasq killed, the balancer keeps its backends.
        """
        settleConnections(self)
        # Queries to a dnsmasq that is gone time out sooner.
        self.patch(_dns, "QUERY_TIMEOUT", (0.3,))
        dnsmasq = Dnsmasq(self)
        s = self.SERVICE
        dnsmasq.configure(srv=[(s, "a.web.example.com", 8081, 0, 5)],
                          hosts=[("127.0.0.5", "many.example.com")])
        yield dnsmasq.start()
        config = balancerConfig(
            [],
            discover=(parseSource(f"dns+srv://{s}"), parseSource("dns+a://many.example.com:9")),
            dnsServers=(("127.0.0.1", dnsmasq.port),),
            dnsMinTTL=0.05,
            dnsMaxTTL=5.0,
        )
        service, _, _ = yield startWithAdmin(self, config)

        def described():
            return sorted((b.url, b.weight, b.backup) for b in service.group if not b.removing)

        @inlineCallbacks
        def follows(*expected):
            yield poll(lambda: described() == sorted(expected), timeout=2.0,
                       what=f"{sorted(expected)} (now {described()})")

        many = ("http://127.0.0.5:9", 1, False)
        yield follows(("http://127.0.0.1:8081", 5, False), many)

        dnsmasq.configure(srv=[(s, "a.web.example.com", 8081, 0, 5),
                               (s, "b.web.example.com", 8082, 0, 3)],
                          hosts=[("127.0.0.5", "many.example.com")])
        yield dnsmasq.restart()
        yield follows(("http://127.0.0.1:8081", 5, False), ("http://127.0.0.1:8082", 3, False),
                      many)

        dnsmasq.configure(srv=[(s, "a.web.example.com", 8081, 0, 1),
                               (s, "b.web.example.com", 8082, 1, 3)],
                          hosts=[("127.0.0.5", "many.example.com")])
        yield dnsmasq.restart()
        yield follows(("http://127.0.0.1:8081", 1, False), ("http://127.0.0.1:8082", 3, True),
                      many)

        dnsmasq.configure(srv=[(s, "a.web.example.com", 8081, 0, 1)],
                          hosts=[("127.0.0.5", "many.example.com"),
                                 ("127.0.0.6", "many.example.com")])
        yield dnsmasq.restart()
        yield follows(("http://127.0.0.1:8081", 1, False), many, ("http://127.0.0.6:9", 1, False))

        dnsmasq.configure(srv=[(s, "a.web.example.com", 8081, 0, 1)],
                          hosts=[("127.0.0.6", "many.example.com")])
        dnsmasq.reload()
        yield follows(("http://127.0.0.1:8081", 1, False), ("http://127.0.0.6:9", 1, False))

        kept = described()
        dnsmasq.stop()
        sources = service.discovery.sources
        yield poll(lambda: all(source.status.state == "failing" for source in sources),
                   timeout=10, what="both sources to fail")
        self.assertEqual(described(), kept)
        yield dnsmasq.start()
        yield poll(lambda: all(source.status.state == "ok" for source in sources),
                   timeout=10, what="both sources to answer again")
        self.assertEqual(described(), kept)
