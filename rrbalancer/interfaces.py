"""
The contracts between the balancer's parts, written down.

Each is small on purpose: the proxy needs one question answered per
request (L{IPicker}), the upstream client hands one response to one
receiver (L{IResponseReceiver}), and the operations side needs to check a
backend now rather than at the next interval (L{IHealthChecker}).  Tests
and embedders can put their own implementations behind them.
"""

from zope.interface import Attribute, Interface


class IResponseReceiver(Interface):
    """
    Whoever started an exchange on a backend connection hears of its
    response here: L{responseHead} once, L{responseBody} any number of
    times, then exactly one of L{responseDone} or L{responseFailed}
    (L{responseFailed} may come before any head).

    One that offers an upgrade with its request also has
    C{responseSwitched(reason, headers, rest)}, called instead of all these
    when the backend switches protocols (see L{rrbalancer.client}).
    """

    def responseHead(code, reason, headers, contentLength):
        """
        The final response's head.

        @param code: the status code, an L{int}.
        @param reason: the reason phrase, L{bytes}.
        @param headers: (name, value) pairs in the order received.
        @param contentLength: the body's length when known, else L{None}.
        """

    def responseBody(data):
        """
        Some of the body, as it arrives.
        """

    def responseDone():
        """
        The whole body arrived; the connection went back to its pool or was
        closed, as its framing allowed.
        """

    def responseFailed(error):
        """
        The exchange did not complete.

        @param error: a L{rrbalancer.client.BackendError} saying how far it
            got (request sent, bytes received, connection reused).
        """


class IPicker(Interface):
    """
    What the proxy asks for each try of a request.
    """

    def pick(exclude=(), request=None):
        """
        The backend for the next try, or L{None} when none may take it.

        @param exclude: backends this request already tried (at most one
            try per backend).
        @param request: the request to place, for a choice that depends on
            it (hashing).
        """


class IHealthChecker(Interface):
    """
    Active health checks of a group of backends.
    """

    def start():
        """
        Start checking every backend at its interval.
        """

    def stop():
        """
        Stop checking.
        """

    def check(backend):
        """
        Check one backend now.

        @return: a L{twisted.internet.defer.Deferred} that fires with
            whether it passed; it never fails.
        """

    def checkSoon(backend):
        """
        Check one backend as soon as the checker's pace allows: at once,
        unless many were asked for together.
        """


class IUpstream(Interface):
    """
    The way to one backend: what the proxy needs of a backend beyond the
    server model (L{rrbalancer.backends.Backend}).
    """

    pool = Attribute("The L{rrbalancer.client.ConnectionPool} to the backend.")

    def forward(forwarding):
        """
        Try the request that C{forwarding} carries on this backend.
        """


class IAdminAPI(Interface):
    """
    What the admin endpoints do, apart from HTTP: in this process
    (L{rrbalancer.admin.AdminAPI}) or over every worker's
    (L{rrbalancer.admin._workers.WorkersAPI}).  Each method returns the
    JSON-ready answer, or a L{twisted.internet.defer.Deferred} of it, and
    refuses with an L{rrbalancer.admin.APIError}.
    """

    def listBackends(state=None, match=None, offset=0, limit=500):
        """
        A page of the backends, with the totals.
        """

    def getBackend(backendID):
        """
        One backend.
        """

    def addBackend(body, peer):
        """
        Add the backend C{body} describes.
        """

    def changeBackend(backendID, body, peer):
        """
        Change a backend's state, weight or both.
        """

    def removeBackend(backendID, peer):
        """
        Drain a backend, then forget it.
        """

    def bulk(body, peer):
        """
        Add, change and remove many backends, all or nothing.
        """

    def reload(peer):
        """
        Read the config file again.
        """

    def status():
        """
        Version, uptime, listeners and totals.
        """
