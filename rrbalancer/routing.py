"""
Routes: which pool (L{rrbalancer.pools}) a request goes to, by its Host,
its path and its method.

A route is tried only as a whole: a host matches exactly (letter case and
port aside) or, written C{*.example.com}, any name below it; a path prefix
matches whole segments (C{/v2} is C{/v2} and C{/v2/x}, never C{/v2x}),
compared after percent-decoding as twisted.web decodes C{request.postpath}.
The order routes are tried in is fixed once, at start
(L{rrbalancer.routeconfig.byPrecedence}), so that a request never depends
on anything but that order: the highest C{priority} first, then an exact
host before a wildcard before none, then the longest prefix, then the
file's order.

The L{Router} is a twisted.web resource like any other: with
C{strip_prefix}, the segments a route matched move to C{request.prepath},
which is how the balancer's resource knows it is mounted under a prefix
(the backend receives the rest of the path and C{X-Forwarded-Prefix}).
"""

import random as _random
from typing import Callable, Dict, List, Mapping, Optional, Sequence
from urllib.parse import unquote_to_bytes

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .proxy import _ORIGIN_FORM, requestTarget, respondWithError, targetAuthority
from .routeconfig import DEFAULT, EXACT, WILDCARD, RouteConfig

_HOSTS_KEPT = 1024


def requestHost(value: Optional[bytes]) -> str:
    """
    The host a Host header (or an absolute-form authority) names: lower
    case, without its port, brackets or final dot.
    """
    if not value:
        return ""
    host = value.strip().lower()
    if host.startswith(b"["):
        host = host[1 : host.find(b"]")] if b"]" in host else host[1:]
    elif host.count(b":") == 1:
        host = host.partition(b":")[0]
    return host.rstrip(b".").decode("latin-1")


def _canonical(segments: Sequence[bytes]) -> bytes:
    """
    Decoded segments as one path that tells them apart: C{%} and C{/}
    within a segment escaped again.  A path without escapes is its own.
    """
    return b"/" + b"/".join(s.replace(b"%", b"%25").replace(b"/", b"%2F") for s in segments)


class _Compiled:
    """
    A route as the router tries it: each test a plain comparison, the
    path's a comparison of bytes with a canonical path (L{_canonical}).
    """

    __slots__ = (
        "config", "host", "suffix", "segments", "methods", "strip", "pick", "mirror",
        "prefix", "prefixLength",
    )

    def __init__(self, config: RouteConfig, random: Callable[[], float], mirrors=None) -> None:
        self.config = config
        self.mirror = mirrors.forRoute(config) if mirrors is not None else None
        self.strip = config.stripPrefix
        self.host = config.host if config.hostKind == EXACT else None
        self.suffix = config.host[1:] if config.hostKind == WILDCARD else None
        self.segments = list(config.segments)
        # None: any path.
        self.prefix = _canonical(self.segments) if self.segments else None
        self.prefixLength = len(self.prefix) if self.segments else 0
        self.methods = (
            frozenset(m.encode("ascii") for m in config.methods) if config.methods else None
        )
        if config.split:
            self.pick = _splitter(config.split, random)
        else:
            pool = config.pool
            self.pick = lambda: pool

    def matches(self, host: str, path: bytes, method: bytes) -> bool:
        """
        @param path: the request's canonical path (L{_canonical}).
        """
        if self.host is not None and host != self.host:
            return False
        if self.suffix is not None and not (
            host.endswith(self.suffix) and len(host) > len(self.suffix)
        ):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.prefix
        if prefix is None:
            return True
        n = self.prefixLength
        return path.startswith(prefix) and (len(path) == n or path[n] == 47)  # "/"


def _splitter(split, random: Callable[[], float]) -> Callable[[], str]:
    parts = [(pool, weight) for pool, weight in split if weight]
    total = sum(w for _, w in parts)

    def pick() -> str:
        at = random() * total
        for pool, weight in parts:
            at -= weight
            if at < 0:
                return pool
        return parts[-1][0]

    return pick


def _segments(path: bytes, depth: int) -> List[bytes]:
    """
    The decoded segments of C{path} below C{depth}, as twisted.web makes
    C{request.postpath}.
    """
    if path[:1] != b"/":
        return []
    raw = path.split(b"/")
    if b"%" not in path:
        return raw[1 + depth :]
    return [unquote_to_bytes(s) if b"%" in s else s for s in raw[1 + depth :]]


class Router(Resource):
    """
    The root of the balancer's site: each request goes to the resource of
    the pool its first matching route names, or to the C{default} pool's
    when none matches; without a default, C{404}.

    @ivar routes: the routes in the order they are tried.
    """

    isLeaf = True

    def __init__(
        self,
        routes: Sequence[RouteConfig],
        pools: Mapping[str, Resource],
        random: Callable[[], float] = _random.random,
        mirrors=None,
    ) -> None:
        """
        @param routes: in precedence order
            (L{rrbalancer.routeconfig.byPrecedence}).
        @param pools: each pool's resource by name (C{default} among them
            when there is one).
        @param random: gives a float in [0, 1) to share a split's requests.
        @param mirrors: the L{rrbalancer.mirror.Mirrors} that send the
            copies of routes with C{mirror}, or None to send none.
        """
        Resource.__init__(self)
        self._random = random
        self._mirrors = mirrors
        # Host headers as routes compare them; a handful of names in the
        # common case, and never more than _HOSTS_KEPT.
        self._hosts: Dict[bytes, str] = {}
        self.update(routes, pools)

    def update(self, routes: Sequence[RouteConfig], pools: Mapping[str, Resource]) -> None:
        """
        Route by these from now on (a reload): the request being rendered
        now, if any, and every later one sees either the old routes and
        pools or the new ones, never a mix.
        """
        compiled = [_Compiled(r, self._random, self._mirrors) for r in routes]
        pools = dict(pools)
        # Nothing below yields to the reactor: no request comes in between.
        self.routes = tuple(routes)
        self.pools = pools
        self.default = pools.get(DEFAULT)
        self._compiled = compiled
        # Without a route that names a host, no request's is looked at.
        self._byHost = any(r.host is not None for r in routes)

    def route(self, host: str, segments: Sequence[bytes], method: bytes):
        """
        The first route that matches, and the pool it chose, or (None,
        None).
        """
        compiled, pool = self._match(host, _canonical(segments), method)
        return (compiled.config if compiled is not None else None), pool

    def _match(self, host: str, path: bytes, method: bytes):
        for compiled in self._compiled:
            if compiled.matches(host, path, method):
                return compiled, compiled.pick()
        return None, None

    def _host(self, value: bytes) -> str:
        hosts = self._hosts
        host = hosts.get(value)
        if host is None:
            host = requestHost(value)
            if len(hosts) >= _HOSTS_KEPT:
                # A flood of made-up names costs what it would without
                # the cache, and no memory.
                hosts.clear()
            hosts[value] = host
        return host

    def render(self, request):
        if not self._compiled:
            return self._send(request, DEFAULT, self.default)
        uri = request.uri
        host = ""
        if _ORIGIN_FORM.match(uri):
            if self._byHost:
                hosts = request.requestHeaders.getRawHeaders(b"host")
                host = self._host(hosts[0] if hosts else b"")
            path = uri.partition(b"?")[0]
        else:
            authority = targetAuthority(request.method, uri)
            if authority is None:
                respondWithError(request, 400, b"Bad Request: invalid request target")
                return NOT_DONE_YET
            if authority:
                host = self._host(authority)
            elif self._byHost:
                hosts = request.requestHeaders.getRawHeaders(b"host")
                host = self._host(hosts[0] if hosts else b"")
            path = requestTarget(uri).partition(b"?")[0]
        depth = len(request.prepath)
        # The common case, a path without escapes at the root, is its own
        # canonical path.
        canonical = path if not depth and b"%" not in path else _canonical(_segments(path, depth))
        route, name = self._match(host, canonical, request.method)
        if route is None:
            return self._send(request, DEFAULT, self.default)
        if route.strip:
            segments = _segments(path, depth)
            n = len(route.segments)
            request.prepath = request.prepath + segments[:n]
            request.postpath = segments[n:]
        if route.mirror is not None:
            # Sent by the pool's resource once the request passed the
            # limits and is forwarded (L{rrbalancer.proxy}).
            request.mirror = route.mirror
        return self._send(request, name, self.pools[name])

    def _send(self, request, name: str, resource: Optional[Resource]):
        if resource is None:
            request.pool = None
            respondWithError(request, 404, b"Not Found: no route matches this request")
            return NOT_DONE_YET
        request.pool = name
        return resource.render(request)
