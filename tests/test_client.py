"""
L{rrbalancer.client}: one exchange on a L{BackendConnection} driven byte by
byte over a L{StringTransport}, with a L{Clock} for its timeout, and the
L{ConnectionPool} that keeps such connections.
"""

import errno
import socket
import random
import signal
from io import BytesIO

from twisted.internet.address import IPv4Address
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import directlyProvides

from rrbalancer import client
from rrbalancer._twisted import _TCP_CLIENT
from rrbalancer.client import (
    BODY_CHUNK_SIZE,
    BackendBusy,
    INLINE_BODY_SIZE,
    MAX_HEAD_SIZE,
    BackendConnection,
    BackendError,
    ConnectError,
    ConnectionPool,
    PacedCloser,
    ProtocolError,
    ResponseTimeout,
    _parseHead,
    connectorFor,
    upgradeAccepted,
    writeNow,
)

from .support import RecordingUnread

HEAD = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
DONE = Failure(ConnectionDone())
RESET = Failure(ConnectionLost())


class Receiver:
    """
    Records what a connection hands on, in order.
    """

    def __init__(self) -> None:
        self.events = []
        self.head = None
        self.body = b""
        self.done = False
        self.error = None

    def responseHead(self, code, reason, headers, contentLength):
        self.events.append("head")
        self.head = (code, reason, headers, contentLength)

    def responseBody(self, data):
        self.events.append("body")
        self.body += data

    def responseDone(self):
        self.events.append("done")
        self.done = True

    def responseFailed(self, error):
        self.events.append("failed")
        self.error = error

    def responseSwitched(self, reason, headers, rest):
        self.events.append("switched")
        self.switched = (reason, headers, rest)


class _Base(unittest.SynchronousTestCase):
    def recordStamping(self):
        """
        The C{arrived} callbacks of the connections set to read with the
        kernel's stamps from now on, in order.
        """
        stamped = []
        original = client.readStamped

        def readStamped(transport, arrived, receive=None):
            stamped.append(arrived)
            return original(transport, arrived, receive)

        self.patch(client, "readStamped", readStamped)
        return stamped

    def setUp(self):
        self.clock = Clock()
        self.opened = []
        self.pool = ConnectionPool(self._connect, self.clock, maxIdle=4, idleTimeout=30)

    def _connect(self, pool):
        protocol = pool.buildProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.opened.append((protocol, transport))
        return succeed(protocol)

    def connection(self):
        connections = []
        self.pool.acquire().addCallback(connections.append)
        return connections[0]

    def exchange(self, response=None, method=b"GET", head=HEAD, timeout=1000.0, connection=None):
        connection = connection or self.connection()
        receiver = Receiver()
        connection.request(head, None, 0, method == b"HEAD", receiver, timeout)
        if response is not None:
            connection.dataReceived(response)
        return connection, receiver


class ResponseTests(_Base):
    def test_contentLength(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(connection.transport.value(), HEAD)
        self.assertEqual(
            receiver.head,
            (200, b"OK", [(b"X-A", b"1"), (b"Content-Length", b"5")], 5),
        )
        self.assertEqual((receiver.body, receiver.events[-1]), (b"hello", "done"))
        self.assertEqual(self.pool.idleCount, 1)
        self.assertFalse(connection.transport.disconnecting)

    def test_responseInHand(self):
        """
        As its head is handed on, a connection says whether the whole
        response is in the bytes at hand (so that its end follows at once).
        """
        for method, response, expected in [
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True),
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", False),
            (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
            (b"GET", b"HTTP/1.0 200 OK\r\n\r\nuntil close", False),
        ]:
            connection, receiver = self.exchange(method=method)
            seen = []
            responseHead = receiver.responseHead

            def head(*args, connection=connection, seen=seen, responseHead=responseHead):
                seen.append(connection.responseInHand)
                responseHead(*args)

            receiver.responseHead = head
            connection.dataReceived(response)
            self.assertEqual(seen, [expected], response)

    def test_byteByByte(self):
        """
        Heads, chunk sizes and bodies split anywhere are read the same.
        """
        response = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n"
        )
        connection, receiver = self.exchange()
        for i in range(len(response)):
            connection.dataReceived(response[i : i + 1])
        self.assertEqual(receiver.head[0], 201)
        self.assertEqual(receiver.body, b"abc0123456789abcdef")
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 1)

    def test_chunkedDecoded(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;x=y\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual(receiver.head[3], None)
        self.assertEqual(receiver.body, b"hello")
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 1)

    def test_chunkedWinsOverContentLength(self):
        """
        Transfer-Encoding overrides Content-Length; but such a response may
        be an attempt at splitting, so its connection is not used again.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n"
        )
        self.assertEqual((receiver.head[3], receiver.body, receiver.done), (None, b"hi", True))
        self.assertEqual(self.pool.idleCount, 0)
        self.assertTrue(connection.transport.disconnecting)

    def test_readUntilClose(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        connection.dataReceived(b" more")
        self.assertFalse(receiver.done)
        connection.connectionLost(DONE)
        self.assertEqual((receiver.body, receiver.done), (b"some more", True))
        self.assertEqual(self.pool.idleCount, 0)

    def test_readUntilCloseReset(self):
        """
        A reset is no end for a close-delimited body: the exchange fails
        after the response started.
        """
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        connection.connectionLost(RESET)
        self.assertFalse(receiver.done)
        self.assertIsInstance(receiver.error, BackendError)
        self.assertTrue(receiver.error.responseStarted)

    def test_readUntilCloseTLS(self):
        """
        Over TLS a close without close_notify is reported like a reset; it
        still ends a close-delimited body (as NGINX takes it).
        """
        connection, receiver = self.exchange()
        directlyProvides(connection.transport, ISSLTransport)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        connection.connectionLost(RESET)
        self.assertEqual((receiver.body, receiver.done), (b"some", True))

    def test_http10NotKept(self):
        connection, receiver = self.exchange(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 0)
        self.assertTrue(connection.transport.disconnecting)

    def test_http10KeepAlive(self):
        connection, receiver = self.exchange(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx"
        )
        self.assertEqual(self.pool.idleCount, 1)

    def test_connectionCloseNotKept(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
        )
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 0)
        self.assertTrue(connection.transport.disconnecting)

    def test_extraBytesNotKept(self):
        """
        Bytes after the end of a response mean the framing is not what it
        seemed: the connection is not used again.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n"
        )
        self.assertEqual(receiver.body, b"x")
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 0)

    def test_headKeepsLength(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD"
        )
        self.assertEqual(receiver.head[3], 1234)
        self.assertEqual(receiver.events, ["head", "done"])
        self.assertEqual(self.pool.idleCount, 1)

    def test_noBodyStatuses(self):
        for status in (b"204 No Content", b"304 Not Modified"):
            connection, receiver = self.exchange(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n"
            )
            self.assertEqual(receiver.events, ["head", "done"])
        self.assertEqual(self.pool.idleCount, 1)
        self.assertEqual(len(self.opened), 1)

    def test_interimResponses(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(receiver.events, ["head", "body", "done"])
        self.assertEqual(receiver.head[:3], (200, b"OK", [(b"Content-Length", b"2")]))

    def test_switchingProtocolsRefused(self):
        connection, receiver = self.exchange(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertEqual(receiver.events, ["failed"])
        self.assertTrue(connection.transport.disconnected)

    def test_reasonKept(self):
        for line, reason in [
            (b"HTTP/1.1 299 Some Reason\r\n", b"Some Reason"),
            (b"HTTP/1.1 299 \r\n", b""),
            (b"HTTP/1.1 299\r\n", b""),
            (b"HTTP/1.1 299 tab\there\r\n", b"tab\there"),
        ]:
            connection, receiver = self.exchange(line + b"Content-Length: 0\r\n\r\n")
            self.assertEqual(receiver.head[:2], (299, reason))


class InvalidResponseTests(_Base):
    """
    Whatever a proxy could not pass on safely fails the exchange before any
    head is handed on, and drops the connection.
    """

    def assertInvalid(self, response):
        connection, receiver = self.exchange(response)
        self.assertEqual(receiver.events, ["failed"], response)
        self.assertIsInstance(receiver.error, BackendError)
        self.assertTrue(receiver.error.gotBytes)
        self.assertFalse(receiver.error.responseStarted)
        self.assertTrue(connection.transport.disconnected)
        self.assertFalse(connection.isOpen)
        self.assertEqual(self.pool.idleCount, 0)

    def test_statusLines(self):
        for line in [
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 abc OK",
            b"HTTP/1.1 099 OK",
            b"HTTP/2 200 OK",
            b"HTTP/1.1",
            b"http/1.1 200 OK",
            b"ICY 200 OK",
            b"HTTP/1.1 200 O\x00K",
            b"HTTP/1.1 200 OK\rX-Injected: 1",
            b"HTTP/1.1 200 OK\nX-Injected: 1",
            b"HTTP/1.1 200 OK\x1b[31m",
        ]:
            self.assertInvalid(line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_headerLines(self):
        for line in [
            b"No Colon",
            b"Bad Name: x",
            b"X-A : x",
            b": empty name",
            b" folded",
            b"X-A: a\x00b",
            b"X-A: a\rb",
            b"X-A: a\nb",
        ]:
            self.assertInvalid(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_contentLengths(self):
        for lengths in [
            [b"5", b"6"],
            [b"5, 6"],
            [b"-1"],
            [b"5a"],
            [b""],
            [b"0x10"],
        ]:
            self.assertInvalid(
                b"HTTP/1.1 200 OK\r\n"
                + b"".join(b"Content-Length: %s\r\n" % v for v in lengths)
                + b"\r\nhello!"
            )

    def test_sameLengthRepeated(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nhi"
        )
        self.assertEqual((receiver.head[3], receiver.body, receiver.done), (2, b"hi", True))

    def test_transferCodings(self):
        """
        A coding other than chunked would reach the client still applied
        once Transfer-Encoding (hop-by-hop) is dropped.
        """
        for codings in [b"gzip, chunked", b"gzip", b"chunked, chunked", b"identity"]:
            self.assertInvalid(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n0\r\n\r\n" % (codings,)
            )

    def test_headTooLarge(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_SIZE
        )
        self.assertEqual(receiver.events, ["failed"])
        self.assertTrue(connection.transport.disconnected)

    def test_invalidChunkAfterHead(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiZZ"
        )
        self.assertEqual(receiver.events, ["head", "body", "failed"])
        self.assertTrue(receiver.error.responseStarted)
        self.assertTrue(connection.transport.disconnected)


class BrokenExchangeTests(_Base):
    def test_closedBeforeAnyByte(self):
        connection, receiver = self.exchange()
        connection.connectionLost(DONE)
        error = receiver.error
        self.assertIsInstance(error, BackendError)
        self.assertEqual(
            (error.requestSent, error.gotBytes, error.responseStarted, error.reused),
            (True, False, False, False),
        )

    def test_closedInsideHead(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nX-A")
        connection.connectionLost(DONE)
        self.assertEqual(receiver.events, ["failed"])
        self.assertTrue(receiver.error.gotBytes)
        self.assertFalse(receiver.error.responseStarted)

    def test_closedInsideBody(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        connection.connectionLost(DONE)
        self.assertEqual(receiver.events, ["head", "body", "failed"])
        self.assertTrue(receiver.error.responseStarted)

    def test_closedInsideChunkedBody(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        connection.connectionLost(DONE)
        self.assertEqual(receiver.events, ["head", "body", "failed"])

    def test_reusedFlag(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        again, receiver = self.exchange(connection=self.connection())
        self.assertIs(again, connection)
        again.connectionLost(DONE)
        self.assertTrue(receiver.error.reused)
        self.assertFalse(receiver.error.gotBytes)

    def test_bytesWhileIdle(self):
        """
        Bytes on an idle connection mean it is confused or closing: it is
        dropped, never handed out again.
        """
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount, 1)
        connection.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(connection.transport.disconnected)
        self.assertIsNot(self.connection(), connection)
        self.assertEqual(len(self.opened), 2)


class ArrivalTests(_Base):
    """
    When a response's first bytes arrived: the kernel's stamp, when the
    connection was given one on the clock's scale; the clock otherwise.
    """

    def setUp(self):
        _Base.setUp(self)
        self.clock.advance(1000)

    def test_clockWithoutStamp(self):
        connection, receiver = self.exchange()
        self.clock.advance(0.25)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
        self.clock.advance(1)
        connection.dataReceived(b"Length: 0\r\n\r\n")
        self.assertEqual(connection.responseArrived, 1000.25)

    def test_stamp(self):
        """
        The first read's stamp, not a later one's.
        """
        connection, receiver = self.exchange()
        self.clock.advance(0.25)
        connection._arrival(1000.125)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
        connection._arrival(1000.2)
        connection.dataReceived(b"Length: 0\r\n\r\n")
        self.assertEqual(connection.responseArrived, 1000.125)
        # The next exchange starts afresh, with a stamp of its own.
        connection, receiver = self.exchange(connection=connection)
        self.clock.advance(1)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(connection.responseArrived, 1001.25)

    def test_stampOffTheClock(self):
        """
        A stamp in the clock's future, or long before its now, is not on
        its scale (a test's clock, a clock set back): the clock is taken.
        """
        for stamp in (1000.5, 900.0):
            connection, receiver = self.exchange()
            connection._arrival(stamp)
            connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(connection.responseArrived, 1000.0)

    def test_stampsOnlyWhenAsked(self):
        """
        A connection reads with the kernel's stamps only when its pool
        asks it to, when it is made.
        """
        stamped = self.recordStamping()
        self.connection()
        self.assertEqual(stamped, [])
        self.pool.stampArrivals = True
        self.pool.connect()
        [arrived] = stamped
        self.assertEqual(arrived, self.opened[-1][0]._arrival)


class UnreadTests(_Base):
    """
    What a connection tells the pool's watch of answers waiting unread,
    and which of its exchanges that watch counts.
    """

    def test_awaitingAnswer(self):
        """
        Only an exchange in the load awaits its answer, and only until its
        first bytes are read.
        """
        connection = self.connection()
        self.assertFalse(connection.awaitingAnswer)
        connection.request(HEAD, None, 0, False, Receiver(), 1000.0)
        self.assertFalse(connection.awaitingAnswer)
        connection.request(HEAD, None, 0, False, Receiver(), 1000.0, inLoad=True)
        self.assertTrue(connection.awaitingAnswer)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertFalse(connection.awaitingAnswer)
        connection.dataReceived(b"Content-Length: 0\r\n\r\n")
        self.assertFalse(connection.awaitingAnswer)

    def test_watchedWhenAsked(self):
        """
        Connections opened while the pool has a watch join it, and leave
        the watch they joined as they close, even after the pool has
        changed its own.
        """
        before = self.connection()
        watch = self.pool.unread = RecordingUnread()
        self.pool.connect()
        watched = self.opened[-1][0]
        self.assertEqual(watch.watched, [watched])
        self.pool.unread = None
        watched.connectionLost(Failure(ConnectionDone()))
        before.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(watch.forgotten, [watched])

    def test_openConnectionsReadAsAsked(self):
        """
        Asked to, the connections open read as the pool asks now: a reload
        to a policy that times answers reaches the connections it keeps,
        and one away from it takes them out of the watch.
        """
        stamped = self.recordStamping()
        connection = self.connection()
        self.assertEqual(stamped, [])
        watch = self.pool.unread = RecordingUnread()
        self.pool.stampArrivals = True
        self.pool.readAsAsked()
        self.assertEqual((stamped, watch.watched), ([connection._arrival], [connection]))
        self.pool.readAsAsked()
        self.assertEqual(watch.watched, [connection])
        self.pool.unread = None
        self.pool.readAsAsked()
        self.assertEqual(watch.forgotten, [connection])

    def test_settled(self):
        """
        The watch hears that an answer no longer waits when its first
        bytes are read, and when the exchange is given up.
        """
        watch = self.pool.unread = RecordingUnread()
        read, _ = self.exchange()
        read.dataReceived(b"HTTP/1.1 200 OK\r\n")
        read.dataReceived(b"Content-Length: 0\r\n\r\n")
        self.assertEqual(watch.answered, [read])
        self.pool.connect()
        given, _ = self.exchange(connection=self.opened[-1][0])
        given.abort()
        self.assertEqual(watch.answered, [read, given])


class TimeoutTests(_Base):
    def test_noAnswer(self):
        connection, receiver = self.exchange(timeout=3)
        self.clock.advance(2.9)
        self.assertEqual(receiver.events, [])
        self.clock.advance(0.1)
        self.assertIsInstance(receiver.error, ResponseTimeout)
        self.assertFalse(receiver.error.gotBytes)
        self.assertTrue(connection.transport.disconnected)
        # The loss that follows the abort reports nothing more.
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(receiver.events, ["failed"])

    def test_silenceInsideBody(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", timeout=3
        )
        self.clock.advance(2)
        connection.dataReceived(b"def")
        self.clock.advance(2)
        self.assertEqual(receiver.events, ["head", "body", "body"])
        self.clock.advance(1)
        self.assertIsInstance(receiver.error, ResponseTimeout)
        self.assertTrue(receiver.error.responseStarted)

    def test_harmlessWhenDone(self):
        """
        The timer of a finished exchange, left running on its kept
        connection, neither fails that exchange nor closes the connection,
        and the next exchange gets a whole timeout of its own.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", timeout=3
        )
        self.clock.advance(2)
        again, second = self.exchange(connection=self.connection(), timeout=3)
        self.assertIs(again, connection)
        self.clock.advance(2.9)
        self.assertEqual(second.events, [])
        again.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(5)
        self.assertEqual(receiver.events, ["head", "done"])
        self.assertEqual(second.events, ["head", "done"])
        self.assertEqual(self.pool.idleCount, 1)
        self.assertFalse(connection.transport.disconnecting)

    def test_keptTimerMovedLaterNotSooner(self):
        """
        The next exchange on a kept connection moves the timer left running
        when its timeout ends later, and replaces it when sooner (a reactor
        searches its whole heap of timers to move one sooner); either way
        the new timeout holds.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", timeout=30
        )
        first = connection._timeoutCall
        self.exchange(connection=self.connection(), timeout=1)
        self.assertIsNot(connection._timeoutCall, first)
        self.assertTrue(first.cancelled)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        second = connection._timeoutCall
        again, receiver = self.exchange(connection=self.connection(), timeout=20)
        self.assertIs(again._timeoutCall, second)
        self.clock.advance(19.9)
        self.assertEqual(receiver.events, [])
        self.clock.advance(0.1)
        self.assertIsInstance(receiver.error, ResponseTimeout)

    def test_noTimer(self):
        """
        Without a timeout, an exchange starts no timer: the caller keeps its
        own deadline and aborts.  One left running by an earlier exchange
        is neither cancelled (a cancelled timer for each health check would
        linger in the reactor's heap) nor heeded when it fires, and the
        next timed exchange takes it up again.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", timeout=30
        )
        left = connection._timeoutCall
        again, check = self.exchange(connection=self.connection(), timeout=None)
        self.assertTrue(left.active())
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.func == again._timedOut], [left]
        )
        again.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.clock.advance(100)
        self.assertFalse(left.active())
        self.assertEqual(check.events, ["head", "body"])
        self.assertFalse(again.transport.disconnecting)
        again.abort()
        self.assertTrue(again.transport.disconnecting)
        self.assertEqual(check.events, ["head", "body"])

    def test_untimedThenTimed(self):
        """
        A timed exchange after an untimed one on a kept connection, the
        timer left running meanwhile, still times out when it should.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", timeout=30
        )
        self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            connection=self.connection(), timeout=None,
        )
        self.clock.advance(10)
        again, receiver = self.exchange(connection=self.connection(), timeout=5)
        self.assertIs(again, connection)
        self.clock.advance(4.9)
        self.assertEqual(receiver.events, [])
        self.clock.advance(0.1)
        self.assertIsInstance(receiver.error, ResponseTimeout)

    def test_cancelledWhenClosed(self):
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", timeout=3
        )
        connection.connectionLost(DONE)
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.func == connection._timedOut], []
        )


class BodyTests(_Base):
    def test_smallBodyInline(self):
        connection = self.connection()
        body = b"x" * INLINE_BODY_SIZE
        connection.request(HEAD, BytesIO(body), len(body), False, Receiver(), 10)
        self.assertEqual(connection.transport.value(), HEAD + body)
        self.assertIsNone(connection.transport.producer)

    def test_largeBodyPulled(self):
        """
        A large body is written as the transport asks for it, then the
        producer goes away.
        """
        connection = self.connection()
        transport = connection.transport
        body = bytes(range(256)) * (INLINE_BODY_SIZE // 256 * 3) + b"tail"
        receiver = Receiver()
        connection.request(HEAD, BytesIO(body), len(body), False, receiver, 10)
        self.assertEqual(transport.value(), HEAD)
        self.assertFalse(transport.streaming)
        pulls = 0
        while transport.producer is not None:
            transport.producer.resumeProducing()
            pulls += 1
        self.assertEqual(pulls, -(-len(body) // BODY_CHUNK_SIZE))
        self.assertTrue(transport.value() == HEAD + body)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount, 1)

    def test_answeredBeforeBodySent(self):
        """
        A response that comes before the whole body was sent leaves the
        connection unusable for another exchange.
        """
        connection = self.connection()
        body = b"x" * (INLINE_BODY_SIZE + 1)
        receiver = Receiver()
        connection.request(HEAD, BytesIO(body), len(body), False, receiver, 10)
        connection.dataReceived(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 0)


class ProducerTests(_Base):
    def test_pauseResume(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        connection.pauseProducing()
        self.assertEqual(connection.transport.producerState, "paused")
        connection.resumeProducing()
        self.assertEqual(connection.transport.producerState, "producing")

    def test_stalledClientTimesOut(self):
        """
        While paused, the backend cannot be late, but the client can: the
        timeout restarts at the pause and, if the client never reads again,
        ends the exchange naming the client.
        """
        connection, receiver = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", timeout=10
        )
        self.clock.advance(9)
        connection.pauseProducing()
        self.clock.advance(9)
        self.assertFalse(connection.transport.disconnected)
        connection.resumeProducing()
        self.clock.advance(9)
        connection.pauseProducing()
        self.clock.advance(10)
        self.assertTrue(connection.transport.disconnected)
        self.assertIn("client stopped reading", str(receiver.error))

    def test_releasedResumed(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        connection.pauseProducing()
        connection.dataReceived(b"cd")
        self.assertTrue(receiver.done)
        self.assertEqual(self.pool.idleCount, 1)
        self.assertEqual(connection.transport.producerState, "producing")

    def test_stopAborts(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        connection.stopProducing()
        self.assertTrue(connection.transport.disconnected)
        connection.connectionLost(Failure(ConnectionLost()))
        # The receiver that gave up hears nothing more.
        self.assertEqual(receiver.events, ["head", "body"])
        self.assertEqual(self.pool.idleCount, 0)


class PoolTests(_Base):
    def test_reuseMostRecentFirst(self):
        first, r = self.exchange()
        second, r = self.exchange()
        self.assertIsNot(first, second)
        second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount, 2)
        again = self.connection()
        self.assertIs(again, first)
        self.assertTrue(again.reused)
        self.assertEqual(self.pool.opened, 2)

    def test_lostWhileIdle(self):
        connection, receiver = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.connectionLost(DONE)
        self.assertEqual(self.pool.idleCount, 0)
        fresh = self.connection()
        self.assertIsNot(fresh, connection)
        self.assertFalse(fresh.reused)

    def test_maxIdle(self):
        self.pool.maxIdle = 1
        a, r = self.exchange()
        b, r = self.exchange()
        a.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        b.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount, 1)
        self.assertTrue(b.transport.disconnected)

    def test_idleTimeout(self):
        a, r = self.exchange()
        b, r = self.exchange()
        a.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(20)
        b.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(10)
        self.assertTrue(a.transport.disconnected)
        self.assertFalse(b.transport.disconnecting)
        self.assertEqual(self.pool.idleCount, 1)
        self.clock.advance(20)
        self.assertTrue(b.transport.disconnected)
        self.assertEqual(self.pool.idleCount, 0)

    def test_closeIdle(self):
        a, r = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.pool.closeIdle()
        self.assertTrue(a.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retireClosesWhatComesBack(self):
        """
        A retired pool (its backend left the group) keeps nothing: not
        what it had, nor a connection an exchange still running gives back.
        """
        busy, r = self.exchange()
        self.pool.retire()
        busy.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(busy.transport.disconnected)
        self.assertEqual(self.pool.idleCount, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retireByCloser(self):
        """
        A retired pool hands what it kept to the closer it is given, and
        keeps nothing.
        """
        a, r = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        handed = []
        self.pool.retire(handed.extend)
        self.assertEqual((handed, self.pool.idleCount), ([a], 0))
        self.assertFalse(a.transport.disconnecting)
        a.abort()
        # No sweep left for what the pool no longer keeps.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connectFailure(self):
        pool = ConnectionPool(lambda pool: fail(ConnectionRefusedError()), self.clock)
        error = self.failureResultOf(pool.acquire(), ConnectError).value
        self.assertFalse(error.requestSent)


class _Closable:
    def __init__(self, closed):
        self._closed = closed

    def abort(self):
        self._closed.append(self)


class _Turns(Clock):
    """
    A clock whose C{advance} is one turn of a loop: the calls due as it
    starts run, and what they ask for with C{callLater(0, ...)} waits for
    the next turn.  (L{Clock.advance} would run it in the same.)
    """

    def advance(self, amount):
        self.rightNow += amount
        for call in [c for c in self.calls if c.getTime() <= self.seconds()]:
            if call in self.calls:  # not cancelled by one run before it
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class PacedCloserTests(unittest.SynchronousTestCase):
    """
    Connections closed a batch per turn of the loop, in order.
    """

    def setUp(self):
        self.clock = _Turns()
        self.closed = []
        self.closer = PacedCloser(self.clock, perTurn=3)

    def connections(self, n):
        return [_Closable(self.closed) for _ in range(n)]

    def test_fewCloseAtOnce(self):
        """
        As many as a turn's batch close at once: one backend's removal is
        not delayed.
        """
        a = self.connections(3)
        self.closer.close(a)
        self.assertEqual(self.closed, a)
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_manyCloseInTurns(self):
        """
        Asked for in one turn, a thousand close a batch at a time, over the
        turns that follow, whether asked for in one call or in many.
        """
        a = self.connections(4)
        b = self.connections(4)
        self.closer.close(a)
        for connection in b:
            self.closer.close([connection])
        self.assertEqual((self.closed, len(self.closer)), (a[:3], 5))
        self.clock.advance(0)
        self.assertEqual(self.closed, a + b[:2])
        self.clock.advance(0)
        self.assertEqual(self.closed, a + b)
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # A turn of its own again: a fresh batch closes at once.
        c = self.connections(3)
        self.closer.close(c)
        self.assertEqual(self.closed, a + b + c)

    def test_closeAll(self):
        """
        Stopping closes what waits, now, and leaves no timer.
        """
        a = self.connections(7)
        self.closer.close(a)
        self.closer.closeAll()
        self.assertEqual((self.closed, len(self.closer)), (a, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectorTests(unittest.SynchronousTestCase):
    """
    L{connectorFor} through a real endpoint, on a memory reactor.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 8081)
        self.pool = ConnectionPool(connectorFor(endpoint), self.reactor)

    def test_connected(self):
        d = self.pool.acquire()
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 8081))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        connection = self.successResultOf(d)
        self.assertIsInstance(connection, BackendConnection)
        self.assertTrue(connection.isOpen)
        self.assertIs(connection.pool, self.pool)

    def test_refused(self):
        d = self.pool.acquire()
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        error = self.failureResultOf(d, ConnectError).value
        self.assertFalse(error.requestSent)
        self.assertEqual(self.pool.opened, 1)


class LimitTests(_Base):
    """
    C{maxConnections}: a bounded number of connections, and a short queue
    for the exchanges that find them all busy.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def setUp(self):
        _Base.setUp(self)
        self.pool.maxConnections = 2
        self.pool.queueSize = 1
        self.pool.queueTimeout = 3

    def test_queueThenBusy(self):
        """
        At the limit, one exchange waits; the next one is refused at once,
        with nothing opened.
        """
        self.exchange()
        self.exchange()
        waiting = self.pool.acquire()
        self.assertNoResult(waiting)
        self.assertEqual(self.pool.waitingCount, 1)
        self.failureResultOf(self.pool.acquire(), BackendBusy)
        self.assertEqual(len(self.opened), 2)

    def test_releasedConnectionGoesToTheQueue(self):
        first, _ = self.exchange()
        self.exchange()
        waiting = self.pool.acquire()
        first.dataReceived(self.OK)
        self.assertIs(self.successResultOf(waiting), first)
        self.assertTrue(first.reused)
        self.assertEqual(self.pool.idleCount, 0)
        self.assertEqual(len(self.opened), 2)

    def test_closedConnectionMakesRoom(self):
        first, _ = self.exchange()
        self.exchange()
        waiting = self.pool.acquire()
        first.connectionLost(RESET)
        connection = self.successResultOf(waiting)
        self.assertIsNot(connection, first)
        self.assertEqual(len(self.opened), 3)
        self.assertEqual(self.pool.openCount, 2)

    def test_waitTooLong(self):
        self.exchange()
        self.exchange()
        waiting = self.pool.acquire()
        self.clock.advance(2.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        self.failureResultOf(waiting, BackendBusy)
        self.assertEqual(self.pool.waitingCount, 0)

    def test_stopWaiting(self):
        """
        An exchange whose client left takes its place out of the queue.
        """
        self.exchange()
        self.exchange()
        timers = len(self.clock.getDelayedCalls())
        waiting = self.pool.acquire()
        self.pool.stopWaiting(waiting)
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.pool.waitingCount, 0)
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)

    def test_noLimit(self):
        self.pool.maxConnections = 0
        for _ in range(5):
            self.exchange()
        self.assertEqual(len(self.opened), 5)


class UpgradeTests(_Base):
    """
    A request that offers an upgrade: a 101 leaves HTTP, any other answer
    is an ordinary response on a connection that is then closed.
    """

    SWITCH = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )

    def upgrade(self, response=None, offer=b"websocket", connection=None):
        connection = connection or self.connection()
        receiver = Receiver()
        connection.request(HEAD, None, 0, False, receiver, 10.0, offer)
        if response is not None:
            connection.dataReceived(response)
        return connection, receiver

    def test_switch(self):
        """
        The 101's head and the bytes read with it go to the receiver; from
        then on bytes and the end of the connection go to the tunnel's end,
        and no timer runs.
        """
        connection, receiver = self.upgrade(self.SWITCH + b"\x81\x02hi")
        self.assertEqual(receiver.events, ["switched"])
        reason, headers, rest = receiver.switched
        self.assertEqual(reason, b"Switching Protocols")
        self.assertIn((b"Upgrade", b"websocket"), headers)
        self.assertEqual(rest, b"\x81\x02hi")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        end = Receiver()
        got, lost = [], []
        end.dataReceived = got.append
        end.connectionLost = lost.append
        connection.startTunnel(end)
        connection.dataReceived(b"more")
        self.assertEqual(got, [b"more"])
        self.assertFalse(connection.transport.disconnecting)
        connection.connectionLost(DONE)
        self.assertEqual(lost, [DONE])
        self.assertEqual(receiver.events, ["switched"])
        self.assertEqual((self.pool.idleCount, self.pool.openCount), (0, 0))

    def test_switchByteByByte(self):
        connection, receiver = self.upgrade()
        for i in range(len(self.SWITCH)):
            connection.dataReceived(self.SWITCH[i : i + 1])
        self.assertEqual(receiver.events, ["switched"])
        self.assertEqual(receiver.switched[2], b"")

    def test_interimThenSwitch(self):
        connection, receiver = self.upgrade(b"HTTP/1.1 100 Continue\r\n\r\n" + self.SWITCH)
        self.assertEqual(receiver.events, ["switched"])

    def test_neverPooled(self):
        """
        An upgrade refused (an ordinary answer) closes its connection after
        the response rather than keeping it: the backend may take it as the
        end of the connection's HTTP.
        """
        connection, receiver = self.upgrade(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        self.assertEqual(receiver.events, ["head", "body", "done"])
        self.assertEqual(self.pool.idleCount, 0)
        self.assertTrue(connection.transport.disconnecting)

    def test_notAskedFor(self):
        """
        A 101 to a request that offered nothing is an error, as it always
        was.
        """
        connection, receiver = self.exchange(self.SWITCH)
        self.assertEqual(receiver.events, ["failed"])
        self.assertIsInstance(receiver.error, ProtocolError)

    def test_badSwitches(self):
        """
        A 101 that names no protocol, or one not offered (h2c is never
        offered), is refused: 502, never a tunnel to something unknown.
        """
        for response, message in [
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "without Upgrade"),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "not offered"),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: \r\n\r\n", "not offered"),
        ]:
            connection, receiver = self.upgrade(response)
            self.assertEqual(receiver.events, ["failed"], response)
            self.assertIsInstance(receiver.error, ProtocolError)
            self.assertIn(message, str(receiver.error))
            self.assertTrue(connection.transport.disconnected)

    def test_accepted(self):
        self.assertTrue(upgradeAccepted(b"websocket", [b"WebSocket"]))
        self.assertTrue(upgradeAccepted(b"foo/2, websocket", [b"foo/2"]))
        self.assertTrue(upgradeAccepted(b"foo/2", [b"foo"]))
        self.assertFalse(upgradeAccepted(b"websocket", [b"websocket, h2c"]))
        self.assertFalse(upgradeAccepted(b"websocket", [b""]))

    def test_freshConnection(self):
        """
        An upgrade never takes a kept connection: it will not give it back.
        """
        kept, _ = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount, 1)
        fresh = self.successResultOf(self.pool.acquireFresh())
        self.assertIsNot(fresh, kept)
        self.assertEqual(self.pool.idleCount, 1)

    def test_freshWaitsAtTheLimit(self):
        self.pool.maxConnections = 1
        first, _ = self.exchange()
        waiting = self.pool.acquireFresh()
        self.assertNoResult(waiting)
        first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIs(self.successResultOf(waiting), first)


class MangledResponseTests(_Base):
    """
    Whatever bytes a backend sends, in whatever pieces, an exchange ends
    exactly once (done or failed) and nothing raises.
    """

    SEEDS = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nbody until close",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    ]
    ALPHABET = b"\r\n :;,0123456789abcdefABCDEF\x00"

    def mangle(self, rng, data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            choice = rng.random()
            if choice < 0.3 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif choice < 0.5 and data:
                del data[rng.randrange(len(data))]
            elif choice < 0.7:
                data.insert(rng.randrange(len(data) + 1), rng.choice(self.ALPHABET))
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = rng.choice(self.SEEDS)[: rng.randrange(40)]
        return bytes(data)

    def test_mangled(self):
        rng = random.Random(20261125)
        for _ in range(1500):
            data = self.mangle(rng, rng.choice(self.SEEDS))
            connection, receiver = self.exchange(method=rng.choice([b"GET", b"HEAD"]), timeout=5)
            at = 0
            while at < len(data):
                size = rng.randint(1, 8)
                connection.dataReceived(data[at : at + size])
                at += size
            if rng.random() < 0.5:
                connection.connectionLost(rng.choice([DONE, RESET]))
            self.clock.advance(10)
            ends = [e for e in receiver.events if e in ("done", "failed")]
            self.assertEqual(len(ends), 1, (data, receiver.events))
            self.assertEqual(receiver.events[-1], ends[0], (data, receiver.events))


class _Collect(Protocol):
    def __init__(self):
        self.data = b""
        self.got = Deferred()

    def dataReceived(self, data):
        self.data += data
        if not self.got.called and len(self.data) >= self.factory.expect:
            self.got.callback(self.data)


class WriteNowTests(unittest.TestCase):
    """
    L{writeNow} on real loopback connections: sent at once when nothing
    waits, and in order behind what does.
    """

    timeout = 10

    @inlineCallbacks
    def connected(self, expect):
        server = Factory.forProtocol(_Collect)
        server.expect = expect
        accepted = []
        build = server.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            protocol.factory = server
            accepted.append(protocol)
            return protocol

        server.buildProtocol = buildProtocol
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(client.transport.abortConnection)
        while not accepted:
            yield deferLater(reactor, 0.01, lambda: None)
        self.addCleanup(accepted[0].transport.abortConnection)
        return client.transport, accepted[0]

    def test_twistedNames(self):
        """
        The TCP connection class writeNow recognises, and its method that
        sends at once (the attributes it reads are those test_sentAtOnce
        reads on a real connection).
        """
        from twisted.internet import tcp

        self.assertIs(_TCP_CLIENT, tcp.Client)
        self.assertTrue(callable(getattr(tcp.Client, "write", None)))

    @inlineCallbacks
    def test_sentAtOnce(self):
        transport, server = yield self.connected(5)
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertFalse(transport.TLS)
        self.assertIsInstance(transport.socket, socket.socket)
        writeNow(transport, b"hello")
        self.assertEqual(transport._tempDataBuffer, [], "buffered, not sent")
        self.assertEqual((yield server.got), b"hello")

    @inlineCallbacks
    def test_inOrderBehindBuffered(self):
        transport, server = yield self.connected(10)
        transport.write(b"first")
        writeNow(transport, b"after")
        self.assertEqual(transport._tempDataBuffer, [b"first", b"after"])
        self.assertEqual((yield server.got), b"firstafter")

    @inlineCallbacks
    def test_partOfItSent(self):
        """
        What the socket did not take waits in the transport's buffer, to be
        sent when it can.
        """
        yield self.writeThrough(_TakesTwo, [b"llo"])

    @inlineCallbacks
    def writeThrough(self, double, buffered):
        """
        writeNow C{b"hello"} with the connection's socket replaced by
        C{double(socket)} for the send: C{buffered} is left to the
        transport, and the other end gets it all.
        """
        transport, server = yield self.connected(5)
        sock = transport.socket
        transport.socket = double(sock)
        try:
            writeNow(transport, b"hello")
        finally:
            transport.socket = sock
        self.assertEqual(transport._tempDataBuffer, buffered)
        self.assertEqual((yield server.got), b"hello")

    @inlineCallbacks
    def test_sendFails(self):
        """
        A send that fails (a full buffer, a broken connection) leaves the
        data to the transport's write, which sends it when it can or
        reports the connection's loss as it always does.
        """
        yield self.writeThrough(_Refuses, [b"hello"])

    def test_otherTransports(self):
        transport = StringTransport()
        writeNow(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class _TakesTwo:
    """
    A socket that takes two bytes a send.
    """

    def __init__(self, sock):
        self._sock = sock

    def send(self, data):
        return self._sock.send(data[:2])


class _Refuses:
    """
    A socket whose buffer is full.
    """

    def __init__(self, sock):
        pass

    def send(self, data):
        raise BlockingIOError(errno.EAGAIN, "full")


def _referenceParseHead(head):
    """
    The response head parser as it was written first, line by line: the
    one-pass parser must agree with it on every head.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2:
        raise ValueError("malformed status line")
    version, code = parts[0], parts[1]
    reason = parts[2] if len(parts) == 3 else b""
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError("unsupported HTTP version")
    if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
        raise ValueError("malformed status code")
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in reason):
        raise ValueError("malformed reason phrase")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not frozenset(
            b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        ).issuperset(name):
            raise ValueError("malformed header line")
        value = value.strip(b" \t")
        if b"\n" in value or b"\x00" in value or b"\r" in value:
            raise ValueError("malformed header value")
        headers.append((name, value))
    return version, int(code), reason, headers


def _outcome(parse, head):
    try:
        version, code, reason, headers = parse(head)
    except ValueError as e:
        return ("refused", str(e))
    return (version, code, reason, [tuple(h) for h in headers])


class ParseHeadTests(unittest.SynchronousTestCase):
    def test_agreesWithReference(self):
        heads = [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive",
            b"HTTP/1.0 204 \r\nA:\r\nB: \t \r\nC:x \t",
            b"HTTP/1.1 200 OK\r\nBad Name: x",
            b"HTTP/1.1 200 OK\r\n folded: x",
            b"HTTP/1.1 200 OK\r\nA: x\ry",
            b"HTTP/1.1 200 OK\r\nA: x\ny",
            b"HTTP/1.1 200 OK\r\nA: x\x00y",
            b"HTTP/1.1 200 OK\r\nA\x00: x",
            b"HTTP/1.1 200 OK\r\nA: x\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nA: x",
            b"HTTP/1.1 200 O\rK\r\nA: x",
            b"HTTP/1.1 200 OK\r\nA: \x01\x0bv\x0b",
            b"HTTP/1.1 200 OK\r\nA: x\r\nB",
            b"HTTP/1.1 200 OK\r\n:x",
        ]
        for head in heads:
            self.assertEqual(
                _outcome(_parseHead, head), _outcome(_referenceParseHead, head), head
            )

    def test_refusedInOnePass(self):
        """
        Heads that a backend could once stall the balancer with: many
        well-formed lines before a malformed one (each blank after a colon
        doubled the tries), and long runs of blanks inside a value (a time
        quadratic in the run).  Each is parsed as the reference parses it;
        on the patterns that allowed those tries the first one did not end
        for hours, which the alarm turns into a failure.
        """
        heads = [
            b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 64 + b"malformed",
            b"HTTP/1.1 200 OK\r\n" + b"X:  a  b  \r\n" * 64 + b"Y: x\x00",
            b"HTTP/1.1 200 OK\r\nX: a" + b" " * 100_000 + b"b\r\nY: z",
            b"HTTP/1.1 200 OK\r\nX: a" + b" \t" * 50_000 + b"\r\nY: z",
        ]

        def stalled(signum, frame):
            raise self.failureException("parsing one head took more than 10 s")

        previous = signal.signal(signal.SIGALRM, stalled)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        for head in heads:
            signal.setitimer(signal.ITIMER_REAL, 10.0)
            try:
                outcome = _outcome(_parseHead, head)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.assertEqual(outcome, _outcome(_referenceParseHead, head))

    def test_agreesOnAnyHead(self):
        """
        Heads made of the pieces that matter to a parser, at random (from a
        fixed seed): both parsers give the same headers, or refuse for the
        same reason.
        """
        rng = random.Random(1515)
        pieces = [b"A", b"b-c", b":", b": ", b" ", b"\t", b"x", b"\r", b"\n", b"\x00",
                  b"\x7f", b"\x0b", b"\r\n", b"\r\n", b"\r\nX-Y: z"]
        for _ in range(3000):
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(
                rng.choice(pieces) for _ in range(rng.randrange(0, 20))
            )
            self.assertEqual(
                _outcome(_parseHead, head), _outcome(_referenceParseHead, head), head
            )
