"""
The plain values a setting may take, and the one error every parser
raises: numbers, strings, ports, backend URLs and backend lists.

Kept apart from the schema (L{rrbalancer.settings}) so that the parsers of
tables with settings of their own (pools, routes, discovery sources) can
use them without the schema, which in turn uses those parsers.
"""

import difflib
import ipaddress
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple
from urllib.parse import urlsplit

class ConfigError(ValueError):
    """
    A setting is missing, malformed or out of range; the message is meant
    for the operator, as one line.

    @ivar key: for an unknown setting, its name (to find its line).
    """

    key = None


@dataclass(frozen=True)
class BackendConfig:
    """
    One backend as the operator described it.
    """

    url: str
    weight: int = 1
    backup: bool = False

    # What follows is read from the URL once: a group looks backends up by
    # their server at every add and removal, and splitting the URL each
    # time was about a second of adding and removing ten thousand.
    @cached_property
    def _parts(self):
        return urlsplit(self.url)

    @property
    def scheme(self) -> str:
        return self._parts.scheme

    @property
    def host(self) -> str:
        return self._parts.hostname or ""

    @property
    def port(self) -> int:
        parts = self._parts
        return parts.port or (443 if parts.scheme == "https" else 80)

    @cached_property
    def server(self) -> Tuple[str, str, int]:
        """
        What is dialled: C{http://a} and C{http://a:80} are one server.
        """
        return (self.scheme, self.host, self.port)


# -- value parsers --------------------------------------------------------------


def number(value: Any, name: str, *, minimum: float = 0.0, positive=False) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if positive and result <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value!r}")
    if result < minimum:
        raise ConfigError(f"{name}: must be at least {minimum:g}, got {value!r}")
    return result


def integer(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        result = value
    else:
        try:
            result = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
    if result < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value!r}")
    return result


def boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(f"{name}: must not contain CR, LF or NUL")
    return value


def seconds(value: Any, name: str) -> float:
    return number(value, name, positive=True)


def secondsOrZero(value: Any, name: str) -> float:
    return number(value, name)


def fraction(value: Any, name: str) -> float:
    result = number(value, name)
    if result >= 1:
        raise ConfigError(f"{name}: must be less than 1, got {value!r}")
    return result


def count(value: Any, name: str) -> int:
    """
    A whole number, 0 allowed (for limits, 0 means none).
    """
    return integer(value, name, minimum=0)


def atLeastOne(value: Any, name: str) -> int:
    return integer(value, name, minimum=1)


def percent(value: Any, name: str) -> int:
    number = integer(value, name, minimum=0)
    if number > 100:
        raise ConfigError(f"{name}: {number} is more than 100 percent")
    return number


def oneOf(*choices: str) -> Callable[[str, Any], str]:
    def parse(value: Any, name: str) -> str:
        text = string(value, name)
        if text not in choices:
            expected = " or ".join(repr(c) for c in choices)
            raise ConfigError(f"{name}: expected {expected}, got {text!r}")
        return text

    return parse


def asList(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def tcpPortNumber(name: str, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        # str.isdigit() says yes to digits int() refuses, such as "²".
        raise ConfigError(f"{name}: {text} is not a TCP port number (1-65535)") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{name}: {text} is not a TCP port number (1-65535)")
    return port


def parseBackendURL(value: Any, name: str = "backend") -> str:
    """
    Check a backend URL: http or https, a host, an optional port, and nothing
    a proxy could not forward to (no credentials, query or fragment).
    """
    text = string(value, name).strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{name}: bad URL {text!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name}: {text!r} must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"{name}: {text!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{name}: {text!r} must not carry credentials")
    if not parts.netloc.isascii():
        # The host goes into request heads and endpoints as ASCII.
        raise ConfigError(
            f"{name}: {text!r}: write the host in ASCII (a name in its xn-- form)"
        )
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigError(
            f"{name}: {text!r} must name a server only (no path, query or fragment)"
        )
    if port == 0:
        raise ConfigError(f"{name}: {text!r} has port 0")
    if parts.scheme == "https" and not _isAddress(parts.hostname):
        # The name the certificate is verified against goes through IDNA
        # (Twisted uses the idna package, which Twisted[tls] installs); one
        # it cannot encode would fail every start with a traceback.
        import idna

        try:
            idna.encode(parts.hostname)
        except UnicodeError as e:
            raise ConfigError(f"{name}: {text!r}: not a host name TLS can verify ({e})") from None
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


BACKEND_KEYS = ("url", "weight", "backup")


def splitWeightAndBackup(text: str, where: str) -> Tuple[str, Dict[str, Any]]:
    """
    C{HEAD[,weight=N][,backup]} as the command line gives a backend (or a
    discovery source): its head, and its options as a TOML table would.
    """
    head, *rest = [part.strip() for part in text.split(",")]
    options: Dict[str, Any] = {}
    for part in rest:
        key, sep, val = (p.strip() for p in part.partition("="))
        if key == "backup" and not sep:
            options["backup"] = True
        elif key == "weight" and sep:
            options["weight"] = val
        else:
            raise ConfigError(
                f"{where}: unknown option {part!r} in {text!r} (expected weight=N or backup)"
            )
    return head, options


def parseBackendSpec(spec: Any) -> BackendConfig:
    """
    Parse the command line's C{URL[,weight=N][,backup]}, or a TOML table
    with the keys C{url}, C{weight} and C{backup}.
    """
    if isinstance(spec, Mapping):
        refuseUnknownKeys(spec, BACKEND_KEYS, "backend")
        if "url" not in spec:
            raise ConfigError("backend: every backend needs a url")
        options = dict(spec)
        url = options.pop("url")
    else:
        url, options = splitWeightAndBackup(string(spec, "backend"), "backend")
    url = parseBackendURL(url)
    weight = integer(options.get("weight", 1), f"backend {url}: weight", minimum=1)
    backup = boolean(options.get("backup", False), f"backend {url}: backup")
    return BackendConfig(url=url, weight=weight, backup=backup)


def parseBackends(value: Any, name: str = "backend") -> Tuple[BackendConfig, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(
            f"{name}: a single [{name}] table; write [[{name}]] (one per backend)"
        )
    backends = tuple(parseBackendSpec(b) for b in asList(value))
    seen: Dict[Tuple[str, str, int], str] = {}
    for b in backends:
        if b.server in seen:
            also = "" if seen[b.server] == b.url else f" (also as {seen[b.server]})"
            raise ConfigError(f"{name}: {b.url} is listed twice{also}")
        seen[b.server] = b.url
    return backends


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _nearest(word: str, possible: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(possible), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def refuseUnknownKeys(table: Iterable[str], keys: Iterable[str], where: str) -> None:
    """
    Refuse a table with a key it may not hold, naming the first (in
    alphabetical order) and the nearest key it may.
    """
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{_nearest(unknown[0], keys)}")
