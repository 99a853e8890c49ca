"""
The access log: one line per request, in NCSA combined format, to a file
that can be reopened when logrotate has moved it (SIGHUP or SIGUSR1), or
to standard output.

The site writes it itself rather than through L{twisted.web.http.Site}'s
own log file, so that it can be reopened, and so that an idle balancer
with no access log runs no timer.
"""

import sys
from typing import Callable, Optional

from twisted.internet import address
from twisted.web.http import datetimeToLogString


def _escape(value: bytes) -> str:
    """
    A header value or request target as it may appear inside double quotes
    in an access log line (no raw control characters, no bare quote).
    """
    text = value.decode("latin-1").encode("unicode_escape").decode("ascii")
    return text.replace('"', '\\"')


def combinedLogFormatter(timestamp: str, request) -> str:
    """
    An NCSA combined log line, as Apache and NGINX write it (Twisted's own
    quotes the client address, which log analysers do not expect).
    """
    clientAddress = request.getClientAddress()
    if isinstance(clientAddress, (address.IPv4Address, address.IPv6Address)):
        host = clientAddress.host
    else:
        host = "-"
    return '%s - - %s "%s %s %s" %d %s "%s" "%s"' % (
        host,
        timestamp,
        _escape(request.method),
        _escape(request.uri),
        _escape(request.clientproto),
        request.code,
        request.sentLength or "-",
        _escape(request.getHeader(b"referer") or b"-"),
        _escape(request.getHeader(b"user-agent") or b"-"),
    )


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

    @param clock: gives the time of each line; the formatted time is kept
        for the rest of its second.
    @param formatter: C{formatter(timestamp, request)} makes one line.
    """

    def __init__(
        self,
        path: str,
        clock,
        formatter: Callable[[str, object], str] = combinedLogFormatter,
    ) -> None:
        self.path = path
        self._clock = clock
        self._formatter = formatter
        self._file = None
        self._second: Optional[int] = None
        self._timestamp = ""

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
        if self._file is None:
            return
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._timestamp = datetimeToLogString(now)
        self._file.write(self._formatter(self._timestamp, request) + "\n")
