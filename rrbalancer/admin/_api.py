"""
What the admin API does, apart from HTTP: the JSON shapes of backends and
status, and the changes it makes to the group, each checked, applied and
logged with who asked.

The field names of the answers are a public contract.  Every error is an
L{APIError} whose message names the problem, and a request that fails
changes nothing.
"""

import copy
import json
from typing import Any, Dict, List, Optional, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from .. import __version__
from ..backends import API, DISABLED, DRAINING, STATES, UP, Backend, BackendGroup
from ..config import BackendConfig, ConfigError, parseBackendURL
from ..interfaces import IAdminAPI
from ..reload import Reloader
from ..site import listenerKey

PATCH_STATES = (DRAINING, DISABLED, UP)
# A page of GET /api/backends: by default, and at the most.
DEFAULT_PAGE = 500
MAX_PAGE = 10000


class APIError(Exception):
    """
    An answer other than success: C{code} and the message for C{"error"}.

    @ivar allow: for a 405, the methods the path takes.
    """

    allow = b""

    def __init__(self, code: int, message: str) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def backendJSON(backend: Backend) -> Dict[str, Any]:
    """
    One backend as the API shows it.
    """
    stats = backend.stats
    group = backend._group
    return {
        "id": backend.id,
        "url": backend.url,
        "weight": backend.weight,
        "backup": backend.backup,
        "state": backend.state,
        "healthy": backend.healthy,
        "active": backend.active,
        "requests": backend.requests,
        "failures": backend.failures,
        "last_check": backend.lastCheck,
        "last_error": backend.lastError,
        "latency_ms": stats.latency(),
        "requests_per_second": round(stats.requestsPerSecond(), 3),
        "error_rate": round(stats.errorRate(), 4),
        "last_change": backend.lastChange,
        "last_change_reason": backend.lastChangeReason,
        "removing": backend.removing,
        "sources": list(backend.owners),
        "history": stats.history(),
        # The rest of what HAProxy's stats page shows of a server.
        "responses": dict(stats.responses),
        "bytes_in": stats.bytesIn,
        "bytes_out": stats.bytesOut,
        "peak_active": backend.peakActive,
        "tunnels": backend.tunnels.open,
        "tunnels_total": backend.tunnels.opened,
        "tunnel_bytes_to_backend": backend.tunnels.toBackend,
        "tunnel_bytes_to_client": backend.tunnels.toClient,
        "protocol_errors": backend.protocolErrors,
        "connections": _connections(backend),
        "last_check_code": backend.lastCheckCode,
        "last_check_ms": (
            round(backend.lastCheckDuration * 1000, 3)
            if backend.lastCheckDuration is not None
            else None
        ),
        "times_down": backend.timesDown,
        "downtime": round(backend.downtime(), 3),
        # Apart from the checks: failures on client requests, and what the
        # balancing policy makes of the backend.
        "consecutive_failures": backend.consecutiveFailures,
        "ejections": backend.ejections,
        "ejected_until": backend.ejectedUntil,
        "weight_ramp": round(group.rampFraction(backend), 3) if group is not None else 1.0,
        "policy": _policyFigures(group, backend),
    }


def _queueJSON(group: BackendGroup) -> Optional[Dict[str, Any]]:
    queue = group.requestQueue
    if queue is None:
        return None
    return {
        "max_conns": group.maxConns,
        "size": queue.size,
        "timeout": queue.timeout,
        "waiting": len(queue),
        "peak": queue.peak,
        "full_backends": group.full,
        **queue.counts,
    }


def _policyFigures(group: Optional[BackendGroup], backend: Backend) -> Dict[str, Any]:
    figures = getattr(group.policy, "figures", None) if group is not None else None
    return figures(backend) if figures is not None else {}


def _connections(backend: Backend) -> Optional[Dict[str, Any]]:
    """
    The backend's connections: open, idle, the limit (0: none), and the
    requests waiting for one.
    """
    pool = backend.pool
    if pool is None:
        return None
    return {
        "open": pool.openCount,
        "idle": pool.idleCount,
        "limit": pool.maxConnections,
        "queue": pool.waitingCount,
        "queue_peak": pool.peakWaiting,
    }


def _snapshot(backend: Backend) -> Dict[str, Any]:
    """
    What a change is logged as, before and after.
    """
    return {"state": backend.state, "weight": backend.weight, "backup": backend.backup}


def _weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise APIError(400, f"weight: expected a whole number greater than 0, got {value!r}")
    return value


def _checkFields(body: Dict[str, Any], allowed: Tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise APIError(
            400,
            f"unknown field {unknown[0]!r} (expected {', '.join(allowed)})",
        )


@implementer(IAdminAPI)
class AdminAPI:
    """
    What the admin endpoints do, apart from HTTP.

    @param service: the L{rrbalancer.service.BalancerService} whose
        listeners, site and settings the status shows, or None.
    @param healthChecker: checks a backend added or enabled at once (an
        L{IHealthChecker}), or None.
    @param discovery: the discovery sources' service
        (L{rrbalancer.discovery.Discovery}), or None without sources.
    """

    log = Logger()

    def __init__(
        self,
        group: BackendGroup,
        clock,
        reloader: Optional[Reloader] = None,
        service=None,
        healthChecker=None,
        discovery=None,
    ) -> None:
        self.group = group
        self.clock = clock
        self.reloader = reloader
        self.service = service
        self.healthChecker = healthChecker
        self.discovery = discovery
        self.started = clock.seconds()
        self.poolName: Optional[str] = None

    def inPool(self, name: Optional[str]) -> "AdminAPI":
        """
        The same API over one pool's backends (L{rrbalancer.pools}): this
        one for None and for the default pool.
        """
        pools = getattr(self.service, "pools", None)
        if name is None or (pools is None and name == "default"):
            return self
        if not isinstance(name, str):
            raise APIError(400, f"pool: expected a pool's name, got {name!r}")
        balancer = pools.balancers.get(name) if pools is not None else None
        if balancer is None:
            raise APIError(404, f"pool: no pool named {name!r}")
        if balancer.group is self.group:
            return self
        api = copy.copy(self)
        api.group = balancer.group
        api.healthChecker = balancer.healthChecker
        api.poolName = name
        return api

    def checkNow(self, backend: Backend) -> None:
        """
        Check a backend soon rather than at the next interval (a new
        backend then takes traffic as soon as it can): at once, or paced
        when many come at once (see L{HealthChecker.checkSoon}).
        """
        checker = self.healthChecker
        if checker is not None and self.group.health.enabled:
            checker.checkSoon(backend)

    def _backend(self, backendID: str) -> Backend:
        backend = self.group.get(backendID)
        if backend is None:
            raise APIError(404, f"no backend with id {backendID!r}")
        return backend

    def _logChange(self, peer: str, action: str, backend: Backend, before, after) -> None:
        self.log.info(
            "admin {peer}: {action} backend {id} {url}{where}: {before} -> {after}",
            peer=peer,
            action=action,
            id=backend.id,
            url=backend.url,
            where=f" of pool {self.poolName}" if self.poolName else "",
            before=json.dumps(before, sort_keys=True) if before else "absent",
            after=json.dumps(after, sort_keys=True) if after else "removed",
        )

    # -- endpoints ----------------------------------------------------------

    def listBackends(
        self,
        state: Optional[str] = None,
        match: Optional[str] = None,
        offset: int = 0,
        limit: int = DEFAULT_PAGE,
    ) -> Dict[str, Any]:
        """
        A page of the backends, in the order they were added, with the
        totals a large set needs: how many there are, how many match, and
        how many are in each state.

        @param state: only backends in this state.
        @param match: only backends whose URL or id contains this text.
        """
        if state is not None and state not in STATES:
            raise APIError(400, f"state: expected one of {', '.join(STATES)}, got {state!r}")
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise APIError(
                400, f"offset must be at least 0 and limit between 1 and {MAX_PAGE}"
            )
        counts = dict.fromkeys(STATES, 0)
        matched = []
        total = 0
        for backend in self.group:
            total += 1
            current = backend.state
            counts[current] += 1
            if state is not None and current != state:
                continue
            if match and match not in backend.url and match != backend.id:
                continue
            matched.append(backend)
        return {
            "backends": [backendJSON(b) for b in matched[offset : offset + limit]],
            "total": total,
            "matched": len(matched),
            "offset": offset,
            "limit": limit,
            "counts": counts,
            "now": self.clock.seconds(),
        }

    def bulk(self, body: Any, peer: str) -> Dict[str, Any]:
        """
        Add, change and remove many backends in one request, all or
        nothing: every item is checked before any is applied.

        C{{"add": [{"url", "weight", "backup"}...], "change": [{"id" or
        "url", "state", "weight"}...], "remove": [id or url...]}}
        """
        if not isinstance(body, dict):
            raise APIError(400, 'expected a JSON object such as {"add": [...], "remove": [...]}')
        _checkFields(body, ("add", "change", "remove"))
        for key in body:
            if not isinstance(body[key], list):
                raise APIError(400, f"{key}: expected a list")
        seen: Dict[tuple, int] = {}
        adds = []
        for n, item in enumerate(body.get("add", [])):
            config = self._newBackend(item, f"add[{n}]")
            existing = self.group.byServer(config)
            if existing is not None:
                raise APIError(409, f"add[{n}]: backend {config.url} already exists (id {existing.id})")
            if config.server in seen:
                raise APIError(400, f"add[{n}]: {config.url} is also add[{seen[config.server]}]")
            seen[config.server] = n
            adds.append(config)
        changes = []
        for n, item in enumerate(body.get("change", [])):
            if not isinstance(item, dict):
                raise APIError(400, f"change[{n}]: expected a JSON object")
            _checkFields(item, ("id", "url", "state", "weight"))
            backend = self._find(item.get("id", item.get("url")), f"change[{n}]")
            state = item.get("state")
            if "state" in item and state not in PATCH_STATES:
                raise APIError(400, f"change[{n}]: state: expected one of {', '.join(PATCH_STATES)}")
            weight = _weight(item["weight"]) if "weight" in item else None
            changes.append((backend, state, weight))
        removes = [self._find(item, f"remove[{n}]") for n, item in enumerate(body.get("remove", []))]
        reason = f"bulk change by {peer}"
        added = []
        for config in adds:
            backend = self.group.add(config, awaitCheck=True, reason=reason, owner=API)
            self.checkNow(backend)
            added.append(backend.id)
        for backend, state, weight in changes:
            if backend.removing:
                continue
            if weight is not None:
                self.group.reconfigure(backend, weight, backend.backup)
            if state is not None:
                wasDisabled = backend.adminState == DISABLED
                backend.setAdminState(state, reason)
                if wasDisabled and state != DISABLED:
                    self.checkNow(backend)
            self._share(backend, state, weight)
        for backend in removes:
            self.group.retire(backend, reason)
        self.log.info(
            "admin {peer}: bulk change{where}: {added} added, {changed} changed, {removed} removed",
            peer=peer,
            where=f" of pool {self.poolName}" if self.poolName else "",
            added=len(added),
            changed=len(changes),
            removed=len(removes),
        )
        return {
            "added": added,
            "changed": [b.id for b, _, _ in changes],
            "removed": [b.id for b in removes],
        }

    def _find(self, key: Any, where: str) -> Backend:
        """
        A backend named by its id or its URL.
        """
        if not isinstance(key, str):
            raise APIError(400, f"{where}: expected a backend id or URL, got {key!r}")
        backend = self.group.get(key)
        if backend is None and "://" in key:
            try:
                backend = self.group.byURL(parseBackendURL(key, where))
            except ConfigError as e:
                raise APIError(400, str(e)) from None
        if backend is None:
            raise APIError(404, f"{where}: no backend {key!r}")
        return backend

    def getBackend(self, backendID: str) -> Dict[str, Any]:
        return backendJSON(self._backend(backendID))

    def _newBackend(self, body: Any, where: str = "") -> BackendConfig:
        """
        A backend to add, as a request describes it.
        """
        prefix = f"{where}: " if where else ""
        if not isinstance(body, dict):
            raise APIError(
                400, prefix + "expected a JSON object such as {\"url\": \"http://10.0.0.5:8080\"}"
            )
        _checkFields(body, ("url", "weight", "backup"))
        if "url" not in body:
            raise APIError(400, prefix + "url: missing")
        if not isinstance(body["url"], str):
            raise APIError(400, prefix + f"url: expected a string, got {body['url']!r}")
        try:
            url = parseBackendURL(body["url"], "url")
        except ConfigError as e:
            raise APIError(400, prefix + str(e)) from None
        weight = _weight(body.get("weight", 1))
        backup = body.get("backup", False)
        if not isinstance(backup, bool):
            raise APIError(400, prefix + f"backup: expected true or false, got {backup!r}")
        return BackendConfig(url=url, weight=weight, backup=backup)

    def addBackend(self, body: Any, peer: str) -> Dict[str, Any]:
        config = self._newBackend(body)
        url = config.url
        existing = self.group.byServer(config)
        if existing is not None:
            detail = " and is being removed" if existing.removing else ""
            raise APIError(
                409, f"backend {url} already exists (id {existing.id}){detail}"
            )
        backend = self.group.add(
            config, awaitCheck=True, reason=f"added by {peer}", owner=API
        )
        self._logChange(peer, "added", backend, None, _snapshot(backend))
        self.checkNow(backend)
        return backendJSON(backend)

    def changeBackend(self, backendID: str, body: Any, peer: str) -> Dict[str, Any]:
        backend = self._backend(backendID)
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object such as {\"state\": \"draining\"}")
        _checkFields(body, ("state", "weight"))
        if not body:
            raise APIError(400, "nothing to change: give state, weight or both")
        state = body.get("state")
        if "state" in body and state not in PATCH_STATES:
            raise APIError(
                400,
                f"state: expected one of {', '.join(PATCH_STATES)}, got {state!r}",
            )
        weight = _weight(body["weight"]) if "weight" in body else None
        if backend.removing:
            raise APIError(409, f"backend {backend.id} is being removed")
        before = _snapshot(backend)
        if weight is not None:
            self.group.reconfigure(backend, weight, backend.backup)
        if state is not None:
            wasDisabled = backend.adminState == DISABLED
            verb = {UP: "enabled", DRAINING: "drained", DISABLED: "disabled"}[state]
            backend.setAdminState(state, f"{verb} by {peer}")
            if wasDisabled and state != DISABLED:
                self.checkNow(backend)
        self._logChange(peer, "changed", backend, before, _snapshot(backend))
        self._share(backend, state, weight)
        return backendJSON(backend)

    def _share(self, backend: Backend, state: Optional[str], weight: Optional[int]) -> None:
        """
        A change of a backend an etcd prefix lists goes back to etcd too, so
        that every balancer watching the prefix makes it.
        """
        if self.discovery is not None:
            self.discovery.share(backend, state, weight)

    def removeBackend(self, backendID: str, peer: str) -> None:
        backend = self._backend(backendID)
        if backend.removing:
            return
        before = _snapshot(backend)
        inFlight, tunnels = backend.active, backend.tunnels.open
        self.group.retire(backend, f"removed by {peer}")
        self.log.info(
            "admin {peer}: removing backend {id} {url}{where} once its {n} requests "
            "in flight end and its {t} tunnels close: {before} -> removed",
            peer=peer,
            id=backend.id,
            url=backend.url,
            where=f" of pool {self.poolName}" if self.poolName else "",
            n=inFlight,
            t=tunnels,
            before=json.dumps(before, sort_keys=True),
        )

    def reload(self, peer: str) -> Dict[str, Any]:
        if self.reloader is None or not self.reloader.canReload:
            raise APIError(
                409,
                "reload: the balancer was started without --config, so there is "
                "no file to read again",
            )
        try:
            result = self.reloader.reload(f"API, {peer}")
        except ConfigError as e:
            raise APIError(400, f"{e}; the running configuration stays") from None
        return dict(result, reloaded=True)

    def discoverySources(self) -> List[Dict[str, Any]]:
        """
        Each discovery source: its URL and kind, its state (C{starting},
        C{ok}, C{failing}) and since when, its last answer and error, the
        backends it gives, and when it asks next.
        """
        return self.discovery.status() if self.discovery is not None else []

    def status(self) -> Dict[str, Any]:
        now = self.clock.seconds()
        backends = list(self.group)
        service = self.service
        listeners: List[Dict[str, Any]] = []
        admin = None
        inFlight = None
        config = None
        limits: List[Dict[str, Any]] = []
        routing: Dict[str, Any] = {"pools": [], "routes": []}
        if service is not None:
            if getattr(service, "pools", None) is not None:
                routing = service.pools.status()
            for limiter in service.balancer.limits.limiters:
                limits.append(
                    {"limit": limiter.limit.describe(), "keys": len(limiter),
                     "requests": dict(limiter.counts)}
                )
            for listener in service.listeners:
                address = listener.address()
                key = listenerKey(listener.port.getHost()) if listener.port is not None else None
                counts = service.site.connections.get(key)
                opened, accepted = counts[:2] if counts is not None else (0, 0)
                listeners.append(
                    {
                        "description": listener.description,
                        "address": address,
                        "connections": opened,
                        "connections_total": accepted,
                        "requests_total": counts[2].total if counts is not None else 0,
                        "requests_per_second": (
                            round(counts[2].perSecond(), 3) if counts is not None else 0.0
                        ),
                    }
                )
            adminListener = service.adminListener
            if adminListener is not None:
                admin = {
                    "description": adminListener.description,
                    "address": adminListener.address(),
                }
            inFlight = service.site.inFlight
            config = service.config.configPath
        responses: Dict[str, int] = {}
        for b in backends:
            for kind, count in b.stats.responses.items():
                responses[kind] = responses.get(kind, 0) + count
        health = self.group.health
        return {
            "version": __version__,
            "uptime": round(now - self.started, 3),
            "started": self.started,
            "now": now,
            "listeners": listeners,
            "admin": admin,
            "config": config,
            "balance": self.group.policy.name,
            "panic": {
                "threshold": self.group.panicThreshold,
                "active": self.group.panicking,
                "times": self.group.panics,
            },
            "slow_start": self.group.slowStart,
            "rate_limits": limits,
            "pools": routing["pools"],
            "routes": routing["routes"],
            "mirrors": routing.get("mirrors"),
            "queue": _queueJSON(self.group),
            "ejection": {
                "after": self.group.ejection.after,
                "time": self.group.ejection.time,
                "on_5xx": self.group.ejection.on5xx,
                "max_percent": self.group.ejection.maxPercent,
                "ejected": self.group.ejected,
            },

            "discovery": self.discoverySources(),
            "health_checks": {
                "enabled": health.enabled,
                "path": health.path,
                "interval": health.interval,
                "timeout": health.timeout,
                "rise": health.rise,
                "fall": health.fall,
            },
            "totals": {
                "backends": len(backends),
                "up": sum(1 for b in backends if b.state == UP),
                "available": sum(1 for b in backends if b.available),
                "requests": sum(b.requests for b in backends),
                "failures": sum(b.failures for b in backends),
                "active": sum(b.active for b in backends),
                "tunnels": sum(b.tunnels.open for b in backends),
                "in_flight": inFlight,
                "retries": self.group.retries,
                "requests_per_second": round(
                    sum(b.stats.requestsPerSecond() for b in backends), 3
                ),
                "responses": responses,
            },
        }
