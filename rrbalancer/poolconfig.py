"""
The C{[[pool]]} tables of a config, parsed and checked: what a pool is
before it runs (L{rrbalancer.pools} runs it).

A pool's C{[pool.health]} keys are the top-level C{[health]} settings,
which the schema (L{rrbalancer.settings}) holds and hands in, so that this
module needs nothing of it.
"""

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Tuple

from .values import (
    BackendConfig,
    ConfigError,
    _nearest,
    asList,
    parseBackends,
    refuseUnknownKeys,
    string,
)

DEFAULT = "default"
POOL_KEYS = ("name", "backend", "balance", "health")
_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class PoolConfig:
    """
    One C{[[pool]]} table as the operator wrote it.

    @ivar balance: its policy, or None for the top-level C{balance}.
    @ivar health: the C{[pool.health]} keys it gives, as (attribute, value)
        pairs; the others are the top-level C{[health]}'s, so that a pool
        states only how its checks differ.
    """

    name: str
    backends: Tuple[BackendConfig, ...]
    balance: Optional[str] = None
    health: Tuple[Tuple[str, Any], ...] = ()

    def configFor(self, config):
        """
        The L{Config} of this pool's L{Balancer}: the running one, with the
        pool's backends, policy and checks.  Client rate limits are the
        balancer's, not each pool's, so they are left out here and shared.
        A sticky cookie has the pool's name in its own: with one name for
        all, a client's visit to another pool would unstick it from its
        backend in this one.
        """
        sticky = config.stickyCookie
        return replace(
            config,
            backends=self.backends,
            balance=self.balance or config.balance,
            health=replace(config.health, **dict(self.health)),
            stickyCookie=f"{sticky}-{self.name}" if sticky is not None else None,
            limits=(),
            pools=(),
            routes=(),
        )


def _poolName(value: Any, where: str) -> str:
    name = string(value, f"{where}: name").strip()
    if not name or not _NAME.issuperset(name):
        raise ConfigError(f"{where}: name {name!r} is not a pool name (letters, digits, -_.)")
    return name


def parsePool(
    spec: Any, number: int, health: Mapping[str, Any], parsePolicy: Callable[[Any, str], str]
) -> PoolConfig:
    """
    One C{[[pool]]} table.

    @param health: the settings a C{[pool.health]} table may hold, by key
        (the schema's own C{[health]} settings: each has C{attr} and
        C{parse}).
    @param parsePolicy: the parser of a C{balance} value.
    """
    where = f"pool {number}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a [[pool]] table, got {spec!r}")
    refuseUnknownKeys(spec, POOL_KEYS, where)
    if "name" not in spec:
        raise ConfigError(f"{where}: every pool needs a name")
    name = _poolName(spec["name"], where)
    where = f"pool {name}"
    if name == DEFAULT:
        raise ConfigError(
            f"{where}: the top-level [[backend]] list is the pool named {DEFAULT}; "
            "give this pool another name"
        )
    if not spec.get("backend"):
        raise ConfigError(f"{where}: no backends; give it at least one [[pool.backend]]")
    try:
        backends = parseBackends(spec["backend"], "pool.backend")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    balance = None
    if "balance" in spec:
        balance = parsePolicy(spec["balance"], f"{where}: balance")
    declared = health
    given = spec.get("health", {})
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where}: health: expected a [pool.health] table")
    overrides = []
    for key, value in given.items():
        setting = declared.get(key)
        if setting is None:
            raise ConfigError(
                f"{where}: health: unknown setting {key!r}{_nearest(key, declared)}"
            )
        overrides.append((setting.attr, setting.parse(value, f"{where}: health.{key}")))
    return PoolConfig(name, backends, balance, tuple(overrides))


def parsePools(
    value: Any, name: str, health: Mapping[str, Any], parsePolicy: Callable[[Any, str], str]
) -> Tuple[PoolConfig, ...]:
    """
    C{[[pool]]} tables (see L{parsePool} for C{health} and
    C{parsePolicy}, which L{rrbalancer.settings} gives).
    """
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}: a single [{name}] table; write [[{name}]] (one per pool)")
    pools = tuple(
        parsePool(spec, n, health, parsePolicy) for n, spec in enumerate(asList(value), 1)
    )
    seen = set()
    for pool in pools:
        if pool.name in seen:
            raise ConfigError(f"pool {pool.name}: two pools have that name")
        seen.add(pool.name)
    return pools


def poolNames(config) -> Tuple[str, ...]:
    """
    The pools a config has: C{default} when it has top-level backends (or
    the demo's, or discovery sources that feed it), then its C{[[pool]]}s
    in file order.
    """
    names = tuple(p.name for p in config.pools)
    if config.backends or config.demo or config.discover:
        return (DEFAULT,) + names
    return names
