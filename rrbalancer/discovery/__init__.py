"""
Backends found by discovery: a source of truth outside the balancer (DNS
records, keys in etcd) tells every balancer reading it which servers to send
requests to, so that a server added there takes traffic everywhere without
anybody typing it into each balancer.

Each C{--discover URL} becomes one L{IDiscoverySource}, which hands the
whole set of backends it currently describes to a callback each time the
set changes.  L{Discovery} applies those sets to the same
L{rrbalancer.backends.BackendGroup} the config file, a reload and the
admin API change, through the same path: a backend that joins takes
traffic once its first health check passes; one that leaves is drained
and removed without cutting a request.  Each source owns what it added,
so that sources never remove each other's backends (nor those of the
config file or the API).

The sources:

 - C{dns+a://NAME:PORT}: every A and AAAA address of NAME, on PORT;
 - C{dns+srv://_service._proto.NAME}: the SRV records of the name; the
   lowest priority present gives the primaries, higher ones the backups,
   and an SRV weight is a backend's weight;
 - C{etcd://HOST:PORT[,HOST:PORT...]/PREFIX/}: every key under the prefix
   in etcd (asked of the members given, one after the other as they fail),
   whose value is a backend's URL or a JSON object of its url, weight,
   backup and state; read once, then watched.

C{_config} parses the URLs (at startup and for C{--check}, so that a
mistake is one line); this module builds the sources; C{_dns} holds the DNS ones,
C{_etcd} the etcd one (C{_etcdclient} the calls it makes), C{_service} the
service that applies their answers.
"""

from typing import Any, Callable, Dict, FrozenSet, List, Optional

from zope.interface import Attribute, Interface

from ..values import BackendConfig
from ._config import SourceConfig, parseSource, parseSources

__all__ = [
    "IDiscoverySource",
    "SourceConfig",
    "SourceStatus",
    "buildDiscovery",
    "parseSource",
    "parseSources",
]


class IDiscoverySource(Interface):
    """
    Somewhere the set of backends is written down, read again whenever it
    may have changed.
    """

    config = Attribute("The L{SourceConfig} it was made from; C{config.url} names it.")
    status = Attribute("Its L{SourceStatus}: whether it answers, since when, how many backends.")

    def start(onChange):
        """
        Start reading the source.

        @param onChange: called with the whole current set of backends (a
            C{frozenset} of L{rrbalancer.settings.BackendConfig}) after the
            first answer and each time the set changes afterwards; never
            called once the source is stopped.
        """

    def stop():
        """
        Stop reading.

        @return: a L{twisted.internet.defer.Deferred} that fires once
            nothing of the source is left in flight.
        """


class SourceStatus:
    """
    How a source is doing, for the log, the admin API and the metrics.

    @ivar state: C{starting} (no answer yet), C{ok} (its last lookup was
        answered) or C{failing} (its last lookup failed; the last set it
        gave stays).
    @ivar since: when the state began (seconds since the epoch).
    @ivar lastAnswer: when it last answered, or None.
    @ivar lastError: why its last lookup failed, or None while it answers.
    @ivar backends: how many backends its current set holds.
    @ivar lookups, failures: lookups made, and those that failed.
    @ivar nextLookup: when it asks again, or None.
    """

    STARTING = "starting"
    OK = "ok"
    FAILING = "failing"

    def __init__(self, now: float) -> None:
        self.state = self.STARTING
        self.since = now
        self.lastAnswer: Optional[float] = None
        self.lastError: Optional[str] = None
        self.backends = 0
        self.lookups = 0
        self.failures = 0
        self.nextLookup: Optional[float] = None

    def answered(self, now: float, backends: int) -> Optional[str]:
        """
        A lookup was answered.

        @return: the state it leaves, if it changed.
        """
        self.lookups += 1
        self.lastAnswer = now
        self.lastError = None
        self.backends = backends
        return self._enter(self.OK, now)

    def failed(self, now: float, reason: str) -> bool:
        """
        A lookup failed.

        @return: whether that is news worth a line in the log: the source
            was not failing, or now fails for another reason.
        """
        self.lookups += 1
        self.failures += 1
        news = self.state != self.FAILING or reason != self.lastError
        self.lastError = reason
        self._enter(self.FAILING, now)
        return news

    def _enter(self, state: str, now: float) -> Optional[str]:
        if state == self.state:
            return None
        previous, self.state, self.since = self.state, state, now
        return previous

    def asDict(self) -> Dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since,
            "last_answer": self.lastAnswer,
            "last_error": self.lastError,
            "backends": self.backends,
            "lookups": self.lookups,
            "failures": self.failures,
            "next_lookup": self.nextLookup,
        }


class Handover:
    """
    What a source gives its callback: the whole set, only when it differs
    from the last one given.  A set the callback could not apply is logged
    (in the source's log) and given again with the next answer, whether
    that one changed or not.

    @ivar current: the last set given, or None before the first (or after
        one that could not be applied).
    """

    def __init__(self, source: "IDiscoverySource") -> None:
        self._source = source
        self.onChange: Callable[[FrozenSet[BackendConfig]], None] = lambda backends: None
        self.current: Optional[FrozenSet[BackendConfig]] = None

    def give(self, backends: FrozenSet[BackendConfig]) -> None:
        if backends == self.current:
            return
        self.current = backends
        try:
            self.onChange(backends)
        except Exception:
            self.current = None
            self._source.log.failure(
                "discovery {url}: its answer could not be applied", url=self._source.config.url
            )


# -- building ----------------------------------------------------------------------


def buildDiscovery(config, group, reactor, onAdded: Callable = lambda backend: None):
    """
    The L{Discovery} service of C{config.discover}'s sources, feeding
    C{group}; None without sources.

    @param onAdded: called with each backend a source adds (to check it at
        once).
    """
    if not config.discover:
        return None
    from ._dns import DNSSource, SharedResolver
    from ._etcd import EtcdSource, etcdURLs
    from ._etcdclient import EtcdClient, TreqClient
    from ._service import Discovery

    resolver = SharedResolver(reactor, config.dnsServers)
    cleanups: List[Callable] = [resolver.close]
    http = None
    sources: List[IDiscoverySource] = []
    for spec in config.discover:
        if spec.scheme == "etcd":
            if http is None:
                http = TreqClient(reactor)
                cleanups.append(http.close)
            sources.append(EtcdSource(spec, EtcdClient(http, etcdURLs(spec), reactor), reactor))
        else:
            sources.append(DNSSource(spec, resolver, reactor, config.dnsMinTTL, config.dnsMaxTTL))
    return Discovery(group, sources, onAdded, cleanups=cleanups)
