"""
Every setting of the balancer, declared once.

A setting has a command-line flag, a TOML key, a parser that validates it,
a default, a help text and whether a reload may change it.  The twistd
L{rrbalancer.tap.Options}, the keys a config file may hold, the fields of
L{rrbalancer.config.Config} and the README's option table are all derived
from L{SETTINGS}, so that adding a setting is one entry here plus the code
that uses it, and the five places cannot disagree.

The parsers take the raw value and the setting's name (for the message),
the value as it comes from TOML (native types) or the command line (strings), and
either return the plain value or raise L{ConfigError} with one line for
the operator.
"""

import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

from . import poolconfig
from .discovery._config import parseSources
from .routeconfig import parseRoutes
from .values import (
    _TOKEN,
    ConfigError,
    _nearest,
    asList,
    atLeastOne,
    boolean,
    count,
    fraction,
    integer,
    number,
    oneOf,
    parseBackends,
    percent,
    refuseUnknownKeys,
    seconds,
    secondsOrZero,
    string,
    tcpPortNumber,
)


def parseWorkers(value: Any, name: str = "workers") -> int:
    """
    A number of worker processes; C{auto} is one per CPU.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    return integer(value, name, minimum=1)


def parsePort(value: Any, name: str = "port") -> str:
    """
    Turn a listening port setting into a server endpoint description: a bare
    number means TCP on every interface, as C{--port 8000} always has.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = string(value, name).strip()
    if text.isdigit():
        return f"tcp:{tcpPortNumber(name, text)}"
    if not text or ":" not in text:
        raise ConfigError(
            f"{name}: {value!r} is neither a port number nor an endpoint "
            "description such as tcp:8000:interface=127.0.0.1"
        )
    return text


def parsePorts(value: Any, name: str = "port") -> Tuple[str, ...]:
    ports = tuple(parsePort(p, name) for p in asList(value))
    if not ports:
        raise ConfigError(f"{name}: at least one listening port is needed")
    seen = set()
    for port in ports:
        # Two listeners of one name would be a RuntimeError (a traceback).
        if port in seen:
            raise ConfigError(f"{name}: {port} is listed twice")
        seen.add(port)
    return ports


LIMIT_KEYS = (
    "rate", "period", "burst", "key", "mode", "max_delay", "max_inflight", "dry_run",
    "max_keys", "headers",
)
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _parseRate(text: str, name: str) -> Tuple[float, float]:
    """
    C{10/s}, C{600/m}, C{100/10s}: a number of requests per period.
    """
    count, sep, per = text.partition("/")
    if not sep or not per or per[-1] not in _PERIODS:
        raise ConfigError(f"{name}: {text!r} is not a rate (like 10/s, 600/m or 100/10s)")
    many = per[:-1] or "1"
    rate = number(count, name, positive=True)
    period = number(many, name, positive=True) * _PERIODS[per[-1]]
    return rate, period


def parseLimit(spec: Any, name: str = "limit"):
    """
    The command line's C{RATE[,burst=N][,key=K]...}, or a C{[[limit]]}
    table.
    """
    from .limits import DELAY, REJECT, RateLimit

    if isinstance(spec, Mapping):
        refuseUnknownKeys(spec, LIMIT_KEYS, name)
        if "rate" not in spec:
            raise ConfigError(f"{name}: every limit needs a rate")
        options = dict(spec)
        rate = number(options.pop("rate"), f"{name}: rate", positive=True)
        period = number(options.pop("period", 1), f"{name}: period", positive=True)
    else:
        text = string(spec, name)
        first, *rest = [part.strip() for part in text.split(",")]
        rate, period = _parseRate(first, name)
        options = {}
        for part in rest:
            key, sep, val = (p.strip() for p in part.partition("="))
            if key == "dry_run" and not sep:
                options["dry_run"] = True
            elif key == "headers" and not sep:
                options["headers"] = True
            elif key in LIMIT_KEYS and key not in ("rate", "period") and sep:
                options[key] = val
            else:
                raise ConfigError(
                    f"{name}: unknown option {part!r} in {text!r} (expected "
                    "burst=N, key=K, mode=reject|delay, max_delay=S, max_inflight=N, "
                    "max_keys=N, dry_run or headers)"
                )
    key = string(options.get("key", "client_ip"), f"{name}: key").strip()
    if key not in ("client_ip", "host"):
        kind, _, field = key.partition(":")
        if kind != "header" or not field or not set(field) <= _TOKEN:
            raise ConfigError(f"{name}: key: {key!r} is not client_ip, host or header:NAME")
    mode = oneOf(REJECT, DELAY)(options.get("mode", REJECT), f"{name}: mode")
    return RateLimit(
        rate=rate,
        period=period,
        burst=integer(options.get("burst", 0), f"{name}: burst", minimum=0),
        key=key,
        mode=mode,
        maxDelay=number(options.get("max_delay", 1), f"{name}: max_delay"),
        maxInflight=integer(options.get("max_inflight", 0), f"{name}: max_inflight", minimum=0),
        dryRun=boolean(options.get("dry_run", False), f"{name}: dry_run"),
        maxKeys=integer(options.get("max_keys", 100_000), f"{name}: max_keys", minimum=1),
        headers=boolean(options.get("headers", False), f"{name}: headers"),
    )


def parseLimits(value: Any, name: str = "limit") -> tuple:
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}: a single [{name}] table; write [[{name}]] (one per limit)")
    return tuple(parseLimit(spec, name) for spec in asList(value))

def parseDNSServers(value: Any, name: str = "dns_server") -> Tuple[Tuple[str, int], ...]:
    """
    DNS servers as C{ADDRESS}, C{ADDRESS:PORT} or C{[IPv6]:PORT}; an
    address, since a name would itself need a resolver.
    """
    servers = []
    for item in asList(value):
        text = string(item, name).strip()
        host, port = text, "53"
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"{name}: {text!r} is not ADDRESS:PORT or [IPv6]:PORT")
            port = rest[1:] or "53"
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"{name}: {text!r} is not an IP address with an optional :PORT "
                "(such as 127.0.0.1:5353)"
            ) from None
        servers.append((str(address), tcpPortNumber(name, port)))
    return tuple(servers)


def parsePools(value: Any, name: str = "pool") -> tuple:
    """
    C{[[pool]]} tables (L{rrbalancer.poolconfig}), whose C{[pool.health]}
    keys are this schema's C{[health]} settings.
    """
    health = {s.name: s for s in settingsIn("health")}
    return poolconfig.parsePools(value, name, health, parsePolicy)


def madeVia() -> str:
    """
    The name C{via = "auto"} stands for: one per balancer, made as it
    starts.
    """
    return "rrbalancer-" + secrets.token_hex(4)


def isMadeVia(name: Optional[str]) -> bool:
    """
    Whether C{name} looks like one L{madeVia} made: a running balancer
    whose file still says C{auto} has not changed its name.
    """
    return name is not None and _MADE_VIA.fullmatch(name) is not None


_MADE_VIA = re.compile(r"rrbalancer-[0-9a-f]{8}")


def parseVia(value: Any, name: str) -> Optional[str]:
    """
    A Via pseudonym: C{auto}, C{none}, or a token.
    """
    text = string(value, name).strip()
    if text.lower() == "none":
        return None
    if text.lower() == "auto":
        return "auto"
    if not text or not _TOKEN.issuperset(text):
        raise ConfigError(f"{name}: {text!r} is not a name (letters, digits, -._~)")
    return text


def parseNetworks(value: Any, name: str) -> Tuple[str, ...]:
    """
    Networks in CIDR notation (an address alone is a network of one).
    """
    networks = []
    for item in asList(value):
        text = string(item, name).strip()
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not a network such as 10.0.0.0/8") from None
    return tuple(networks)


def parsePolicy(value: Any, name: str) -> str:
    from .policies import policyNames

    text = string(value, name).strip()
    names = policyNames()
    if text not in names:
        raise ConfigError(f"{name}: {text!r} is not a policy (one of {', '.join(names)})")
    return text


def parseHashKey(value: Any, name: str) -> str:
    """
    What the hash policy hashes: C{client-ip}, C{path}, C{header:NAME} or
    C{cookie:NAME}.
    """
    text = string(value, name).strip()
    if text in ("client-ip", "path"):
        return text
    kind, _, field = text.partition(":")
    if kind in ("header", "cookie") and field and set(field) <= _TOKEN:
        return text
    raise ConfigError(
        f"{name}: {text!r} is not a hash key (client-ip, path, header:NAME or cookie:NAME)"
    )


def parseCookieName(value: Any, name: str) -> Optional[str]:
    text = string(value, name)
    # RFC 6265's cookie-name is an RFC 9110 token.
    if not text or not set(text) <= _TOKEN:
        raise ConfigError(f"{name}: {text!r} is not a cookie name")
    return text


def parseHealthPath(value: Any, name: str) -> str:
    path = string(value, name)
    if not path.startswith("/") or " " in path:
        raise ConfigError(f"{name}: must be an absolute path, got {path!r}")
    return path




def parseHeaderName(value: Any, name: str) -> Optional[str]:
    """
    An HTTP header name, or C{none} for none.
    """
    text = string(value, name).strip()
    if text.lower() == "none":
        return None
    if not text or not _TOKEN.issuperset(text):
        raise ConfigError(f"{name}: {text!r} is not a header name")
    return text


ADMIN_DEFAULT = "tcp:8001:interface=127.0.0.1"


def parseAdmin(value: Any, name: str = "admin") -> Optional[str]:
    """
    The admin listener: C{none} for none, a bare port number for that port
    on 127.0.0.1, or a server endpoint description.
    """
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = string(value, name).strip()
    if text.lower() in ("none", "off", "false", "no", ""):
        return None
    if text.isdigit():
        return f"tcp:{tcpPortNumber(name, text)}:interface=127.0.0.1"
    if ":" not in text:
        raise ConfigError(
            f"{name}: {value!r} is neither 'none', a port number nor an endpoint "
            "description such as tcp:8001:interface=127.0.0.1"
        )
    return text


def existingFile(path: str, name: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: no such file: {path}")
    return path


def existingFolder(path: str, name: str) -> str:
    if not os.path.isdir(path):
        raise ConfigError(f"{name}: no such folder: {path}")
    return path


def logFile(path: str, name: str) -> str:
    if path != "-":
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise ConfigError(f"{name}: no such folder: {folder}")
    return path


def readAdminToken(path: str, name: str = "admin_token_file") -> bytes:
    """
    The admin token: the file's content without surrounding whitespace.
    """
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"{name}: {path} is empty")
    if any(c in token for c in b"\r\n\x00"):
        raise ConfigError(f"{name}: {path} holds more than one line")
    return token


def tokenFile(path: str, name: str) -> str:
    readAdminToken(path, name)
    return path


# -- the schema -----------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One setting, everywhere it appears.

    @ivar key: the TOML key; C{table.key} for a key inside a table
        (C{health.interval}).
    @ivar attr: the attribute of the config object (of the table's object
        for a table's key).
    @ivar parse: C{parse(raw, name)} validates and converts; C{name} is
        for its message.
    @ivar default: the value when neither the file nor a flag gives one
        (already parsed).
    @ivar flag: the long command-line flag; C{""} for a setting only a file
        can give.
    @ivar switch: for a flag that takes no value, the raw value it sets
        (C{--demo} sets C{True}, C{--no-health-checks} sets C{False}).
    @ivar repeatable: the flag may be given many times (a list).
    @ivar path: a file name, relative to the config file's folder (or the
        working directory on the command line); C{-} passes as it is.
    @ivar reloadable: a reload (SIGHUP) applies a change to it; any other
        change is reported as needing a restart.
    @ivar metavar: how the flag's value is shown in the README.
    @ivar shownDefault: the default as the README shows it, when the value
        itself would not read well.
    """

    key: str
    attr: str
    parse: Callable[[str, Any], Any]
    default: Any
    help: str
    flag: Optional[str] = None
    short: Optional[str] = None
    switch: Any = None
    repeatable: bool = False
    path: bool = False
    reloadable: bool = False
    metavar: str = ""
    shownDefault: Optional[str] = None

    @property
    def table(self) -> Optional[str]:
        return self.key.split(".", 1)[0] if "." in self.key else None

    @property
    def name(self) -> str:
        """
        The key inside its table.
        """
        return self.key.rsplit(".", 1)[-1]

    @property
    def longFlag(self) -> Optional[str]:
        if self.flag == "":
            return None
        return self.flag or self.name.replace("_", "-")

    def shown(self) -> str:
        if self.shownDefault is not None:
            return self.shownDefault
        value = self.default
        if value is None or value is False or value == ():
            return ""
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return ", ".join(str(v) for v in value)
        return str(value)


def _s(key, attr, parse, default, help, **options) -> Setting:
    return Setting(key, attr, parse, default, help, **options)


SETTINGS: Tuple[Setting, ...] = (
    _s("port", "ports", parsePorts, ("tcp:8000",),
       "Listen here: a port number (tcp:PORT) or any Twisted server endpoint: "
       "tcp:8000:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, "
       "unix:/run/rr.sock, haproxy:tcp:8000 (PROXY protocol), systemd:domain=INET:index=0; "
       "and tls:8443 for TLS with the certificates of --tls-cert. Repeatable.",
       short="p", repeatable=True, metavar="PORT|ENDPOINT", shownDefault="8000"),
    _s("backend", "backends", parseBackends, (),
       "A backend, http:// or https://, repeatable. Weights give NGINX's smooth "
       "weighted round robin (5,1,1 → a a b a c a a); backups get traffic only "
       "while no primary is up. A reload applies changes to the backends.",
       short="b", repeatable=True, reloadable=True, metavar="URL[,weight=N][,backup]"),
    _s("discover", "discover", parseSources, (),
       "Backends found by discovery, repeatable: dns+a://NAME:PORT (every A and "
       "AAAA address of NAME, on PORT; ,weight=N and ,backup apply to each) or "
       "dns+srv://_http._tcp.NAME (SRV records: the lowest priority present are "
       "primaries, the others backups; the SRV weight is the weight), asked again "
       "at the answer's TTL; or etcd://HOST:PORT/PREFIX/ (each key under the "
       "prefix, its value a URL or {\"url\", \"weight\", \"backup\", \"state\"}; "
       "watched). A failed lookup or an etcd outage keeps the last set.",
       repeatable=True, metavar="URL"),
    _s("dns_server", "dnsServers", parseDNSServers, (),
       "The DNS server discovery asks: an address, with :PORT when not 53 "
       "(repeatable). By default those of /etc/resolv.conf.",
       repeatable=True, metavar="HOST:PORT"),
    _s("dns_min_ttl", "dnsMinTTL", seconds, 5.0,
       "Discovery asks DNS again at the answer's TTL, but never sooner than "
       "this many seconds; a failed lookup is retried within this many.",
       metavar="S"),
    _s("dns_max_ttl", "dnsMaxTTL", seconds, 300.0,
       "Discovery asks DNS again no later than this many seconds, whatever the "
       "answer's TTL.", metavar="S"),
    _s("backend_ca", "backendCA", existingFile, None,
       "PEM CAs trusted for https backends, besides the system store "
       "(certificates are verified with service-identity).",
       path=True, metavar="FILE"),
    _s("health.path", "path", parseHealthPath, "/",
       "Path of the health check request.", flag="health-path", metavar="PATH"),
    _s("health.interval", "interval", seconds, 2.0,
       "Seconds between health checks.", flag="health-interval", metavar="S"),
    _s("health.timeout", "timeout", seconds, 1.0,
       "A check passes on a 2xx or 3xx answer within this many seconds.",
       flag="health-timeout", metavar="S"),
    _s("health.rise", "rise", atLeastOne, 2,
       "Passing checks in a row that bring a backend up.", metavar="N"),
    _s("health.fall", "fall", atLeastOne, 3,
       "Failing checks in a row that take a backend down.", metavar="N"),
    _s("health.jitter", "jitter", fraction, 0.05,
       "Each wait between two checks of a backend is the interval times 1 plus "
       "or minus up to this fraction (HAProxy's spread-checks), so that checks "
       "never fall due all at once.", flag="health-jitter", metavar="F"),
    _s("health.enabled", "enabled", boolean, True,
       "Check backends (the flag turns checks off); without checks every "
       "backend is always up.",
       flag="no-health-checks", switch=False, shownDefault="true"),
    _s("tls_cert", "tlsCert", existingFolder, None,
       "A folder of certificates for tls:PORT ports, chosen by the name the "
       "client asks for (SNI): NAME.pem (key and chain) or NAME/privkey.pem and "
       "NAME/fullchain.pem; default.pem (or the first) for other names. Re-read "
       "on SIGHUP.", path=True, metavar="DIR"),
    _s("tls_min_version", "tlsMinVersion", oneOf("1.2", "1.3"), "1.2",
       "The oldest TLS version tls: ports accept.", metavar="1.2|1.3"),
    _s("http2", "http2", boolean, True,
       "Offer HTTP/2 by ALPN on TLS ports (tls: and ssl:), beside HTTP/1.1 "
       "(the flag offers HTTP/1.1 only). Plain ports speak HTTP/1.1 only; "
       "backends are always spoken to in HTTP/1.1.",
       flag="no-http2", switch=False, shownDefault="true"),
    _s("max_concurrent_streams", "maxConcurrentStreams", atLeastOne, 100,
       "HTTP/2: the streams (requests) one client connection may have open at "
       "once; more are refused by the protocol, not queued.", metavar="N"),
    _s("balance", "balance", parsePolicy, "round-robin",
       "How a backend is chosen: round-robin (NGINX's smooth weighted round "
       "robin), least-conn (fewest requests in flight and tunnels open for the "
       "weight), random "
       "(weighted), p2c (two at random, the faster by EWMA latency times "
       "load), hash (consistent hashing with bounded loads on --hash-key), or "
       "a policy a plugin offers.", metavar="NAME", reloadable=True),
    _s("hash_key", "hashKey", parseHashKey, "client-ip",
       "hash: what is hashed: client-ip (the peer's address), path, header:NAME "
       "or cookie:NAME. A request without it is balanced round robin.",
       metavar="KEY", reloadable=True),
    _s("hash_balance", "hashBalance", lambda v, n: number(v, n, minimum=1.0), 1.25,
       "hash: no backend takes more than this many times the mean load "
       "(requests in flight and tunnels open, for its weight); past it, a key "
       "goes on round the ring to the next backend.", metavar="F", reloadable=True),
    _s("ewma_decay", "ewmaDecay", seconds, 10.0,
       "p2c: the time constant, in seconds, over which a backend's slow "
       "answers are forgotten (under load, each answer also weighs at least "
       "a sixteenth of the average).", metavar="S", reloadable=True),
    _s("slow_start", "slowStart", secondsOrZero, 0.0,
       "A backend that comes up (added at run time, enabled again, recovered "
       "or readmitted) ramps from a tenth of its weight to all of it over this "
       "many seconds, in every policy; 0 is off. Backends there at start take "
       "their full weight at once.", metavar="S", reloadable=True),
    _s("panic_threshold", "panicThreshold", percent, 0,
       "When fewer than this percent of the enabled primaries are up and no "
       "backup is, spread requests over every enabled primary whatever its "
       "health (Envoy's panic mode), so that the last healthy one is not "
       "crushed while checks flap; 0 is off.", metavar="PERCENT", reloadable=True),
    _s("eject_after", "ejectAfter", count, 5,
       "Failures in a row seen on client requests (no connection, a reset, a "
       "timeout, a response cut short; 5xx too with --eject-on-5xx) that eject "
       "a backend for a while, apart from the active checks; 0 is off.",
       metavar="N", reloadable=True),
    _s("eject_time", "ejectTime", seconds, 30.0,
       "How long an ejection lasts, times the number of times the backend was "
       "ejected (capped at 300 s; the count starts again after 300 s without "
       "one).", metavar="S", reloadable=True),
    _s("eject_on_5xx", "ejectOn5xx", boolean, False,
       "Count 5xx answers as failures for --eject-after.", switch=True, reloadable=True),
    _s("max_ejected_percent", "maxEjectedPercent", percent, 50,
       "Never eject more than this percent of the backends at once (rounded "
       "down: one backend alone is never ejected at 50).", metavar="PERCENT", reloadable=True),
    _s("sticky_cookie", "stickyCookie", parseCookieName, None,
       "Sticky sessions: the first answer sets this cookie to an opaque id of "
       "the backend (never its address); later requests carrying it go to that "
       "backend while it is available, and are stuck to another when it is "
       "not. HttpOnly, SameSite=Lax, and Secure on TLS ports.", metavar="NAME"),
    _s("backend_timeout", "backendTimeout", seconds, 30.0,
       "No response byte from a backend within this many seconds: 504.", metavar="S"),
    _s("connect_timeout", "connectTimeout", seconds, 5.0,
       "Seconds to wait for a connection to a backend.", metavar="S"),
    _s("host_header", "hostHeader", oneOf("client", "backend"), "client",
       "Which Host backends see: the client's, or the backend's own.",
       metavar="client|backend"),
    _s("forwarded_header", "forwardedHeader", oneOf("x-forwarded", "forwarded", "both"),
       "x-forwarded", "Which forwarding headers backends get: X-Forwarded-For, -Proto, "
       "-Host; RFC 7239's Forwarded; or both.", metavar="x-forwarded|forwarded|both"),
    _s("trusted_proxy", "trustedProxies", parseNetworks, (),
       "A proxy in front whose X-Forwarded-For/Forwarded chain is kept and "
       "appended to (CIDR, repeatable). Once one is given, the chain from any "
       "other client is replaced by its own address. Without any, every chain "
       "is appended to.", repeatable=True, metavar="CIDR"),
    _s("via", "via", parseVia, "auto",
       "The name this balancer gives itself in the Via header of the requests "
       "it forwards; a request that comes back with it (a loop) gets 508. auto "
       "makes one per balancer; none sends no Via.", metavar="NAME|auto|none"),
    _s("limit", "limits", parseLimits, (),
       "A client rate limit (a token bucket per key, checked before a backend "
       "is picked): RATE like 10/s, 600/m or 100/10s, then options: burst=N "
       "(default: the rate), key=client_ip|host|header:NAME, mode=reject|delay "
       "(429, or hold up to max_delay=S seconds), max_inflight=N per key, "
       "max_keys=N remembered (100000), dry_run, headers (the IETF RateLimit "
       "headers). TOML: [[limit]] tables with those keys. Repeatable.",
       flag="rate-limit", repeatable=True, reloadable=False,
       metavar="RATE[,burst=N][,key=K]..."),
    _s("pool", "pools", parsePools, (),
       "TOML only: [[pool]] tables, each a group of backends of its own with its "
       "own health checks and policy: name, [[pool.backend]] (as [[backend]]), "
       "balance (default: balance) and a [pool.health] table (default: [health]). "
       "The top-level backends are the pool named default. A reload applies "
       "changes, but for a pool's [pool.health], which needs a restart.",
       flag="", reloadable=True),
    _s("route", "routes", parseRoutes, (),
       "TOML only: [[route]] tables sending requests to a pool: host (exact or "
       "*.example.com), path_prefix (whole segments), methods, pool (or split, a "
       "list of {pool, weight}), strip_prefix and priority. Tried by priority, "
       "then exact host, wildcard host, none, then the longest prefix, then file "
       "order; unmatched requests go to the default pool, or get 404 without one. "
       "mirror, a list of {pool, percent}, sends a copy of that percent of the "
       "route's requests to each pool, whose answers are dropped. "
       "A reload applies changes.", flag="", reloadable=True),
    _s("mirror_max_body", "mirrorMaxBody", count, 64 * 1024,
       "A mirrored request whose body is larger than this many bytes is not "
       "copied (it is counted as skipped); a route's mirror_max_body says "
       "otherwise for its own.", metavar="BYTES", reloadable=True),
    _s("mirror_max_inflight", "mirrorMaxInflight", count, 100,
       "Mirror copies sent and not yet answered, at most; past it, copies are "
       "skipped and counted, never queued; 0 is no bound.", metavar="N",
       reloadable=True),
    _s("access_log", "accessLog", logFile, None,
       "Write an NCSA combined access log here; - is standard output.",
       path=True, metavar="PATH"),
    _s("access_log_format", "accessLogFormat", oneOf("combined", "json"), "combined",
       "combined: NCSA combined lines; json: one JSON object a line with time, "
       "client, method, target, protocol, status, bytes, duration_ms, backend, "
       "backend_status, attempts, request_id and pool.", metavar="combined|json"),
    _s("request_id_header", "requestIDHeader", parseHeaderName, "X-Request-ID",
       "A request's id: kept from this header, or made when absent; sent to the "
       "backend and logged. none turns it off.", metavar="NAME|none"),
    _s("shutdown_grace", "shutdownGrace", secondsOrZero, 10.0,
       "On SIGTERM/SIGINT: stop accepting, let requests in flight finish and "
       "tunnels run this many seconds, close what is left, exit 0. A removed "
       "backend's tunnels run as long.", metavar="S"),
    _s("tunnel_timeout", "tunnelTimeout", seconds, 3600.0,
       "A tunnel (a WebSocket or other upgraded connection) with no byte "
       "either way for this many seconds is closed.", metavar="S"),
    _s("client_timeout", "clientTimeout", seconds, 60.0,
       "Idle client connections are closed after this many seconds.", metavar="S"),
    _s("header_timeout", "headerTimeout", seconds, 10.0,
       "A request head must arrive whole within this many seconds of its "
       "first byte (408).", metavar="S"),
    _s("body_timeout", "bodyTimeout", seconds, 60.0,
       "A request body may pause this many seconds between two reads (408); "
       "an upload has no deadline as a whole.", metavar="S"),
    _s("max_body_size", "maxBodySize", count, 100 * 1024 * 1024,
       "Larger request bodies get 413; 0 is no limit.", metavar="BYTES"),
    _s("max_response_head_size", "maxResponseHeadSize", atLeastOne, 64 * 1024,
       "A backend's response head larger than this many bytes is refused (502).",
       metavar="BYTES"),
    _s("max_in_flight", "maxInFlight", count, 0,
       "Past this many requests in flight on the balancer, new ones get 503 with "
       "Retry-After at once (load shedding); 0 is no bound.", metavar="N"),
    _s("max_conns", "maxConns", count, 0,
       "Requests in flight (and tunnels open) that make a backend full (HAProxy's "
       "server maxconn): "
       "no policy picks it, and a request that finds every backend full waits "
       "in one queue, oldest first (--queue-size, --queue-timeout), then gets "
       "503; 0 is no limit.", metavar="N"),
    _s("max_connections", "maxConnections", count, 0,
       "Most connections open to one backend; 0 is no limit.", metavar="N"),
    _s("queue_size", "queueSize", count, 100,
       "Requests that may wait for a backend with room (--max-conns), or for a "
       "connection to a backend at --max-connections; past it, 503 at once "
       "(or the next backend, for a connection).", metavar="N"),
    _s("queue_timeout", "queueTimeout", seconds, 5.0,
       "Seconds a request may wait in that queue before its 503.", metavar="S"),
    _s("max_idle_per_backend", "maxIdlePerBackend", count, 32,
       "Idle kept-alive connections kept per backend.", metavar="N"),
    _s("pool_idle_timeout", "poolIdleTimeout", seconds, 60.0,
       "Seconds an idle backend connection is kept.", metavar="S"),
    _s("workers", "workers", parseWorkers, 1,
       "Processes sharing the listening sockets; auto is one per CPU.",
       metavar="N|auto"),
    _s("admin", "admin", parseAdmin, ADMIN_DEFAULT,
       "Where the admin API, dashboard and metrics listen: an endpoint, a bare "
       "port number (on 127.0.0.1), or none.", metavar="ENDPOINT"),
    _s("admin_token_file", "adminTokenFile", tokenFile, None,
       "Every admin request must then carry Authorization: Bearer and this "
       "file's content.", path=True, metavar="FILE"),
    _s("metrics_per_backend", "metricsPerBackend", boolean, True,
       "Give /metrics a series per backend and measure; false keeps the totals "
       "only, for fleets where that many series are unwanted.", metavar="true|false"),
    _s("demo", "demo", boolean, False,
       "Start three demo backends on loopback ports and balance over them.",
       switch=True),
)

TABLES = ("health",)


def settingsIn(table: Optional[str]) -> Tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.table == table)


def unknownKey(where: str, key: str, possible: Iterable[str]) -> ConfigError:
    error = ConfigError(f"{where}unknown setting {key!r}{_nearest(key, possible)}")
    error.key = key
    return error


def markdownTable() -> str:
    """
    The README's option table, from the schema.
    """
    rows = ["| flag | TOML key | default | |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        flag = s.longFlag
        if flag is None:
            shownFlag = ""
        else:
            shownFlag = f"--{flag}" + (f" {s.metavar}" if s.metavar and s.switch is None else "")
            shownFlag = "`" + shownFlag.replace("|", "\\|") + "`"
        default = s.shown()
        rows.append(
            "| %s | `%s` | %s | %s |"
            % (
                shownFlag,
                s.key,
                f"`{default}`" if default else "",
                s.help.replace("|", "\\|"),
            )
        )
    return "\n".join(rows) + "\n"
