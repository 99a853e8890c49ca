"""
A worker process of C{--workers N} (see L{rrbalancer.workers}): a whole
balancer on the listening sockets its parent bound and handed down.

Its parent runs L{main} (with the parent's own copy of the package first
on the path); it reads its L{Config} and the sockets' description from
the environment.
"""

import base64
import os
import pickle
import socket
import sys
from dataclasses import replace
from typing import List, Tuple

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.haproxy import proxyEndpoint

from ._channel import CheckSharer, WorkerChannel
from .admin import AdminAPI
from .service import makeService
from .workers import ENVIRONMENT_KEY


class _ParentWatch(Protocol):
    """
    A worker's standard input is a pipe from its parent: when it closes,
    the parent is gone, and so the worker stops instead of lingering.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def connectionLost(self, reason) -> None:
        if self._reactor.running:
            self._reactor.stop()


def listenersFor(reactor, sockets) -> List[Tuple[str, object]]:
    """
    The endpoints of a worker's adopted sockets.
    """
    endpoints = []
    for description, proxied, family, fd in sockets:
        endpoint = AdoptedStreamServerEndpoint(reactor, fd, family)
        if proxied:
            endpoint = proxyEndpoint(endpoint)
        endpoints.append((description, endpoint))
    return endpoints


def connectChannel(reactor, service, fd: int, index: int) -> WorkerChannel:
    """
    Answer the parent over the socket it handed down (L{WorkerChannel}),
    with an admin API of this worker's own that no port serves.

    Worker 1 runs the health checks and shares their results; the others
    only take them (a backend is checked once per interval, not once per
    worker).  Call before the service starts.
    """
    api = AdminAPI(service.group, reactor, service.reloader, service, service.healthChecker)
    channel = WorkerChannel(api, service.metrics)
    factory = Factory.forProtocol(lambda: channel)
    factory.noisy = False
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
    os.close(fd)
    checker = service.healthChecker
    if checker is not None:
        if index == 1:
            checker.observer = CheckSharer(channel, reactor)
        else:
            checker.scheduled = False
    return channel


def main() -> None:  # pragma: no cover - run in worker processes
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, textFileLogObserver

    config, index, sockets, channelFD = pickle.loads(
        base64.b64decode(os.environ.pop(ENVIRONMENT_KEY))
    )
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout, timeFormat="")], redirectStandardIO=False
    )
    service = makeService(
        replace(config, workers=1, admin=None), reactor, listeners=listenersFor(reactor, sockets)
    )
    StandardIO(_ParentWatch(reactor), stdout=os.open(os.devnull, os.O_WRONLY))
    connectChannel(reactor, service, channelFD, index)
    service.privilegedStartService()
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":  # pragma: no cover
    main()
