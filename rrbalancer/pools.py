"""
Pools: more than one group of backends behind one balancer, each with its
own health checks and policy (HAProxy's backends, NGINX's upstreams,
Envoy's clusters), chosen per request by L{rrbalancer.routing}.

The top-level backends are the pool named C{default}, so that a file
without C{[[pool]]} tables means what it always meant.  Every other pool is
a whole L{Balancer} built from the running L{Config} with the pool's own
backends, policy and checks laid over it: one more pool is one more of the
object every single-pool balancer already is, not new machinery.
"""

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from .backends import UP
from .settings import (
    BackendConfig,
    ConfigError,
    _nearest,
    parseBackends,
    parsePolicy,
    settingsIn,
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


def parsePool(spec: Any, number: int) -> PoolConfig:
    where = f"pool {number}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a [[pool]] table, got {spec!r}")
    unknown = sorted(set(spec) - set(POOL_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}{_nearest(unknown[0], POOL_KEYS)}"
        )
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
    health = spec.get("health", {})
    if not isinstance(health, Mapping):
        raise ConfigError(f"{where}: health: expected a [pool.health] table")
    declared = {s.name: s for s in settingsIn("health")}
    overrides = []
    for key, value in health.items():
        setting = declared.get(key)
        if setting is None:
            raise ConfigError(
                f"{where}: health: unknown setting {key!r}{_nearest(key, declared)}"
            )
        overrides.append((setting.attr, setting.parse(value, f"{where}: health.{key}")))
    return PoolConfig(name, backends, balance, tuple(overrides))


def parsePools(value: Any, name: str = "pool") -> Tuple[PoolConfig, ...]:
    if isinstance(value, Mapping):
        raise ConfigError(f"{name}: a single [{name}] table; write [[{name}]] (one per pool)")
    pools = tuple(parsePool(spec, n) for n, spec in enumerate(_asList(value), 1))
    seen = set()
    for pool in pools:
        if pool.name in seen:
            raise ConfigError(f"pool {pool.name}: two pools have that name")
        seen.add(pool.name)
    return pools


def _asList(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


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


class Pools(MultiService):
    """
    The balancer's pools and the router in front of them.

    The default pool's L{Balancer} is the service's own (it has the admin
    API, the metrics and the reload); this holds the others as children,
    so that they start and stop together.

    @ivar balancers: every pool's L{Balancer} by name, the default's
        included when there is one.
    @ivar router: the L{rrbalancer.routing.Router} a site serves.
    @ivar mirrors: the copies routes send to other pools
        (L{rrbalancer.mirror.Mirrors}).
    """

    log = Logger()

    def __init__(self, config, reactor, default) -> None:
        from .mirror import Mirrors
        from .routing import Router, byPrecedence

        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.default = default
        self.balancers: Dict[str, Any] = {}
        # Each pool as it runs: a reload compares the file's with these.
        self._pools: Dict[str, PoolConfig] = {}
        if DEFAULT in poolNames(config):
            self.balancers[DEFAULT] = default
        for pool in config.pools:
            self._addPool(pool, config)
        self.routes = byPrecedence(config.routes)
        self.mirrors = Mirrors(
            {name: b.group for name, b in self.balancers.items()},
            config.mirrorMaxInflight,
            config.mirrorMaxBody,
        )
        self.router = Router(
            self.routes,
            {name: b.resource() for name, b in self.balancers.items()},
            mirrors=self.mirrors,
        )

    def _addPool(self, pool: PoolConfig, config):
        from .balancer import Balancer

        balancer = Balancer(reactor=self.reactor, config=pool.configFor(config))
        # One set of client limits for the whole balancer, whichever
        # pool a request goes to.
        balancer.limits = self.default.limits
        balancer.resource().limits = self.default.limits
        balancer.setServiceParent(self)
        self.balancers[pool.name] = balancer
        self._pools[pool.name] = pool
        return balancer

    def resource(self):
        return self.router

    def startService(self) -> None:
        for pool in self.config.pools:
            self._describe(pool.name)
        for route in self.routes:
            self.log.info("{route}", route=route.describe())
        self._warnUnrouted()
        MultiService.startService(self)

    def _describe(self, name: str) -> None:
        balancer = self.balancers[name]
        health = balancer.config.health
        self.log.info(
            "pool {name}: {n} backends by {policy}; health checks: {checks}",
            name=name,
            n=len(balancer.group),
            policy=balancer.config.balance,
            checks=f"GET {health.path} every {health.interval:g}s" if health.enabled else "off",
        )

    def _warnUnrouted(self) -> None:
        routed = {pool for route in self.routes for pool in route.pools}
        for pool in self.config.pools:
            if pool.name not in routed:
                self.log.warn(
                    "pool {name}: no route leads to it, so it takes no requests",
                    name=pool.name,
                )

    def reload(self, new, reason: str) -> Dict[str, List[str]]:
        """
        Bring the pools, the routes and the mirrors to those of C{new}, a
        reload's L{Config} (already checked: every route's pools exist).

        A new pool starts as it would at start; a pool the file no longer
        has leaves the router at once, and its backends are drained and
        removed without cutting a request (then it stops); a pool that
        stays gets its backends and balancing as the default pool's are
        (L{rrbalancer.reload.applyBackends}).  The routes are swapped in
        one step.  A pool's C{[pool.health]}, like the top-level
        C{[health]}, needs a restart: a change to it is reported, not
        applied.

        @return: the C{added}, C{removed} and C{changed} pools and
            backends, and the C{ignored} settings, as the reload reports
            them.
        """
        from .reload import BALANCING
        from .routing import byPrecedence

        result: Dict[str, List[str]] = {"added": [], "removed": [], "changed": [], "ignored": []}
        # The top level as it runs from now on: its balancing settings
        # follow the file, the rest needs a restart.
        running = replace(self.config, **{n: getattr(new, n) for n in BALANCING})
        wanted = {pool.name for pool in new.pools}
        for name in [n for n in self._pools if n not in wanted]:
            self._removePool(name, reason)
            result["removed"].append(f"pool {name}")
        for pool in new.pools:
            if pool.name in self._pools:
                self._updatePool(pool, running, reason, result)
            else:
                self._startPool(pool, running, reason)
                result["added"].append(f"pool {pool.name}")
        if DEFAULT in poolNames(new):
            self.balancers[DEFAULT] = self.default
        else:
            self.balancers.pop(DEFAULT, None)
        # Pools in file order, as at start.
        order = [n for n in (DEFAULT,) + tuple(p.name for p in new.pools) if n in self.balancers]
        self.balancers = {name: self.balancers[name] for name in order}
        routes = byPrecedence(new.routes)
        if routes != self.routes:
            result["changed"].append("routes")
        mirrors = self.mirrors
        mirrors.pickers = {name: b.group for name, b in self.balancers.items()}
        mirrors.maxInFlight = new.mirrorMaxInflight
        mirrors.maxBody = new.mirrorMaxBody
        self.routes = routes
        self.router.update(routes, {name: b.resource() for name, b in self.balancers.items()})
        self.config = replace(
            running,
            pools=tuple(self._pools[p.name] for p in new.pools),
            routes=new.routes,
            mirrorMaxInflight=new.mirrorMaxInflight,
            mirrorMaxBody=new.mirrorMaxBody,
        )
        if "routes" in result["changed"] or result["added"] or result["removed"]:
            for route in routes:
                self.log.info("{route}", route=route.describe())
            self._warnUnrouted()
        return result

    def _startPool(self, pool: PoolConfig, running, reason: str) -> None:
        """
        Start a pool a reload adds.
        """
        balancer = self._addPool(pool, running)
        if balancer.healthChecker is not None:
            # As a backend a reload adds to a pool that stays: no traffic
            # before a check passes, and that at once.
            for backend in balancer.group:
                backend.awaitFirstCheck(reason)
                if self.running:
                    balancer.checkNow(backend)
        self._describe(pool.name)

    def _updatePool(self, pool: PoolConfig, running, reason: str, result) -> None:
        """
        Bring a pool that stays to the file's: its backends and its
        balancing; a change to its checks goes to C{result}'s C{ignored}.
        """
        from .reload import applyBackends

        name = pool.name
        old = self._pools[name]
        if pool.health != old.health:
            result["ignored"].append(f"pool {name} health")
            pool = replace(pool, health=old.health)
        balancer = self.balancers[name]
        added, removed, changed = applyBackends(
            balancer.group, pool.backends, reason, balancer.checkNow,
            label=lambda url: f"pool {name}: {url}",
        )
        result["added"].extend(added)
        result["removed"].extend(removed)
        result["changed"].extend(changed)
        if self._rebalance(balancer, pool.configFor(running)):
            result["changed"].append(f"balancing of pool {name}")
        balancer.config = replace(balancer.config, backends=pool.backends)
        self._pools[name] = pool

    def _removePool(self, name: str, reason: str) -> None:
        """
        Take a pool out of the router and drain its backends; it stops
        once none has a request in flight.
        """
        balancer = self.balancers.pop(name)
        del self._pools[name]
        self.log.info(
            "pool {name} is being removed ({n} requests in flight): {reason}: "
            "no longer in the file",
            name=name,
            n=sum(b.active for b in balancer.group),
            reason=reason,
        )
        group = balancer.group
        drained = [
            group.retire(backend, f"{reason}: its pool {name} is no longer in the file")
            for backend in list(group)
        ]

        def stop(_):
            self.log.info("pool {name} removed", name=name)
            return balancer.disownServiceParent()

        DeferredList(drained).addCallback(stop)

    @staticmethod
    def _rebalance(balancer, config) -> bool:
        """
        Give a pool's group the balancing settings of C{config}, if they
        changed.
        """
        from .backends import Ejection
        from .policies import policyFor
        from .reload import BALANCING

        if all(getattr(config, n) == getattr(balancer.config, n) for n in BALANCING):
            return False
        balancer.group.rebalance(
            policyFor(config, balancer.reactor),
            Ejection.fromConfig(config),
            config.slowStart,
            config.panicThreshold,
        )
        balancer.config = replace(balancer.config, **{n: getattr(config, n) for n in BALANCING})
        return True

    def status(self) -> Dict[str, List[Dict[str, Any]]]:
        """
        The pools with their backends' counts, and the routes in the order
        they are tried: what C{GET /api/status} shows.
        """
        pools = []
        for name, balancer in self.balancers.items():
            group = balancer.group
            backends = list(group)
            queue = group.requestQueue
            pools.append(
                {
                    "name": name,
                    "balance": group.policy.name,
                    "backends": len(backends),
                    "up": sum(1 for b in backends if b.state == UP),
                    "available": sum(1 for b in backends if b.available),
                    "retries": group.retries,
                    "panic": group.panicking,
                    "queued": len(queue) if queue is not None else 0,
                }
            )
        return {
            "pools": pools,
            "routes": [route.json() for route in self.routes],
            "mirrors": self.mirrors.json(),
        }
