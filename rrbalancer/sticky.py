"""
Sticky sessions: a cookie that sends a client back to the backend that
answered it first.

The cookie holds the backend's L{stickyID<rrbalancer.backends.Backend>}, a
digest of the server it dials: the same on every balancer and across
restarts (so that a fleet, or a restarted balancer, honours the cookies
another one set), and not its address (a client learns nothing of the
network behind the balancer).  A request whose backend cannot take it (down,
drained, disabled, ejected, gone, or already tried) is balanced as any other,
and its answer sticks the client to the new backend.
"""

from typing import Collection, Optional

from twisted.web.http_headers import Headers


class StickyCookie:
    """
    Reads and sets one cookie for a group of backends.

    @param group: finds a backend by its sticky id (a
        L{rrbalancer.backends.BackendGroup}).
    """

    def __init__(self, name: str, group) -> None:
        self.name = name.encode("ascii")
        self._group = group

    def _value(self, request) -> Optional[bytes]:
        getCookie = getattr(request, "getCookie", None)
        return getCookie(self.name) if getCookie is not None else None

    def backendFor(self, request, exclude: Collection = ()):
        """
        The backend the request's cookie names, while it may take the
        request; otherwise None.
        """
        value = self._value(request)
        if not value:
            return None
        backend = self._group.byStickyID(value.decode("latin-1"))
        if backend is None or not backend.available or backend in exclude:
            return None
        return backend

    def stick(self, request, backend, headers: Headers) -> None:
        """
        Add to the response C{headers} the cookie that names C{backend},
        unless the request already carried it.
        """
        stickyID = backend.stickyID.encode("ascii")
        if self._value(request) == stickyID:
            return
        cookie = self.name + b"=" + stickyID + b"; Path=/; HttpOnly; SameSite=Lax"
        if request.isSecure():
            cookie += b"; Secure"
        headers.addRawHeader(b"set-cookie", cookie)
