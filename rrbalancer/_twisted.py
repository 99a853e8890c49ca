"""
The few Twisted names the balancer needs that Twisted does not make public.

Each has no public route to what it gives, and each is used here and only
here, so that a Twisted release that changes one breaks this module (and
C{tests/test_twisted.py}, which checks every name against the installed
Twisted) rather than the balancer, silently, at run time.  Everything else
goes through Twisted's public API.
"""

import socket
import struct
import sys
from errno import EWOULDBLOCK

from twisted.internet import main
from twisted.internet.tcp import Client as _TCP_CLIENT
from twisted.internet.tcp import Server as _TCP_SERVER
from twisted.web import http

# trustRoot= of optionsForClientTLS takes an object providing this; Twisted
# exports platformTrust() and Certificate-based roots, not the interface a
# root of one's own (the system store plus a bundle) must provide.
from twisted.internet._sslverify import IOpenSSLTrustRoot

# HTTP/2: Twisted's server side is public only through its generic channel,
# which a site with a channel class of its own cannot use.  The balancer's
# connection subclasses H2Connection, and overrides (each calling Twisted's
# own first) its handlers of a new stream, and of a stream's data, end and
# reset (_requestReceived, which cannot refuse one; _requestDataReceived,
# _requestEnded, _requestAborted, which look a stream up without asking
# whether Twisted has already forgotten it),
# _requestDone, where a stream is forgotten, and connectionLost, whose
# second argument (_cancelTimeouts) it passes on.
from twisted.web._http2 import H2Connection, H2Stream

__all__ = [
    "H2Connection",
    "H2Stream",
    "IOpenSSLTrustRoot",
    "h2WriteControlData",
    "handlingRequest",
    "leaveFormsUnparsed",
    "readDirect",
    "readIntoOneBuffer",
    "readStamped",
    "headBegun",
    "headSoFar",
    "stopRereadingResolvConf",

    "sslContextFactory",
    "streamConnection",
    "takeBuffered",
    "tcpUnder",
    "waitingForTransport",
    "writeNow",
]


def handlingRequest(channel: http.HTTPChannel) -> bool:
    """
    Has C{channel} a whole request in hand (so that bytes now arriving
    belong to the next one, and are buffered)?
    """
    return channel._handlingRequest


def leaveFormsUnparsed(request: http.Request) -> None:
    """
    Have C{request.requestReceived} leave a POST's body as it is, when it
    is called next.

    It would parse a form body into C{args}: every urlencoded or multipart
    body read whole into memory, and a multipart body it cannot parse
    answered 400, where a proxy passes bodies on for the backend to judge.
    Twisted from 25 on takes C{parsePOSTFormSubmission=False} for this,
    24 does not; every version parses only a body whose length, which it
    reads as the position of C{content}, is not 0 (and rewinds C{content}
    itself before reading it).
    """
    if request.content is not None:
        request.content.seek(0, 0)


def headSoFar(channel: http.HTTPChannel):
    """
    The size in bytes and the number of header lines of the request head
    C{channel} is reading, as it counts them against its own limits.
    """
    return channel._receivedHeaderSize, channel._receivedHeaderCount


def headBegun(channel: http.HTTPChannel) -> bool:
    """
    Has C{channel} read part of a request head: a whole line of it, or
    part of one?
    """
    return channel._receivedHeaderSize > 0 or channel._buffer != b""


def takeBuffered(channel: http.HTTPChannel) -> bytes:
    """
    The bytes C{channel} read after the request it is handling and holds
    for the next one (a client that spoke first after an upgrade it asked
    for), taken out of the channel.
    """
    data = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    return data


def stopRereadingResolvConf(resolver) -> None:
    """
    Stop the timer with which a L{twisted.names.client.Resolver} made from
    C{resolv.conf} reads the file again every minute: nothing public stops
    it, and a stopped balancer must leave no timer behind.
    """
    call = getattr(resolver, "_parseCall", None)
    if call is not None and call.active():
        call.cancel()
    resolver.resolv = None


def sslContextFactory(endpoint):
    """
    The context factory an C{ssl:} port's endpoint (L{SSL4ServerEndpoint})
    makes its connections' TLS with.
    """
    return endpoint._sslContextFactory


def streamConnection(stream: H2Stream) -> H2Connection:
    """
    The HTTP/2 connection C{stream} belongs to.
    """
    return stream._conn


def h2WriteControlData(connection: H2Connection) -> bool:
    """
    Send the frames C{connection}'s state machine has queued outside the
    flow of data (a reset, a GOAWAY).

    @return: False when that aborted the connection instead (a client that
        let too many of them pile up without reading).
    """
    return connection._tryToWriteControlData()


def waitingForTransport(channel: http.HTTPChannel) -> bool:
    """
    Has C{channel} paused its producer because its transport's buffer is
    full?  A producer registered now must start paused: the channel will
    not ask again.
    """
    return channel._waitingForTransport


# Plain TCP connections, a client's and an accepted one.
_TCP_TRANSPORTS = (_TCP_CLIENT, _TCP_SERVER)


def writeNow(transport, data: bytes) -> None:
    """
    Write C{data}, sending it at once where that is safe: a plain TCP
    connection with nothing already waiting to be sent.

    (It reads a TCP transport's private buffers, to know that nothing is
    waiting to be sent before it.)

    A transport's C{write} only buffers, and asks the reactor to wait until
    the socket can be written to; the send happens on the reactor's next
    turn.  For a request of a few hundred bytes on an idle connection that
    costs an event and two epoll changes on top of the send itself: a
    quarter of what a health check costs the balancer, and as much again
    as a tunnel's own work on a small WebSocket message.  Anything not sent
    at once (a full socket buffer, an error) goes through C{write}, which
    also reports a lost connection the usual way.

    (The send is the socket's own, not the transport's C{writeSomeData}:
    that wraps it in three calls of Python, for a limit on what one send
    may take that only Windows needs.)
    """
    if (
        type(transport) in _TCP_TRANSPORTS
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        if sent > 0:
            data = data[sent:]
    transport.write(data)


# What every connection given to readIntoOneBuffer reads into: one reactor
# thread, and each read copied out before anything else runs.
_readBuffer = bytearray(_TCP_CLIENT.bufferSize)
_readView = memoryview(_readBuffer)


def readIntoOneBuffer(transport, receive=None) -> bool:
    """
    Have the TCP connection under C{transport} (itself, or the one a TLS
    transport runs over) read into one buffer the process shares, and hand
    its protocol a string of what arrived (to C{receive} directly, given
    one: see L{readDirect}).

    (It replaces the connection's C{doRead}, as Twisted's own does but for
    the call to C{recv}, and calls its private C{_dataReceived}.)

    Twisted reads with C{socket.recv(bufferSize)}, 64 KiB.  PyPy makes
    that 64 KiB string in its nursery whatever arrives, then shrinks it:
    a read of a 100-byte request spends 64 KiB of the nursery, so that a
    balancer with a 1 MB nursery runs a minor collection every few
    requests, each promoting whatever the requests in flight hold to the
    old generation, where it dies and waits for a major collection.  Read
    into a buffer made once, a read spends what arrived.

    @return: whether it could (a TCP connection, possibly under TLS).
    """
    connection = tcpUnder(transport)
    if connection is None:
        return False
    recvInto = connection.socket.recv_into
    dataReceived = _receiver(connection, transport, receive)

    def doRead():
        try:
            received = recvInto(_readBuffer)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return dataReceived(_readView[:received].tobytes())

    connection.doRead = doRead
    return True


def readDirect(transport, receive) -> bool:
    """
    Have the plain TCP connection C{transport} hand what it reads to
    C{receive}, its protocol's own C{dataReceived}, directly.

    (It replaces the connection's C{doRead}, as Twisted's own does but for
    the call it ends with.)

    Twisted's read goes through two more calls before it reaches the
    protocol: the connection's C{_dataReceived}, and the C{dataReceived}
    of the wrapper an endpoint puts around the protocol, which only passes
    the bytes on.  A health check is one read, and those two calls were
    about a hundredth of its instructions.

    @return: whether it could (a plain TCP connection).
    """
    if type(transport) not in _TCP_TRANSPORTS:
        return False
    recv = transport.socket.recv
    size = transport.bufferSize

    def doRead():
        try:
            data = recv(size)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        receive(data)
        return None

    transport.doRead = doRead
    return True


def _receiver(connection, transport, receive):
    """
    What a read of C{connection} hands its bytes to: C{receive}, when it
    is given and the connection is C{transport} itself (under TLS, the
    bytes are the TLS layer's), or else the connection's C{_dataReceived},
    which also reads an empty string as the end.
    """
    if receive is None or connection is not transport:
        return connection._dataReceived

    def dataReceived(data: bytes):
        if not data:
            return main.CONNECTION_DONE
        receive(data)
        return None

    return dataReceived


def tcpUnder(transport):
    """
    The TCP connection C{transport} is, or the one a TLS transport runs
    over; or None.
    """
    if type(transport) in _TCP_TRANSPORTS:
        return transport
    connection = getattr(transport, "transport", None)
    if type(connection) in _TCP_TRANSPORTS:
        return connection
    return None


# Linux's SO_TIMESTAMPNS (the socket module does not name it), the type of
# the control message it brings, a struct timespec.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


def readStamped(transport, arrived, receive=None) -> bool:
    """
    As L{readIntoOneBuffer}, and call C{arrived(seconds)} before each read
    is handed on, with the time (as C{time.time()} counts) at which the
    kernel received the last of its bytes.

    (It sets Linux's C{SO_TIMESTAMPNS} on the socket, and reads with
    C{recvmsg_into}.)

    A busy balancer reads what a backend sent a turn of the loop or more
    after it came: timed when read, every backend looks as slow as the
    balancer is busy, and a backend ten times slower than the others only
    a few times.  Timed by the kernel, an answer's latency is the
    backend's own.

    Linux starts stamping a moment after the first socket asks for it
    (and stops when the last one goes): a read before that comes without
    a stamp, and C{arrived} is not called for it.

    @return: whether it could (Linux, a TCP connection, possibly under
        TLS); if not, the connection reads as it did.
    """
    connection = tcpUnder(transport)
    if connection is None or not sys.platform.startswith("linux") or not _STAMP_SPACE:
        return False
    sock = connection.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    recvmsgInto = sock.recvmsg_into
    dataReceived = _receiver(connection, transport, receive)
    into = [_readBuffer]
    unpack = _TIMESPEC.unpack
    kind = _SO_TIMESTAMPNS
    size = _TIMESPEC.size

    def doRead():
        try:
            received, ancillary, _, _ = recvmsgInto(into, _STAMP_SPACE)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        for _, got, data in ancillary:
            if got == kind and len(data) == size:
                seconds, nanoseconds = unpack(data)
                arrived(seconds + nanoseconds * 1e-9)
        return dataReceived(_readView[:received].tobytes())

    connection.doRead = doRead
    return True
