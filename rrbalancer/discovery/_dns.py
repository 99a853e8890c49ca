"""
Backends from DNS: C{dns+a://NAME:PORT} and C{dns+srv://_service._proto.NAME}.

A source asks again when its answer's TTL runs out, held between
C{--dns-min-ttl} and C{--dns-max-ttl} so that a TTL of 0 does not turn
into a flood of queries and a day-long one does not hide a change for a
day.  A lookup is all or nothing: if any of its queries fails (no answer,
SERVFAIL, NXDOMAIN, REFUSED), the source keeps the last set it gave and
asks again soon, sooner than its TTL (1 s, then twice as long each time,
never longer than the minimum TTL); a DNS server that is down or a zone
being rewritten then never empties the balancer.  An answer that holds no
record is an answer: the name has no servers now, and its backends drain.
(So is an SRV target that no longer exists: the record outlived its
server, which gives no backend, and the other records still count.)

Queries go to C{--dns-server}, or to the servers of C{/etc/resolv.conf},
through L{twisted.names.client.Resolver} on the balancer's reactor, with
no cache of its own (the TTLs are honoured here); an answer too large for
UDP is asked again over TCP.
"""

import socket
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from twisted.internet.defer import (
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, error
from zope.interface import implementer

from .._twisted import stopRereadingResolvConf
from ..values import BackendConfig
from . import Handover, IDiscoverySource, SourceConfig, SourceStatus

# Seconds before each try of a query is given up (and sent again): the
# resolver's own default waits a minute in all, far too long for a
# balancer to notice that its DNS server is gone.
QUERY_TIMEOUT = (1, 2, 4)
# The first retry after a failed lookup, in seconds; each next one waits
# twice as long, up to the minimum TTL.
FIRST_RETRY = 1.0

# What is looked up, and the answer: the set of backends, and the TTL
# after which to ask again (None for no record to take one from).
Answer = Tuple[FrozenSet[BackendConfig], Optional[float]]


class LookupFailed(Exception):
    """
    One query of a lookup failed; the message says which, and how.

    @ivar noSuchName: the server said the name does not exist (NXDOMAIN).
    """

    def __init__(self, message: str, noSuchName: bool = False) -> None:
        Exception.__init__(self, message)
        self.noSuchName = noSuchName


_RCODES = {
    error.DNSNameError: "NXDOMAIN (no such name)",
    error.DNSServerError: "SERVFAIL",
    error.DNSQueryRefusedError: "REFUSED",
    error.DNSFormatError: "FORMERR",
    error.DNSNotImplementedError: "NOTIMP",
    error.DNSUnknownError: "an unknown DNS error",
}


def describeDNSFailure(failure) -> str:
    """
    A failed query, in the words of DNS.
    """
    for kind, words in _RCODES.items():
        if failure.check(kind):
            return words
    if failure.check(TimeoutError, error.DNSQueryTimeoutError):
        return f"no answer within {sum(QUERY_TIMEOUT)}s"
    return failure.getErrorMessage() or failure.type.__name__


def _query(lookup: Deferred, kind: str, name: str) -> Deferred:
    """
    C{lookup}, its failure told as a L{LookupFailed} naming the query.
    """

    def failed(failure):
        raise LookupFailed(
            f"{kind} {name}: {describeDNSFailure(failure)}",
            noSuchName=failure.check(error.DNSNameError) is not None,
        )

    return lookup.addErrback(failed)


def _firstFailure(failure):
    """
    The failure inside a L{gatherResults} failure.
    """
    if failure.check(FirstError):
        return failure.value.subFailure
    return failure


def _address(record: dns.RRHeader) -> Optional[str]:
    if record.type == dns.A:
        return socket.inet_ntop(socket.AF_INET, record.payload.address)
    if record.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.payload.address)
    return None


def backendURL(address: str, port: int) -> str:
    if ":" in address:
        return f"http://[{address}]:{port}"
    return f"http://{address}:{port}"


def _minimum(ttls: Iterable[Optional[float]]) -> Optional[float]:
    known = [t for t in ttls if t is not None]
    return min(known) if known else None


def _addresses(answers: Sequence[dns.RRHeader]) -> Tuple[List[str], Optional[float]]:
    """
    The addresses of an A or AAAA answer, and its TTL (that of the CNAMEs
    on the way included).
    """
    addresses = []
    ttls = []
    for record in answers:
        address = _address(record)
        if address is not None:
            addresses.append(address)
            ttls.append(record.ttl)
        elif record.type == dns.CNAME:
            ttls.append(record.ttl)
    return addresses, _minimum(ttls)


def lookupAddresses(resolver, name: str) -> Deferred:
    """
    The A and AAAA addresses of C{name}: fires with (addresses, TTL), or
    fails with L{LookupFailed} if either query fails.
    """
    queries = [
        _query(resolver.lookupAddress(name), "A", name),
        _query(resolver.lookupIPV6Address(name), "AAAA", name),
    ]

    def combine(results):
        addresses: List[str] = []
        ttls = []
        for answers, authority, additional in results:
            found, ttl = _addresses(answers)
            addresses.extend(found)
            ttls.append(ttl)
        return addresses, _minimum(ttls)

    return gatherResults(queries, consumeErrors=True).addCallbacks(combine, _firstFailure)


class AddressLookup:
    """
    C{dns+a://NAME:PORT}: each A and AAAA address of the name is a backend
    on the port, all of the source's weight and role.
    """

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    def __call__(self, resolver) -> Deferred:
        config = self.config

        def backends(found):
            addresses, ttl = found
            return (
                frozenset(
                    BackendConfig(backendURL(a, config.port), config.weight, config.backup)
                    for a in addresses
                ),
                ttl,
            )

        return lookupAddresses(resolver, config.name).addCallback(backends)


class ServiceLookup:
    """
    C{dns+srv://_service._proto.NAME}: each SRV record is a target's
    addresses on the record's port.  The lowest priority present gives the
    primaries, every higher one backups; the record's weight is the
    backends' weight (0, "rarely", becomes the least weight there is, 1).
    A target's addresses come from the answer's additional section when
    the server put them there, else from their own queries; a target with
    no such name gives no backend (the record outlived its server), and a
    target of "." none either (RFC 2782: no service here).
    """

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    def __call__(self, resolver) -> Deferred:
        name = self.config.name
        d = _query(resolver.lookupService(name), "SRV", name)
        return d.addCallback(self._targets, resolver)

    def _targets(self, result, resolver) -> Deferred:
        answers, authority, additional = result
        records = [
            r for r in answers
            if r.type == dns.SRV and r.payload.target.name not in (b"", b".")
        ]
        if not records:
            return succeed((frozenset(), _minimum(r.ttl for r in answers)))
        given: Dict[bytes, List[dns.RRHeader]] = {}
        for record in additional:
            if _address(record) is not None:
                given.setdefault(record.name.name.lower(), []).append(record)
        targets = sorted({r.payload.target.name.lower() for r in records})
        lookups = []
        for target in targets:
            if target in given:
                lookups.append(succeed(_addresses(given[target])))
            else:
                lookups.append(self._lookupTarget(resolver, target.decode("ascii")))
        d = gatherResults(lookups, consumeErrors=True)
        d.addCallbacks(lambda found: self._backends(records, dict(zip(targets, found))), _firstFailure)
        return d

    @staticmethod
    def _lookupTarget(resolver, target: str) -> Deferred:
        d = lookupAddresses(resolver, target)

        def gone(failure):
            if failure.check(LookupFailed) and failure.value.noSuchName:
                return [], None
            return failure

        return d.addErrback(gone)

    @staticmethod
    def _backends(records, found) -> Answer:
        lowest = min(r.payload.priority for r in records)
        weights: Dict[str, int] = {}
        primary: Dict[str, bool] = {}
        ttls = [r.ttl for r in records]
        for record in records:
            srv = record.payload
            addresses, ttl = found[srv.target.name.lower()]
            ttls.append(ttl)
            for address in addresses:
                url = backendURL(address, srv.port)
                # One server named twice (two records, or two targets of
                # one address) gets the share of both.
                weights[url] = weights.get(url, 0) + max(srv.weight, 1)
                primary[url] = primary.get(url, False) or srv.priority == lowest
        return (
            frozenset(
                BackendConfig(url, weight, not primary[url]) for url, weight in weights.items()
            ),
            _minimum(ttls),
        )


class _Resolver(client.Resolver):
    """
    L{client.Resolver} that can be put away: its re-reading of
    C{resolv.conf} stopped and its TCP connections closed (it keeps them
    open for later queries), so that a stopped balancer leaves nothing
    behind.
    """

    _closing: Optional[List[Deferred]] = None

    def close(self) -> Deferred:
        stopRereadingResolvConf(self)
        if not self.connections:
            return succeed(None)
        done = Deferred()
        self._closing = (self._closing or []) + [done]
        for protocol in list(self.connections):
            protocol.transport.loseConnection()
        return done

    def connectionMade(self, protocol):
        client.Resolver.connectionMade(self, protocol)
        if self._closing is not None:
            protocol.transport.loseConnection()

    def connectionLost(self, protocol):
        client.Resolver.connectionLost(self, protocol)
        if self._closing is not None and not self.connections:
            waiting, self._closing = self._closing, None
            for d in waiting:
                d.callback(None)


class SharedResolver:
    """
    The resolver every DNS source of a balancer asks, made at the first
    lookup rather than when the balancer is built, so that building one
    (for C{--check} too) reads no file and leaves no timer behind.

    @param servers: (address, port) pairs; none for those of
        C{resolv.conf}.
    """

    def __init__(
        self, reactor, servers: Sequence[Tuple[str, int]] = (), resolv: str = "/etc/resolv.conf"
    ) -> None:
        self._reactor = reactor
        self._servers = list(servers)
        self._resolv = resolv
        self._resolver: Optional[_Resolver] = None

    def _get(self) -> _Resolver:
        if self._resolver is None:
            if self._servers:
                self._resolver = _Resolver(
                    servers=self._servers, reactor=self._reactor, timeout=QUERY_TIMEOUT
                )
            else:
                self._resolver = _Resolver(
                    resolv=self._resolv, reactor=self._reactor, timeout=QUERY_TIMEOUT
                )
        return self._resolver

    def lookupAddress(self, name: str) -> Deferred:
        return maybeDeferred(lambda: self._get().lookupAddress(name))

    def lookupIPV6Address(self, name: str) -> Deferred:
        return maybeDeferred(lambda: self._get().lookupIPV6Address(name))

    def lookupService(self, name: str) -> Deferred:
        return maybeDeferred(lambda: self._get().lookupService(name))

    def close(self) -> Deferred:
        resolver, self._resolver = self._resolver, None
        if resolver is None:
            return succeed(None)
        return resolver.close()


@implementer(IDiscoverySource)
class DNSSource:
    """
    One C{dns+a} or C{dns+srv} URL, asked again at its answer's TTL.

    @param resolver: answers C{lookupAddress}, C{lookupIPV6Address} and
        C{lookupService} as an L{twisted.internet.interfaces.IResolver}.
    @param minTTL, maxTTL: the bounds of the wait between two lookups.
    """

    log = Logger()

    def __init__(
        self,
        config: SourceConfig,
        resolver,
        clock: IReactorTime,
        minTTL: float = 5.0,
        maxTTL: float = 300.0,
    ) -> None:
        self.config = config
        self._lookup: Callable[..., Deferred] = (
            AddressLookup(config) if config.scheme == "dns+a" else ServiceLookup(config)
        )
        self._resolver = resolver
        self._clock = clock
        self.minTTL = minTTL
        self.maxTTL = maxTTL
        self.status = SourceStatus(clock.seconds())
        self.running = False
        self._handover = Handover(self)
        self._call = None
        self._inFlight: Optional[Deferred] = None
        self._idle: List[Deferred] = []
        self._failuresInRow = 0

    def __repr__(self) -> str:
        return f"<DNSSource {self.config.url} {self.status.state}>"

    def start(self, onChange: Callable[[FrozenSet[BackendConfig]], None]) -> None:
        if self.running:
            return
        self._handover.onChange = onChange
        self.running = True
        self._ask()

    def stop(self) -> Deferred:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.status.nextLookup = None
        if self._inFlight is None:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d

    def delay(self, ttl: Optional[float]) -> float:
        """
        The wait before the next lookup, for an answer of this TTL.
        """
        if ttl is None:
            return self.minTTL
        return min(max(float(ttl), self.minTTL), self.maxTTL)

    def retryDelay(self) -> float:
        """
        The wait before asking again after the failures in a row so far.
        """
        exponent = min(self._failuresInRow - 1, 32)
        return min(FIRST_RETRY * 2.0**exponent, self.minTTL)

    def _ask(self) -> None:
        self._call = None
        self.status.nextLookup = None
        d = self._inFlight = maybeDeferred(self._lookup, self._resolver)
        d.addCallbacks(self._answered, self._failed)
        d.addErrback(self._broken)
        d.addBoth(self._finished)

    def _finished(self, _) -> None:
        self._inFlight = None
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self.status.nextLookup = self._clock.seconds() + delay
            self._call = self._clock.callLater(delay, self._ask)

    def _answered(self, answer: Answer) -> None:
        if not self.running:
            return
        backends, ttl = answer
        now = self._clock.seconds()
        previous = self.status.answered(now, len(backends))
        self._failuresInRow = 0
        if previous == SourceStatus.FAILING:
            self.log.info(
                "discovery {url}: answers again ({n} backends)",
                url=self.config.url,
                n=len(backends),
            )
        self._schedule(self.delay(ttl))
        self._handover.give(backends)

    def _failed(self, failure) -> None:
        if not self.running:
            return
        self._failuresInRow += 1
        reason = (
            failure.getErrorMessage()
            if failure.check(LookupFailed)
            else describeDNSFailure(failure)
        )
        delay = self.retryDelay()
        if self.status.failed(self._clock.seconds(), reason):
            if self._handover.current is None:
                kept = "no backends from it yet"
            else:
                kept = f"keeping the {len(self._handover.current)} backends of its last answer"
            self.log.warn(
                "discovery {url}: lookup failed: {reason}; {kept}; asking again "
                "every {most:g}s at most until it answers",
                url=self.config.url,
                reason=reason,
                kept=kept,
                most=self.minTTL,
            )
        self._schedule(delay)

    def _broken(self, failure) -> None:
        # A bug, not a DNS failure: said once, and the lookups go on.
        self.log.failure("discovery {url}: lookup broke", failure, url=self.config.url)
        if self.running and (self._call is None or not self._call.active()):
            self._schedule(self.minTTL)
