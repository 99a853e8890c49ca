"""
Tests for L{rrbalancer.tunnel}: two connections joined after a protocol
switch, on L{StringTransport}s and a L{Clock}.
"""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from rrbalancer.tunnel import ABORT_AFTER, Tunnel, TunnelCounts


class TunnelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.counts = TunnelCounts()
        self.total = TunnelCounts()
        self.tunnel = Tunnel(self.clock, 60.0, (self.counts, self.total))
        self.client = StringTransport()
        self.backend = StringTransport()
        self.done = []
        self.tunnel.whenDone(self.done.append)

    def start(self, **kwargs):
        self.tunnel.start(self.client, self.backend, **kwargs)

    def lose(self, end, reason=ConnectionDone):
        end.connectionLost(Failure(reason()))

    def test_interface(self):
        verifyObject(IPushProducer, self.tunnel.client)
        verifyObject(IPushProducer, self.tunnel.backend)

    def test_carriesBothWays(self):
        """
        What one side sends, the other gets, unchanged; the tunnel and each
        of its counts know how much went which way.
        """
        self.start()
        self.tunnel.client.dataReceived(b"\x81\x05hello")
        self.tunnel.backend.dataReceived(b"\x81\x05world")
        self.tunnel.backend.dataReceived(b"\x00" * 1000)
        self.assertEqual(self.backend.value(), b"\x81\x05hello")
        self.assertEqual(self.client.value(), b"\x81\x05world" + b"\x00" * 1000)
        self.assertEqual((self.tunnel.toBackend, self.tunnel.toClient), (7, 1007))
        for counts in (self.counts, self.total):
            self.assertEqual(
                (counts.open, counts.opened, counts.toBackend, counts.toClient), (1, 1, 7, 1007)
            )

    def test_earlyBytesFirst(self):
        """
        Bytes read with the 101 head, and bytes the client sent before the
        switch, go first, each to its side.
        """
        self.start(toClient=b"first-down", toBackend=b"first-up")
        self.tunnel.client.dataReceived(b"|then-up")
        self.tunnel.backend.dataReceived(b"|then-down")
        self.assertEqual(self.client.value(), b"first-down|then-down")
        self.assertEqual(self.backend.value(), b"first-up|then-up")
        self.assertEqual((self.counts.toBackend, self.counts.toClient), (16, 20))

    def test_producersRegistered(self):
        """
        Each end is the producer of the other side's writes: registered with
        the other's transport, or with the consumer given for it (the
        client's channel, which holds its transport's producer slot).
        """
        channel = StringTransport()
        self.tunnel.start(self.client, self.backend, clientConsumer=channel)
        self.assertIs(self.backend.producer, self.tunnel.client)
        self.assertIs(channel.producer, self.tunnel.backend)
        self.assertTrue(channel.streaming)
        self.assertIsNone(self.client.producer)

    def test_slowBackendPausesClient(self):
        """
        When the backend's connection cannot take more, reading from the
        client stops until it can; nothing else is paused.
        """
        self.start()
        self.backend.producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        self.assertEqual(self.backend.producerState, "producing")
        # Twice paused, once resumed: a transport says each only once, but
        # the tunnel must not count.
        self.backend.producer.pauseProducing()
        self.backend.producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")

    def test_slowClientPausesBackend(self):
        self.start()
        self.client.producer.pauseProducing()
        self.assertEqual(self.backend.producerState, "paused")
        self.assertEqual(self.client.producerState, "producing")
        self.client.producer.resumeProducing()
        self.assertEqual(self.backend.producerState, "producing")

    def test_startResumesReading(self):
        """
        A side paused while it spoke HTTP (a channel holding back a client
        that sent early) reads again once the tunnel starts.
        """
        self.client.pauseProducing()
        self.start()
        self.assertEqual(self.client.producerState, "producing")

    def test_clientClosesBackend(self):
        """
        The client's end of stream closes the backend's connection (once
        what it has to write is written, as loseConnection does); once both
        are gone the tunnel is done and no longer counted open.
        """
        self.start()
        self.tunnel.client.dataReceived(b"last words")
        self.lose(self.tunnel.client)
        self.assertTrue(self.backend.disconnecting)
        self.assertEqual(self.backend.value(), b"last words")
        self.assertEqual(self.done, [])
        self.assertEqual(self.counts.open, 1)
        self.lose(self.tunnel.backend)
        self.assertEqual(self.done, [self.tunnel])
        self.assertEqual((self.counts.open, self.counts.opened), (0, 1))
        self.assertEqual(self.total.open, 0)
        self.assertFalse(self.tunnel.open)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backendClosesClient(self):
        self.start()
        self.tunnel.backend.dataReceived(b"\x88\x02\x03\xe8")
        self.lose(self.tunnel.backend, ConnectionLost)
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.client.value(), b"\x88\x02\x03\xe8")
        self.lose(self.tunnel.client)
        self.assertEqual(self.done, [self.tunnel])

    def test_nothingCarriedAfterClose(self):
        """
        Bytes still read from a side after the other went are dropped:
        there is nowhere to send them.
        """
        self.start()
        self.lose(self.tunnel.backend)
        self.tunnel.client.dataReceived(b"too late")
        self.assertEqual(self.backend.value(), b"")
        self.assertEqual(self.counts.toBackend, 0)

    def test_abortWhenTheOtherSideHangs(self):
        """
        A side that cannot finish writing (its peer reads nothing) is cut
        L{ABORT_AFTER} seconds after the other side went.
        """
        self.start()
        self.lose(self.tunnel.client)
        self.clock.advance(ABORT_AFTER - 0.5)
        self.assertFalse(self.backend.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.backend.disconnected)

    def test_idleTimeout(self):
        """
        A tunnel with no byte either way for its idle timeout is closed;
        traffic either way keeps it open.
        """
        self.start()
        self.clock.advance(50)
        self.tunnel.client.dataReceived(b"ping")
        self.clock.advance(50)
        self.tunnel.backend.dataReceived(b"pong")
        self.clock.advance(59)
        self.assertFalse(self.client.disconnecting or self.backend.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.backend.disconnecting)
        self.lose(self.tunnel.client)
        self.lose(self.tunnel.backend)
        self.assertEqual(self.done, [self.tunnel])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleTimerIsOne(self):
        """
        Traffic does not add timers: one pending call at most, whatever
        passes.
        """
        self.start()
        for _ in range(100):
            self.tunnel.client.dataReceived(b"x")
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_close(self):
        """
        Closing (a stopping balancer) closes both sides, once; a side that
        does not go is cut after L{ABORT_AFTER} seconds.
        """
        self.start()
        self.tunnel.close()
        self.tunnel.close()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.backend.disconnecting)
        self.lose(self.tunnel.client)
        self.clock.advance(ABORT_AFTER)
        self.assertTrue(self.backend.disconnected)
        self.assertFalse(self.client.disconnected)
        self.lose(self.tunnel.backend)
        self.assertEqual(self.done, [self.tunnel])

    def test_stopProducing(self):
        """
        A transport that stops its producer is going away: the tunnel
        closes.
        """
        self.start()
        self.backend.producer.stopProducing()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.backend.disconnecting)

    def test_notStarted(self):
        """
        A tunnel never started counts nothing, and closing it does nothing.
        """
        self.tunnel.close()
        self.assertEqual((self.counts.open, self.counts.opened), (0, 0))
        self.assertFalse(self.tunnel.open)
