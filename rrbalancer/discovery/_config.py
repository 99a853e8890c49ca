"""
The C{--discover} URLs (and C{[[discover]]} tables), parsed and checked
at startup and for C{--check}, so that a mistake is one line: what a
source is before L{rrbalancer.discovery} builds and runs it.
"""

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from ..values import (
    ConfigError,
    _isAddress,
    asList,
    boolean,
    integer,
    refuseUnknownKeys,
    splitWeightAndBackup,
    string,
    tcpPortNumber,
)


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


def parseSource(spec: Any, where: str = "discover") -> SourceConfig:
    """
    Parse the command line's C{URL[,weight=N][,backup]}, or a TOML table
    with the keys C{url}, C{weight} and C{backup}.
    """
    if isinstance(spec, Mapping):
        refuseUnknownKeys(spec, SOURCE_KEYS, where)
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
