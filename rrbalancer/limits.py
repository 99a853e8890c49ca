"""
Client rate limits: a token bucket per client (or per header value, or per
Host), checked before a request is given to any backend.

A limit refuses with C{429} and a C{Retry-After} in whole seconds (NGINX's
C{limit_req} with C{limit_req_status 429}, Traefik's C{rateLimit}), or, in
C{delay} mode, holds a request that came too early until its token is due,
up to C{max_delay}.  C{max_inflight} bounds the requests of one key in
flight at once (NGINX's C{limit_conn}, Traefik's C{inFlightReq}).  In
C{dry_run} it only counts and logs.

The keys a limit remembers are bounded (C{max_keys}, the least recently
seen forgotten first), so that a flood of distinct addresses costs a
bounded amount of memory; a forgotten key comes back with a full bucket,
which errs on the side of the client.

Each worker process keeps its own buckets.  A client on one connection
stays with one worker and sees the limit exactly; a client that opens
connections to several workers gets up to the limit from each.
"""

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

REJECT = "reject"
DELAY = "delay"


@dataclass(frozen=True)
class RateLimit:
    """
    One limit, as the settings give it.

    @ivar key: C{client_ip}, C{host} or C{header:NAME}.
    @ivar rate: requests per C{period} seconds, over time.
    @ivar burst: requests a key may make at once (the bucket's size).
    @ivar maxInflight: requests of one key in flight at once; 0 is no bound.
    @ivar headers: send the IETF C{RateLimit-Policy} and C{RateLimit}
        headers (draft-ietf-httpapi-ratelimit-headers) with every answer.
    """

    rate: float
    period: float = 1.0
    burst: int = 0
    key: str = "client_ip"
    mode: str = REJECT
    maxDelay: float = 1.0
    maxInflight: int = 0
    dryRun: bool = False
    maxKeys: int = 100_000
    headers: bool = False

    @property
    def size(self) -> int:
        """
        The bucket's size: C{burst}, or the rate over one period without it.
        """
        return self.burst or max(1, math.ceil(self.rate))

    @property
    def perSecond(self) -> float:
        return self.rate / self.period

    def describe(self) -> str:
        return f"{self.rate:g} per {self.period:g} s, burst {self.size}, by {self.key}"


class _Key:
    """
    What a limit remembers of one key.
    """

    __slots__ = ("tokens", "updated", "inFlight")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.inFlight = 0


def clientAddress(request, trusted: Tuple) -> Optional[str]:
    """
    The client's address: the peer's, or, when the peer is a trusted proxy,
    the last address in C{X-Forwarded-For} that is not one (NGINX's
    C{real_ip_recursive}).
    """
    host = getattr(request.getClientAddress(), "host", None)
    if host is None or not trusted:
        return host
    chain = [host]
    for value in request.requestHeaders.getRawHeaders(b"x-forwarded-for", []):
        chain[:0] = [p.strip().decode("latin-1") for p in value.split(b",") if p.strip()]
    for address in reversed(chain):
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if not any(ip in network for network in trusted):
            return address
    return chain[0]


def keyReader(spec: str, trusted: Tuple = ()) -> Callable[[object], Optional[bytes]]:
    if spec == "client_ip":
        def key(request):
            address = clientAddress(request, trusted)
            return address.encode("latin-1") if address else None
    elif spec == "host":
        def key(request):
            host = request.requestHeaders.getRawHeaders(b"host")
            return host[0].lower() if host else None
    else:
        field = spec.split(":", 1)[1].encode("ascii")

        def key(request):
            values = request.requestHeaders.getRawHeaders(field)
            return b",".join(values) if values else None
    return key


class Verdict:
    """
    What a limiter says of one request.

    @ivar delay: seconds to hold it before it goes on (0: at once).
    @ivar refused: it gets C{429} (after C{retryAfter} seconds it may try
        again).
    @ivar release: to call once it has ended (it counted towards the
        requests in flight of its key).
    """

    __slots__ = ("delay", "refused", "retryAfter", "release", "reason")

    def __init__(self, delay=0.0, refused=False, retryAfter=0, release=None, reason=""):
        self.delay = delay
        self.refused = refused
        self.retryAfter = retryAfter
        self.release = release
        self.reason = reason


PASS = Verdict()


class RateLimiter:
    """
    One limit's buckets and counts.

    @ivar counts: requests by outcome: C{passed}, C{rejected}, C{delayed},
        C{dry_run} (would have been refused), C{unkeyed} (without the key,
        not limited).
    """

    log = Logger()

    def __init__(self, limit: RateLimit, clock: IReactorTime, trusted: Tuple = (),
                 name: str = "0") -> None:
        self.limit = limit
        self.name = name
        self._clock = clock
        self._key = keyReader(limit.key, trusted)
        # Read for every request: worked out once.
        self._size = float(limit.size)
        self._perSecond = limit.perSecond
        self._keys: "OrderedDict[bytes, _Key]" = OrderedDict()
        self.counts = dict.fromkeys(("passed", "rejected", "delayed", "dry_run", "unkeyed"), 0)
        self._lastLogged = -math.inf

    def __len__(self) -> int:
        return len(self._keys)

    def _state(self, key: bytes, now: float) -> _Key:
        keys = self._keys
        state = keys.get(key)
        if state is None:
            state = keys[key] = _Key(self._size, now)
            if len(keys) > self.limit.maxKeys:
                # The least recently seen goes (its requests in flight, if
                # any, release its state, no longer the table's).
                keys.popitem(last=False)
        else:
            keys.move_to_end(key)
            tokens = state.tokens + (now - state.updated) * self._perSecond
            state.tokens = tokens if tokens < self._size else self._size
            state.updated = now
        return state

    def check(self, request) -> Verdict:
        key = self._key(request)
        if key is None:
            self.counts["unkeyed"] += 1
            return PASS
        limit = self.limit
        now = self._clock.seconds()
        state = self._state(key, now)
        if limit.maxInflight and state.inFlight >= limit.maxInflight:
            return self._refuse(key, 1, f"{state.inFlight} requests in flight")
        delay = 0.0
        if state.tokens < 1:
            wait = (1 - state.tokens) / self._perSecond
            if limit.mode != DELAY or wait > limit.maxDelay:
                return self._refuse(key, wait, "over the rate")
            delay = wait
        state.tokens -= 1
        self.counts["delayed" if delay else "passed"] += 1
        if not limit.maxInflight:
            return Verdict(delay=delay) if delay else PASS
        state.inFlight += 1

        def release():
            state.inFlight -= 1

        return Verdict(delay=delay, release=release)

    def _refuse(self, key: bytes, wait: float, reason: str) -> Verdict:
        retryAfter = max(1, math.ceil(wait))
        now = self._clock.seconds()
        dryRun = self.limit.dryRun
        if now - self._lastLogged >= 1:
            # At most a line a second, however hard the flood.
            self._lastLogged = now
            self.log.info(
                "rate limit {name} ({limit}){dry}: {key} {reason}",
                name=self.name, limit=self.limit.describe(),
                dry=" (dry run: let through)" if dryRun else "",
                key=key.decode("latin-1"), reason=reason,
            )
        if dryRun:
            self.counts["dry_run"] += 1
            return PASS
        self.counts["rejected"] += 1
        return Verdict(refused=True, retryAfter=retryAfter, reason=reason)

    def headers(self, request) -> List[Tuple[bytes, bytes]]:
        """
        The draft IETF headers that tell a client its quota, if asked for.
        """
        limit = self.limit
        if not limit.headers:
            return []
        key = self._key(request)
        state = self._keys.get(key) if key is not None else None
        remaining = max(0, int(state.tokens)) if state is not None else limit.size
        missing = limit.size - remaining
        reset = math.ceil(missing / limit.perSecond) if missing else 0
        policy = b'"limit%s";q=%d;w=%d' % (
            self.name.encode("ascii"), limit.size, max(1, math.ceil(limit.period)),
        )
        return [
            (b"ratelimit-policy", policy),
            (b"ratelimit", b'"limit%s";r=%d;t=%d' % (self.name.encode("ascii"), remaining, reset)),
        ]


class Limits:
    """
    Every limit, applied in turn to each request before it is forwarded.
    """

    def __init__(self, limiters: Iterable[RateLimiter], clock: IReactorTime) -> None:
        self.limiters = tuple(limiters)
        self._clock = clock
        self._withHeaders = tuple(
            limiter for limiter in self.limiters if limiter.limit.headers
        )

    def __bool__(self) -> bool:
        return bool(self.limiters)

    def gate(self, request, proceed: Callable[[], None], refuse: Callable[[int, str], None]) -> None:
        """
        Call C{proceed} now or after a delay, or C{refuse(retryAfter,
        reason)}; the in-flight counts are released when the request ends.
        """
        limiters = self.limiters
        if len(limiters) == 1 and not self._withHeaders:
            # One limit and no headers, the common case: a request it lets
            # through at once and counts nowhere goes on with nothing more.
            first = limiters[0].check(request)
            if first is PASS:
                proceed()
                return
            verdicts: Iterable[Verdict] = (first,)
        else:
            verdicts = (limiter.check(request) for limiter in limiters)
        releases = []
        delay = 0.0
        for verdict in verdicts:
            if verdict.release is not None:
                releases.append(verdict.release)
            if verdict.refused:
                for release in releases:
                    release()
                self._addHeaders(request)
                refuse(verdict.retryAfter, verdict.reason)
                return
            delay = max(delay, verdict.delay)
        if releases:
            whenEnded = getattr(request, "whenEnded", None)
            if whenEnded is not None:
                # The balancer's own requests say so without a Deferred.
                for release in releases:
                    whenEnded(release)
            else:
                def released(result):
                    for release in releases:
                        release()
                    return result

                request.notifyFinish().addBoth(released)
        self._addHeaders(request)
        if not delay:
            proceed()
            return
        call = self._clock.callLater(delay, proceed)

        def gone(result):
            if call.active():
                call.cancel()
            return result

        request.notifyFinish().addErrback(gone)

    def _addHeaders(self, request) -> None:
        for limiter in self._withHeaders:
            for name, value in limiter.headers(request):
                request.responseHeaders.addRawHeader(name, value)
