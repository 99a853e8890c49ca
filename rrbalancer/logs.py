"""
Logs for machines: one JSON object a line, for twistd's own C{--logger}
option::

    twistd --logger rrbalancer.logs.jsonLogger -n rrbalancer --config ...

Each line has C{time} (RFC 3339, UTC), C{level}, C{namespace}, a readable
C{message}, and the event's own fields (C{url}, C{reason}, C{peer}, ...),
so that a log pipeline can filter on them without parsing the message.
Bytes are shown as text, never as C{b'...'}.

(Twisted's own C{jsonFileLogObserver} needs a file argument, which
C{--logger} cannot give, and writes Twisted's serialization format rather
than flat fields.)

And what a line says of many backends at once (L{changesInBrief}).
"""

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Callable, Dict, List

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider


def inBrief(urls: List[str], shown: int = 5) -> str:
    """
    The backends a change touched, for its one summary line: all of them
    when they are few, the first C{shown} and how many more otherwise.  A
    reload or a discovery answer of ten thousand backends made one line of
    half a megabyte; each backend's own lines name them all.
    """
    if not urls:
        return "none"
    if len(urls) <= shown:
        return repr(urls)
    return f"{urls[:shown]!r} and {len(urls) - shown:,} more"


def changesInBrief(added: List[str], removed: List[str], changed: List[str]) -> Dict[str, Any]:
    """
    The fields of a line that sums up a change to the set of backends:
    C{added}, C{removed} and C{changed} in brief (L{inBrief}), and their
    counts as C{addedCount}, C{removedCount} and C{changedCount}.
    """
    return {
        "added": inBrief(added),
        "removed": inBrief(removed),
        "changed": inBrief(changed),
        "addedCount": len(added),
        "removedCount": len(removed),
        "changedCount": len(changed),
    }


def _plain(value: Any) -> Any:
    """
    A value as JSON can hold it: text for bytes and anything unknown.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def eventAsJSON(event: Dict[str, Any]) -> str:
    """
    One event as one line of JSON (without the newline).
    """
    when = event.get("log_time")
    level = event.get("log_level")
    record: Dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
            if when is not None
            else None
        ),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace"),
        "message": formatEvent(
            {k: _plain(v) if isinstance(v, bytes) else v for k, v in event.items()}
        ),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError"):
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False)


def jsonLineObserver(out: IO[str]) -> Callable[[Dict[str, Any]], None]:
    """
    An observer writing each event to C{out} as a line of JSON.
    """

    @provider(ILogObserver)
    def observe(event: Dict[str, Any]) -> None:
        out.write(eventAsJSON(event) + "\n")
        out.flush()

    return observe


def jsonLogger() -> Callable[[Dict[str, Any]], None]:
    """
    The observer factory C{twistd --logger} takes: JSON lines on standard
    output, where service managers (systemd's journal) collect them.
    """
    return jsonLineObserver(sys.stdout)
