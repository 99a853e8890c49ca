"""
What routing costs a request, in process: the site's root resource (the
L{rrbalancer.routing.Router}) handing a request to a pool's resource that
does nothing, for a number of routes of which only the last one tried
matches (each earlier one has a host and a prefix the request does not
have), the matching one stripping its prefix.

    python bench/routes.py [--routes 0,1,5,20,100] [--number 200000]

The best of five runs, in microseconds per request; no sockets, no timers.
"""

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402

from rrbalancer.routing import Router, byPrecedence, parseRoutes  # noqa: E402


class Pool(Resource):
    isLeaf = True

    def render(self, request):
        return b""


class Request:
    """
    The attributes of a twisted.web request the router reads.
    """

    def __init__(self, uri: bytes, host: bytes) -> None:
        self.uri = uri
        self.method = b"GET"
        self.prepath = []
        self.postpath = []
        self.requestHeaders = Headers({b"host": [host]})


def routes(n: int):
    tables = [
        {"host": f"h{i}.example.com", "path_prefix": f"/p{i}", "pool": "api"}
        for i in range(n - 1)
    ]
    if n:
        tables.append({"path_prefix": "/api", "strip_prefix": True, "pool": "api"})
    return byPrecedence(parseRoutes(tables)) if tables else ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default="0,1,5,20,100")
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    print(f"{sys.implementation.name} {sys.version.split()[0]}")
    for n in (int(r) for r in args.routes.split(",")):
        router = Router(routes(n), {"default": Pool(), "api": Pool()})
        request = Request(b"/api/v1/users/42?full=1", b"www.example.com:8000")

        def one():
            request.prepath = []
            router.render(request)

        best = min(timeit.repeat(one, number=args.number, repeat=5)) / args.number
        print(f"{n:5d} routes: {best * 1e6:6.2f} us a request")


if __name__ == "__main__":
    main()
