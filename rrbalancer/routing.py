"""
Routes: which pool (L{rrbalancer.pools}) a request goes to, by its Host,
its path and its method.

A route is tried only as a whole: a host matches exactly (letter case and
port aside) or, written C{*.example.com}, any name below it; a path prefix
matches whole segments (C{/v2} is C{/v2} and C{/v2/x}, never C{/v2x}),
compared after percent-decoding as twisted.web decodes C{request.postpath}.
The order routes are tried in is fixed once, at start (L{byPrecedence}),
so that a request never depends on anything but that order: the highest
C{priority} first, then an exact host before a wildcard before none, then
the longest prefix, then the file's order.

The L{Router} is a twisted.web resource like any other: with
C{strip_prefix}, the segments a route matched move to C{request.prepath},
which is how the balancer's resource knows it is mounted under a prefix
(the backend receives the rest of the path and C{X-Forwarded-Prefix}).
"""

import ipaddress
import random as _random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .pools import DEFAULT, poolNames
from .proxy import _ORIGIN_FORM, requestTarget, respondWithError, targetAuthority
from .settings import ConfigError, _TOKEN, _nearest, boolean, count, integer, number, string

ROUTE_KEYS = (
    "host", "path_prefix", "methods", "pool", "split", "strip_prefix", "priority",
    "mirror", "mirror_max_body",
)
SPLIT_KEYS = ("pool", "weight")
MIRROR_KEYS = ("pool", "percent")
_HOST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")

EXACT, WILDCARD, ANY = 0, 1, 2
_HOSTS_KEPT = 1024


@dataclass(frozen=True)
class RouteConfig:
    """
    One C{[[route]]} table as the operator wrote it.

    @ivar number: its place among the routes of the file, from 1: how
        messages name it, and the last word on precedence.
    @ivar host: a lower-case host name, C{*.} and a name for any name
        below that one, or None for any host.
    @ivar pathPrefix: C{/} and segments, without a trailing C{/}; None
        for any path.
    @ivar methods: upper-case methods, or None for any.
    @ivar pool: the pool it sends to (None with C{split}).
    @ivar split: (pool, weight) pairs that share its requests by weight,
        or empty for C{pool} alone.
    @ivar mirror: (pool, percent) pairs, each pool sent a copy of that
        percent of its requests (L{rrbalancer.mirror}); empty for none.
    @ivar mirrorMaxBody: the largest body a copy carries, or None for the
        top-level C{mirror_max_body}.
    """

    number: int
    pool: Optional[str] = None
    host: Optional[str] = None
    pathPrefix: Optional[str] = None
    methods: Optional[Tuple[str, ...]] = None
    stripPrefix: bool = False
    priority: int = 0
    split: Tuple[Tuple[str, int], ...] = ()
    mirror: Tuple[Tuple[str, float], ...] = ()
    mirrorMaxBody: Optional[int] = None

    @property
    def hostKind(self) -> int:
        if self.host is None:
            return ANY
        return WILDCARD if self.host.startswith("*.") else EXACT

    @property
    def segments(self) -> Tuple[bytes, ...]:
        """
        The prefix's segments, decoded as the request's are.
        """
        if self.pathPrefix is None or self.pathPrefix == "/":
            return ()
        return tuple(unquote_to_bytes(s) for s in self.pathPrefix[1:].split("/"))

    @property
    def pools(self) -> Tuple[str, ...]:
        return tuple(p for p, _ in self.split) if self.split else (self.pool,)

    def sameMatch(self) -> tuple:
        """
        What decides whether a request matches: two routes alike in this
        are one too many, the second could never be chosen.
        """
        return (
            self.host,
            self.segments,
            frozenset(self.methods) if self.methods is not None else None,
        )

    def json(self) -> dict:
        """
        The route in the admin API: its keys as the file writes them.
        """
        return {
            "route": self.number,
            "host": self.host,
            "path_prefix": self.pathPrefix,
            "methods": list(self.methods) if self.methods is not None else None,
            "pool": self.pool,
            "split": [{"pool": p, "weight": w} for p, w in self.split] or None,
            "strip_prefix": self.stripPrefix,
            "priority": self.priority,
            "mirror": [{"pool": p, "percent": c} for p, c in self.mirror] or None,
        }

    def describe(self) -> str:
        """
        The route in one line, as logs name it.
        """
        if self.split:
            to = "split " + ", ".join(f"{p} {w}" for p, w in self.split)
        else:
            to = f"pool {self.pool}"
        if self.mirror:
            to += "; mirror " + ", ".join(f"{p} {c:g}%" for p, c in self.mirror)
        return f"{self.name()} -> {to}"

    def name(self) -> str:
        """
        The route and what it matches, as messages name it.
        """
        where = []
        if self.host is not None:
            where.append(f"host {self.host}")
        if self.pathPrefix is not None:
            where.append(f"path_prefix {self.pathPrefix}")
        if self.methods is not None:
            where.append("methods " + " ".join(self.methods))
        if self.priority:
            where.append(f"priority {self.priority}")
        return f"route {self.number} ({', '.join(where) or 'every request'})"


def _parseHost(value: Any, where: str) -> str:
    text = string(value, f"{where}: host").strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if ":" in text:
        raise ConfigError(f"{where}: host {text!r}: give the name without a port (ports are ignored)")
    name = text[2:] if text.startswith("*.") else text
    name = name.rstrip(".")
    labels = name.split(".")
    if not name or not _HOST.issuperset(name) or "" in labels:
        raise ConfigError(
            f"{where}: host {text!r} is not a host name (example.com, or *.example.com "
            "for any name below it)"
        )
    return ("*." if text.startswith("*.") else "") + name


def _parsePrefix(value: Any, where: str) -> str:
    text = string(value, f"{where}: path_prefix").strip()
    if not text.startswith("/") or any(c in text for c in "?# ") or "//" in text:
        raise ConfigError(
            f"{where}: path_prefix {text!r} must be an absolute path such as /api "
            "(no query, no empty segment)"
        )
    text = text.rstrip("/") or "/"
    if any(s in (".", "..") for s in text.split("/")):
        raise ConfigError(f"{where}: path_prefix {text!r} must not hold . or .. segments")
    return text


def _parseMethods(value: Any, where: str) -> Tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    methods = []
    for item in items:
        method = string(item, f"{where}: methods").strip().upper()
        if not method or not _TOKEN.issuperset(method):
            raise ConfigError(f"{where}: methods: {method!r} is not a method")
        if method not in methods:
            methods.append(method)
    if not methods:
        raise ConfigError(f"{where}: methods: an empty list matches nothing; leave it out for any")
    return tuple(methods)


def _parseParts(
    value: Any, where: str, name: str, example: str, keys: Sequence[str],
    parse: Callable[[Mapping, str], Any],
) -> Tuple[Tuple[str, Any], ...]:
    """
    A list of C{{pool = ..., ...}} tables (a split's, a mirror's): each
    pool once, with what C{parse} makes of the rest of its table.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: {name}: expected a list such as {example}")
    parts = []
    for item in value:
        if not isinstance(item, Mapping) or "pool" not in item:
            raise ConfigError(
                f"{where}: {name}: each part needs a pool and a {keys[1]}, got {item!r}"
            )
        unknown = sorted(set(item) - set(keys))
        if unknown:
            raise ConfigError(
                f"{where}: {name}: unknown key {unknown[0]!r}{_nearest(unknown[0], keys)}"
            )
        pool = string(item["pool"], f"{where}: {name}: pool").strip()
        if pool in (p for p, _ in parts):
            raise ConfigError(f"{where}: {name}: pool {pool} is named twice")
        parts.append((pool, parse(item, f"{where}: {name}: {pool}")))
    return tuple(parts)


def _parseSplit(value: Any, where: str) -> Tuple[Tuple[str, int], ...]:
    parts = _parseParts(
        value, where, "split",
        '[{pool = "default", weight = 95}, {pool = "canary", weight = 5}]', SPLIT_KEYS,
        lambda item, name: integer(item.get("weight", 1), f"{name}: weight", minimum=0),
    )
    if not any(w for _, w in parts):
        raise ConfigError(f"{where}: split: every weight is 0")
    return parts


def _percent(item: Mapping, name: str) -> float:
    share = number(item.get("percent", 100), f"{name}: percent")
    if share > 100:
        raise ConfigError(f"{name}: percent {share:g} is more than 100")
    return share


def _parseMirror(value: Any, where: str) -> Tuple[Tuple[str, float], ...]:
    return _parseParts(
        value, where, "mirror", '[{pool = "shadow", percent = 100}]', MIRROR_KEYS, _percent
    )


def parseRoute(spec: Any, number: int) -> RouteConfig:
    where = f"route {number}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a [[route]] table, got {spec!r}")
    unknown = sorted(set(spec) - set(ROUTE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{_nearest(unknown[0], ROUTE_KEYS)}")
    if ("pool" in spec) == ("split" in spec):
        raise ConfigError(f"{where}: give it a pool (or a split over pools)")
    pool = split = None
    if "pool" in spec:
        pool = string(spec["pool"], f"{where}: pool").strip()
    else:
        split = _parseSplit(spec["split"], where)
    host = _parseHost(spec["host"], where) if "host" in spec else None
    prefix = _parsePrefix(spec["path_prefix"], where) if "path_prefix" in spec else None
    strip = boolean(spec.get("strip_prefix", False), f"{where}: strip_prefix")
    if strip and prefix in (None, "/"):
        raise ConfigError(f"{where}: strip_prefix needs a path_prefix to strip")
    return RouteConfig(
        number=number,
        pool=pool,
        host=host,
        pathPrefix=prefix,
        methods=_parseMethods(spec["methods"], where) if "methods" in spec else None,
        stripPrefix=strip,
        priority=integer(spec.get("priority", 0), f"{where}: priority", minimum=-(2**31)),
        split=split or (),
        mirror=_parseMirror(spec["mirror"], where) if "mirror" in spec else (),
        mirrorMaxBody=(
            count(spec["mirror_max_body"], f"{where}: mirror_max_body")
            if "mirror_max_body" in spec else None
        ),
    )


def parseRoutes(value: Any, name: str = "route") -> Tuple[RouteConfig, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}: a single [{name}] table; write [[{name}]] (one per route)")
    items = value if isinstance(value, (list, tuple)) else [value]
    routes = tuple(parseRoute(spec, n) for n, spec in enumerate(items, 1))
    seen = {}
    for route in routes:
        key = route.sameMatch()
        if key in seen:
            raise ConfigError(
                f"{route.name()} -> pool {', '.join(route.pools)}: matches the same "
                f"requests as {seen[key].name()}, so it could never be chosen"
            )
        seen[key] = route
    return routes


def checkRouting(config) -> None:
    """
    The rules that need the pools and the routes together: every route's
    pools exist, and some pool can be reached.

    @raise ConfigError: naming the route and the pool.
    """
    names = poolNames(config)
    if not config.routes and DEFAULT not in names:
        raise ConfigError(
            "route: no [[route]] leads to the pools, and without top-level backends "
            "or discovery sources "
            "there is no default pool: every request would get 404"
        )
    for route in config.routes:
        for pool in route.pools + tuple(p for p, _ in route.mirror):
            if pool not in names:
                if pool == DEFAULT:
                    known = "the default pool is the top-level backends, and there are none"
                else:
                    known = "the pools are " + (", ".join(names) or "none")
                close = _nearest(pool, names)
                raise ConfigError(
                    f"{route.name()}: no pool named {pool!r} ({known}"
                    f"{'; ' + close[2:-1] if close else ''})"
                )


def byPrecedence(routes: Sequence[RouteConfig]) -> Tuple[RouteConfig, ...]:
    """
    The routes in the order they are tried.
    """
    return tuple(
        sorted(routes, key=lambda r: (-r.priority, r.hostKind, -len(r.segments), r.number))
    )


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
        @param routes: in precedence order (L{byPrecedence}).
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
