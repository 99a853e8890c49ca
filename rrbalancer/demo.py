"""
Demo backends, for C{--demo}: three small servers inside the balancer's own
process, on loopback ports the system picks, so that a new user sees the
rotation at once with nothing else to start.
"""

from twisted.application.service import Service
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from .backends import DEMO
from .config import BackendConfig

DEMO_BACKENDS = 3


class DemoBackendResource(Resource):
    """
    Answers every request with a line naming this backend, so each reload
    shows which one served it.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name
        self.served = 0

    def render(self, request):
        self.served += 1
        body = (
            f"Hello from {self.name} (request {self.served} to this backend)\n"
        ).encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return b"" if request.method == b"HEAD" else body


class DemoBackends(Service):
    """
    Listens on 127.0.0.1 only, and adds each demo backend to the group once
    it listens.
    """

    def __init__(self, group, reactor, count: int = DEMO_BACKENDS) -> None:
        self._group = group
        self._reactor = reactor
        self._count = count
        self.ports = []

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        for n in range(1, self._count + 1):
            site = Site(DemoBackendResource(f"demo backend {n}"), reactor=self._reactor)
            site.noisy = False
            site.log = lambda request: None
            port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
            self.ports.append(port)
            url = f"http://127.0.0.1:{port.getHost().port}"
            self._group.add(BackendConfig(url=url), owner=DEMO)

    def startService(self):
        if not self.ports:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        ports, self.ports = self.ports, []
        # Fires once every port is closed, so a stop waits for them.
        return gatherResults([maybeDeferred(port.stopListening) for port in ports])
