"""
Configuration: parsed and validated once, into plain immutable objects.

Settings arrive from two places, a TOML file and the command line, as a
nested dict of loosely typed values (strings from the command line, native
values from TOML).  L{buildConfig} is the only place that turns such a dict
into a L{Config}; every mistake a user can make is reported there as a
L{ConfigError} whose message names the setting, so that the plugin and the
.tac file can print one line and exit instead of a traceback.

What the settings are is declared once, in L{rrbalancer.settings}; the
classes here are made from that table.
"""

import ipaddress
import os
import re
import sys
from dataclasses import field, make_dataclass, replace
from typing import Any, Dict, Mapping, Optional

from .settings import (
    ADMIN_DEFAULT,
    SETTINGS,
    TABLES,
    Setting,
    parseAdmin,
    parsePort,
    parseWorkers,
    readAdminToken,
    settingsIn,
    unknownKey,
)
from .routeconfig import checkRouting
from .values import BackendConfig, ConfigError, parseBackendSpec, parseBackendURL, string

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on PyPy 3.9
    import tomli as tomllib

__all__ = [
    "ADMIN_DEFAULT",
    "BackendConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "buildConfig",
    "isLoopbackEndpoint",
    "loadConfig",
    "mergeSettings",
    "parseAdmin",
    "parseBackendSpec",
    "parseBackendURL",
    "parsePort",
    "parseWorkers",
    "readAdminToken",
    "readConfigFile",
]


def _fields(table: Optional[str]):
    return [(s.attr, Any, field(default=s.default)) for s in settingsIn(table)]


HealthConfig = make_dataclass("HealthConfig", _fields("health"), frozen=True)
HealthConfig.__module__ = __name__
HealthConfig.__doc__ = "The health checks' settings (the C{[health]} table)."

Config = make_dataclass(
    "Config",
    _fields(None)
    + [
        ("health", HealthConfig, field(default_factory=HealthConfig)),
        # The file this came from, and the command line's settings laid over
        # it, so that a reload (SIGHUP) can build the same way again.
        ("configPath", Optional[str], field(default=None)),
        (
            "configOverrides",
            Mapping[str, Any],
            field(default_factory=dict, compare=False, hash=False, repr=False),
        ),
    ],
    frozen=True,
)
Config.__module__ = __name__
Config.__doc__ = """
Everything needed to build the balancer; one attribute per setting of
L{rrbalancer.settings.SETTINGS} (the C{[health]} table as a L{HealthConfig}).
"""

# Fields a reload applies; a change to any other is reported as needing a
# restart.
RELOADABLE = frozenset(
    {s.attr for s in SETTINGS if s.reloadable and s.table is None}
    | {"configPath", "configOverrides"}
)


def _resolve(value: Any, setting: Setting, baseDir: str) -> Any:
    text = string(value, setting.key)
    if text == "-":
        return text
    return os.path.normpath(os.path.join(baseDir, os.path.expanduser(text)))


def _parseTable(
    table: Optional[str], raw: Mapping[str, Any], baseDir: str
) -> Dict[str, Any]:
    """
    The parsed values of one table's settings, by attribute; defaults for
    those not given.
    """
    declared = settingsIn(table)
    known = {s.name for s in declared} | (set(TABLES) if table is None else set())
    for key in raw:
        if key not in known:
            raise unknownKey(f"{table}: " if table else "", key, known)
    values = {}
    for setting in declared:
        if setting.name not in raw:
            continue
        value = raw[setting.name]
        if value is None and setting.default is None:
            continue
        if setting.path:
            value = _resolve(value, setting, baseDir)
        values[setting.attr] = setting.parse(value, setting.key)
    return values


def buildConfig(settings: Mapping[str, Any], baseDir: str = ".") -> Config:
    """
    Validate a settings dict and freeze it into a L{Config}.

    @param baseDir: where relative file names in the settings are found
        (the config file's folder, or the working directory).
    """
    values = _parseTable(None, settings, baseDir)
    for table in TABLES:
        raw = settings.get(table, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{table}: expected a table")
        values[table] = (HealthConfig if table == "health" else dict)(
            **_parseTable(table, raw, baseDir)
        )
    return _checkTogether(Config(**values))


def _checkTogether(config: Config) -> Config:
    """
    The rules that involve more than one setting.
    """
    if not config.backends and not config.demo and not config.discover and not config.pools:
        raise ConfigError(
            "no backend: give at least one --backend URL or --discover URL (or try --demo)"
        )
    if config.dnsMinTTL > config.dnsMaxTTL:
        raise ConfigError(
            f"dns_min_ttl: {config.dnsMinTTL:g} is more than dns_max_ttl "
            f"({config.dnsMaxTTL:g})"
        )
    if config.routes or config.pools:
        checkRouting(config)
    if (
        config.admin is not None
        and config.adminTokenFile is None
        and not isLoopbackEndpoint(config.admin)
    ):
        raise ConfigError(
            f"admin: {config.admin} can be reached from other hosts: give "
            "--admin-token-file, or listen on a loopback interface "
            "(tcp:8001:interface=127.0.0.1)"
        )
    return config


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


def isLoopbackHost(host: str) -> bool:
    """
    Is C{host} (a name or an address, IPv6 with or without brackets) one
    that only this machine reaches?
    """
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    return isLoopbackHost(kwargs.get("interface", ""))


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
    except UnicodeDecodeError as e:
        # TOML is UTF-8; tomllib decodes before it parses.
        raise ConfigError(
            f"config: {path} is not valid TOML: not UTF-8 (byte {e.start + 1})"
        ) from None


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


def _lineOf(path: str, key: str) -> Optional[int]:
    """
    The line of a TOML file where C{key} is set (or opens a table), if it
    can be found; tomllib does not say.
    """
    pattern = re.compile(
        r"^\s*(?:\[\[?\s*" + re.escape(key) + r"\s*\]|[\"']?" + re.escape(key) + r"[\"']?\s*=)"
    )
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, 1):
                if pattern.match(text):
                    return number
    except OSError:
        pass
    return None


def loadConfig(path: str, overrides: Mapping[str, Any] = {}) -> Config:
    """
    Read, merge and validate: the one way from a file to a L{Config}.
    """
    settings = readConfigFile(path)
    try:
        config = buildConfig(
            mergeSettings(settings, overrides),
            baseDir=os.path.dirname(os.path.abspath(path)),
        )
    except ConfigError as e:
        line = e.key and _lineOf(path, e.key)
        if line:
            raise ConfigError(f"{path}, line {line}: {e}") from None
        raise
    return replace(
        config, configPath=os.path.abspath(path), configOverrides=dict(overrides)
    )
