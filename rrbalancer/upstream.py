"""
How the balancer reaches a backend: the client endpoint (TCP, name
resolution, TLS verified with service-identity) and the keep-alive
connection pool over it.

The pooled HTTP/1.1 protocol itself is L{rrbalancer.client}; this module
only decides where its connections go and how they are secured.
"""

import ipaddress

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from zope.interface import implementer

from ._twisted import IOpenSSLTrustRoot
from .client import ConnectionPool, connectorFor
from .values import BackendConfig


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


def trustRoot(backendCA=None):
    """
    What https backends' certificates are verified against.

    @param backendCA: a PEM bundle trusted besides the system's store.
    """
    if backendCA is not None:
        return SystemTrustPlus(backendCA)
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


def connectionPool(reactor, backend: BackendConfig, config, trust) -> ConnectionPool:
    """
    The keep-alive pool to one backend, sized and timed by C{config} (a
    L{rrbalancer.config.Config}).
    """
    endpoint = backendEndpoint(reactor, backend, trust, config.connectTimeout)
    return ConnectionPool(
        connectorFor(endpoint),
        reactor,
        maxIdle=config.maxIdlePerBackend,
        idleTimeout=config.poolIdleTimeout,
        maxConnections=config.maxConnections,
        queueSize=config.queueSize,
        queueTimeout=config.queueTimeout,
        maxHeadSize=config.maxResponseHeadSize,
    )
