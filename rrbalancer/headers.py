"""
What a proxy must change in the headers it passes on (RFC 9110 section 7.6),
and nothing more.

Hop-by-hop headers describe one connection, so they stop here in both
directions, together with every header that C{Connection} names.  The
message framing (C{Content-Length}, C{Transfer-Encoding}) is the proxy's to
decide on each side, never copied.  The forwarding headers tell the backend
who asked and how.
"""

from typing import Iterable, List, Optional, Sequence, Set, Tuple

HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # Only meaningful with the h2c upgrade, which is never passed on.
        b"http2-settings",
    ]
)

# Not copied from the client: framing is recomputed, and these are set by
# the proxy itself.
_SET_BY_PROXY = frozenset(
    [
        b"host",
        b"content-length",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
    ]
)

# Methods whose requests carry a body by definition, so an empty one is sent
# with an explicit Content-Length: 0.
_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])


X_FORWARDED = "x-forwarded"
FORWARDED = "forwarded"
BOTH = "both"

# A token's characters (RFC 9110 section 5.6.2): as bytes, for
# C{text.translate(None, TOKEN_CHARS)} (what is left is not token), and as
# a set.
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN = frozenset(TOKEN_CHARS)


def _quoted(value: bytes) -> bytes:
    """
    A C{Forwarded} parameter's value: a token as it is, anything else as a
    quoted string (RFC 7239 section 4).
    """
    if value and _TOKEN.issuperset(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _node(address: bytes) -> bytes:
    """
    A C{for=} node (RFC 7239 section 6): IPv6 in brackets, quoted; a client
    without an IP address (a UNIX socket) is C{unknown}.
    """
    if address == b"unix":
        return b"unknown"
    if b":" in address:
        return b'"[' + address + b']"'
    return address


def connectionTokens(values: Optional[Iterable[bytes]]) -> Set[bytes]:
    """
    The header names a C{Connection} header lists, lowercased.
    """
    tokens = set()
    for value in values or ():
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


# A protocol in an Upgrade header: a token, and a version token after a
# slash (RFC 9110 section 7.8).
def _isProtocol(item: bytes) -> bool:
    name, slash, version = item.partition(b"/")
    return bool(name) and _TOKEN.issuperset(name) and (
        not slash or (bool(version) and _TOKEN.issuperset(version))
    )


def upgradeOffer(
    version: bytes, connection: Optional[Sequence[bytes]], upgrade: Optional[Sequence[bytes]]
) -> Optional[bytes]:
    """
    The C{Upgrade} to pass on with a request, or None when it offers no
    upgrade that may pass.

    C{Upgrade} and C{Connection: upgrade} are hop-by-hop, but a proxy that
    dropped them would refuse every WebSocket; they pass together, or not
    at all: only from an HTTP/1.1 request (HTTP/1.0 has no upgrades) whose
    C{Connection} names C{upgrade}, and never with C{h2c}, which is an
    upgrade of this one connection to HTTP/2, not something to tunnel.
    """
    if not upgrade or version != b"HTTP/1.1":
        return None
    if b"upgrade" not in connectionTokens(connection):
        return None
    offered = []
    for value in upgrade:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item:
                continue
            if not _isProtocol(item):
                # A malformed list is no offer at all.
                return None
            if item.split(b"/", 1)[0].lower() != b"h2c":
                offered.append(item)
    return b", ".join(offered) or None


def requestHead(
    method: bytes,
    target: bytes,
    headers: Iterable[Tuple[bytes, Sequence[bytes]]],
    host: bytes,
    clientAddress: bytes,
    proto: bytes,
    bodyLength: int,
    hadBody: bool,
    prefix: Optional[bytes] = None,
    extra: Sequence[Tuple[bytes, bytes]] = (),
    style: str = X_FORWARDED,
    trustChain: bool = True,
    upgrade: Optional[bytes] = None,
) -> bytes:
    """
    The request head to send a backend.

    @param headers: the client's headers as (name, values) pairs, repeated
        headers kept (L{twisted.web.http_headers.Headers.getAllRawHeaders}).
    @param host: the C{Host} to send.
    @param clientAddress: appended to C{X-Forwarded-For}.
    @param proto: C{http} or C{https}, as the client connected.
    @param hadBody: the client framed a body (even an empty one).
    @param prefix: where the balancer is mounted in its site, for
        C{X-Forwarded-Prefix}; None at the root (and a client's own
        C{X-Forwarded-Prefix} is never passed on).
    @param extra: headers the balancer sets, in place of any of the same
        name from the client (a request id).
    @param style: which forwarding headers to send: the C{X-Forwarded-*}
        family, RFC 7239's C{Forwarded}, or both.
    @param trustChain: keep the chain of addresses the client sent (it is
        a proxy we trust) and append to it; otherwise the chain starts
        here, with the client's address alone, so that nobody can forge
        their address to the backends.
    @param upgrade: the protocols offered (see L{upgradeOffer}), sent with
        C{Connection: upgrade}; or None.
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    forwardedFor: List[bytes] = []
    forwarded: List[bytes] = []
    clientHost = None
    headers = list(headers)
    drop = HOP_BY_HOP
    for name, values in headers:
        if name.lower() == b"connection":
            drop = HOP_BY_HOP | connectionTokens(values)
            break
    if extra:
        drop = drop | {name.lower() for name, _ in extra}
    for name, values in headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower in _SET_BY_PROXY:
            if lower == b"host":
                clientHost = values[0]
            continue
        if lower == b"x-forwarded-for":
            if trustChain:
                forwardedFor.extend(values)
            continue
        if lower == b"forwarded":
            if trustChain:
                if style == X_FORWARDED:
                    lines.extend(name + b": " + value for value in values)
                else:
                    forwarded.extend(values)
            continue
        for value in values:
            lines.append(name + b": " + value)
    if style != FORWARDED:
        forwardedFor.append(clientAddress)
        lines.append(b"X-Forwarded-For: " + b", ".join(forwardedFor))
        lines.append(b"X-Forwarded-Proto: " + proto)
        if clientHost is not None:
            lines.append(b"X-Forwarded-Host: " + clientHost)
        if prefix is not None:
            lines.append(b"X-Forwarded-Prefix: " + prefix)
    if style != X_FORWARDED:
        element = b"for=" + _node(clientAddress)
        if clientHost is not None:
            element += b";host=" + _quoted(clientHost)
        element += b";proto=" + proto
        forwarded.append(element)
        lines.append(b"Forwarded: " + b", ".join(forwarded))
    for name, value in extra:
        lines.append(name + b": " + value)
    if upgrade is not None:
        lines.append(b"Connection: upgrade")
        lines.append(b"Upgrade: " + upgrade)
    if bodyLength or hadBody or method in _BODY_METHODS:
        lines.append(b"Content-Length: %d" % (bodyLength,))
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines)


def responseHeaders(
    headers: Iterable[Tuple[bytes, bytes]],
    rewrite: "LocationRewriter",
    clientBase: Optional[bytes],
    prefix: Optional[bytes] = None,
) -> List[Tuple[bytes, bytes]]:
    """
    The end-to-end headers of a backend's response, in order, repeats kept,
    with C{Location} and C{Content-Location} pointing back at the balancer.
    C{Content-Length} is dropped here: the caller sets it from the framing
    it checked.
    """
    drop = HOP_BY_HOP
    for name, value in headers:
        if name.lower() == b"connection":
            drop = drop | connectionTokens([value])
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in drop or lower == b"content-length":
            continue
        if lower == b"location" or lower == b"content-location":
            value = rewrite(value, clientBase, prefix)
        kept.append((name, value))
    return kept


class LocationRewriter:
    """
    Rewrites a URL that points at a backend so that it points at the address
    the client used instead, as NGINX's default C{proxy_redirect} does: the
    backend stays hidden, and the redirect still works from outside.
    """

    def __init__(self, backendURL: str) -> None:
        self._forms = _urlForms(backendURL)

    def __call__(
        self, value: bytes, clientBase: Optional[bytes], prefix: Optional[bytes] = None
    ) -> bytes:
        """
        @param clientBase: C{scheme://host} as the client asked, or L{None}
            when the client named no host (the value is left alone).
        @param prefix: where the balancer is mounted, or None at the root:
            a backend that thinks it serves C{/} is then served under it,
            and so are the paths it redirects to.
        """
        if prefix is not None and value[:1] == b"/" and value[1:2] != b"/":
            return prefix + value
        if clientBase is None:
            return value
        lower = value.lower()
        for form in self._forms:
            if lower.startswith(form):
                rest = value[len(form) :]
                if not rest or rest[:1] in (b"/", b"?", b"#"):
                    if prefix is not None:
                        rest = prefix + (rest if rest[:1] == b"/" else b"/" + rest)
                    return clientBase + rest
        return value


def _urlForms(url: str) -> Tuple[bytes, ...]:
    """
    The spellings of a backend's base URL: with and without its default port.
    """
    base = url.lower().encode("ascii")
    scheme, _, netloc = base.partition(b"://")
    default = b":443" if scheme == b"https" else b":80"
    if netloc.endswith(default):
        return (base, scheme + b"://" + netloc[: -len(default)])
    if netloc.endswith(b"]") or b":" not in netloc:
        return (base, base + default)
    return (base,)
