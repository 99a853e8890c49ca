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

from dataclasses import replace
from typing import Any, Dict, List

from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from .backends import UP, Ejection
from .balancer import Balancer
from .mirror import Mirrors
from .policies import policyFor
from .poolconfig import DEFAULT, PoolConfig, poolNames
from .reload import BALANCING, applyBackends
from .routeconfig import byPrecedence
from .routing import Router


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
