"""
The balancer as an object: a group of backends, the way to each (its
connection pool and L{BackendProxyResource}), active health checks, and
the resource that serves requests from them.

It is what the twistd plugin runs (see L{rrbalancer.service}, which adds
listeners and operations around it), and what a Twisted program mounts in
a site of its own::

    balancer = Balancer(["http://127.0.0.1:8081", "http://127.0.0.1:8082"])
    balancer.setServiceParent(application)
    root.putChild(b"api", balancer.resource())
"""

import ipaddress
import os
from typing import Any, Iterable, Optional

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from .backends import CONFIG, BackendGroup, Ejection
from .config import Config, ConfigError, buildConfig, loadConfig
from .discovery import buildDiscovery
from .health import HealthChecker
from .policies import policyFor
from .interfaces import IHealthChecker
from .limits import Limits, RateLimiter
from .proxy import BackendProxyResource, BalancerResource
from .values import BackendConfig
from .sticky import StickyCookie
from .upstream import connectionPool, trustRoot


class _HealthService(Service):
    """
    Runs a health checker while the balancer runs.
    """

    def __init__(self, checker: IHealthChecker) -> None:
        self.checker = checker

    def startService(self):
        Service.startService(self)
        self.checker.start()

    def stopService(self):
        Service.stopService(self)
        self.checker.stop()


def _onePool() -> ConfigError:
    # Pools and routes would be checked and then ignored: a Balancer is one
    # pool, and the router belongs to the site.
    return ConfigError(
        "pool, route: a Balancer is one pool; mount one per pool in your "
        "resource tree, or build the service (rrbalancer.service.makeService) "
        "for [[pool]] and [[route]]"
    )


class Balancer(MultiService):
    """
    Backends, their health and the choice among them, behind one resource.

    Starting it starts the health checks; stopping it stops them and closes
    the idle connections to the backends.

    @ivar config: the settings it was built from.
    @ivar group: the backends (L{BackendGroup}), the picker its resource
        asks; add and remove backends there at run time.
    @ivar healthChecker: the active checks (L{IHealthChecker}), or None when
        they are off.
    @ivar limits: the client rate limits (L{rrbalancer.limits.Limits}).
    @ivar discovery: the discovery sources feeding the group
        (L{rrbalancer.discovery.Discovery}), or None without any.
    """

    log = Logger()
    healthChecker: Optional[IHealthChecker] = None
    discovery = None

    def __init__(
        self,
        backends: Iterable[Any] = (),
        reactor=None,
        *,
        config: Optional[Config] = None,
        **settings: Any,
    ) -> None:
        """
        @param backends: URLs (C{"http://127.0.0.1:8081,weight=2"}) or tables
            (C{{"url": ..., "weight": ..., "backup": ...}}).
        @param reactor: by default, the global reactor.
        @param config: a whole L{Config} instead of C{backends} and
            C{settings}.
        @param settings: the config file's keys (C{host_header="backend"},
            C{health={"interval": 5}}), validated as a file's are.

        @raise rrbalancer.settings.ConfigError: a setting is not valid.
        """
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        if config is None:
            if settings.get("pool") or settings.get("route"):
                raise _onePool()
            settings = dict(settings, backend=list(backends))
            settings.setdefault("admin", "none")
            config = buildConfig(settings, baseDir=os.getcwd())
        self.config = config
        self.reactor = reactor
        self._trust = trustRoot(config.backendCA)
        self.group = BackendGroup(
            config.health,
            reactor,
            self._upstream,
            policyFor(config, reactor),
            ejection=Ejection.fromConfig(config),
            slowStart=config.slowStart,
            panicThreshold=config.panicThreshold,
            maxConns=config.maxConns,
            queueSize=config.queueSize,
            queueTimeout=config.queueTimeout,
            tunnelGrace=config.shutdownGrace,
        )
        for backend in config.backends:
            self.group.add(backend, owner=CONFIG)
        if config.health.enabled:
            # Checks share each backend's own pool of kept connections.
            self.healthChecker = HealthChecker(
                self.group, None, reactor, config.health, jitter=config.health.jitter
            )
            _HealthService(self.healthChecker).setServiceParent(self)
        sticky = None
        if config.stickyCookie is not None:
            sticky = StickyCookie(config.stickyCookie, self.group)
        trusted = tuple(ipaddress.ip_network(n) for n in config.trustedProxies)
        self.limits = limits = Limits(
            (RateLimiter(limit, reactor, trusted, str(n))
             for n, limit in enumerate(config.limits)),
            reactor,
        )
        # After the checks: a source's first answer may come at once, and
        # its backends are checked as they come.
        self.discovery = buildDiscovery(config, self.group, reactor, self.checkNow)
        if self.discovery is not None:
            self.discovery.setServiceParent(self)
        self._resource = BalancerResource(
            self.group, config.requestIDHeader, config.via, sticky, limits
        )

    @classmethod
    def fromConfig(cls, path: str, reactor=None, **overrides: Any) -> "Balancer":
        """
        The balancer a TOML file describes (C{overrides} laid over it, as
        flags are).
        """
        config = loadConfig(path, overrides)
        if config.pools or config.routes:
            raise _onePool()
        return cls(reactor=reactor, config=config)

    def _upstream(self, backend: BackendConfig) -> BackendProxyResource:
        pool = connectionPool(self.reactor, backend, self.config, self._trust)
        return BackendProxyResource(
            backend.host,
            backend.port,
            b"",
            self.reactor,
            scheme=backend.scheme,
            config=self.config,
            pool=pool,
        )

    def checkNow(self, backend) -> None:
        """
        Check a backend soon rather than at the next interval (one added
        at run time then takes traffic as soon as it can): at once, or
        paced when many come at once (see L{HealthChecker.checkSoon}).
        """
        if self.healthChecker is not None:
            self.healthChecker.checkSoon(backend)

    def resource(self) -> BalancerResource:
        """
        The resource to serve: mount it at a site's root, or under any path.
        """
        return self._resource

    def closeConnections(self):
        """
        Close every idle connection to the backends (those in use close
        when their exchange ends, since the pools are stopping too).
        """
        for backend in self.group:
            backend.pool.closeIdle()

    def stopService(self):
        self.group.stop()
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self.closeConnections())
        return d

