"""
Tests for L{rrbalancer._unread}: on real loopback connections, what the
kernel holds unread is counted for the pool whose request it answers, and
nothing else is.
"""

import gc
import select
import weakref

from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, TestCase

from rrbalancer._unread import UnreadAnswers

from .test_admin import poll
from .test_twisted import connectedPair


class _Exchange:
    """
    What the count reads of a backend connection.
    """

    def __init__(self, protocol, pool, awaitingAnswer=True):
        self.transport = protocol.transport
        self.pool = pool
        self.awaitingAnswer = awaitingAnswer


class UnreadAnswersTests(TestCase):
    timeout = 10

    def setUp(self):
        if not hasattr(select, "epoll"):
            raise SkipTest("needs epoll")
        self.unread = UnreadAnswers()
        self.addCleanup(self.unread.close)

    def count(self, pool="pool"):
        """
        The count for C{pool}, brought up to date.
        """
        self.unread.refresh()
        return self.unread.waiting(pool)

    @inlineCallbacks
    def held(self, pool, awaitingAnswer=True):
        """
        A watched connection, and its server end; what the server sends
        stays unread until the connection reads again.
        """
        client, server = yield connectedPair(self)
        client.transport.stopReading()
        exchange = _Exchange(client, pool, awaitingAnswer)
        self.unread.watch(exchange)
        return exchange, client, server

    @inlineCallbacks
    def test_countedUntilSettled(self):
        """
        An answer that came is counted for its pool from the next refresh
        until its connection says it is read.
        """
        exchange, client, server = yield self.held("pool")
        self.assertEqual(self.count(), 0)
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        yield poll(lambda: self.count() == 1)
        self.assertEqual((self.count(), self.unread.waiting("other")), (1, 0))
        self.unread.settled(exchange)
        self.assertEqual(self.unread.waiting("pool"), 0)
        self.unread.settled(exchange)
        self.assertEqual(self.count(), 0)

    @inlineCallbacks
    def test_nothingKeptOfAPool(self):
        """
        Once a pool's answers are all read, the count keeps no reference
        to it (a removed backend's pool goes).
        """

        class _Pool:
            pass

        pool = _Pool()
        gone = weakref.ref(pool)
        exchange, client, server = yield self.held(pool)
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        yield poll(lambda: self.count(pool) == 1)
        self.unread.settled(exchange)
        self.unread.forget(exchange)
        del exchange, pool
        gc.collect()
        self.assertIsNone(gone())

    @inlineCallbacks
    def test_readBeforeCounted(self):
        """
        An answer read before the next refresh is not counted: the kernel
        names a connection only while it still has bytes waiting.
        """
        exchange, client, server = yield self.held("pool")
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        client.transport.startReading()
        yield poll(lambda: client.data)
        self.assertEqual(self.count(), 0)

    @inlineCallbacks
    def test_perPool(self):
        held = []
        for pool in ("a", "a", "b"):
            exchange, client, server = yield self.held(pool)
            server.transport.write(b"HTTP/1.1 200 OK\r\n")
            held.append(client)

        def counted():
            return (self.count("a"), self.unread.waiting("b")) == (2, 1)

        yield poll(counted)

    @inlineCallbacks
    def test_onlyAnswersAwaited(self):
        """
        Bytes on a connection that waits for no answer of a request in the
        load (a health check's, or a backend closing a kept connection) are
        not counted, then or later: an answer comes after its request.
        """
        exchange, client, server = yield self.held("pool", awaitingAnswer=False)
        other, otherClient, otherServer = yield self.held("pool")
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        otherServer.transport.write(b"HTTP/1.1 200 OK\r\n")
        yield poll(lambda: self.count() == 1)
        exchange.awaitingAnswer = True
        self.assertEqual(self.count(), 1)
        server.transport.write(b"Content-Length: 0\r\n\r\n")
        yield poll(lambda: self.count() == 2)

    @inlineCallbacks
    def test_forget(self):
        """
        A forgotten connection is not counted, and forgetting one that is
        closed already, or twice, does nothing.
        """
        exchange, client, server = yield self.held("pool")
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        yield poll(lambda: self.count() == 1)
        self.unread.forget(exchange)
        self.assertEqual(self.count(), 0)
        self.unread.forget(exchange)
        closing, closingClient, _ = yield self.held("pool")
        closingClient.transport.startReading()
        closingClient.transport.loseConnection()
        yield closingClient.closedDeferred
        self.unread.forget(closing)

    def test_notTCP(self):
        """
        A connection on no TCP socket is not watched.
        """

        class _Protocol:
            transport = StringTransport()

        self.unread.watch(_Exchange(_Protocol(), "pool"))
        self.assertEqual(self.count(), 0)

    @inlineCallbacks
    def test_closed(self):
        """
        Closed (the balancer stops, or the policy no longer times answers),
        it counts nothing, and its connections may still forget themselves.
        """
        exchange, client, server = yield self.held("pool")
        server.transport.write(b"HTTP/1.1 200 OK\r\n")
        yield poll(lambda: self.count() == 1)
        self.unread.close()
        self.assertEqual(self.count(), 0)
        self.unread.forget(exchange)
