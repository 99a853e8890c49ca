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

This module parses the URLs (at startup and for C{--check}, so that a
mistake is one line) and builds the sources; C{_dns} holds the DNS ones,
C{_etcd} the etcd one (C{_etcdclient} the calls it makes), C{_service} the
service that applies their answers.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from zope.interface import Attribute, Interface

from ..settings import (
    BackendConfig,
    ConfigError,
    _nearest,
    splitWeightAndBackup,
    asList,
    boolean,
    integer,
    string,
    tcpPortNumber,
)

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


@dataclass(frozen=True)
class SourceConfig:
    """
    One C{--discover} URL, checked.

    @ivar url: the URL as written back (lower-case scheme and name); the
        source's name in the log, the admin API and the metrics, and the
        owner of the backends it adds.
    @ivar scheme: C{dns+a}, C{dns+srv} or C{etcd}.
    @ivar name: the DNS name to ask about (no trailing dot), or etcd's key
        prefix.
    @ivar port: the backends' port (C{dns+a}); None where the records give
        it or the URL names no backend (C{etcd}).
    @ivar weight: the weight of each backend (C{dns+a}; SRV records carry
        their own).
    @ivar backup: each backend is a backup (C{dns+a}).
    @ivar members: the (address or name, port) of each etcd member given
        (C{etcd}).
    """

    url: str
    scheme: str
    name: str
    port: Optional[int] = None
    weight: int = 1
    backup: bool = False
    members: Tuple[Tuple[str, int], ...] = ()


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


# -- parsing ---------------------------------------------------------------------


SCHEMES = ("dns+a", "dns+srv", "etcd")
ETCD_PORT = 2379
SOURCE_KEYS = ("url", "weight", "backup")
_LABEL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def checkDNSName(text: str, where: str) -> str:
    """
    A DNS name as it goes into a query: ASCII labels of letters, digits,
    hyphens (and underscores, which SRV names begin with), 1 to 63 bytes
    each, 253 in all; a trailing dot is allowed and dropped.
    """
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ConfigError(f"{where}: no name to look up")
    if not name.isascii():
        raise ConfigError(f"{where}: {text!r}: write the name in ASCII (its xn-- form)")
    if len(name) > 253:
        raise ConfigError(f"{where}: {text!r} is longer than a DNS name may be (253)")
    for label in name.split("."):
        if not label:
            raise ConfigError(f"{where}: {text!r} has an empty label")
        if len(label) > 63:
            raise ConfigError(f"{where}: {text!r} has a label longer than 63")
        if not _LABEL.issuperset(label) or label[0] == "-" or label[-1] == "-":
            raise ConfigError(
                f"{where}: {text!r} is not a DNS name (letters, digits and "
                "hyphens between dots)"
            )
    return name


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parseSource(spec: Any, where: str = "discover") -> SourceConfig:
    """
    Parse the command line's C{URL[,weight=N][,backup]}, or a TOML table
    with the keys C{url}, C{weight} and C{backup}.
    """
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}{_nearest(unknown[0], SOURCE_KEYS)}"
            )
        if "url" not in spec:
            raise ConfigError(f"{where}: every source needs a url")
        options = dict(spec)
        text = string(options.pop("url"), where).strip()
    else:
        text = string(spec, where).strip()
        if text.lower().startswith("etcd://"):
            # Its commas part the members; it takes no option.
            options = {}
        else:
            text, options = splitWeightAndBackup(text, where)
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(
            f"{where}: {text!r} is not a URL such as dns+a://NAME:PORT or "
            "dns+srv://_http._tcp.NAME"
        )
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{where}: {text!r}: unknown scheme {scheme!r} (expected {', '.join(SCHEMES)})"
        )
    where = f"{where} {text}"
    try:
        parts = urlsplit(text)
        # (etcd's URL may name several members, each with its port.)
        port = parts.port if scheme != "etcd" else None
    except ValueError as e:
        raise ConfigError(f"{where}: bad URL: {e}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}: must not carry credentials")
    if scheme == "etcd":
        return _parseEtcd(parts, options, where)
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigError(f"{where}: must name a DNS name only (no path, query or fragment)")
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        raise ConfigError(f"{where}: an address is not a name to look up; give it as --backend")
    host = host.partition(":")[0]
    if _isAddress(host):
        raise ConfigError(f"{where}: an address is not a name to look up; give it as --backend")
    name = checkDNSName(host, where)
    if scheme == "dns+a":
        if port is None:
            raise ConfigError(f"{where}: needs the backends' port: dns+a://NAME:PORT")
        port = tcpPortNumber(where, str(port))
        url = f"dns+a://{name}:{port}"
        weight = integer(options.get("weight", 1), f"{where}: weight", minimum=1)
        backup = boolean(options.get("backup", False), f"{where}: backup")
        return SourceConfig(url, scheme, name, port, weight, backup)
    if port is not None or host != parts.netloc:
        raise ConfigError(f"{where}: SRV records give the port; write dns+srv://_http._tcp.NAME")
    labels = name.split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
        raise ConfigError(
            f"{where}: expected _service._proto.NAME, such as dns+srv://_http._tcp.example.com"
        )
    if options:
        raise ConfigError(
            f"{where}: SRV records carry their own weight and priority "
            "(no weight= or backup here)"
        )
    return SourceConfig(f"dns+srv://{name}", scheme, name)


def _parseEtcd(parts, options, where: str) -> SourceConfig:
    """
    C{etcd://HOST[:PORT][,HOST[:PORT]...]/PREFIX/}: the client address of
    each etcd member to ask (port 2379 unless given) and the key prefix
    whose keys are the backends.
    """
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: no query or fragment; write etcd://HOST:PORT/PREFIX/")
    if options:
        raise ConfigError(
            f"{where}: each key's value carries its weight and backup "
            "(no weight= or backup here)"
        )
    members: List[Tuple[str, int]] = []
    for item in parts.netloc.split(","):
        try:
            member = urlsplit(f"//{item.strip()}")
            port = member.port
        except ValueError as e:
            raise ConfigError(f"{where}: bad address {item!r}: {e}") from None
        host = member.hostname
        if not host:
            raise ConfigError(f"{where}: needs etcd's address: etcd://HOST:PORT/PREFIX/")
        if not _isAddress(host):
            host = checkDNSName(host, where)
        port = ETCD_PORT if port is None else tcpPortNumber(where, str(port))
        if (host, port) in members:
            raise ConfigError(f"{where}: names {item.strip()} twice")
        members.append((host, port))
    prefix = parts.path
    if "," in prefix:
        raise ConfigError(
            f"{where}: each key's value carries its weight and backup "
            "(no weight= or backup here)"
        )
    if prefix in ("", "/"):
        raise ConfigError(
            f"{where}: needs the key prefix of the backends: etcd://HOST:PORT/PREFIX/"
        )
    if not prefix.endswith("/"):
        raise ConfigError(
            f"{where}: the prefix must end with / (else the keys of {prefix}x/ "
            f"would be backends too): etcd://HOST:PORT{prefix}/"
        )
    shown = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in members)
    return SourceConfig(f"etcd://{shown}{prefix}", "etcd", prefix, members=tuple(members))


def parseSources(value: Any, name: str = "discover") -> Tuple[SourceConfig, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}: a single [{name}] table; write [[{name}]] (one per source)")
    sources = tuple(parseSource(spec, name) for spec in asList(value))
    seen = set()
    for source in sources:
        if source.url in seen:
            raise ConfigError(f"{name}: {source.url} is listed twice")
        seen.add(source.url)
    return sources


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
