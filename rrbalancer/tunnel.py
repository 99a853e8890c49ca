"""
Byte tunnels: what a client connection and a backend connection become
once the backend has answered an upgrade with C{101 Switching Protocols}
(RFC 9110 section 7.8).  From then on neither side speaks HTTP to the
balancer; their bytes are carried as they come, both ways.

A L{Tunnel} has two L{TunnelEnd}s.  The protocol that owns each connection
(the client's channel, the backend's L{rrbalancer.client.BackendConnection})
hands its end what it reads and tells it when the connection is lost.  Each
end is also the push producer registered with the I{other} connection:
when a connection cannot write as fast as the other side sends, its
transport pauses the end that feeds it, which stops reading from that
side.  So a slow reader holds back a fast writer, and what the balancer
buffers for a tunnel stays within the transports' own write buffers.

A tunnel closes when either side closes (what that side sent is still
written to the other, which is then closed in turn: an end of stream on
one side is an end of stream on the other), when nothing has passed either
way for C{idleTimeout} seconds, or when L{Tunnel.close} is called (a
stopping balancer).
"""

from typing import Callable, List, Sequence

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._twisted import writeNow

# After asking both sides to close, so long for their buffered bytes to
# drain before the connections are cut.
ABORT_AFTER = 10.0


class TunnelCounts:
    """
    What tunnels carried, counted as it passes: for a backend, or for the
    whole balancer.

    @ivar open: tunnels open now.
    @ivar opened: tunnels opened since start.
    @ivar toBackend: bytes carried from clients to backends.
    @ivar toClient: bytes carried from backends to clients (those that came
        with the C{101} head included).
    """

    __slots__ = ("open", "opened", "toBackend", "toClient")

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.toBackend = 0
        self.toClient = 0


@implementer(IPushProducer)
class TunnelEnd:
    """
    One connection of a tunnel.

    @ivar transport: the connection's transport, once the tunnel started.
    @ivar lost: the connection is gone.
    """

    transport = None
    other: "TunnelEnd"
    lost = False
    paused = False

    def __init__(self, tunnel: "Tunnel", name: str) -> None:
        self.tunnel = tunnel
        self.name = name

    def __repr__(self) -> str:
        return f"<TunnelEnd {self.name}>"

    # -- called by the protocol that owns the connection ----------------------

    def dataReceived(self, data: bytes) -> None:
        self.tunnel._carry(self, data)

    def connectionLost(self, reason=None) -> None:
        self.tunnel._lost(self)

    # -- IPushProducer, registered with the other end's connection -------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            if not self.lost and self.transport is not None:
                self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if not self.lost and self.transport is not None:
                self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The other connection is going away: nothing read here could be
        # delivered any more.
        self.tunnel.close()


class Tunnel:
    """
    A client connection and a backend connection joined into one stream
    each way.

    @param clock: for the idle timeout.
    @param idleTimeout: seconds without a byte either way after which the
        tunnel is closed.
    @param counts: L{TunnelCounts} to keep up to date (a backend's, the
        balancer's).

    @ivar client: the client's L{TunnelEnd}.
    @ivar backend: the backend's L{TunnelEnd}.
    @ivar toBackend: bytes carried to the backend.
    @ivar toClient: bytes carried to the client.
    """

    log = Logger()

    started = False
    closed = False
    _idleCall = None
    _abortCall = None

    def __init__(
        self, clock: IReactorTime, idleTimeout: float, counts: Sequence[TunnelCounts] = ()
    ) -> None:
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.counts = tuple(counts)
        self.client = TunnelEnd(self, "client")
        self.backend = TunnelEnd(self, "backend")
        self.client.other = self.backend
        self.backend.other = self.client
        self.toBackend = 0
        self.toClient = 0
        self._last = clock.seconds()
        self._whenDone: List[Callable[["Tunnel"], None]] = []

    def whenDone(self, callback: Callable[["Tunnel"], None]) -> None:
        """
        Call C{callback} with this tunnel once both its connections are
        gone.
        """
        self._whenDone.append(callback)

    def start(
        self,
        clientTransport,
        backendTransport,
        toClient: bytes = b"",
        toBackend: bytes = b"",
        clientConsumer=None,
        backendConsumer=None,
    ) -> None:
        """
        Join the two connections.

        @param toClient: bytes the backend sent after its C{101} head, read
            with it: they go to the client first.
        @param toBackend: bytes the client sent after its request, read
            before the switch: they go to the backend first.
        @param clientConsumer: what the backend end registers with as the
            producer of the client's writes (the client's channel, which
            owns the transport's producer slot); by default the transport.
        @param backendConsumer: the same for the client end, by default
            the backend's transport.
        """
        self.started = True
        self.client.transport = clientTransport
        self.backend.transport = backendTransport
        for counts in self.counts:
            counts.open += 1
            counts.opened += 1
        if toClient:
            self._carry(self.backend, toClient)
        if toBackend:
            self._carry(self.client, toBackend)
        (backendConsumer or backendTransport).registerProducer(self.client, True)
        (clientConsumer or clientTransport).registerProducer(self.backend, True)
        # Either side may have been paused while it spoke HTTP (a channel
        # holding back a pipelined client): from now on only the other
        # side's writes pause it.
        for end in (self.client, self.backend):
            if not end.paused and not end.lost:
                end.transport.resumeProducing()
        self._idleCall = self.clock.callLater(self.idleTimeout, self._checkIdle)

    @property
    def open(self) -> bool:
        return self.started and not (self.client.lost and self.backend.lost)

    def _carry(self, source: TunnelEnd, data: bytes) -> None:
        target = source.other
        if target.lost or self.closed:
            return
        size = len(data)
        if source is self.client:
            self.toBackend += size
            for counts in self.counts:
                counts.toBackend += size
        else:
            self.toClient += size
            for counts in self.counts:
                counts.toClient += size
        self._last = self.clock.seconds()
        # Sent at once when nothing waits before it: a tunnel mostly carries
        # small messages one at a time, for which the reactor's turn that
        # an ordinary write waits for costs as much as the carrying.
        writeNow(target.transport, data)

    def _lost(self, end: TunnelEnd) -> None:
        if end.lost:
            return
        end.lost = True
        if self.client.lost and self.backend.lost:
            self._done()
        else:
            # The other side is closed in turn, once what it has still to
            # write is written.
            self.close()

    def _checkIdle(self) -> None:
        self._idleCall = None
        idle = self.clock.seconds() - self._last
        if idle >= self.idleTimeout:
            self.log.info(
                "closing a tunnel idle for {seconds:g}s", seconds=self.idleTimeout
            )
            self.close()
        else:
            self._idleCall = self.clock.callLater(self.idleTimeout - idle, self._checkIdle)

    def close(self) -> None:
        """
        Close both connections (once what is buffered for each is written,
        or after L{ABORT_AFTER} seconds at most).
        """
        if self.closed or not self.open:
            return
        self.closed = True
        self._stopIdleTimer()
        for end in (self.client, self.backend):
            if not end.lost and end.transport is not None:
                end.transport.loseConnection()
        if self.open:
            self._abortCall = self.clock.callLater(ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        for end in (self.client, self.backend):
            if not end.lost and end.transport is not None:
                end.transport.abortConnection()

    def _stopIdleTimer(self) -> None:
        if self._idleCall is not None:
            if self._idleCall.active():
                self._idleCall.cancel()
            self._idleCall = None

    def _done(self) -> None:
        self._stopIdleTimer()
        if self._abortCall is not None:
            if self._abortCall.active():
                self._abortCall.cancel()
            self._abortCall = None
        if self.started:
            for counts in self.counts:
                counts.open -= 1
        callbacks, self._whenDone = self._whenDone, []
        for callback in callbacks:
            callback(self)

