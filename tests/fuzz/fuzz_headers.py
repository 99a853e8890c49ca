"""
Fuzz the header rewriting: a header list, as a client's request or a
backend's response could carry it, through L{requestHead} (the head sent
to a backend) and L{responseHeaders} with a L{LocationRewriter} (the
headers sent back to the client).

The input is lines (split at LF).  The first line holds the choices:
 - byte 0, bits 0-1: the backend's URL (L{BACKENDS});
 - bit 2: the client connected over TLS;
 - bit 3: the client framed a body;
 - bits 4-5: where the balancer is mounted (L{PREFIXES});
 - bit 6: a request id is set by the balancer;
 - bit 7: the backend's own Host is sent (C{host_header = "backend"});
 - byte 1: the method (L{METHODS}); byte 2: the target (L{TARGETS});
 - byte 3: the body's length.
Every other line is C{name:value}, kept only if a request or response
parser could have produced it (the name a token, the value without CR or
NUL, surrounding blanks stripped).

Invariants, for the request head: it ends at its first blank line; no
line has a CR, LF or NUL in it; the request line is the method, the
target and HTTP/1.1; every header line is C{token: value}; there is
exactly one Host (the one chosen) and one X-Forwarded-For (ending with
the client); Content-Length is there exactly when a body is, with its
length; no hop-by-hop header, and no header the client's Connection
names, is passed on (unless the balancer sets it itself); every other
client header is passed on, in order.  For the response headers: no
hop-by-hop header, none that Connection names, no Content-Length; every
other header kept in order, with a C{Location} or C{Content-Location}
that pointed at the backend pointing at the balancer instead.

Run it as a fuzzer with C{tests/fuzz/run.sh headers}.
"""

import sys

from tests.fuzz._common import command, instrumentModules, instrumented

with instrumented(__name__):
    from twisted.web.http_headers import Headers

    from rrbalancer.headers import (
        HOP_BY_HOP,
        LocationRewriter,
        connectionTokens,
        requestHead,
        responseHeaders,
    )

BACKENDS = [
    "http://127.0.0.1:8081",
    "http://backend.example",
    "https://[::1]",
    "https://backend.example:8443",
]
PREFIXES = [None, b"/api", b"/a/b", b"/x%2Fy"]
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PROPFIND"]
TARGETS = [b"/", b"/p?q=1", b"*", b"/a%20b/c;d?e#f"]
CLIENT = b"192.0.2.7"
REQUEST_ID = (b"X-Request-ID", b"0123456789abcdef")
# Set by the balancer itself, whatever the client's Connection names.
SET_BY_PROXY = frozenset(
    [b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"x-forwarded-prefix"]
)
_TOKEN = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _headerLines(lines):
    """
    The (name, value) pairs a parser could have produced from C{lines}.
    """
    pairs = []
    for line in lines:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if not sep or not name or not _TOKEN.issuperset(name):
            continue
        if b"\r" in value or b"\x00" in value:
            continue
        pairs.append((name, value))
    return pairs


def _isSubsequence(wanted, found) -> bool:
    found = iter(found)
    return all(any(item == other for other in found) for item in wanted)


def _checkRequestHead(head, method, target, host, bodyLength, hadBody, extra, pairs, grouped):
    end = head.find(b"\r\n\r\n")
    assert end == len(head) - 4, f"the head does not end at its first blank line: {head!r}"
    lines = head[:end].split(b"\r\n")
    for line in lines:
        assert not any(c in line for c in b"\r\n\x00"), f"CR, LF or NUL in {line!r}"
    assert lines[0] == method + b" " + target + b" HTTP/1.1", lines[0]
    out = []
    for line in lines[1:]:
        name, sep, value = line.partition(b": ")
        assert sep and name and _TOKEN.issuperset(name), f"malformed header line {line!r}"
        out.append((name.lower(), value))
    names = [n for n, v in out]
    assert [v for n, v in out if n == b"host"] == [host], f"Host: {head!r}"
    forwardedFor = [v for n, v in out if n == b"x-forwarded-for"]
    assert len(forwardedFor) == 1 and forwardedFor[0].endswith(CLIENT), head
    lengths = [v for n, v in out if n == b"content-length"]
    if bodyLength or hadBody or method in (b"POST", b"PUT", b"PATCH"):
        assert lengths == [b"%d" % bodyLength], f"Content-Length: {head!r}"
    else:
        assert lengths == [], f"Content-Length without a body: {head!r}"
    connection = [values for name, values in grouped if name.lower() == b"connection"]
    named = connectionTokens(connection[0] if connection else [])
    ours = SET_BY_PROXY | {name.lower() for name, _ in extra}
    for name in names:
        assert name not in HOP_BY_HOP, f"hop-by-hop {name!r} passed on: {head!r}"
        assert name in ours or name not in named, f"{name!r}, named by Connection, passed on"
    for name, value in extra:
        assert (name.lower(), value) in out, f"{name!r} not set: {head!r}"
    passed = [
        (name.lower(), value)
        for name, value in pairs
        if name.lower() not in HOP_BY_HOP | named | ours
    ]
    # Headers keep their order within a name; Twisted's Headers groups
    # them by name, so the order across names is the first appearance's.
    for name in {n for n, v in passed}:
        wanted = [p for p in passed if p[0] == name]
        assert _isSubsequence(wanted, [p for p in out if p[0] == name]), (
            f"client header {name!r} not passed on as it came: {head!r}"
        )


def _checkResponseHeaders(pairs, kept, backendURL, clientBase, prefix):
    named = connectionTokens([v for n, v in pairs if n.lower() == b"connection"])
    dropped = HOP_BY_HOP | named | {b"content-length"}
    expected = [(n, v) for n, v in pairs if n.lower() not in dropped]
    assert [n for n, v in kept] == [n for n, v in expected], (pairs, kept)
    forms = [backendURL.lower().encode("ascii")]
    for (name, before), (_, after) in zip(expected, kept):
        assert not any(c in after for c in b"\r\n\x00"), f"CR, LF or NUL in {after!r}"
        if name.lower() not in (b"location", b"content-location"):
            assert after == before, (name, before, after)
            continue
        if prefix is not None and before[:1] == b"/" and before[1:2] != b"/":
            assert after == prefix + before, (before, after)
        elif any(
            before.lower().startswith(form) and before[len(form) : len(form) + 1] in (b"", b"/", b"?", b"#")
            for form in forms
        ):
            assert after.startswith(clientBase), (before, after)
            assert after.endswith(before[len(forms[0]) :].lstrip(b"/")), (before, after)
        else:
            assert after == before or after.startswith(clientBase), (before, after)


def check(data: bytes) -> None:
    control, *lines = data.split(b"\n")
    control = control + bytes(4 - len(control)) if len(control) < 4 else control
    choice = control[0]
    backendURL = BACKENDS[choice & 3]
    secure = bool(choice & 4)
    hadBody = bool(choice & 8)
    prefix = PREFIXES[(choice >> 4) & 3]
    extra = (REQUEST_ID,) if choice & 64 else ()
    method = METHODS[control[1] % len(METHODS)]
    target = TARGETS[control[2] % len(TARGETS)]
    bodyLength = control[3]

    pairs = _headerLines(lines)
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    grouped = list(headers.getAllRawHeaders())
    backendHost = backendURL.split("://", 1)[1].encode("ascii")
    if choice & 128:
        host = backendHost
    else:
        host = headers.getRawHeaders(b"host", [backendHost])[0]
    head = requestHead(
        method,
        target,
        grouped,
        host,
        CLIENT,
        b"https" if secure else b"http",
        bodyLength,
        hadBody,
        prefix,
        extra,
    )
    _checkRequestHead(head, method, target, host, bodyLength, hadBody, extra, pairs, grouped)

    clientHost = headers.getRawHeaders(b"host", [b"127.0.0.1:8000"])[0]
    clientBase = (b"https://" if secure else b"http://") + clientHost
    rewrite = LocationRewriter(backendURL)
    kept = responseHeaders(pairs, rewrite, clientBase, prefix)
    _checkResponseHeaders(pairs, kept, backendURL, clientBase, prefix)


if __name__ == "__main__":
    import atheris
    from twisted.web import http_headers

    instrumentModules(http_headers)
    sys.argv[0] = command(__spec__, __file__)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
