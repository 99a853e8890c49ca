"""
Tests for L{rrbalancer.discovery}: the C{--discover} URLs and the DNS
settings, what a source's answers do to the group of backends (added,
drained, removed, each source owning its own), and the service that runs
the sources.  The DNS sources themselves are tested in
C{test_discovery_dns}.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rrbalancer.backends import API, CONFIG, DISABLED, DRAINING, UP, BackendGroup
from rrbalancer.config import BackendConfig, Config, ConfigError, HealthConfig, buildConfig
from rrbalancer.discovery import (
    IDiscoverySource,
    SourceConfig,
    SourceStatus,
    parseSource,
    parseSources,
)
from rrbalancer.discovery._dns import DNSSource
from rrbalancer.discovery._etcd import EtcdBackend
from rrbalancer.discovery._service import Discovery, SourceFeed
from rrbalancer.reload import Reloader
from rrbalancer.service import makeService
from rrbalancer.settings import parseDNSServers
from rrbalancer.tap import Options

from .support import memoryReactor
from .test_tap import CapturedOutput, parse

# -- the URLs ----------------------------------------------------------------------


class ParseTests(SynchronousTestCase):
    def test_dnsA(self):
        self.assertEqual(
            parseSource("dns+a://Web.Example.com.:8080"),
            SourceConfig("dns+a://web.example.com:8080", "dns+a", "web.example.com", 8080),
        )
        self.assertEqual(
            parseSource("dns+a://web.example.com:8080, weight=3, backup"),
            SourceConfig(
                "dns+a://web.example.com:8080", "dns+a", "web.example.com", 8080, 3, True
            ),
        )
        self.assertEqual(
            parseSource({"url": "dns+a://web.example.com:8080", "weight": 2}).weight, 2
        )

    def test_dnsSRV(self):
        self.assertEqual(
            parseSource("DNS+SRV://_http._tcp.example.com"),
            SourceConfig("dns+srv://_http._tcp.example.com", "dns+srv", "_http._tcp.example.com"),
        )

    def assertRefused(self, spec, *mentions):
        e = self.assertRaises(ConfigError, parseSource, spec)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("discover"), message)
        for word in mentions:
            self.assertIn(word, message)
        return message

    def test_unknownScheme(self):
        self.assertRefused("consul://127.0.0.1:8500/web", "unknown scheme 'consul'", "dns+a")
        self.assertRefused("http://127.0.0.1:8081", "unknown scheme 'http'")

    def test_notAURL(self):
        self.assertRefused("web.example.com:8080", "not a URL", "dns+a://NAME:PORT")

    def test_missingPort(self):
        self.assertRefused("dns+a://web.example.com", "port", "dns+a://NAME:PORT")
        self.assertRefused("dns+a://web.example.com:", "port")
        self.assertRefused("dns+a://web.example.com:0", "0 is not a TCP port")
        self.assertRefused("dns+a://web.example.com:99999", "dns+a://web.example.com:99999")

    def test_badName(self):
        for name in ["web..example.com", "-web.example.com", "web!.example.com",
                     "a" * 64 + ".example.com", "ex\u00e4mple.com", ".", "."
                     + "a." * 127]:
            self.assertRefused(f"dns+a://{name}:8080")
        self.assertRefused("dns+a://:8080", "no name")

    def test_addressIsNoName(self):
        self.assertRefused("dns+a://192.0.2.1:8080", "--backend")
        self.assertRefused("dns+a://[2001:db8::1]:8080", "--backend")

    def test_srvShape(self):
        self.assertRefused("dns+srv://example.com", "_service._proto.NAME")
        self.assertRefused("dns+srv://_http._tcp.example.com:80", "port")
        self.assertRefused("dns+srv://_http._tcp.example.com,weight=2", "weight")
        self.assertRefused("dns+srv://_http._tcp.example.com,backup", "backup")

    def test_extras(self):
        self.assertRefused("dns+a://web.example.com:8080/path", "no path")
        self.assertRefused("dns+a://web.example.com:8080?x=1", "no path")
        self.assertRefused("dns+a://u:p@web.example.com:8080", "credentials")
        self.assertRefused("dns+a://web.example.com:8080,weight=0", "weight")
        self.assertRefused("dns+a://web.example.com:8080,heavy", "heavy")
        self.assertRefused({"url": "dns+a://web.example.com:8080", "wieght": 2}, "'weight'")
        self.assertRefused({"weight": 2}, "url")

    def test_etcd(self):
        self.assertEqual(
            parseSource("ETCD://127.0.0.1:2379/services/web/"),
            SourceConfig("etcd://127.0.0.1:2379/services/web/", "etcd", "/services/web/",
                         members=(("127.0.0.1", 2379),)),
        )
        cluster = parseSource("etcd://127.0.0.1:2379,127.0.0.2,etcd3.example.com:2479/s/")
        self.assertEqual(cluster.url, "etcd://127.0.0.1:2379,127.0.0.2:2379,etcd3.example.com:2479/s/")
        self.assertEqual(cluster.members, (("127.0.0.1", 2379), ("127.0.0.2", 2379),
                                           ("etcd3.example.com", 2479)))
        self.assertEqual(parseSource("etcd://Etcd.Example.com/s/").url,
                         "etcd://etcd.example.com:2379/s/")
        self.assertEqual(parseSource({"url": "etcd://[::1]:2380/a/b/"}).url,
                         "etcd://[::1]:2380/a/b/")

    def test_etcdRefused(self):
        self.assertRefused("etcd://127.0.0.1:2379", "key prefix", "etcd://HOST:PORT/PREFIX/")
        self.assertRefused("etcd://127.0.0.1:2379/", "key prefix")
        self.assertRefused("etcd://127.0.0.1:2379/services/web", "must end with /",
                           "etcd://HOST:PORT/services/web/")
        self.assertRefused("etcd:///services/web/", "etcd's address")
        self.assertRefused("etcd://127.0.0.1:0/s/", "0 is not a TCP port")
        self.assertRefused("etcd://u:p@127.0.0.1/s/", "credentials")
        self.assertRefused("etcd://127.0.0.1/s/?x=1", "no query")
        self.assertRefused("etcd://127.0.0.1/s/,weight=2", "weight")
        self.assertRefused("etcd://bad_name!/s/", "not a DNS name")
        self.assertRefused("etcd://127.0.0.1:2379,127.0.0.1/s/", "names 127.0.0.1 twice")
        self.assertRefused("etcd://127.0.0.1:2379,/s/", "etcd's address")
        self.assertRefused("etcd://127.0.0.1/s/, backup", "weight")

    def test_listedTwice(self):
        e = self.assertRaises(
            ConfigError,
            parseSources,
            ["dns+a://web.example.com:8080", "dns+a://WEB.example.com.:8080"],
        )
        self.assertIn("listed twice", str(e))

    def test_singleTable(self):
        e = self.assertRaises(ConfigError, parseSources, {"url": "dns+a://web.example.com:80"})
        self.assertIn("[[discover]]", str(e))


class DNSServerTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(
            parseDNSServers(["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5353", "[::1]"]),
            (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 53), ("::1", 5353), ("::1", 53)),
        )
        self.assertEqual(parseDNSServers("192.0.2.53:53"), (("192.0.2.53", 53),))

    def test_refused(self):
        for text in ["ns1.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x", ""]:
            e = self.assertRaises(ConfigError, parseDNSServers, [text])
            self.assertTrue(str(e).startswith("dns_server: "), str(e))


# -- the settings -----------------------------------------------------------------------


class SettingsTests(SynchronousTestCase):
    def test_flags(self):
        config = parse(
            "--discover", "dns+a://web.example.com:8080",
            "--discover", "dns+srv://_http._tcp.example.com",
            "--dns-server", "127.0.0.1:5353",
            "--dns-min-ttl", "2",
            "--dns-max-ttl", "60",
            "--admin", "none",
        )
        self.assertEqual(
            [s.url for s in config.discover],
            ["dns+a://web.example.com:8080", "dns+srv://_http._tcp.example.com"],
        )
        self.assertEqual(config.dnsServers, (("127.0.0.1", 5353),))
        self.assertEqual((config.dnsMinTTL, config.dnsMaxTTL), (2.0, 60.0))
        self.assertEqual(config.backends, ())

    def test_defaults(self):
        config = Config()
        self.assertEqual((config.discover, config.dnsServers), ((), ()))
        self.assertEqual((config.dnsMinTTL, config.dnsMaxTTL), (5.0, 300.0))

    def test_fileForms(self):
        """
        In a file, a list of URLs or [[discover]] tables, as backends.
        """
        listed = buildConfig({"discover": ["dns+a://web.example.com:8080,weight=2"]})
        tables = buildConfig({"discover": [{"url": "dns+a://web.example.com:8080", "weight": 2}]})
        self.assertEqual(listed.discover, tables.discover)
        self.assertEqual(listed.discover[0].weight, 2)
        one = buildConfig({"discover": "dns+srv://_http._tcp.example.com"})
        self.assertEqual(one.discover[0].url, "dns+srv://_http._tcp.example.com")

    def test_discoveryAloneIsEnough(self):
        """
        A balancer may start with discovery sources and no backend; without
        either, it may not.
        """
        buildConfig({"discover": ["dns+a://web.example.com:8080"]})
        e = self.assertRaises(ConfigError, buildConfig, {})
        self.assertIn("--discover", str(e))

    def test_ttlBounds(self):
        e = self.assertRaises(
            ConfigError,
            buildConfig,
            {"backend": ["http://127.0.0.1:8081"], "dns_min_ttl": 10, "dns_max_ttl": 5},
        )
        self.assertIn("dns_min_ttl", str(e))
        for key in ("dns_min_ttl", "dns_max_ttl"):
            self.assertRaises(
                ConfigError, buildConfig, {"backend": ["http://127.0.0.1:8081"], key: 0}
            )

    def test_reloadSaysRestart(self):
        """
        The sources are set at start: a reload that finds them changed says
        so and changes nothing.
        """
        config = buildConfig({"backend": ["http://127.0.0.1:8081"]})
        group = BackendGroup(HealthConfig(enabled=False), Clock())
        changed = buildConfig(
            {"backend": ["http://127.0.0.1:8081"], "discover": ["dns+a://web.example.com:80"]}
        )
        result = Reloader(config, group, load=lambda: changed).reload()
        self.assertEqual(result["ignored"], ["discover"])


class MistakeTests(SynchronousTestCase):
    """
    A bad source on the command line is one line and exit status 1.
    """

    def assertMistake(self, argv, mention):
        output = CapturedOutput(self)
        e = self.assertRaises(SystemExit, Options().parseOptions, argv)
        self.assertIsInstance(e.code, str)
        self.assertTrue(e.code.startswith("rrbalancer: "), e.code)
        self.assertNotIn("\n", e.code)
        self.assertIn(mention, e.code)
        self.assertEqual((output.stdout.getvalue(), output.stderr.getvalue()), ("", ""))

    def test_badSources(self):
        self.assertMistake(["--discover", "consul://127.0.0.1:8500"], "consul")
        self.assertMistake(["--discover", "dns+a://web.example.com"], "port")
        self.assertMistake(["--discover", "dns+a://web..example.com:80"], "empty label")
        self.assertMistake(["--discover", "etcd://127.0.0.1:2379/services/web"], "must end with /")
        self.assertMistake(["--discover", "dns+a://web.example.com:80\nx"], "CR, LF")
        self.assertMistake(
            ["--discover", "dns+a://web.example.com:80", "--dns-server", "ns.example.com"],
            "dns_server",
        )


# -- what answers do to the group -------------------------------------------------------


@implementer(IDiscoverySource)
class FakeSource:
    """
    A source whose sets the test gives (L{give}).
    """

    def __init__(self, url="dns+a://web.example.com:80"):
        self.config = parseSource(url)
        self.status = SourceStatus(0)
        self.onChange = None
        self.stopped = None

    def start(self, onChange):
        self.onChange = onChange

    def stop(self):
        self.stopped = Deferred()
        return self.stopped

    def give(self, *specs):
        self.onChange(frozenset(backends(*specs)))


def backends(*specs):
    """
    C{"a"} is http://192.0.2.1:80 (b, c ... the next addresses); C{("a", 3,
    True)} a backup of weight 3.
    """
    result = []
    for spec in specs:
        if not isinstance(spec, tuple):
            spec = (spec,)
        name, weight, backup = spec + (1, False)[len(spec) - 1:]
        result.append(BackendConfig(url(name), weight, backup))
    return result


def url(name):
    return f"http://192.0.2.{ord(name) - ord('a') + 1}:80"


class FeedTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.group = BackendGroup(HealthConfig(), self.clock)
        self.checked = []
        self.source = FakeSource()
        self.feed = SourceFeed(self.source, self.group, self.checked.append)
        self.source.start(self.feed.apply)
        self.events = []
        self.feed.log = Logger(observer=self.events.append)

    def state(self):
        return {
            b.url: (b.state, b.weight, b.backup, b.removing) for b in self.group
        }

    def test_joinAwaitsItsFirstCheck(self):
        """
        A backend that joins is checked at once and takes traffic once its
        first check passes.
        """
        self.source.give("a", ("b", 5, True))
        a, b = self.group.byURL(url("a")), self.group.byURL(url("b"))
        self.assertEqual(self.checked, [a, b])
        self.assertFalse(a.available)
        self.assertEqual(
            a.lastChangeReason,
            "discovery dns+a://web.example.com:80; waiting for its first health check",
        )
        self.assertEqual((b.weight, b.backup), (5, True))
        self.assertIsNone(self.group.pick())
        a.recordCheck(True, "HTTP 200")
        self.assertIs(self.group.pick(), a)
        self.assertEqual(a.owners, ("dns+a://web.example.com:80",))

    def test_leaveDrains(self):
        """
        A backend that leaves the set drains, and goes once its last request
        in flight has ended.
        """
        self.source.give("a", "b")
        b = self.group.byURL(url("b"))
        b.active = 1
        self.source.give("a")
        self.assertEqual((b.state, b.removing), (DRAINING, True))
        self.assertIs(self.group.byURL(url("b")), b)
        b.active = 0
        self.assertEqual(list(self.state()), [url("a")])

    def test_comesBackWhileDraining(self):
        self.source.give("a", "b")
        b = self.group.byURL(url("b"))
        b.active = 1
        self.source.give("a")
        result = self.feed.apply(frozenset(backends("a", "b")))
        self.assertEqual(result["changed"], [url("b")])
        b.active = 0
        self.assertIs(self.group.byURL(url("b")), b)
        self.assertEqual((b.adminState, b.removing), (UP, False))

    def test_reweighed(self):
        """
        The source changes the weight and role of a backend it describes
        differently; a change it does not make (an operator's, through the
        API) stands.
        """
        self.source.give("a", "b")
        a, b = self.group.byURL(url("a")), self.group.byURL(url("b"))
        self.group.reconfigure(b, 7, False)
        result = self.feed.apply(frozenset(backends(("a", 4, True), "b")))
        self.assertEqual(result, {"added": [], "removed": [], "changed": [url("a")]})
        self.assertEqual((a.weight, a.backup, b.weight), (4, True, 7))

    def test_result(self):
        result = self.feed.apply(frozenset(backends("a", "b")))
        self.assertEqual(result, {"added": [url("a"), url("b")], "removed": [], "changed": []})
        self.assertEqual(
            formatEvent(self.events[-1]),
            "discovery dns+a://web.example.com:80: 2 backends; added "
            f"['{url('a')}', '{url('b')}'], removed none, changed none",
        )
        result = self.feed.apply(frozenset(backends("b")))
        self.assertEqual(result, {"added": [], "removed": [url("a")], "changed": []})
        self.events.clear()
        self.feed.apply(frozenset(backends("b")))
        self.assertEqual(self.events, [])

    def test_manyNamedInBrief(self):
        """
        An answer that adds many backends names the first five in its line,
        and says how many more; the event carries the counts.
        """
        names = "abcdefgh"
        self.feed.apply(frozenset(backends(*names)))
        event = self.events[-1]
        text = formatEvent(event)
        self.assertTrue(text.startswith("discovery dns+a://web.example.com:80: 8 backends; added ['"), text)
        self.assertIn("'] and 3 more, removed none, changed none", text)
        self.assertEqual(text.count("http://"), 5)
        self.assertEqual((event["addedCount"], event["removedCount"]), (8, 0))

    def test_emptySet(self):
        """
        An answer with no backend (the name has none now) drains them all.
        """
        self.source.give("a", "b")
        self.source.give()
        self.assertEqual(len(self.group), 0)

    def test_state(self):
        """
        A state the source gives (an etcd value's) applies when first given
        and each time it changes; an operator's change made meanwhile stands
        until then.  A backend enabled from disabled is checked at once.
        """

        def give(**states):
            return self.feed.apply(frozenset(
                EtcdBackend(url(name), state=state) for name, state in states.items()
            ))

        give(a="draining", b=None)
        a, b = self.group.byURL(url("a")), self.group.byURL(url("b"))
        self.assertEqual((a.adminState, b.adminState), (DRAINING, UP))
        b.setAdminState(DISABLED, "disabled by 127.0.0.1")
        self.assertEqual(give(a="draining", b=None)["changed"], [])
        self.assertEqual(b.adminState, DISABLED)
        del self.checked[:]
        self.assertEqual(give(a=None, b="up")["changed"], [url("a"), url("b")])
        self.assertEqual((a.adminState, b.adminState), (UP, UP))
        self.assertEqual(self.checked, [b])
        give(a="disabled", b="up")
        self.assertEqual(a.adminState, DISABLED)
        self.assertIn("discovery dns+a://web.example.com:80", a.lastChangeReason)

    def test_stateOfAReturningBackend(self):
        self.feed.apply(frozenset([EtcdBackend(url("a"), state="disabled")]))
        a = self.group.byURL(url("a"))
        a.active = 1
        self.feed.apply(frozenset())
        self.assertTrue(a.removing)
        self.feed.apply(frozenset([EtcdBackend(url("a"), state="disabled")]))
        self.assertEqual((a.adminState, a.removing), (DISABLED, False))


class OwnershipTests(SynchronousTestCase):
    """
    Sources, the config file and the API never remove each other's
    backends.
    """

    def setUp(self):
        self.group = BackendGroup(HealthConfig(enabled=False), Clock())
        self.one = FakeSource("dns+a://one.example.com:80")
        self.two = FakeSource("dns+srv://_http._tcp.example.com")
        for source in (self.one, self.two):
            source.start(SourceFeed(source, self.group).apply)

    def urls(self):
        return sorted(b.url for b in self.group if not b.removing)

    def test_twoSourcesOneServer(self):
        self.one.give("a", "b")
        self.two.give("b", "c")
        b = self.group.byURL(url("b"))
        self.assertEqual(b.owners, ("dns+a://one.example.com:80", "dns+srv://_http._tcp.example.com"))
        self.one.give("a")
        self.assertEqual(self.urls(), [url("a"), url("b"), url("c")])
        self.two.give("c")
        self.assertEqual(self.urls(), [url("a"), url("c")])

    def test_staticBackendKept(self):
        """
        A backend of the config file that a source lists too stays when the
        source drops it, and keeps its own weight.
        """
        static = self.group.add(BackendConfig(url("a"), weight=9), owner=CONFIG)
        self.one.give(("a", 2), "b")
        self.assertEqual(static.weight, 9)
        self.one.give("b")
        self.assertEqual(self.urls(), [url("a"), url("b")])
        self.assertEqual(static.owners, (CONFIG,))

    def test_apiBackendKept(self):
        self.group.add(BackendConfig(url("c")), owner=API)
        self.one.give("a")
        self.two.give("b")
        self.one.give()
        self.two.give()
        self.assertEqual(self.urls(), [url("c")])

    def test_reloadKeepsDiscovered(self):
        """
        A reload whose file drops a backend a source lists leaves it.
        """
        config = buildConfig({"backend": [url("a"), url("b")]})
        for b in config.backends:
            self.group.add(b, owner=CONFIG)
        self.one.give("b")
        reloader = Reloader(config, self.group, load=lambda: buildConfig({"backend": [url("a")]}))
        self.assertEqual(reloader.reload()["removed"], [])
        self.assertEqual(self.urls(), [url("a"), url("b")])
        self.one.give()
        self.assertEqual(self.urls(), [url("a")])

    def test_removedThroughTheAPI(self):
        """
        A discovered backend removed through the API stays removed while
        the source's answer stays the same, and is added again when it
        next changes and still lists it (as a reload brings back a
        backend of the file).
        """
        self.one.give("a", "b")
        a = self.group.byURL(url("a"))
        self.group.retire(a, "removed by 127.0.0.1")
        self.assertIsNone(self.group.byURL(url("a")))
        self.one.give("a", "b", "c")
        self.assertEqual(self.urls(), [url("a"), url("b"), url("c")])


# -- the service --------------------------------------------------------------------------


class ServiceTests(SynchronousTestCase):
    def test_interface(self):
        verifyObject(IDiscoverySource, FakeSource())
        verifyObject(
            IDiscoverySource,
            DNSSource(parseSource("dns+a://web.example.com:80"), None, Clock()),
        )

    def test_startAndStop(self):
        """
        Starting starts every source; stopping stops them, and once they
        have all stopped, runs the cleanups (the shared resolver's close).
        """
        group = BackendGroup(HealthConfig(enabled=False), Clock())
        one, two = FakeSource(), FakeSource("dns+srv://_http._tcp.example.com")
        cleaned = []
        discovery = Discovery(group, [one, two], cleanups=[lambda: cleaned.append(1)])
        discovery.startService()
        one.give("a")
        two.give("b")
        self.assertEqual(len(group), 2)
        d = discovery.stopService()
        one.stopped.callback(None)
        self.assertEqual(cleaned, [])
        self.assertNoResult(d)
        two.stopped.callback(None)
        self.assertEqual(cleaned, [1])
        self.successResultOf(d)

    def test_share(self):
        """
        An operator's change goes to each source that lists the backend and
        can take it back.
        """
        group = BackendGroup(HealthConfig(enabled=False), Clock())
        one, two, three = FakeSource(), FakeSource("dns+a://two.example.com:80"), FakeSource(
            "dns+a://three.example.com:80")
        shared = []
        one.share = lambda backend, state, weight: shared.append((1, backend.url, state, weight))
        two.share = lambda backend, state, weight: shared.append((2, backend.url, state, weight))
        discovery = Discovery(group, [one, two, three])
        discovery.startService()
        one.give("a")
        three.give("a")
        discovery.share(group.byURL(url("a")), "draining", None)
        self.assertEqual(shared, [(1, url("a"), "draining", None)])

    def test_status(self):
        group = BackendGroup(HealthConfig(enabled=False), Clock())
        source = FakeSource()
        source.status.answered(12.5, 3)
        [status] = Discovery(group, [source]).status()
        self.assertEqual(
            status,
            {"url": "dns+a://web.example.com:80", "kind": "dns+a", "state": "ok",
             "since": 12.5, "last_answer": 12.5, "last_error": None, "backends": 3,
             "lookups": 1, "failures": 0, "next_lookup": None},
        )

    def test_balancerWithDiscoveryOnly(self):
        """
        A balancer built from discovery sources alone has no backend until
        they answer, so that a request gets 503; building it reads no file
        and arms no timer.
        """
        reactor = memoryReactor()
        config = Config(
            discover=(parseSource("dns+a://web.example.com:80"),),
            admin=None,
            ports=("tcp:0:interface=127.0.0.1",),
        )
        service = makeService(config, reactor)
        self.assertEqual(len(service.group), 0)
        self.assertEqual([s.config.url for s in service.discovery.sources],
                         ["dns+a://web.example.com:80"])
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertIsNone(service.group.pick())
