"""
Service wiring: the one function that builds the whole balancer from a
L{Config} and a reactor.  The twistd plugin and C{balancer.tac} are thin
layers over L{makeService}.
"""

import ipaddress
from typing import Callable

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from treq.client import HTTPClient

from .admin import addOperations
from .backends import Backend, BackendGroup
from .client import ConnectionPool, connectorFor
from .config import BackendConfig, Config, ConfigError
from .demo import DemoBackends
from .health import HealthChecker
from .listeners import Listener
from .proxy import BalancerResource, BackendProxyResource
from .site import BalancerSite

# The interface that trustRoot= accepts; Twisted exports no public name for it.
from twisted.internet._sslverify import IOpenSSLTrustRoot


@implementer(IOpenSSLTrustRoot)
class SystemTrustPlus:
    """
    The system's trust store plus the CAs of one PEM bundle (C{--backend-ca}),
    for backends whose certificates come from a private CA.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _addCACertsToContext(self, context) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self.path)


def trustRoot(config: Config):
    if config.backendCA is not None:
        return SystemTrustPlus(config.backendCA)
    return platformTrust()


def backendEndpoint(reactor, backend: BackendConfig, trust, timeout: float):
    """
    How to reach a backend: plain TCP to an address, name resolution for a
    host name, and TLS verified with service-identity for https.
    """
    host, port = backend.host, backend.port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpointType = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
        endpoint = endpointType(reactor, host, port, timeout=timeout)
    if backend.scheme == "https":
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
    return endpoint


def _serverEndpoint(reactor, description: str):
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(f"port: bad endpoint {description!r}: {e}") from None


class _QuietPool(HTTPConnectionPool):
    """
    A pool for health checks that does not log two lines per check.
    """

    class _factory(HTTPConnectionPool._factory):
        noisy = False


class _HealthService(Service):
    def __init__(self, checker: HealthChecker) -> None:
        self.checker = checker

    def startService(self):
        Service.startService(self)
        self.checker.start()

    def stopService(self):
        Service.stopService(self)
        self.checker.stop()


class BalancerService(MultiService):
    """
    The balancer: listeners, health checks and (with C{--demo}) the demo
    backends, stopped gracefully.

    Stopping closes the listening ports first, then waits for the requests
    in flight to finish, for at most C{shutdownGrace} seconds.
    """

    log = Logger()

    def __init__(self, config: Config, reactor, group: BackendGroup, site: BalancerSite) -> None:
        MultiService.__init__(self)
        self.config = config
        self.group = group
        self.site = site
        self._clock = reactor
        self.listeners = []


    def stopService(self):
        # The site stops (closing its access log) with its last port; hold
        # it started until the requests in flight are done, so that they
        # are logged too.
        site = self.site
        holding = site.numPorts > 0
        if holding:
            site.doStart()
        d = MultiService.stopService(self)
        d.addCallback(lambda _: self._drain())
        if holding:
            d.addBoth(lambda result: (site.doStop(), result)[1])
        return d

    def _drain(self):
        site = self.site
        if site.inFlight:
            self.log.info(
                "stopping: waiting up to {grace}s for {n} requests in flight",
                grace=self.config.shutdownGrace,
                n=site.inFlight,
            )
        grace = self.config.shutdownGrace
        deadline = self._clock.seconds() + grace
        d = site.whenIdle()
        d.addTimeout(grace, self._clock)

        def late(failure):
            self.log.warn(
                "stopping: {n} requests still in flight after {grace}s",
                n=site.inFlight,
                grace=self.config.shutdownGrace,
            )

        def closePools(_):
            for backend in self.group:
                backend.pool.closeIdle()

        def closeConnections(_):
            # Finished responses may still sit in buffers: let them out
            # before the reactor stops and drops every connection.
            closed = site.closeConnections()
            remaining = max(deadline - self._clock.seconds(), 0.1)
            return closed.addTimeout(remaining, self._clock).addErrback(lambda _: None)

        d.addErrback(late)
        d.addCallback(closeConnections)
        d.addCallback(closePools)
        return d


def backendPreparer(config: Config, clock, connectFor) -> Callable[[Backend], None]:
    """
    How a backend joins the group: a connection pool sized by C{config},
    and the proxy resource that forwards to it.

    @param connectFor: gives the C{connect} argument of a backend's
        L{ConnectionPool} (tests give connections of their own).
    """

    def prepare(backend: Backend) -> None:
        backend.pool = ConnectionPool(
            connectFor(backend),
            clock,
            maxIdle=config.maxIdlePerBackend,
            idleTimeout=config.poolIdleTimeout,
            maxConnections=config.maxConnections,
            queueSize=config.queueSize,
            queueTimeout=config.queueTimeout,
        )
        backend.resource = BackendProxyResource(backend, config, clock)

    return prepare


def makeService(config: Config, reactor, listeners=None):
    """
    Build the balancer described by C{config}, running on C{reactor}.

    Nothing listens until the service starts.  With more than one worker,
    this process only holds the ports and looks after the workers
    (L{rrbalancer.workers}), each of which builds its own balancer here.

    @param listeners: (description, endpoint) pairs to serve on instead of
        C{config.ports} (a worker's adopted sockets).

    @raise ConfigError: a listening endpoint description is malformed.
    """
    if config.workers > 1:
        from .workers import WorkerPool

        parent = MultiService()
        WorkerPool(config, reactor, config.workers).setServiceParent(parent)
        return parent
    trust = trustRoot(config)

    def connectFor(backend: Backend):
        return connectorFor(
            backendEndpoint(reactor, backend.config, trust, config.connectTimeout)
        )

    prepare = backendPreparer(config, reactor, connectFor)
    group = BackendGroup(config.health, reactor, prepare)
    for backend in config.backends:
        group.add(backend)

    site = BalancerSite(
        BalancerResource(group),
        reactor,
        accessLog=config.accessLog,
        maxBodySize=config.maxBodySize,
        timeout=config.clientTimeout,
        headerTimeout=config.headerTimeout,
        bodyTimeout=config.bodyTimeout,
    )
    service = BalancerService(config, reactor, group, site)
    if config.demo:
        DemoBackends(group, reactor).setServiceParent(service)
    if listeners is None:
        listeners = [(d, _serverEndpoint(reactor, d)) for d in config.ports]
    seen = set()
    for description, endpoint in listeners:
        # Two listeners of one name would be a RuntimeError (a traceback).
        if description in seen:
            raise ConfigError(f"port: {description} is listed twice")
        seen.add(description)
        listener = Listener(description, endpoint, site)
        listener.setServiceParent(service)
        service.listeners.append(listener)
    if config.health.enabled:
        # Checks share each backend's own pool of kept connections.
        checker = HealthChecker(group, None, reactor, config.health)
        _HealthService(checker).setServiceParent(service)
        service.healthChecker = checker
    # The admin API, dashboard and metrics (--admin), and reload on SIGHUP.
    addOperations(service, config, reactor)
    return service
