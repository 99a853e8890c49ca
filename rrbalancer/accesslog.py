"""
The access log: one line per request, in NCSA combined format or as a
JSON object, to a file that can be reopened when logrotate has moved it
(SIGHUP or SIGUSR1), or to standard output.

The site writes it itself rather than through L{twisted.web.http.Site}'s
own log file, so that it can be reopened, and so that an idle balancer
with no access log runs no timer.
"""

import json
import sys
from datetime import datetime, timezone
from typing import Optional

from twisted.internet import address
from twisted.web.http import datetimeToLogString


def _escape(value: bytes) -> str:
    """
    A header value or request target as it may appear inside double quotes
    in an access log line (no raw control characters, no bare quote).
    """
    text = value.decode("latin-1").encode("unicode_escape").decode("ascii")
    return text.replace('"', '\\"')


def _client(request) -> Optional[str]:
    clientAddress = request.getClientAddress()
    if isinstance(clientAddress, (address.IPv4Address, address.IPv6Address)):
        return clientAddress.host
    return None


class CombinedFormat:
    """
    NCSA combined log lines, as Apache and NGINX write them (Twisted's own
    quotes the client address, which log analysers do not expect).  The
    formatted time is kept for the rest of its second.
    """

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._timestamp = ""

    def __call__(self, now: float, request) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._timestamp = datetimeToLogString(now)
        return combinedLogFormatter(self._timestamp, request)


def combinedLogFormatter(timestamp: str, request) -> str:
    """
    One NCSA combined log line.
    """
    return '%s - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _client(request) or "-",
        timestamp,
        _escape(request.method),
        _escape(request.uri),
        _escape(request.clientproto),
        request.code,
        request.sentLength or "-",
        _escape(request.getHeader(b"referer") or b"-"),
        _escape(request.getHeader(b"user-agent") or b"-"),
    )


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def jsonFormat(now: float, request) -> str:
    """
    One JSON object: what NGINX's and HAProxy's JSON logs carry, with the
    balancer's own part of the story (which backend answered, with what,
    after how many tries).  The C{backend*}, C{attempts} and C{requestID}
    attributes are the proxy's, on the requests it handled.
    """
    started = getattr(request, "startedAt", None)
    return json.dumps(
        {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "client": _client(request),
            "method": _text(request.method),
            "target": _text(request.uri),
            "protocol": _text(request.clientproto),
            "status": request.code,
            "bytes": request.sentLength,
            "duration_ms": round((now - started) * 1000, 3) if started is not None else None,
            "backend": getattr(request, "backendURL", None),
            "backend_status": getattr(request, "backendStatus", None),
            "attempts": getattr(request, "attempts", 0),
            "request_id": getattr(request, "requestID", None),
            "pool": getattr(request, "pool", None),
        },
        ensure_ascii=False,
    )


FORMATS = {"combined": CombinedFormat, "json": lambda: jsonFormat}


class _Stdout:
    """
    Standard output, flushed line by line and never closed.
    """

    def write(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()

    def close(self) -> None:
        pass


class AccessLog:
    """
    An access log at C{path} (C{-} for standard output), open between
    L{open} and L{close}.

    @param clock: gives the time of each line.
    @param format: C{combined} or C{json} (see L{FORMATS}).
    """

    def __init__(self, path: str, clock, format: str = "combined") -> None:
        self.path = path
        self._clock = clock
        self._format = FORMATS[format]()
        self._file = None

    def open(self) -> None:
        if self._file is None:
            self._file = _Stdout() if self.path == "-" else open(self.path, "a", buffering=1)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def reopen(self) -> None:
        """
        Close the file and open it again by name: after logrotate renamed
        it, lines go to a new file of that name.
        """
        if self._file is not None:
            self.close()
            self.open()

    def write(self, request) -> None:
        if self._file is not None:
            self._file.write(self._format(self._clock.seconds(), request) + "\n")
