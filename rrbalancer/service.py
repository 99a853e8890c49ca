"""
The running balancer: the one place that builds it from a L{Config} and a
reactor.  The twistd plugin and C{balancer.tac} are thin layers over
L{makeService}.
"""

from dataclasses import replace
from typing import List, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from ._systemd import ReadyNotifier, notify, reloading
from .admin import AdminAPI, makeAdminSite
from .admin._workers import WorkersAPI, WorkersMetrics
from .balancer import Balancer
from .config import Config, ConfigError
from .demo import DemoBackends
from .listeners import Listener
from .logs import inBrief
from .memory import collectorWatch, heapGuard, settleMemory
from .metrics import Metrics
from .pools import Pools
from .reload import Reloader
from .settings import madeVia, readAdminToken
from .signals import SignalHandlers
from .site import BalancerSite
from .tls import CertificateStore, offerProtocols, tlsEndpoint
from .workers import WorkerPool


def serverEndpoint(
    reactor, description: str, setting: str = "port", tls=None, protocols=None
):
    """
    The server endpoint a description names, or a L{ConfigError} naming the
    setting.

    @param tls: the L{CertificateStore} of C{tls:} ports.
    @param protocols: what an C{ssl:} port offers by ALPN, or None for no
        ALPN (C{tls:} ports offer their store's).
    """
    if description.startswith("tls:"):
        return tlsEndpoint(reactor, description, tls)
    try:
        endpoint = serverFromString(reactor, description)
        if protocols is not None:
            offerProtocols(endpoint, protocols)
    except Exception as e:
        raise ConfigError(f"{setting}: bad endpoint {description!r}: {e}") from None
    return endpoint


class BalancerService(MultiService):
    """
    The balancer and everything around it that a server process needs.

    Stopping closes the listening ports first, then waits for the requests
    in flight to finish and the tunnels to close, for at most
    C{shutdownGrace} seconds, then closes what is left.

    @ivar config: the settings it was built from.
    @ivar balancer: the backends, their health checks and the proxy
        resource (L{Balancer}): the pool named default.
    @ivar pools: the other pools and the router in front of every pool
        (L{Pools}).
    @ivar site: the client-facing site serving the router.
    @ivar listeners: a L{Listener} per C{--port}.
    @ivar reloader: applies the config file again (SIGHUP, the API).
    @ivar signals: SIGHUP reloads and reopens the access log, SIGUSR1
        reopens it (logrotate).
    @ivar metrics: the Prometheus metrics the admin listener serves.
    @ivar adminAPI: what the admin endpoints do, or None without an admin
        listener.
    @ivar adminListener: the admin listener, or None.
    @ivar demo: the demo backends (C{--demo}), or None.
    @ivar tls: the certificates of C{tls:} ports (C{--tls-cert}), or None.
    @ivar heapGuard: the L{HeapGuard} that keeps PyPy's heap bounded, or
        None (on CPython).
    @ivar collectorWatch: the L{CollectorWatch} that keeps CPython's full
        collections short, or None (on PyPy).
    """

    log = Logger()

    # A start lists each backend when there are at most this many, and
    # otherwise says them in brief: ten thousand lines on every start were
    # a fifth of the start's time, and the listing (GET /api/backends) says
    # them all.
    LISTED_AT_START = 20

    adminAPI: Optional[AdminAPI] = None
    adminListener: Optional[Listener] = None
    demo: Optional[DemoBackends] = None
    tls: Optional[CertificateStore] = None

    def __init__(self, config: Config, reactor, listeners=None) -> None:
        """
        @param listeners: (description, endpoint) pairs to serve on instead of
            C{config.ports} (a worker's adopted sockets).

        @raise ConfigError: an endpoint description is malformed, or the
            token file cannot be read.
        """
        MultiService.__init__(self)
        self.config = config
        self._clock = reactor
        self.balancer = Balancer(reactor=reactor, config=config)
        self.balancer.setServiceParent(self)
        self.pools = Pools(config, reactor, self.balancer)
        self.pools.setServiceParent(self)
        self.site = BalancerSite(
            self.pools.resource(),
            reactor,
            accessLog=config.accessLog,
            accessLogFormat=config.accessLogFormat,
            maxBodySize=config.maxBodySize,
            timeout=config.clientTimeout,
            headerTimeout=config.headerTimeout,
            bodyTimeout=config.bodyTimeout,
            maxInFlight=config.maxInFlight,
            http2=config.http2,
            maxConcurrentStreams=config.maxConcurrentStreams,
        )
        # Handlers first: once a listener says where it listens, a signal
        # must find them installed.
        self.signals = SignalHandlers(
            reactor, {"SIGHUP": self.hangup, "SIGUSR1": self.site.reopenAccessLog}
        )
        self.signals.setServiceParent(self)
        if config.demo:
            self.demo = DemoBackends(self.group, reactor)
            self.demo.setServiceParent(self)
        self.reloader = Reloader(config, self.group, onAdded=self.checkNow, pools=self.pools)
        self.metrics = Metrics(
            self.group,
            self.site,
            reactor,
            config.metricsPerBackend,
            self.healthChecker,
            self.discovery,
            self.balancer.limits,
            pools=self.pools,
        )
        if config.admin is not None:
            # Before the client ports: an admin port in use stops the start
            # before any client connection can be accepted.
            self._addAdmin(config, reactor)
        if config.tlsCert is not None:
            self.tls = CertificateStore(
                config.tlsCert, config.tlsMinVersion, self.site.acceptableProtocols()
            )
        if listeners is None:
            protocols = self.site.acceptableProtocols()
            listeners = [
                (d, serverEndpoint(reactor, d, tls=self.tls, protocols=protocols))
                for d in config.ports
            ]
        self.listeners: List[Listener] = []
        for description, endpoint in listeners:
            listener = Listener(description, endpoint, self.site)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        ReadyNotifier(reactor).setServiceParent(self)
        # Last, so that what it measures at start is the balancer built.
        self.heapGuard = heapGuard(reactor)
        if self.heapGuard is not None:
            self.heapGuard.setServiceParent(self)
        self.collectorWatch = collectorWatch(reactor)
        if self.collectorWatch is not None:
            self.collectorWatch.setServiceParent(self)

    def _addAdmin(self, config: Config, reactor) -> None:
        token = readAdminToken(config.adminTokenFile) if config.adminTokenFile else None
        endpoint = serverEndpoint(reactor, config.admin, "admin")
        self.adminAPI = AdminAPI(
            self.group, reactor, self.reloader, self, self.healthChecker, self.discovery
        )
        site = makeAdminSite(self.adminAPI, self.metrics, reactor, token)
        self.adminListener = Listener(config.admin, endpoint, site, "admin")
        self.adminListener.setServiceParent(self)

    @property
    def group(self):
        return self.balancer.group

    @property
    def healthChecker(self):
        return self.balancer.healthChecker

    def checkNow(self, backend) -> None:
        """
        Check a backend at once rather than at the next interval (a backend
        added at run time then takes traffic as soon as it can).
        """
        self.balancer.checkNow(backend)

    @property
    def discovery(self):
        return self.balancer.discovery

    def startService(self) -> None:
        health = self.config.health
        if health.enabled:
            checks = (
                f"GET {health.path} every {health.interval:g}s, timeout "
                f"{health.timeout:g}s, rise {health.rise}, fall {health.fall}"
            )
        else:
            checks = "off"
        self.log.info(
            "balancing over {n} backends by {policy}; health checks: {checks}",
            n=len(self.group),
            policy=self.config.balance,
            checks=checks,
        )
        backends = list(self.group)
        if len(backends) <= self.LISTED_AT_START:
            for backend in backends:
                self.log.info(
                    "backend {url} weight {weight}{backup}",
                    url=backend.url,
                    weight=backend.weight,
                    backup=" (backup)" if backend.backup else "",
                )
        else:
            self.log.info(
                "backends: {backends} ({backups} of them backup)",
                backends=inBrief([backend.url for backend in backends]),
                backups=sum(1 for backend in backends if backend.backup),
            )
        for source in self.config.discover:
            self.log.info("backends found by discovery: {url}", url=source.url)
        MultiService.startService(self)
        self._clock.callWhenRunning(settleMemory)

    def hangup(self) -> None:
        """
        SIGHUP: reopen the access log, and reload the config file if there
        is one.  Nothing here ends the process: logrotate and
        C{systemctl reload} send it to running daemons.
        """
        self.site.reopenAccessLog()
        if self.tls is not None:
            self.tls.reload()
        if not self.reloader.canReload:
            self.log.info(
                "SIGHUP: started without --config, so there is no file to reload; "
                "nothing changed"
            )
            return
        reloading()
        try:
            self.reloader.reload("SIGHUP")
        except ConfigError:
            pass  # logged by the reloader
        finally:
            notify("READY=1")
        # Once the backends it removed have drained (within their timeout).
        self._clock.callLater(self.config.backendTimeout + 1, settleMemory)

    def stopService(self):
        # The site stops (closing its access log) with its last port; hold
        # it started until the requests in flight are done, so that they
        # are logged too.  The balancers (their checks and connection pools)
        # stop last.
        site = self.site
        holding = site.numPorts > 0
        if holding:
            site.doStart()
        Service.stopService(self)
        last = (self.balancer, self.pools)
        d = DeferredList(
            [maybeDeferred(s.stopService) for s in reversed(list(self)) if s not in last]
        )
        d.addCallback(lambda _: self._drain())
        d.addCallback(
            lambda _: DeferredList([maybeDeferred(s.stopService) for s in last])
        )
        d.addCallback(lambda _: None)
        if holding:
            d.addBoth(lambda result: (site.doStop(), result)[1])
        return d

    def _drain(self):
        site = self.site
        grace = self.config.shutdownGrace
        if site.inFlight or site.tunnels:
            self.log.info(
                "stopping: waiting up to {grace}s for {n} requests in flight"
                " and {t} tunnels",
                grace=grace,
                n=site.inFlight,
                t=len(site.tunnels),
            )
        deadline = self._clock.seconds() + grace
        d = site.whenIdle()
        d.addTimeout(grace, self._clock)

        def late(failure):
            self.log.warn(
                "stopping: {n} requests still in flight and {t} tunnels open"
                " after {grace}s",
                n=site.inFlight,
                t=len(site.tunnels),
                grace=grace,
            )

        def closeConnections(_):
            # Finished responses may still sit in buffers: let them out
            # before the reactor stops and drops every connection.
            closed = site.closeConnections()
            remaining = max(deadline - self._clock.seconds(), 0.1)
            return closed.addTimeout(remaining, self._clock).addErrback(lambda _: None)

        d.addErrback(late)
        d.addCallback(closeConnections)
        return d


def _addWorkersAdmin(parent: MultiService, config: Config, reactor, pool: WorkerPool) -> None:
    """
    The parent's admin listener, over every worker (L{WorkersAPI}).
    """
    token = readAdminToken(config.adminTokenFile) if config.adminTokenFile else None
    endpoint = serverEndpoint(reactor, config.admin, "admin")
    api = WorkersAPI(pool, reactor)
    site = makeAdminSite(api, WorkersMetrics(api), reactor, token)
    api.adminListener = Listener(config.admin, endpoint, site, "admin")
    api.adminListener.setServiceParent(parent)


def makeService(config: Config, reactor, listeners=None):
    """
    Build the balancer described by C{config}, running on C{reactor}.

    Nothing listens until the service starts.  With more than one worker,
    this process only holds the ports and looks after the workers
    (L{rrbalancer.workers}), each of which builds its own balancer here.

    @raise ConfigError: a listening endpoint description is malformed.
    """
    if config.via == "auto":
        # One name for the whole balancer, its workers included, so that a
        # request coming back through any of them is known.
        config = replace(config, via=madeVia())
    if config.workers > 1:
        parent = MultiService()
        pool = WorkerPool(config, reactor, config.workers)
        if config.admin is not None:
            # Before the workers' ports, as with one process.
            _addWorkersAdmin(parent, config, reactor, pool)
        pool.setServiceParent(parent)
        SignalHandlers(
            reactor,
            {"SIGHUP": lambda: pool.signalAll("HUP"), "SIGUSR1": lambda: pool.signalAll("USR1")},
        ).setServiceParent(parent)
        ReadyNotifier(reactor).setServiceParent(parent)
        return parent
    return BalancerService(config, reactor, listeners)
