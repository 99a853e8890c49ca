"""
Tests for L{rrbalancer.upstream}: where the balancer's connections to a
backend go, and how they are secured.
"""

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase

from rrbalancer import upstream as upstreamModule
from rrbalancer.config import BackendConfig
from rrbalancer.upstream import SystemTrustPlus, backendEndpoint, trustRoot

from .support import memoryReactor


class BackendEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.memory = memoryReactor()
        self.tlsCalls = []
        realOptions = upstreamModule.optionsForClientTLS

        def optionsForClientTLS(hostname, trustRoot=None, **kwargs):
            self.tlsCalls.append((hostname, trustRoot))
            return realOptions(hostname, trustRoot=trustRoot, **kwargs)

        self.patch(upstreamModule, "optionsForClientTLS", optionsForClientTLS)
        self.trust = upstreamModule.platformTrust()

    def endpoint(self, url):
        return backendEndpoint(self.memory, BackendConfig(url=url), self.trust, 4.0)

    def test_ipv4Literal(self):
        endpoint = self.endpoint("http://10.1.2.3:8081")
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port, endpoint._timeout), ("10.1.2.3", 8081, 4.0))
        self.assertEqual(self.tlsCalls, [])

    def test_ipv6Literal(self):
        endpoint = self.endpoint("http://[::1]:8081")
        self.assertIsInstance(endpoint, TCP6ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port, endpoint._timeout), ("::1", 8081, 4.0))

    def test_hostName(self):
        endpoint = self.endpoint("http://backend.example")
        self.assertIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual(
            (endpoint._hostText, endpoint._port, endpoint._timeout), ("backend.example", 80, 4.0)
        )
        self.assertEqual(self.tlsCalls, [])

    def test_httpsHostName(self):
        endpoint = self.endpoint("https://backend.example")
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        inner = endpoint._wrappedEndpoint
        self.assertIsInstance(inner, HostnameEndpoint)
        self.assertEqual((inner._hostText, inner._port), ("backend.example", 443))
        self.assertEqual(self.tlsCalls, [("backend.example", self.trust)])
        # The wrapper makes TLS client connections.
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapped = endpoint._wrapperFactory(Factory())
        self.assertIsInstance(wrapped, TLSMemoryBIOFactory)

    def test_httpsIPLiterals(self):
        endpoint = self.endpoint("https://10.1.2.3:8443")
        self.assertIsInstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint)
        self.assertEqual(endpoint._wrappedEndpoint._port, 8443)
        endpoint = self.endpoint("https://[2001:db8::1]")
        self.assertIsInstance(endpoint._wrappedEndpoint, TCP6ClientEndpoint)
        self.assertEqual(endpoint._wrappedEndpoint._port, 443)
        self.assertEqual(
            self.tlsCalls, [("10.1.2.3", self.trust), ("2001:db8::1", self.trust)]
        )

    def test_trustRoot(self):
        self.assertIsInstance(trustRoot(), type(upstreamModule.platformTrust()))
        root = trustRoot("/etc/rrbalancer/ca.pem")
        self.assertIsInstance(root, SystemTrustPlus)
        self.assertEqual(root.path, "/etc/rrbalancer/ca.pem")

    def test_balancerUsesBackendEndpoints(self):
        """
        A backend's pool connects through its endpoint: TLS named after the
        backend, its port, the connect timeout.
        """
        from rrbalancer.balancer import Balancer

        balancer = Balancer(
            ["https://backend.example:8443"],
            self.memory,
            connect_timeout=3,
            health={"enabled": False},
        )
        [backend] = balancer.group
        backend.pool.connect()
        self.assertEqual(self.tlsCalls[0][0], "backend.example")
        # The name is resolved (synchronously by the memory reactor), then
        # connected to.
        [(host, port, factory, timeout, bind)] = self.memory.tcpClients
        self.assertEqual((port, timeout), (8443, 3.0))
