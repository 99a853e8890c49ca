"""
Shared helpers for the proxy tests.

 - L{Net}: everything one test opens on the network (ports, connections,
   services), closed and waited for after the test, so that the reactor is
   left clean whatever the test did.
 - L{ScriptedBackend}: a raw backend on 127.0.0.1 that parses the requests
   the balancer sends and answers with exactly the bytes a test scripts.
 - L{RawClient}: a client that writes exact bytes to the balancer and reads
   its responses with L{parseResponse}, a strict HTTP/1.1 response parser
   (it refuses any framing a real client could misread).
 - L{startBalancer}: the balancer built by L{rrbalancer.service.makeService},
   listening on 127.0.0.1 port 0.
 - L{MemoryBalancer}: the same balancer on a memory reactor and
   L{StringTransport}s, for what needs time or backpressure under the
   test's control.
"""

import itertools
import os
import random
import socket
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import alsoProvides, implementer
from twisted.python.failure import Failure
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rrbalancer.config import BackendConfig, Config, HealthConfig
from rrbalancer.service import makeService

LITERAL = os.environ.get("RRBALANCER_TEST_LITERAL") == "1"

# The longest any single wait in a test may take before the test fails
# (a hang is a failure, never a stuck run).
WAIT = 5.0


def withTimeout(d: Deferred, seconds: float = WAIT) -> Deferred:
    return d.addTimeout(seconds, reactor)


def restartablePort() -> int:
    """
    A loopback port free for TCP and UDP, for a server the test stops and
    starts again on the same port (etcd, dnsmasq): taken below the range
    the kernel hands out to outgoing connections, so that none of the
    test's own connections takes it while the server is down.
    """
    low = 20000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    high = max(low + 1000, ephemeral) - 1
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(low, high)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, socket.socket(
                socket.AF_INET, socket.SOCK_DGRAM
            ) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free loopback port below the ephemeral range")


# -- tracking what a test opened ----------------------------------------------


class Net:
    """
    The network things of one test.  Its cleanup aborts every connection
    still open (clients first, so that requests in flight end), stops the
    balancer services, and waits until every socket is really closed.
    """

    def __init__(self, testCase) -> None:
        self._clients: List[Protocol] = []
        self._protocols: List[Protocol] = []
        self._ports = []
        self._services = []
        testCase.addCleanup(self._cleanup)

    def track(self, protocol: Protocol, client: bool = False) -> Protocol:
        """
        Note a protocol instance, so that it is closed (and its close
        waited for) after the test.  Works for any protocol, including
        proxies of protocols such as L{twisted.web.http}'s.
        """
        lost = Deferred()
        protocol._netLost = lost
        protocol._netTransport = None
        makeConnection = protocol.makeConnection
        connectionLost = protocol.connectionLost

        def patchedMakeConnection(transport):
            protocol._netTransport = transport
            return makeConnection(transport)

        def patchedConnectionLost(reason):
            try:
                return connectionLost(reason)
            finally:
                if not lost.called:
                    lost.callback(None)

        protocol.makeConnection = patchedMakeConnection
        protocol.connectionLost = patchedConnectionLost
        (self._clients if client else self._protocols).append(protocol)
        return protocol

    def trackFactory(self, factory) -> None:
        """
        Track every protocol C{factory} builds from now on.
        """
        build = factory.buildProtocol

        def buildProtocol(*args):
            protocol = build(*args)
            if protocol is not None:
                self.track(protocol)
            return protocol

        factory.buildProtocol = buildProtocol

    def listen(self, factory) -> int:
        self.trackFactory(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return port.getHost().port

    def addService(self, service) -> None:
        self._services.append(service)

    def refusingPort(self) -> int:
        """
        A loopback port that refuses connections for the rest of the test: a
        socket bound to it but not listening, so no one else can take it.
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        self._ports.append(_ClosingSocket(s))
        return s.getsockname()[1]

    @staticmethod
    def _abort(protocol) -> None:
        transport = protocol._netTransport
        if transport is not None and not protocol._netLost.called:
            transport.abortConnection()

    @staticmethod
    def _losses(protocols) -> Deferred:
        # A protocol that never got a connection has nothing to lose.
        return withTimeout(
            DeferredList(
                [p._netLost for p in protocols if p._netTransport is not None],
                consumeErrors=True,
            )
        )

    @inlineCallbacks
    def _cleanup(self):
        for protocol in self._clients:
            self._abort(protocol)
        yield self._losses(self._clients)
        for service in self._services:
            if service.running:
                yield withTimeout(service.stopService())
        for protocol in self._protocols:
            self._abort(protocol)
        yield self._losses(self._clients + self._protocols)
        for port in self._ports:
            yield port.stopListening()


class _ClosingSocket:
    def __init__(self, s: socket.socket) -> None:
        self._socket = s

    def stopListening(self):
        self._socket.close()
        return succeed(None)


# -- parsing HTTP/1.1 responses strictly -----------------------------------------


class FramingError(AssertionError):
    """
    The bytes are not a response a client could read unambiguously.
    """


class Response:
    def __init__(self, raw, version, code, reason, headers, body, framing):
        self.raw = raw
        self.version = version
        self.code = code
        self.reason = reason
        self.headers = headers
        self.body = body
        self.framing = framing

    def header(self, name: bytes) -> List[bytes]:
        """
        Every value of one header, in order.
        """
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def names(self) -> List[bytes]:
        return [k.lower() for k, v in self.headers]

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.reason!r} {self.headers!r} body={len(self.body)}B>"


_TOKEN = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _dechunk(data: bytes) -> Optional[Tuple[bytes, int]]:
    """
    Strictly decode a chunked body; L{None} while incomplete, else the body
    and the number of bytes consumed.
    """
    body = []
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol == -1:
            return None
        line = data[pos:eol].split(b";", 1)[0]
        if not line or any(c not in b"0123456789abcdefABCDEF" for c in line):
            raise FramingError(f"bad chunk size line {data[pos:eol]!r}")
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section
                eol = data.find(b"\r\n", pos)
                if eol == -1:
                    return None
                line, pos = data[pos:eol], eol + 2
                if not line:
                    return b"".join(body), pos
        if len(data) < pos + size + 2:
            return None
        body.append(data[pos : pos + size])
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise FramingError("chunk not followed by CRLF")
        pos += size + 2


def parseResponse(
    data: bytes, method: bytes = b"GET", closed: bool = False
) -> Optional[Tuple[Response, bytes]]:
    """
    Parse one response from the front of C{data}.

    @param closed: the connection has ended, so a close-delimited body is
        complete and an incomplete response is an error.
    @return: the response and the bytes after it, or L{None} if more bytes
        are needed.
    @raise FramingError: the bytes cannot be read as one valid response.
    """
    end = data.find(b"\r\n\r\n")
    if end == -1:
        if closed:
            raise FramingError(f"connection closed before a response head: {data!r}")
        return None
    lines = data[:end].split(b"\r\n")
    rest = data[end + 4 :]
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise FramingError(f"bad status line {lines[0]!r}")
    if len(parts[1]) != 3 or not parts[1].isdigit():
        raise FramingError(f"bad status code {lines[0]!r}")
    version, code = parts[0], int(parts[1])
    reason = parts[2] if len(parts) == 3 else b""
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN.issuperset(name):
            raise FramingError(f"bad header line {line!r}")
        if any(c in value for c in b"\r\n\x00"):
            raise FramingError(f"bad header value {line!r}")
        headers.append((name, value.strip(b" \t")))
    response = Response(data, version, code, reason, headers, b"", None)
    codings = response.header(b"transfer-encoding")
    lengths = response.header(b"content-length")
    if codings and lengths:
        raise FramingError("both Transfer-Encoding and Content-Length")
    if len(lengths) > 1:
        raise FramingError(f"several Content-Length headers: {lengths!r}")
    if method == b"HEAD" or code in (204, 304) or code < 200:
        if code in (204, 304) and codings:
            raise FramingError(f"{code} with Transfer-Encoding")
        response.framing = "none"
        consumed = end + 4
    elif codings:
        if codings != [b"chunked"]:
            raise FramingError(f"unexpected Transfer-Encoding {codings!r}")
        decoded = _dechunk(rest)
        if decoded is None:
            if closed:
                raise FramingError("connection closed inside a chunked body")
            return None
        response.body, used = decoded
        response.framing = "chunked"
        consumed = end + 4 + used
    elif lengths:
        if not lengths[0].isdigit():
            raise FramingError(f"bad Content-Length {lengths[0]!r}")
        length = int(lengths[0])
        if len(rest) < length:
            if closed:
                raise FramingError(
                    f"connection closed after {len(rest)} of {length} body bytes"
                )
            return None
        response.body = rest[:length]
        response.framing = "length"
        consumed = end + 4 + length
    else:
        if not closed:
            return None
        response.body = rest
        response.framing = "close"
        consumed = len(data)
    response.raw = data[:consumed]
    return response, data[consumed:]


# -- a raw client ------------------------------------------------------------------


class RawClient(Protocol):
    """
    Writes exact bytes; keeps every byte received.

    @ivar data: everything received so far.
    @ivar closed: fires with C{data} when the connection ends.
    """

    lostReason = None

    def __init__(self) -> None:
        self.data = b""
        self._unread = b""
        self.isClosed = False
        self.closed = Deferred()
        self._waiters: List[Tuple[Callable[[], bool], Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._unread += data
        self._check()

    def connectionLost(self, reason) -> None:
        self.isClosed = True
        self.lostReason = reason
        self._check()
        self.closed.callback(self.data)

    def _check(self) -> None:
        # Settle every waiter first, fire them after: a callback may add a
        # new waiter (and check it) at once.
        settled, waiting = [], []
        for test, d in self._waiters:
            try:
                done = test()
            except BaseException:
                settled.append((d, Failure()))
                continue
            if done:
                settled.append((d, self))
            elif self.isClosed:
                error = AssertionError(f"connection closed while waiting; got {self.data!r}")
                settled.append((d, Failure(error)))
            else:
                waiting.append((test, d))
        self._waiters = waiting
        for d, result in settled:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)

    def waitFor(self, test: Callable[[], bool]) -> Deferred:
        d = Deferred()
        self._waiters.append((test, d))
        self._check()
        return withTimeout(d)

    def waitForBytes(self, data: bytes) -> Deferred:
        return self.waitFor(lambda: data in self.data)

    def waitForClose(self) -> Deferred:
        """
        Fires with everything received, once the balancer closed.
        """
        d = Deferred()
        self.closed.addCallback(lambda data: (d.callback(data), data)[1])
        return withTimeout(d)

    def readResponse(self, method: bytes = b"GET") -> Deferred:
        """
        The next complete response (strictly parsed), removed from what is
        unread.
        """
        found = []

        def test():
            parsed = parseResponse(self._unread, method, closed=self.isClosed)
            if parsed is None:
                return False
            found.append(parsed[0])
            self._unread = parsed[1]
            return True

        return self.waitFor(test).addCallback(lambda _: found[0])

    def send(self, data: bytes) -> None:
        self.transport.write(data)


@inlineCallbacks
def rawRequest(port: int, request: bytes):
    """
    Open a connection to 127.0.0.1:C{port} (not tracked: for tests that
    wait for the balancer to close it) and send C{request}; the returned
    L{RawClient}'s C{closed} fires with every byte received.
    """
    client = yield withTimeout(
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT), RawClient())
    )
    client.send(request)
    return client


def splitResponse(data: bytes):
    """
    Status line, headers (lower-cased names, the last of each) and body of
    one response, leniently: for tests that look at a few fields of what
    arrived before a close (L{parseResponse} checks framing strictly).
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def connectClient(net: Net, port: int) -> Deferred:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=WAIT)
    client = net.track(RawClient(), client=True)
    return withTimeout(connectProtocol(endpoint, client))


@inlineCallbacks
def exchange(net: Net, port: int, data: bytes, method: bytes = b"GET"):
    """
    Send C{data} on a new connection and read one response.
    """
    client = yield connectClient(net, port)
    client.send(data)
    response = yield client.readResponse(method)
    return response


def get(path: bytes = b"/", host: bytes = b"balancer.example", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, host, extra)


# -- a scripted raw backend ------------------------------------------------------------


class ReceivedRequest:
    """
    A request as the backend received it.
    """

    def __init__(self, raw: bytes, head: bytes, body: bytes) -> None:
        self.raw = raw
        self.head = head
        self.body = body
        lines = head.split(b"\r\n")
        self.requestLine = lines[0]
        self.method, self.target, self.version = lines[0].split(b" ")
        self.headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.append((name, value.strip(b" \t")))

    def header(self, name: bytes) -> List[bytes]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def names(self) -> List[bytes]:
        return [k.lower() for k, v in self.headers]


class ScriptedConnection(Protocol):
    """
    One connection to a L{ScriptedBackend}.  Requests are framed by
    Content-Length only (the balancer never sends anything else); each whole
    one goes to the backend's handler.
    """

    def __init__(self, backend: "ScriptedBackend") -> None:
        self.backend = backend
        self.buffer = b""
        self.requests: List[ReceivedRequest] = []
        self.isClosed = False
        self.closed = Deferred()

    def connectionMade(self) -> None:
        self.backend.connections.append(self)
        self.backend._changed()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            raw, self.buffer = self.buffer[:total], self.buffer[total:]
            request = ReceivedRequest(raw, head, raw[end + 4 :])
            self.requests.append(request)
            self.backend.requests.append(request)
            self.backend.handler(self, request)
            self.backend._changed()
            if self.isClosed or self.transport.disconnecting:
                return

    def connectionLost(self, reason) -> None:
        self.isClosed = True
        self.lostReason = reason
        self.closed.callback(None)
        self.backend._changed()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()


class ScriptedBackend(Factory):
    """
    A backend that answers each request with C{handler(connection,
    request)}: the handler writes bytes with C{connection.write}, and may
    close or abort the connection, or keep it to answer later.
    """

    noisy = False

    def __init__(self, net: Net, handler) -> None:
        self.handler = handler
        self.connections: List[ScriptedConnection] = []
        self.requests: List[ReceivedRequest] = []
        self._waiters: List[Tuple[Callable[[], bool], Deferred]] = []
        self.port = net.listen(self)
        self.url = f"http://127.0.0.1:{self.port}"

    def buildProtocol(self, addr) -> ScriptedConnection:
        return ScriptedConnection(self)

    def _changed(self) -> None:
        ready, waiting = [], []
        for test, d in self._waiters:
            (ready if test() else waiting).append((test, d))
        self._waiters = waiting
        for test, d in ready:
            d.callback(self)

    def waitFor(self, test: Callable[[], bool]) -> Deferred:
        d = Deferred()
        self._waiters.append((test, d))
        self._changed()
        return withTimeout(d)

    def waitForAllClosed(self) -> Deferred:
        return self.waitFor(lambda: all(c.isClosed for c in self.connections))


def reply(data: bytes):
    """
    A handler that answers every request with C{data}.
    """

    def handler(connection, request):
        connection.write(data)

    return handler


def replyAndClose(data: bytes):
    def handler(connection, request):
        connection.write(data)
        connection.close()

    return handler


def closeWithoutAnswer(connection, request):
    connection.close()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """
    A complete 200 response, kept alive.
    """
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class CountingSite(Site):
    """
    A twisted.web site as backend, counting the connections it accepts.
    """

    noisy = False

    def __init__(self, net: Net, resource) -> None:
        Site.__init__(self, resource)
        self.accepted = 0
        self.port = net.listen(self)
        self.url = f"http://127.0.0.1:{self.port}"

    def buildProtocol(self, addr):
        self.accepted += 1
        return Site.buildProtocol(self, addr)


# -- the balancer ------------------------------------------------------------------------


class Balancer:
    def __init__(self, service, port: int) -> None:
        self.service = service
        self.port = port
        self.group = service.group
        self.site = service.site
        self.backends = list(service.group)


def makeConfig(urls, **settings) -> Config:
    settings.setdefault("health", HealthConfig(enabled=False))
    settings.setdefault("shutdownGrace", 2.0)
    settings.setdefault("admin", None)
    settings.setdefault("ports", ("tcp:0:interface=127.0.0.1",))
    return Config(backends=tuple(BackendConfig(url=url) for url in urls), **settings)


class LiteralBalancer:
    """
    The literal design the project started from, as a yardstick for the
    fault and hardening suites: a resource that hands each request to the
    next stock L{ReverseProxyResource}, and nothing else (no pool, no
    timeouts, no checks).  C{RRBALANCER_TEST_LITERAL=1} runs those suites
    against it, to show which of their cases are defects there.
    """

    backends = ()

    def __init__(self, net: Net, urls) -> None:
        proxies = []
        for url in urls:
            parts = urlsplit(url)
            proxies.append(ReverseProxyResource(parts.hostname, parts.port, b""))
        turn = itertools.cycle(proxies).__next__

        class RoundRobin(Resource):
            def getChild(self, path, request):
                return turn().getChild(path, request)

        self.site = Site(RoundRobin())
        self.port = net.listen(self.site)


class Held(Resource):
    """
    Keeps every request open for the test to answer or finish.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


@inlineCallbacks
def startBalancer(net: Net, urls, **settings):
    """
    The balancer of L{rrbalancer.service.makeService} for C{urls}, started
    and listening on a loopback port chosen by the system; the
    L{LiteralBalancer} instead under C{RRBALANCER_TEST_LITERAL=1}.
    """
    if LITERAL:
        return LiteralBalancer(net, urls)
    service = makeService(makeConfig(urls, **settings), reactor)
    port = yield serve(net, service)
    return Balancer(service, port)


@inlineCallbacks
def serve(net: Net, service):
    """
    Start C{service} (from L{rrbalancer.service.makeService}), its client
    connections and every pool's backend connections tracked by C{net};
    fires with the port its first listener got.
    """
    net.trackFactory(service.site)
    for balancer in service.pools.balancers.values():
        for backend in balancer.group:
            net.trackFactory(backend.pool)
    net.addService(service)
    service.startService()
    # The listener's own Deferred must keep its result (the port it stops
    # with), so wait on a separate one.
    listening = Deferred()

    def gotPort(port):
        listening.callback(port)
        return port

    service.listeners[0]._waitingForPort.addCallback(gotPort)
    port = yield withTimeout(listening)
    return port.getHost().port


@inlineCallbacks
def receivedThrough(net: Net, request: bytes, **settings):
    """
    Send C{request} through a balancer (with C{settings}) to a backend that
    answers 200, and return the request as the backend received it.
    """
    backend = ScriptedBackend(net, reply(ok()))
    balancer = yield startBalancer(net, [backend.url], **settings)
    yield exchange(net, balancer.port, request)
    return backend.requests[0]


# -- in memory -----------------------------------------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _SynchronousResolver:
    """
    Resolves every name to 127.0.0.1 at once, as the memory reactor of
    recent Twisted releases does (older ones resolve in a thread).
    """

    def resolveHostName(
        self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return resolution


class RecordingUnread:
    """
    Stands in for an L{rrbalancer._unread.UnreadAnswers} as a connection
    pool's C{unread}: records what the connections tell it.
    """

    def __init__(self) -> None:
        self.watched: list = []
        self.forgotten: list = []
        self.answered: list = []

    def watch(self, connection) -> None:
        self.watched.append(connection)

    def forget(self, connection) -> None:
        self.forgotten.append(connection)

    def settled(self, connection) -> None:
        self.answered.append(connection)

    def refresh(self) -> None:
        pass

    def waiting(self, pool) -> int:
        return 0

    def close(self) -> None:
        pass


def memoryReactor() -> MemoryReactorClock:
    """
    A L{MemoryReactorClock} whose name resolution is synchronous whatever
    the Twisted release.
    """
    memory = MemoryReactorClock()
    memory.nameResolver = _SynchronousResolver()
    alsoProvides(memory, IReactorPluggableNameResolver)
    return memory


class _BackendReactor(MemoryReactorClock):
    """
    A memory reactor on which a connection to a backend is made at once,
    on a L{StringTransport}, unless its L{MemoryBalancer} refuses or holds
    it.
    """

    def __init__(self, balancer: "MemoryBalancer") -> None:
        MemoryReactorClock.__init__(self)
        self._balancer = balancer

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = MemoryReactorClock.connectTCP(
            self, host, port, factory, timeout, bindAddress
        )
        self._balancer._dialled(host, port, factory, connector)
        return connector


class MemoryBalancer:
    """
    The balancer of L{rrbalancer.service.makeService}, on a memory reactor:
    the test plays both the client and the backends, byte by byte, and
    moves the clock.

    @ivar opened: for each backend id, the (protocol, transport) of every
        backend connection opened.
    @ivar refuse: backend ids whose connections are refused.
    @ivar hold: while true, new connections wait in C{held} (as (Deferred,
        protocol, transport)) until the test fires their Deferred.
    """

    def __init__(self, urls=("http://127.0.0.1:8081",), **settings) -> None:
        self.clock = _BackendReactor(self)
        self.config = makeConfig(urls, **settings)
        self.refuse = set()
        self.hold = False
        self.held = []
        self.service = makeService(self.config, self.clock)
        self.group = self.service.group
        self.site = self.service.site
        self.backends = list(self.group)
        self.opened = {b.id: [] for b in self.backends}

    def _dialled(self, host, port, factory, connector) -> None:
        [backend] = [
            b for b in self.group if (b.config.host, b.config.port) == (host, port)
        ]
        if backend.id in self.refuse:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        self.opened[backend.id].append((protocol, transport))
        if self.hold:
            d = Deferred()
            d.addCallback(lambda _: protocol.makeConnection(transport))
            self.held.append((d, protocol, transport))
            return
        protocol.makeConnection(transport)

    def client(self, host: str = "192.0.2.7"):
        """
        A new client connection: its channel and its transport.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8000),
            peerAddress=IPv4Address("TCP", host, 40000),
        )
        channel.makeConnection(transport)
        return channel, transport

    def backendConnection(self, index: int = 0, n: int = -1):
        """
        The (protocol, transport) of a backend connection.
        """
        return self.opened[self.backends[index].id][n]
