"""
What a worker of C{--workers N} and its parent say to each other: AMP over
a UNIX socket pair made at the worker's spawn (L{rrbalancer.workers}), so
that the parent's admin listener can show and change the whole balancer.

The parent asks; the worker answers:
 - L{Snapshot}: the worker's backends and status, as the admin API shows
   them;
 - L{Render}: the worker's metrics text;
 - L{Apply}: run one admin API change (the same code as with one process,
   so the same checks and the same answers);
 - L{Backends} and L{Sync}: the backend set (ids, URLs, weights, what the
   operator asked) read from one worker and imposed on another, so that a
   worker started again gets the changes made before it started;
 - L{Checked}: the health check results of the one worker that checks,
   passed on by the parent to the others (L{CheckSharer}).

Answers are JSON; an L{APIError} travels back as C{{"error", "code"}}, so
that the parent answers it as the worker would have.
"""

import json
from typing import Any, Dict, List, Optional

from twisted.logger import Logger
from twisted.protocols import amp

from .admin._api import AdminAPI, APIError, backendJSON
from .backends import ADMIN_STATES, DISABLED, BackendGroup
from .config import BackendConfig

# AMP carries values of at most 64 KiB; a value is split over as many keys.
CHUNK = amp.MAX_VALUE_LENGTH


class JSON(amp.Argument):
    """
    Any JSON value, however long: a fleet's snapshot is megabytes, spread
    over keys C{name}, C{name.1}, C{name.2}...
    """

    def toBox(self, name, strings, objects, proto):
        key = amp._wireNameToPythonIdentifier(name)
        if self.optional and objects.get(key) is None:
            return
        data = json.dumps(objects[key]).encode("utf-8")
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        strings[name] = chunks[0]
        for n, chunk in enumerate(chunks[1:], 1):
            strings[name + b".%d" % (n,)] = chunk

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            objects[amp._wireNameToPythonIdentifier(name)] = None
            return
        parts = [strings.pop(name)]
        n = 1
        while name + b".%d" % (n,) in strings:
            parts.append(strings.pop(name + b".%d" % (n,)))
            n += 1
        objects[amp._wireNameToPythonIdentifier(name)] = json.loads(b"".join(parts))


class _Channel(amp.AMP):
    """
    AMP without its line per connection made and lost: a worker's channel
    lives and dies with the worker, whose start and end are logged.
    """

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class Snapshot(amp.Command):
    """
    The worker's backends (as L{backendJSON} shows each) and, if asked,
    its status.  C{ids}: only those backends; C{brief}: of each only
    what a page of many needs to be chosen (L{BRIEF}).
    """

    arguments = [
        (b"status", amp.Boolean()),
        (b"ids", JSON(optional=True)),
        (b"brief", amp.Boolean(optional=True)),
    ]
    response = [(b"answer", JSON())]


# What a brief snapshot tells of each backend.
BRIEF = ("id", "url", "state", "healthy", "removing")


class Render(amp.Command):
    """
    The worker's metrics, in the format the scraper asked the parent for.
    """

    arguments = [(b"openMetrics", amp.Boolean())]
    response = [(b"text", JSON())]


class Apply(amp.Command):
    """
    One change through the admin API: C{{"method", "args", "next_id"}}.
    C{next_id} numbers the backends it adds as the first worker numbered
    them.
    """

    arguments = [(b"call", JSON())]
    response = [(b"answer", JSON())]


class Backends(amp.Command):
    """
    The backend set, as L{Sync} takes it.
    """

    arguments: List = []
    response = [(b"answer", JSON())]


class Sync(amp.Command):
    """
    Make the worker's backend set the one given (L{listing}).
    """

    arguments = [(b"listing", JSON())]
    response: List = []


class Checked(amp.Command):
    """
    Health check results: from the worker that checks to its parent, and
    from the parent to every other worker, so that each backend is checked
    once per interval however many workers there are.  Each result:
    C{{"id", "url", "ok", "reason", "code", "duration"}}.
    """

    arguments = [(b"results", JSON())]
    requiresAnswer = False


# The admin API methods a parent may apply, and the arguments each takes.
CHANGES = {
    "addBackend": 2,
    "changeBackend": 3,
    "removeBackend": 2,
    "bulk": 2,
    "reload": 1,
}


def listing(group: BackendGroup) -> Dict[str, Any]:
    """
    What another worker needs to have the same backends.
    """
    return {
        "next_id": group.nextID,
        "backends": [
            {
                "id": b.id,
                "url": b.url,
                "weight": b.weight,
                "backup": b.backup,
                "admin_state": b.adminState,
                "removing": b.removing,
            }
            for b in group
        ],
    }


def syncGroup(group: BackendGroup, wanted: Dict[str, Any], reason: str):
    """
    Add, change and retire backends until C{group} has those of C{wanted}
    (a L{listing}), with their ids.

    @return: how many were added, changed and retired, and the backends
        to check at once (added, or enabled again).
    """
    items = {item["id"]: item for item in wanted["backends"]}
    counts = {"added": 0, "changed": 0, "retired": 0}
    toCheck = []
    for backend in group:
        item = items.get(backend.id)
        if backend.removing:
            continue
        if item is None or item["url"] != backend.url or item["removing"]:
            group.retire(backend, reason)
            counts["retired"] += 1
    for item in wanted["backends"]:
        if item["removing"]:
            continue
        backend = group.get(item["id"])
        if backend is None:
            config = BackendConfig(url=item["url"], weight=item["weight"], backup=item["backup"])
            if group.byServer(config) is not None:
                # Still draining under another id: it cannot be had twice.
                continue
            backend = group.add(config, awaitCheck=True, reason=reason, backendID=item["id"])
            counts["added"] += 1
            toCheck.append(backend)
        elif backend.removing:
            continue
        elif (backend.weight, backend.backup) != (item["weight"], item["backup"]):
            group.reconfigure(backend, item["weight"], item["backup"])
            counts["changed"] += 1
        state = item["admin_state"]
        if state in ADMIN_STATES and backend.adminState != state:
            if backend.adminState == DISABLED and backend not in toCheck:
                toCheck.append(backend)
            backend.setAdminState(state, reason)
            counts["changed"] += 1
    if wanted["next_id"] > group.nextID:
        group.continueIDsFrom(wanted["next_id"])
    return counts, toCheck


class WorkerChannel(_Channel):
    """
    The worker's end: answers its parent from the worker's own balancer.

    @param api: the worker's L{AdminAPI}, never served over HTTP.
    @param metrics: the worker's L{Metrics}.
    """

    log = Logger()

    def __init__(self, api: AdminAPI, metrics) -> None:
        _Channel.__init__(self)
        self.api = api
        self.metrics = metrics

    @Snapshot.responder
    def snapshot(self, status: bool, ids=None, brief=False) -> Dict[str, Any]:
        group = self.api.group
        if ids is None:
            backends = list(group)
        else:
            backends = [b for b in map(group.get, ids) if b is not None]
        if brief:
            shown = [
                {"id": b.id, "url": b.url, "state": b.state, "healthy": b.healthy,
                 "removing": b.removing}
                for b in backends
            ]
        else:
            shown = [backendJSON(b) for b in backends]
        answer: Dict[str, Any] = {"backends": shown}
        if status:
            answer["status"] = self.api.status()
        return {"answer": answer}

    @Render.responder
    def render(self, openMetrics: bool) -> Dict[str, Any]:
        return {"text": self.metrics.render(openMetrics).decode("utf-8")}

    @Apply.responder
    def apply(self, call: Dict[str, Any]) -> Dict[str, Any]:
        method, args = call.get("method"), call.get("args", [])
        if CHANGES.get(method) != len(args):
            return {"answer": {"error": f"no such change: {method!r}", "code": 400}}
        group = self.api.group
        firstID = group.nextID
        nextID: Optional[int] = call.get("next_id")
        if nextID is not None and nextID != group.nextID:
            try:
                group.continueIDsFrom(nextID)
            except ValueError as e:
                return {"answer": {"error": f"ids differ from the other workers': {e}",
                                   "code": 500}}
        try:
            value = getattr(self.api, method)(*args)
        except APIError as e:
            return {"answer": {"error": e.message, "code": e.code}}
        return {"answer": {"value": value, "next_id": firstID}}

    @Backends.responder
    def backends(self) -> Dict[str, Any]:
        return {"answer": listing(self.api.group)}

    @Checked.responder
    def checked(self, results: List[Dict[str, Any]]) -> Dict[str, Any]:
        group = self.api.group
        for result in results:
            backend = group.get(result["id"])
            if backend is not None and backend.url == result["url"]:
                backend.recordCheck(
                    result["ok"], result["reason"], result["code"], result["duration"]
                )
        return {}

    @Sync.responder
    def sync(self, listing: Dict[str, Any]) -> Dict[str, Any]:
        counts, toCheck = syncGroup(self.api.group, listing, "as the other workers have it")
        for backend in toCheck:
            self.api.checkNow(backend)
        if any(counts.values()):
            self.log.info(
                "backends made as the other workers have them: {added} added, "
                "{changed} changed, {retired} retired",
                **counts,
            )
        return {}


class CheckSharer:
    """
    The checking worker's results, sent to its parent in batches (at most
    one message every C{delay} seconds, however many backends).
    """

    def __init__(self, channel: amp.AMP, clock, delay: float = 0.05) -> None:
        self._channel = channel
        self._clock = clock
        self._delay = delay
        self._results: List[Dict[str, Any]] = []
        self._call = None

    def __call__(self, backend, ok: bool, reason: str, code, duration) -> None:
        self._results.append(
            {"id": backend.id, "url": backend.url, "ok": ok, "reason": reason,
             "code": code, "duration": duration}
        )
        if self._call is None:
            self._call = self._clock.callLater(self._delay, self._send)

    def _send(self) -> None:
        self._call = None
        results, self._results = self._results, []
        if self._channel.transport is not None and results:
            self._channel.callRemote(Checked, results=results)


class ParentChannel(_Channel):
    """
    The parent's end of one worker's channel: tells the pool when it
    connects and when it is lost (the worker ended).
    """

    def __init__(self, pool, index: int) -> None:
        _Channel.__init__(self)
        self.pool = pool
        self.index = index

    def connectionMade(self) -> None:
        _Channel.connectionMade(self)
        self.pool._channelUp(self.index, self)

    def connectionLost(self, reason) -> None:
        _Channel.connectionLost(self, reason)
        self.pool._channelDown(self.index, self)

    @Checked.responder
    def checked(self, results: List[Dict[str, Any]]) -> Dict[str, Any]:
        for channel in list(self.pool.channels.values()):
            if channel is not self:
                channel.callRemote(Checked, results=results)
        return {}
