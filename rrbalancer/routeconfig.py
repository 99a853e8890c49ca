"""
The C{[[route]]} tables of a config, parsed and checked, and the order
routes are tried in: what a route is before the router
(L{rrbalancer.routing}) serves by it.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote_to_bytes

from .poolconfig import DEFAULT, poolNames
from .values import (
    _TOKEN,
    ConfigError,
    _nearest,
    boolean,
    count,
    integer,
    number,
    refuseUnknownKeys,
    string,
)

ROUTE_KEYS = (
    "host", "path_prefix", "methods", "pool", "split", "strip_prefix", "priority",
    "mirror", "mirror_max_body",
)
SPLIT_KEYS = ("pool", "weight")
MIRROR_KEYS = ("pool", "percent")
_HOST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")

EXACT, WILDCARD, ANY = 0, 1, 2


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
        refuseUnknownKeys(item, keys, f"{where}: {name}")
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
    refuseUnknownKeys(spec, ROUTE_KEYS, where)
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
