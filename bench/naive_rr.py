"""
The literal naive design, as a yardstick for bench/run.sh: a twisted.web
Resource that hands each request to the next stock
twisted.web.proxy.ReverseProxyResource, in round robin.  Nothing else: no
connection pooling (ReverseProxyResource opens a new HTTP/1.0 connection to
the backend for every request), no health checks, no timeouts.

    python naive_rr.py --port 9114 http://127.0.0.1:9101 http://127.0.0.1:9102 ...
"""

import argparse
import itertools
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site


class RoundRobin(Resource):
    def __init__(self, proxies):
        Resource.__init__(self)
        self._next = itertools.cycle(proxies).__next__

    def getChild(self, path, request):
        # Every request (even "/", whose only path segment is b"") passes
        # here once; the chosen proxy resource takes the rest of the path.
        return self._next().getChild(path, request)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("backends", nargs="+", help="http://HOST:PORT")
    args = parser.parse_args()
    proxies = []
    for url in args.backends:
        parts = urlsplit(url)
        proxies.append(ReverseProxyResource(parts.hostname, parts.port or 80, b""))
    reactor.listenTCP(args.port, Site(RoundRobin(proxies)), interface=args.interface)
    reactor.run()


if __name__ == "__main__":
    main()
