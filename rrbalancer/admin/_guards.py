"""
Who may use the admin listener.

With a token (C{--admin-token-file}), every request must carry
C{Authorization: Bearer <token>}, or for a browser HTTP Basic credentials
with the token as password; the comparison takes constant time.  Without
a token the listener is on loopback (checked by the config), and a request
whose C{Host} is not a loopback name is refused, so that a web page cannot
reach it by DNS rebinding.  A change whose C{Origin} is another site is
refused (no cross-site request forgery), and so is a change that a
browser marks C{Sec-Fetch-Site: cross-site}; a change's body must be
C{application/json}, which no other site can send without asking first.
"""

import base64
import hashlib
import hmac
from typing import Optional, Tuple
from urllib.parse import urlsplit

from ..config import isLoopbackHost


def _hostname(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


class TokenCheck:
    """
    The admin token, kept as a digest so that a comparison shows not even
    its length.
    """

    def __init__(self, token: Optional[bytes]) -> None:
        self._digest = hashlib.sha256(token).digest() if token is not None else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def authorized(self, request) -> bool:
        if self._digest is None:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, credentials = header.partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == b"bearer":
            presented = credentials
        elif scheme == b"basic":
            try:
                decoded = base64.b64decode(credentials, validate=True)
            except ValueError:
                return False
            presented = decoded.partition(b":")[2]
        else:
            return False
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest)


def refusal(request, tokenRequired: bool) -> Optional[Tuple[int, str]]:
    """
    Why a request must be refused even though it is authorized, as (status,
    message), or None.
    """
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    # (No Host at all is no browser's request: HTTP/1.0 tools.)
    if not tokenRequired and host and not isLoopbackHost(_hostname(host)):
        return (
            403,
            f"Host {host!r} is not a loopback name; without a token the admin "
            "API answers only requests to 127.0.0.1, [::1] or localhost",
        )
    if request.method not in (b"GET", b"HEAD"):
        # Browsers say where a request comes from; another site's is refused
        # whatever its Origin says.
        if (request.getHeader(b"sec-fetch-site") or b"").lower() == b"cross-site":
            return (403, "cross-site request refused")
        origin = request.getHeader(b"origin")
        if origin is not None:
            origin = origin.decode("latin-1")
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return (403, f"cross-origin request from {origin} refused")
    return None
