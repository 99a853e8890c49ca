"""
A Twisted web site of your own with a balancer in it: /api/ is balanced
over two backends, everything else is served here.

    python examples/embed.py http://127.0.0.1:8081 http://127.0.0.1:8082

then GET http://127.0.0.1:8080/api/anything goes to the backends in turn
(as /anything), and http://127.0.0.1:8080/ is this site's own page.
"""

import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from rrbalancer import Balancer


def makeSite(balancer: Balancer) -> Site:
    root = Resource()
    root.putChild(b"", Data(b"served by the site itself\n", "text/plain"))
    root.putChild(b"api", balancer.resource())
    return Site(root)


def main(argv) -> None:
    port = 8080
    if argv and argv[0].startswith("--port="):
        port = int(argv.pop(0).split("=", 1)[1])
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    balancer = Balancer(argv, reactor, health={"interval": 5})
    balancer.startService()
    reactor.addSystemEventTrigger("before", "shutdown", balancer.stopService)
    endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")

    def listening(listeningPort):
        address = listeningPort.getHost()
        print(f"listening on http://{address.host}:{address.port}/", flush=True)

    endpoint.listen(makeSite(balancer)).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
