"""
The admin API of a balancer of several workers (C{--workers N}), run by
their parent: every read asks each worker over its channel
(L{rrbalancer._channel}) and sums what they answer; every change is
applied by each worker in turn, and answered once all have.

A change goes to one worker first, which checks it as with one process:
refused there, it is refused, and no other worker sees it.  Accepted, it
goes to the others, told to number any backend it adds as the first one
did, so that a backend has one id in every worker.  The parent keeps the
backend set the workers agree on, and a worker that starts again is made
to have it before it is asked anything.

How the figures of several workers make one backend: counts (requests,
failures, responses, bytes, requests in flight and their peaks) are
summed; a backend is C{up} and C{healthy} only if every worker finds it
so (each has its own health checks), and C{workers} lists what each
worker sees of it.
"""

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import (
    DeferredList,
    DeferredLock,
    TimeoutError,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.logger import Logger
from zope.interface import implementer

from .. import __version__
from .._channel import Apply, Backends, Render, Snapshot, Sync
from ..backends import DOWN, EJECTED, STATES, UP
from ..interfaces import IAdminAPI
from ..metrics import mergeMetrics
from ._api import DEFAULT_PAGE, MAX_PAGE, APIError

# Seconds a worker has to answer the parent.
WORKER_TIMEOUT = 10.0

_SUMMED = (
    "requests", "failures", "active", "peak_active", "protocol_errors", "bytes_in",
    "bytes_out", "ejections",
)
_LATEST = ("times_down", "downtime", "consecutive_failures")


def _sumDicts(dicts) -> Dict[str, Any]:
    total: Dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


def _mergeState(states: List[str]) -> str:
    """
    One state for a backend the workers may see differently: an
    operator's state is the same in all; otherwise, the worst a worker
    sees (down, then ejected), so that C{up} means up everywhere.
    """
    if all(s == states[0] for s in states):
        return states[0]
    for state in (DOWN, EJECTED):
        if state in states:
            return state
    return states[0]


def mergeBackend(views: List[Tuple[int, Dict[str, Any]]]) -> Dict[str, Any]:
    """
    One backend as the workers (C{(index, backendJSON)} pairs) see it, in
    the shape of L{backendJSON}, with C{workers} added.
    """
    merged = dict(views[0][1])
    backends = [b for _, b in views]
    for key in _SUMMED:
        merged[key] = sum(b[key] for b in backends)
    for key in _LATEST:
        merged[key] = max(b[key] for b in backends)
    merged["requests_per_second"] = round(sum(b["requests_per_second"] for b in backends), 3)
    rates = sum(b["requests_per_second"] for b in backends)
    merged["error_rate"] = round(
        sum(b["error_rate"] * b["requests_per_second"] for b in backends) / rates
        if rates
        else max(b["error_rate"] for b in backends),
        4,
    )
    merged["responses"] = _sumDicts(b["responses"] for b in backends)
    merged["state"] = _mergeState([b["state"] for b in backends])
    merged["healthy"] = all(b["healthy"] for b in backends)
    merged["removing"] = any(b["removing"] for b in backends)
    merged["weight_ramp"] = min(b["weight_ramp"] for b in backends)
    ejected = [b["ejected_until"] for b in backends if b["ejected_until"] is not None]
    merged["ejected_until"] = max(ejected) if ejected else None
    # Latency spreads cannot be added: the slowest worker's is shown.
    merged["latency_ms"] = {
        key: max((b["latency_ms"][key] for b in backends if b["latency_ms"][key] is not None),
                 default=None)
        for key in views[0][1]["latency_ms"]
    }
    checked = max(backends, key=lambda b: b["last_check"] or 0)
    for key in ("last_check", "last_error", "last_check_code", "last_check_ms"):
        merged[key] = checked[key]
    changed = max(backends, key=lambda b: b["last_change"] or 0)
    merged["last_change"] = changed["last_change"]
    merged["last_change_reason"] = changed["last_change_reason"]
    connections = [b["connections"] for b in backends if b["connections"] is not None]
    merged["connections"] = _sumDicts(connections) if connections else None
    merged["history"] = _mergeHistory([b["history"] for b in backends])
    merged["workers"] = [
        {
            "worker": index,
            "state": b["state"],
            "healthy": b["healthy"],
            "active": b["active"],
            "requests": b["requests"],
            "last_error": b["last_error"],
        }
        for index, b in views
    ]
    return merged


def _mergeHistory(histories: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    steps: Dict[float, Dict[str, Any]] = {}
    for history in histories:
        for point in history:
            step = steps.setdefault(point["t"], {"t": point["t"], "rps": 0, "errors": 0,
                                                 "latency_ms": None})
            step["rps"] = round(step["rps"] + point["rps"], 3)
            step["errors"] = round(step["errors"] + point["errors"], 3)
            if point["latency_ms"] is not None:
                step["latency_ms"] = max(step["latency_ms"] or 0, point["latency_ms"])
    return [steps[t] for t in sorted(steps)]


def mergeBackends(snapshots: List[Tuple[int, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """
    Every backend any worker has, in the order they were added.
    """
    views: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
    for index, backends in snapshots:
        for backend in backends:
            views.setdefault(backend["id"], []).append((index, backend))
    return [mergeBackend(views[i]) for i in sorted(views, key=int)]


def mergeBrief(snapshots: List[Tuple[int, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """
    Every backend any worker has, with only its id, URL and merged state,
    as L{mergeBackend} would merge them.
    """
    views: Dict[str, List[Dict[str, Any]]] = {}
    for _, backends in snapshots:
        for backend in backends:
            views.setdefault(backend["id"], []).append(backend)
    merged = []
    for backendID in sorted(views, key=int):
        each = views[backendID]
        merged.append({
            "id": backendID,
            "url": each[0]["url"],
            "state": _mergeState([b["state"] for b in each]),
            "healthy": all(b["healthy"] for b in each),
            "removing": any(b["removing"] for b in each),
        })
    return merged


def mergeStatus(statuses: List[Tuple[int, Dict[str, Any]]], backends: List[Dict[str, Any]]):
    """
    The status of the whole balancer, from its workers' and the merged
    backends: the parent fills in what it alone knows (listeners, uptime).
    """
    first = dict(statuses[0][1])
    each = [s for _, s in statuses]
    first["panic"] = dict(
        first["panic"],
        active=any(s["panic"]["active"] for s in each),
        times=sum(s["panic"]["times"] for s in each),
    )
    first["ejection"] = dict(first["ejection"], ejected=sum(s["ejection"]["ejected"] for s in each))
    first["rate_limits"] = [
        dict(limit, keys=sum(s["rate_limits"][n]["keys"] for s in each),
             requests=_sumDicts(s["rate_limits"][n]["requests"] for s in each))
        for n, limit in enumerate(first["rate_limits"])
    ]
    if first["queue"] is not None:
        queues = [s["queue"] for s in each]
        queue = dict(first["queue"])
        for key, value in queue.items():
            if key in ("max_conns", "size", "timeout"):
                continue
            if isinstance(value, (int, float)):
                queue[key] = (max if key == "peak" else sum)(q[key] for q in queues)
        first["queue"] = queue
    if first.get("mirrors"):
        mirrors = [s["mirrors"] for s in each]
        names = first["mirrors"]["pools"]
        first["mirrors"] = dict(
            first["mirrors"],
            in_flight=sum(m["in_flight"] for m in mirrors),
            pools={
                name: {
                    "mirrored": sum(m["pools"][name]["mirrored"] for m in mirrors),
                    "failed": sum(m["pools"][name]["failed"] for m in mirrors),
                    "skipped": _sumDicts(m["pools"][name]["skipped"] for m in mirrors),
                }
                for name in names
            },
        )
    totals = [s["totals"] for s in each]
    first["totals"] = {
        "backends": len(backends),
        "up": sum(1 for b in backends if b["state"] == UP),
        "available": sum(1 for b in backends if b["state"] == UP and not b["removing"]),
        "requests": sum(t["requests"] for t in totals),
        "failures": sum(t["failures"] for t in totals),
        "active": sum(t["active"] for t in totals),
        "in_flight": sum(t["in_flight"] or 0 for t in totals),
        "retries": sum(t["retries"] for t in totals),
        "requests_per_second": round(sum(t["requests_per_second"] for t in totals), 3),
        "responses": _sumDicts(t["responses"] for t in totals),
    }
    return first


@implementer(IAdminAPI)
class WorkersAPI:
    """
    What the admin endpoints do when the balancer is several workers: the
    same answers as L{AdminAPI}, each a L{Deferred}.

    @param pool: the L{WorkerPool}, whose C{channels} reach the workers.
    @param timeout: seconds a worker has to answer.
    @ivar adminListener: the parent's admin listener, for the status.
    """

    log = Logger()
    adminListener = None

    def __init__(self, pool, clock, timeout: float = WORKER_TIMEOUT) -> None:
        self.pool = pool
        self.clock = clock
        self.timeout = timeout
        self.started = clock.seconds()
        self._lock = DeferredLock()
        self._ready: Dict[int, Any] = {}
        # The backend set the workers agreed on last (see Backends).
        self.listing: Optional[Dict[str, Any]] = None
        pool.channelChanged = self._channelChanged

    # -- the workers ---------------------------------------------------------

    def workers(self) -> List[Tuple[int, Any]]:
        """
        The workers that answer: connected, and made like the others.
        """
        return sorted(self._ready.items())

    def _channelChanged(self, index: int, channel) -> None:
        if channel is None:
            self._ready.pop(index, None)
            return
        self._lock.run(self._join, index, channel)

    @inlineCallbacks
    def _join(self, index: int, channel):
        """
        Give a worker that has just connected the backends the others
        have, before it is asked anything.
        """
        others = self.workers()
        try:
            if others:
                self.listing = yield self._call(others[0], Backends)
            if self.listing is not None:
                yield self._call((index, channel), Sync, listing=self.listing)
        except APIError as e:
            self.log.warn("worker {index} could not be made like the others: {e}",
                          index=index, e=e.message)
        if self.pool.channels.get(index) is channel:
            self._ready[index] = channel

    def _call(self, worker: Tuple[int, Any], command, **arguments):
        """
        Ask one worker; an L{APIError} naming it if it does not answer.
        """
        index, channel = worker
        d = channel.callRemote(command, **arguments)
        d.addTimeout(self.timeout, self.clock)

        def failed(failure):
            if failure.check(TimeoutError):
                raise APIError(504, f"worker {index} did not answer within {self.timeout:g}s")
            raise APIError(502, f"worker {index} failed: {failure.getErrorMessage()}")

        d.addCallback(lambda answer: answer[next(iter(answer))] if answer else None)
        return d.addErrback(failed)

    def _callAll(self, command, **arguments):
        """
        Ask every worker at once; their answers as C{(index, answer)}
        pairs.
        """
        workers = self.workers()
        if not workers:
            raise APIError(503, "no worker is running yet")
        d = DeferredList(
            [self._call(w, command, **arguments) for w in workers], consumeErrors=True
        )

        def collect(results):
            for ok, value in results:
                if not ok:
                    value.raiseException()
            return [(index, value) for (index, _), (_, value) in zip(workers, results)]

        return d.addCallback(collect)

    def _change(self, method: str, *args):
        return self._lock.run(self._applyEverywhere, method, list(args))

    @inlineCallbacks
    def _applyEverywhere(self, method: str, args: List[Any]):
        workers = self.workers()
        if not workers:
            raise APIError(503, "no worker is running to apply the change")
        first, rest = workers[0], workers[1:]
        answer = yield self._call(first, Apply, call={"method": method, "args": args})
        if "error" in answer:
            raise APIError(answer["code"], answer["error"])
        results = yield DeferredList(
            [
                self._call(w, Apply, call={"method": method, "args": args,
                                           "next_id": answer["next_id"]})
                for w in rest
            ],
            consumeErrors=True,
        )
        values = [(first[0], answer["value"])]
        for (index, _), (ok, result) in zip(rest, results):
            if not ok:
                error = result.value
                raise APIError(
                    error.code,
                    f"{error.message}; worker {first[0]} applied the change, worker "
                    f"{index} may not have",
                )
            if "error" in result:
                raise APIError(
                    502,
                    f"worker {index} did not apply the change: {result['error']}; "
                    f"worker {first[0]} did",
                )
            values.append((index, result["value"]))
        try:
            self.listing = yield self._call(first, Backends)
        except APIError:
            pass  # kept from before; the next change or join refreshes it
        if isinstance(answer["value"], dict) and "url" in answer["value"]:
            return mergeBackend(values)
        return answer["value"]

    # -- endpoints (IAdminAPI) ---------------------------------------------

    @inlineCallbacks
    def _backends(self, status: bool = False, ids: Optional[List[str]] = None,
                  brief: bool = False):
        """
        Every worker's snapshot, and the backends merged from them (only
        C{ids}, if given; if C{brief}, only what L{mergeBrief} keeps).
        """
        snapshots = yield self._callAll(Snapshot, status=status, ids=ids, brief=brief)
        merge = mergeBrief if brief else mergeBackends
        return snapshots, merge([(i, s["backends"]) for i, s in snapshots])

    def listBackends(self, state=None, match=None, offset: int = 0, limit: int = DEFAULT_PAGE):
        if state is not None and state not in STATES:
            raise APIError(400, f"state: expected one of {', '.join(STATES)}, got {state!r}")
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise APIError(400, f"offset must be at least 0 and limit between 1 and {MAX_PAGE}")

        # Chosen on what little each worker says of every backend; only the
        # page is asked for in full.
        def choose(result):
            _, backends = result
            counts = dict.fromkeys(STATES, 0)
            matched = []
            for backend in backends:
                counts[backend["state"]] += 1
                if state is not None and backend["state"] != state:
                    continue
                if match and match not in backend["url"] and match != backend["id"]:
                    continue
                matched.append(backend)
            answer = {
                "backends": [],
                "total": len(backends),
                "matched": len(matched),
                "offset": offset,
                "limit": limit,
                "counts": counts,
            }
            ids = [b["id"] for b in matched[offset : offset + limit]]
            if not ids:
                return dict(answer, now=self.clock.seconds())
            return self._backends(ids=ids).addCallback(
                lambda result: dict(answer, backends=result[1], now=self.clock.seconds())
            )

        return self._backends(brief=True).addCallback(choose)

    def getBackend(self, backendID: str):
        def find(result):
            for backend in result[1]:
                if backend["id"] == backendID:
                    return backend
            raise APIError(404, f"no backend with id {backendID!r}")

        return self._backends(ids=[backendID]).addCallback(find)

    def addBackend(self, body: Any, peer: str):
        return self._change("addBackend", body, peer)

    def changeBackend(self, backendID: str, body: Any, peer: str):
        return self._change("changeBackend", backendID, body, peer)

    def removeBackend(self, backendID: str, peer: str):
        return self._change("removeBackend", backendID, peer)

    def bulk(self, body: Any, peer: str):
        return self._change("bulk", body, peer)

    def reload(self, peer: str):
        return self._change("reload", peer)

    def status(self):
        def merge(result):
            snapshots, backends = result
            status = mergeStatus([(i, s["status"]) for i, s in snapshots], backends)
            now = self.clock.seconds()
            status.update(uptime=round(now - self.started, 3), started=self.started, now=now,
                          version=__version__)
            keys = ("connections", "connections_total", "requests_total", "requests_per_second")
            sums: Dict[str, Dict[str, float]] = {}
            for _, snapshot in snapshots:
                for listener in snapshot["status"]["listeners"]:
                    counts = sums.setdefault(listener["description"], dict.fromkeys(keys, 0))
                    for key in keys:
                        counts[key] += listener.get(key, 0)
            status["listeners"] = [
                dict(
                    {"description": description, "address": address},
                    **sums.get(description, dict.fromkeys(keys, 0)),
                )
                for description, address in self.pool.addresses()
            ]
            admin = self.adminListener
            status["admin"] = (
                {"description": admin.description, "address": admin.address()}
                if admin is not None
                else None
            )
            answered = dict(snapshots)
            status["workers"] = [
                {
                    "worker": index,
                    "pid": self.pool.pid(index),
                    "answering": index in answered,
                    "in_flight": answered[index]["status"]["totals"]["in_flight"]
                    if index in answered else None,
                    "up": sum(1 for b in answered[index]["backends"] if b["state"] == UP)
                    if index in answered else None,
                }
                for index in range(1, self.pool.count + 1)
            ]
            return status

        return self._backends(status=True, brief=True).addCallback(merge)


class WorkersMetrics:
    """
    The metrics of every worker as one balancer's (L{mergeMetrics}).
    """

    def __init__(self, api: WorkersAPI) -> None:
        self.api = api

    def render(self, openMetrics: bool = False):
        d = maybeDeferred(self.api._callAll, Render, openMetrics=openMetrics)
        return d.addCallback(
            lambda texts: mergeMetrics(texts, openMetrics, len(self.api.workers())).encode("utf-8")
        )
