"""
HTTP/2 on client connections that chose it by ALPN.

A TLS port offers C{h2} beside C{http/1.1}; a connection that takes it is
served by L{BalancerH2Connection}, one per connection, whose streams make
the site's own requests (L{rrbalancer.site.BalancerRequest}), so that
everything the balancer does to a request holds for a stream too.  The
backends still get HTTP/1.1 from the keep-alive pool: pseudo-headers
become the request line and C{Host} (Twisted's L{H2Stream} does that).

Twisted's L{H2Connection} is used as it is, with what a proxy needs on
top: its reactor passed in, a bound on concurrent streams, backends paused
while the client's transport is full (not only when a stream's window is
spent), a stream reset when a response is cut short that tells its request
so, streams answered before their body ended (a 413) asked to stop
without error, a graceful close that lets answered streams drain (and
refuses the streams opened after it), a deadline for every request head
(the first, and each one after it), and an idle timeout that never closes
a connection under a request in flight.  (A stream's body timeout is the
request's: see L{rrbalancer.site.BalancerRequest}.)
"""

from typing import Optional

import h2.errors
import h2.exceptions
import h2.settings
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from . import _twisted

H2 = b"h2"
HTTP11 = b"http/1.1"


def alpnProtocols(http2: bool):
    """
    What a TLS port offers by ALPN, in the server's order of preference.
    """
    return [H2, HTTP11] if http2 else [HTTP11]


def isStream(channel) -> bool:
    """
    Is C{channel} (a request's) an HTTP/2 stream, not an HTTP/1.1
    connection?
    """
    return isinstance(channel, _twisted.H2Stream)


def streamBlocked(stream) -> bool:
    """
    Must a producer registered on C{stream} now start paused?  (The stream
    will not say so until it is written to again.)
    """
    connection = _twisted.streamConnection(stream)
    if isinstance(connection, BalancerH2Connection):
        return connection.streamBlocked(stream.streamID)
    return False


# The types of the frames that carry a header block.
_HEAD_FRAMES = (HeadersFrame.type, ContinuationFrame.type)


def headUnderWay(conn) -> bool:
    """
    Has C{conn} (an C{h2} package connection) part of a header block in
    hand: a HEADERS frame waiting for its CONTINUATION frames, part of a
    HEADERS or CONTINUATION frame, or part of a frame header (whose type
    is not known yet)?  Nothing public tells: this reads the package's
    frame buffer (the same in every release the balancer supports; the
    tests check it).
    """
    buffer = conn.incoming_buffer
    if buffer._headers_buffer:
        return True
    data = buffer._data
    return 0 < len(data) and (len(data) < 4 or data[3] in _HEAD_FRAMES)


class _Transport:
    """
    The client's transport as its HTTP/2 connection sees it.

    The connection is the transport's producer, and TLS does not close a
    connection while a producer is registered: Twisted's HTTP/2 code closes
    (after a GOAWAY, a timeout, a protocol error) without letting go of it
    first, so its close is made to.
    """

    def __init__(self, transport) -> None:
        self._transport = transport
        directlyProvides(self, providedBy(transport))

    def loseConnection(self) -> None:
        self._transport.unregisterProducer()
        self._transport.loseConnection()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def serve(connection: "BalancerH2Connection", transport) -> None:
    """
    Start C{connection} on C{transport}, the transport's producer from now
    on (whatever producer it had must be unregistered first).
    """
    connection.makeConnection(_Transport(transport))
    transport.registerProducer(connection, True)


class BalancerH2Connection(_twisted.H2Connection):
    """
    One client connection in HTTP/2.

    @ivar closing: a graceful close is under way: GOAWAY was sent, and the
        connection closes once its last stream is done.
    """

    closing = False
    _transportPaused = False
    _headTimer = None
    _served = False
    _lost = False
    # Once GOAWAY is sent: the last stream it lets the client have.
    _lastStreamID: Optional[int] = None

    # Streams a client may reset before their answer, at once, and a second
    # after that (Rapid Reset, CVE-2023-44487: each reset stream was already
    # passed on to a backend, so a client resetting them by the thousand
    # costs the balancer and its backends what answering would, and none
    # of it counts against the streams allowed at once).  Past the budget
    # the connection is closed with ENHANCE_YOUR_CALM.
    RESET_BURST = 200
    RESET_RATE = 20.0

    def __init__(
        self, reactor, maxConcurrentStreams: int = 100, headerTimeout: float = 10.0
    ) -> None:
        _twisted.H2Connection.__init__(self, reactor)
        self.headerTimeout = headerTimeout
        self._clock = reactor
        self._resetBudget = float(self.RESET_BURST)
        self._resetChecked = reactor.seconds()
        self.resetsRefused = False
        # Before the connection preface, which announces the settings.
        codes = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: maxConcurrentStreams,
                codes.MAX_HEADER_LIST_SIZE: self.conn.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )

    # -- request heads' deadline -------------------------------------------------

    def dataReceived(self, data):
        """
        The idle timeout restarts at every byte, whole frame or not, and
        does not run at all while a stream is open, so a client trickling a
        request head could hold a connection for ever: the preface and the
        first request's head must arrive within C{headerTimeout} of the
        first byte, as an HTTP/1.1 head must; and so must every later
        head, from its first byte to its last frame (HEADERS, then any
        CONTINUATION: nothing else may come between them, so a head
        trickled that way holds up the whole connection).
        """
        if not self._served and self._headTimer is None:
            self._headTimer = self.callLater(self.headerTimeout, self._headTimedOut)
        _twisted.H2Connection.dataReceived(self, data)
        if not self._served:
            if not self.streams:
                return
            self._served = True
            self._stopHeadTimer()
        if self._lost or self.closing:
            return
        if headUnderWay(self.conn):
            if self._headTimer is None:
                self._headTimer = self.callLater(self.headerTimeout, self._headTimedOut)
        else:
            self._stopHeadTimer()

    def timeoutConnection(self):
        """
        Idle means no stream open: a request waiting on its backend is
        bounded by the backend timeout, and the connection must not close
        under it (a late answer would then meet a closed connection).
        """
        if self.streams:
            # (The call that fired is spent: a new one.)
            self.setTimeout(self.timeOut)
            return
        _twisted.H2Connection.timeoutConnection(self)

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self.transport is not None:
            # No stream to answer 408 on (it has none before its head is
            # whole): GOAWAY, and close once the streams open are done.
            self.goAway()

    def _stopHeadTimer(self) -> None:
        timer, self._headTimer = self._headTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason, _cancelTimeouts=True):
        self._lost = True
        self._stopHeadTimer()
        _twisted.H2Connection.connectionLost(self, reason, _cancelTimeouts)

    # -- backpressure ---------------------------------------------------------

    def pauseProducing(self):
        """
        The client's transport is full.  Twisted's connection only stops
        sending, and each stream would go on taking its backend's bytes up
        to its whole flow-control window (tens of MiB for curl): pause every
        stream's producer too.
        """
        self._transportPaused = True
        _twisted.H2Connection.pauseProducing(self)
        for stream in list(self.streams.values()):
            stream.flowControlBlocked()

    def resumeProducing(self):
        self._transportPaused = False
        _twisted.H2Connection.resumeProducing(self)
        for stream in list(self.streams.values()):
            # Resumes those with room left in their window.
            stream.windowUpdated()

    def remainingOutboundWindow(self, streamID):
        # No room at all while the transport is full, so that a window
        # update from the client does not wake a backend before it.
        if self._transportPaused:
            return 0
        return _twisted.H2Connection.remainingOutboundWindow(self, streamID)

    def streamBlocked(self, streamID: int) -> bool:
        return streamID not in self.streams or self.remainingOutboundWindow(streamID) <= 0

    # -- streams Twisted has forgotten ----------------------------------------

    def _requestReceived(self, event):
        if self._lastStreamID is not None and event.stream_id > self._lastStreamID:
            # Opened after GOAWAY said which would be the last: refused
            # (RFC 9113 section 6.8), which tells the client that it may
            # send the request again elsewhere.
            self._stopStream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        return _twisted.H2Connection._requestReceived(self, event)

    def _requestDataReceived(self, event):
        if event.stream_id in self.streams:
            return _twisted.H2Connection._requestDataReceived(self, event)
        # Its response was complete before its body (a 413): the bytes still
        # count against the connection's window, and RFC 9113 section 8.1
        # lets the server ask the client to stop sending, without error.
        if event.flow_controlled_length:
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self._stopStream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _requestEnded(self, event):
        if event.stream_id in self.streams:
            return _twisted.H2Connection._requestEnded(self, event)

    def _requestAborted(self, event):
        if event.stream_id in self.streams:
            result = _twisted.H2Connection._requestAborted(self, event)
            if not self._resetAllowed():
                self._calm()
            return result

    def _resetAllowed(self) -> bool:
        now = self._clock.seconds()
        self._resetBudget = min(
            float(self.RESET_BURST),
            self._resetBudget + (now - self._resetChecked) * self.RESET_RATE,
        )
        self._resetChecked = now
        self._resetBudget -= 1
        return self._resetBudget >= 0

    def _calm(self) -> None:
        """
        Too many streams reset: GOAWAY with ENHANCE_YOUR_CALM, and close.
        """
        if self.resetsRefused or self.transport is None:
            return
        self.resetsRefused = True
        self.closing = True
        self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        if _twisted.h2WriteControlData(self):
            self.transport.loseConnection()

    def _stopStream(self, streamID: int, code) -> bool:
        try:
            self.conn.reset_stream(streamID, error_code=code)
        except h2.exceptions.StreamClosedError:
            return False
        return True

    def abortRequest(self, streamID):
        """
        Reset one stream whose response is cut short (a backend that broke
        off): with C{INTERNAL_ERROR}, so that the client cannot take what
        it got for a whole response, and telling its request that its
        client is gone, as a lost HTTP/1.1 connection does.  (Twisted's
        resets with C{NO_ERROR} and leaves the request waiting.)
        """
        stream = self.streams.get(streamID)
        self._stopStream(streamID, h2.errors.ErrorCodes.INTERNAL_ERROR)
        if not _twisted.h2WriteControlData(self) or stream is None:
            return
        self._requestDone(streamID)
        stream.connectionLost(Failure(ConnectionLost("the response was cut short")))

    # -- closing ---------------------------------------------------------------

    def goAway(self) -> None:
        """
        Close gracefully: no new stream (GOAWAY), the streams already
        answered sent to their end, then the connection closed.
        """
        if self.closing or self.transport is None:
            return
        self.closing = True
        self._stopHeadTimer()
        self._lastStreamID = self.conn.highest_inbound_stream_id
        if not self.streams:
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR)
            if _twisted.h2WriteControlData(self):
                self._closeIfDone()
            return
        # The h2 package's GOAWAY closes its state machine, and the streams
        # still open with it: this one only tells the client to open no
        # more (RFC 9113 section 6.8), and the streams go on.
        frame = GoAwayFrame(
            0, last_stream_id=self._lastStreamID, error_code=h2.errors.ErrorCodes.NO_ERROR,
        )
        self.transport.write(frame.serialize())

    def _requestDone(self, streamID):
        _twisted.H2Connection._requestDone(self, streamID)
        if self.closing:
            self._closeIfDone()

    def _closeIfDone(self) -> None:
        if not self.streams and self.transport is not None:
            self.transport.loseConnection()


def negotiated(transport) -> Optional[bytes]:
    """
    The protocol a connection chose by ALPN, or None (plain TCP, or a
    client that offered none).
    """
    return getattr(transport, "negotiatedProtocol", None)
