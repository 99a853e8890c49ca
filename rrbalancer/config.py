"""
Configuration: parsed and validated once, into plain immutable objects.

Settings arrive from two places, a TOML file and the command line, as a
nested dict of loosely typed values (strings from the command line, native
values from TOML).  L{buildConfig} is the only place that turns such a dict
into a L{Config}; every mistake a user can make is reported there as a
L{ConfigError} whose message names the setting, so that the plugin and the
.tac file can print one line and exit instead of a traceback.
"""

import ipaddress
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on PyPy 3.9
    import tomli as tomllib


class ConfigError(ValueError):
    """
    A setting is missing, malformed or out of range; the message is meant
    for the operator, as one line.
    """


@dataclass(frozen=True)
class BackendConfig:
    """
    One backend as the operator described it.
    """

    url: str
    weight: int = 1
    backup: bool = False

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True)
class Config:
    """
    Everything needed to build the service; see L{rrbalancer.service}.
    """

    backends: Tuple[BackendConfig, ...] = ()
    ports: Tuple[str, ...] = ("tcp:8000",)
    health: HealthConfig = field(default_factory=HealthConfig)
    backendCA: Optional[str] = None
    backendTimeout: float = 30.0
    connectTimeout: float = 5.0
    hostHeader: str = "client"
    accessLog: Optional[str] = None
    shutdownGrace: float = 10.0
    clientTimeout: float = 60.0
    headerTimeout: float = 10.0
    bodyTimeout: float = 60.0
    maxBodySize: int = 100 * 1024 * 1024
    maxIdlePerBackend: int = 32
    maxConnections: int = 0
    queueSize: int = 100
    queueTimeout: float = 5.0
    poolIdleTimeout: float = 60.0
    demo: bool = False
    workers: int = 1
    # The admin listener (API, dashboard, metrics): an endpoint description,
    # or None for none.  buildConfig's default is ADMIN_DEFAULT; a Config
    # made in code has none unless asked.
    admin: Optional[str] = None
    adminTokenFile: Optional[str] = None
    # The file this came from, and the command line's settings laid over
    # it, so that a reload (SIGHUP) can build the same way again.
    configPath: Optional[str] = None
    configOverrides: Mapping[str, Any] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )


# The settings a file or the command line may carry, with the parser that
# validates each.  Nested tables ("health") are validated field by field.
TOP_LEVEL_KEYS = (
    "port",
    "backend",
    "backend_ca",
    "backend_timeout",
    "connect_timeout",
    "host_header",
    "access_log",
    "shutdown_grace",
    "client_timeout",
    "header_timeout",
    "body_timeout",
    "max_body_size",
    "max_idle_per_backend",
    "max_connections",
    "queue_size",
    "queue_timeout",
    "pool_idle_timeout",
    "demo",
    "health",
    "workers",
    "admin",
    "admin_token_file",
)
HEALTH_KEYS = ("enabled", "path", "interval", "timeout", "rise", "fall")
BACKEND_KEYS = ("url", "weight", "backup")


def _number(name: str, value: Any, *, minimum: float = 0.0, positive=False) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if positive and number <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum:g}, got {value!r}")
    return number


def _integer(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value!r}")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(f"{name}: must not contain CR, LF or NUL")
    return value


def parseWorkers(value: Any) -> int:
    """
    A number of worker processes; C{auto} is one per CPU.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _integer("workers", value, minimum=1)


def parsePort(value: Any) -> str:
    """
    Turn a listening port setting into a server endpoint description: a bare
    number means TCP on every interface, as C{--port 8000} always has.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _string("port", value).strip()
    if text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise ConfigError(f"port: {text} is not a TCP port number (1-65535)")
        return f"tcp:{port}"
    if not text or ":" not in text:
        raise ConfigError(
            f"port: {value!r} is neither a port number nor an endpoint "
            "description such as tcp:8000:interface=127.0.0.1"
        )
    return text


def parseBackendURL(value: Any, name: str = "backend") -> str:
    """
    Check a backend URL: http or https, a host, an optional port, and nothing
    a proxy could not forward to (no credentials, query or fragment).
    """
    text = _string(name, value).strip()
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
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigError(
            f"{name}: {text!r} must name a server only (no path, query or fragment)"
        )
    if port == 0:
        raise ConfigError(f"{name}: {text!r} has port 0")
    netloc = parts.netloc.lower()
    return f"{parts.scheme}://{netloc}"


def parseBackendSpec(spec: Any) -> BackendConfig:
    """
    Parse the command line's C{URL[,weight=N][,backup]}, or a TOML table
    with the keys C{url}, C{weight} and C{backup}.
    """
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(BACKEND_KEYS))
        if unknown:
            raise ConfigError(f"backend: unknown key {unknown[0]!r}")
        if "url" not in spec:
            raise ConfigError("backend: every backend needs a url")
        options = dict(spec)
        url = options.pop("url")
    else:
        text = _string("backend", spec)
        url, *rest = [part.strip() for part in text.split(",")]
        options = {}
        for part in rest:
            key, sep, val = (p.strip() for p in part.partition("="))
            if key == "backup" and not sep:
                options["backup"] = True
            elif key == "weight" and sep:
                options["weight"] = val
            else:
                raise ConfigError(
                    f"backend: unknown option {part!r} in {text!r} "
                    "(expected weight=N or backup)"
                )
    url = parseBackendURL(url)
    weight = _integer(f"backend {url}: weight", options.get("weight", 1), minimum=1)
    backup = _boolean(f"backend {url}: backup", options.get("backup", False))
    return BackendConfig(url=url, weight=weight, backup=backup)


def _asList(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _health(settings: Mapping[str, Any]) -> HealthConfig:
    if not isinstance(settings, Mapping):
        raise ConfigError("health: expected a table")
    unknown = sorted(set(settings) - set(HEALTH_KEYS))
    if unknown:
        raise ConfigError(f"health: unknown key {unknown[0]!r}")
    defaults = HealthConfig()
    path = _string("health.path", settings.get("path", defaults.path))
    if not path.startswith("/") or " " in path:
        raise ConfigError(f"health.path: must be an absolute path, got {path!r}")
    interval = _number(
        "health.interval", settings.get("interval", defaults.interval), positive=True
    )
    timeout = _number(
        "health.timeout", settings.get("timeout", defaults.timeout), positive=True
    )
    return HealthConfig(
        enabled=_boolean("health.enabled", settings.get("enabled", True)),
        path=path,
        interval=interval,
        timeout=timeout,
        rise=_integer("health.rise", settings.get("rise", defaults.rise), minimum=1),
        fall=_integer("health.fall", settings.get("fall", defaults.fall), minimum=1),
    )


def buildConfig(settings: Mapping[str, Any], baseDir: str = ".") -> Config:
    """
    Validate a settings dict and freeze it into a L{Config}.

    @param baseDir: where relative file names in the settings are found
        (the config file's folder, or the working directory).
    """
    unknown = sorted(set(settings) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    d = Config()
    demo = _boolean("demo", settings.get("demo", False))
    backends = tuple(parseBackendSpec(b) for b in _asList(settings.get("backend", [])))
    if not backends and not demo:
        raise ConfigError(
            "no backend: give at least one --backend URL (or try --demo)"
        )
    seen = {}
    for b in backends:
        # http://a and http://a:80 are one server: compare what is dialled.
        server = (b.scheme, b.host, b.port)
        if server in seen:
            also = "" if seen[server] == b.url else f" (also as {seen[server]})"
            raise ConfigError(f"backend: {b.url} is listed twice{also}")
        seen[server] = b.url
    ports = tuple(parsePort(p) for p in _asList(settings.get("port", "8000")))
    if not ports:
        raise ConfigError("port: at least one listening port is needed")

    def path(name: str) -> Optional[str]:
        value = settings.get(name)
        if value is None:
            return None
        text = _string(name, value)
        if text == "-":
            return text
        return os.path.normpath(os.path.join(baseDir, os.path.expanduser(text)))

    backendCA = path("backend_ca")
    if backendCA is not None and not os.path.isfile(backendCA):
        raise ConfigError(f"backend_ca: no such file: {backendCA}")
    accessLog = path("access_log")
    if accessLog not in (None, "-"):
        folder = os.path.dirname(accessLog) or "."
        if not os.path.isdir(folder):
            raise ConfigError(f"access_log: no such folder: {folder}")
    hostHeader = _string("host_header", settings.get("host_header", d.hostHeader))
    if hostHeader not in ("client", "backend"):
        raise ConfigError(
            f"host_header: expected 'client' or 'backend', got {hostHeader!r}"
        )
    return Config(
        backends=backends,
        ports=ports,
        health=_health(settings.get("health", {})),
        backendCA=backendCA,
        backendTimeout=_number(
            "backend_timeout",
            settings.get("backend_timeout", d.backendTimeout),
            positive=True,
        ),
        connectTimeout=_number(
            "connect_timeout",
            settings.get("connect_timeout", d.connectTimeout),
            positive=True,
        ),
        hostHeader=hostHeader,
        accessLog=accessLog,
        shutdownGrace=_number(
            "shutdown_grace", settings.get("shutdown_grace", d.shutdownGrace)
        ),
        clientTimeout=_number(
            "client_timeout",
            settings.get("client_timeout", d.clientTimeout),
            positive=True,
        ),
        headerTimeout=_number(
            "header_timeout",
            settings.get("header_timeout", d.headerTimeout),
            positive=True,
        ),
        bodyTimeout=_number(
            "body_timeout",
            settings.get("body_timeout", d.bodyTimeout),
            positive=True,
        ),
        maxBodySize=_integer(
            "max_body_size", settings.get("max_body_size", d.maxBodySize), minimum=0
        ),
        maxConnections=_integer(
            "max_connections",
            settings.get("max_connections", d.maxConnections),
            minimum=0,
        ),
        queueSize=_integer(
            "queue_size", settings.get("queue_size", d.queueSize), minimum=0
        ),
        queueTimeout=_number(
            "queue_timeout",
            settings.get("queue_timeout", d.queueTimeout),
            positive=True,
        ),
        maxIdlePerBackend=_integer(
            "max_idle_per_backend",
            settings.get("max_idle_per_backend", d.maxIdlePerBackend),
            minimum=0,
        ),
        poolIdleTimeout=_number(
            "pool_idle_timeout",
            settings.get("pool_idle_timeout", d.poolIdleTimeout),
            positive=True,
        ),
        demo=demo,
        workers=parseWorkers(settings.get("workers", d.workers)),
        **_adminSettings(settings, path),
    )


ADMIN_DEFAULT = "tcp:8001:interface=127.0.0.1"


def parseAdmin(value: Any) -> Optional[str]:
    """
    The admin listener setting: C{none} for none, a bare port number for
    that port on 127.0.0.1, or a server endpoint description.
    """
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _string("admin", value).strip()
    if text.lower() in ("none", "off", "false", "no", ""):
        return None
    if text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise ConfigError(f"admin: {text} is not a TCP port number (1-65535)")
        return f"tcp:{port}:interface=127.0.0.1"
    if ":" not in text:
        raise ConfigError(
            f"admin: {value!r} is neither 'none', a port number nor an endpoint "
            "description such as tcp:8001:interface=127.0.0.1"
        )
    return text


def _endpointParts(description: str):
    """
    A server endpoint description's positional and keyword arguments
    (colons escaped with a backslash do not split).
    """
    parts, current, escaped = [], "", False
    for c in description:
        if escaped:
            current += c
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current)
    args = [p for p in parts if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts if "=" in p)
    return args, kwargs


def isLoopbackEndpoint(description: str) -> bool:
    """
    Can only this host reach a listener on C{description}?  True for a
    UNIX socket and for TCP bound to a loopback address; False for every
    other interface, and for kinds of endpoint this cannot judge.
    """
    args, kwargs = _endpointParts(description)
    kind = args[0].lower() if args else ""
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = kwargs.get("interface", "").strip("[]")
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def readAdminToken(path: str) -> bytes:
    """
    The admin token: the file's content without surrounding whitespace.
    """
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(
            f"admin_token_file: cannot read {path}: {e.strerror}"
        ) from None
    if not token:
        raise ConfigError(f"admin_token_file: {path} is empty")
    if any(c in token for c in b"\r\n\x00"):
        raise ConfigError(f"admin_token_file: {path} holds more than one line")
    return token


def _adminSettings(settings: Mapping[str, Any], path) -> Dict[str, Any]:
    """
    The admin listener's settings.  It is refused on an address other hosts
    can reach unless a token guards it; with several workers (each with its
    own backends) there is none, and asking for one is a mistake.
    """
    admin = parseAdmin(settings.get("admin", ADMIN_DEFAULT))
    workers = parseWorkers(settings.get("workers", 1))
    if workers > 1 and admin is not None:
        if "admin" in settings:
            raise ConfigError(
                "admin: the admin listener needs --workers 1 (every worker has "
                "its own backends); give --admin none"
            )
        admin = None
    tokenFile = path("admin_token_file")
    if tokenFile is not None:
        readAdminToken(tokenFile)
    if admin is not None and tokenFile is None and not isLoopbackEndpoint(admin):
        raise ConfigError(
            f"admin: {admin} can be reached from other hosts: give "
            "--admin-token-file, or listen on a loopback interface "
            "(tcp:8001:interface=127.0.0.1)"
        )
    return {"admin": admin, "adminTokenFile": tokenFile}


def readConfigFile(path: str) -> Dict[str, Any]:
    """
    Read a TOML config file into a settings dict for L{buildConfig}.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: no such file: {path}") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None


def mergeSettings(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """
    Lay command-line settings over file settings; nested tables merge key by
    key, so C{--health-interval} leaves the file's C{health.path} alone.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = mergeSettings(merged[key], value)
        else:
            merged[key] = value
    return merged


def loadConfig(path: str, overrides: Mapping[str, Any] = {}) -> Config:
    """
    Read, merge and validate: the one way from a file to a L{Config}.
    """
    settings = readConfigFile(path)
    config = buildConfig(
        mergeSettings(settings, overrides),
        baseDir=os.path.dirname(os.path.abspath(path)),
    )
    return replace(
        config, configPath=os.path.abspath(path), configOverrides=dict(overrides)
    )
