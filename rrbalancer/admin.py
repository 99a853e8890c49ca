"""
The admin listener: a JSON API to see and change the backends at run time,
a live dashboard, and Prometheus metrics.

    GET    /                        the dashboard (and its assets)
    GET    /metrics                 Prometheus metrics
    GET    /api/status              version, uptime, listeners, totals
    GET    /api/backends            every backend
    POST   /api/backends            add one: {"url", "weight", "backup"}
    GET    /api/backends/{id}       one backend
    PATCH  /api/backends/{id}       {"state": "draining"|"disabled"|"up", "weight": N}
    DELETE /api/backends/{id}       drain it, then forget it
    POST   /api/reload              read the --config file again

The field names of the answers are a public contract.  Every error is a
JSON C{{"error": "..."}} that names the problem, and a request that fails
changes nothing.  Every change is logged with who asked (the peer), what,
and the state before and after.

Security: with C{--admin-token-file}, every request must carry
C{Authorization: Bearer <token>} (or, for a browser, HTTP Basic auth with
the token as password); without a token the listener must be on loopback
(checked by L{rrbalancer.config.buildConfig}), and then requests whose
C{Host} is not a loopback name are refused, so that a web page cannot reach
it by DNS rebinding.  A change whose C{Origin} is another site is refused
(no cross-site request forgery).
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import os
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from . import __version__
from .backends import DISABLED, DRAINING, UP, Backend, BackendGroup
from .config import BackendConfig, ConfigError, parseBackendURL
from .listeners import describeAddress
from .metrics import MetricsResource
from .reload import Reloader, findServer
from .site import BalancerSite

DASHBOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
DASHBOARD_FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Bodies of admin requests are small JSON objects.
MAX_BODY = 64 * 1024
SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"content-security-policy": (
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
        b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'; form-action 'self'"
    ),
}
PATCH_STATES = (DRAINING, DISABLED, UP)
LOOPBACK_NAMES = ("localhost", "localhost.")


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
        "history": stats.history(),
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


class AdminAPI:
    """
    What the admin endpoints do, apart from HTTP.

    @param service: the L{rrbalancer.service.BalancerService} whose
        listeners, site and settings the status shows, or None.
    @param healthChecker: checks a backend added or enabled at once (an
        L{IHealthChecker}), or None.
    """

    log = Logger()

    def __init__(
        self,
        group: BackendGroup,
        clock,
        reloader: Optional[Reloader] = None,
        service=None,
        healthChecker=None,
    ) -> None:
        self.group = group
        self.clock = clock
        self.reloader = reloader
        self.service = service
        self.healthChecker = healthChecker
        self.started = clock.seconds()

    def checkNow(self, backend: Backend) -> None:
        """
        Check a backend at once rather than at the next interval (a new
        backend then takes traffic as soon as it can).
        """
        checker = self.healthChecker
        if checker is not None and self.group.health.enabled:
            checker.check(backend)

    def _backend(self, backendID: str) -> Backend:
        backend = self.group.get(backendID)
        if backend is None:
            raise APIError(404, f"no backend with id {backendID!r}")
        return backend

    def _logChange(self, peer: str, action: str, backend: Backend, before, after) -> None:
        self.log.info(
            "admin {peer}: {action} backend {id} {url}: {before} -> {after}",
            peer=peer,
            action=action,
            id=backend.id,
            url=backend.url,
            before=json.dumps(before, sort_keys=True) if before else "absent",
            after=json.dumps(after, sort_keys=True) if after else "removed",
        )

    # -- endpoints ----------------------------------------------------------

    def listBackends(self) -> Dict[str, Any]:
        return {
            "backends": [backendJSON(b) for b in self.group],
            "now": self.clock.seconds(),
        }

    def getBackend(self, backendID: str) -> Dict[str, Any]:
        return backendJSON(self._backend(backendID))

    def addBackend(self, body: Any, peer: str) -> Dict[str, Any]:
        if not isinstance(body, dict):
            raise APIError(400, "expected a JSON object such as {\"url\": \"http://10.0.0.5:8080\"}")
        _checkFields(body, ("url", "weight", "backup"))
        if "url" not in body:
            raise APIError(400, "url: missing")
        if not isinstance(body["url"], str):
            raise APIError(400, f"url: expected a string, got {body['url']!r}")
        try:
            url = parseBackendURL(body["url"], "url")
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        weight = _weight(body.get("weight", 1))
        backup = body.get("backup", False)
        if not isinstance(backup, bool):
            raise APIError(400, f"backup: expected true or false, got {backup!r}")
        config = BackendConfig(url=url, weight=weight, backup=backup)
        existing = findServer(self.group, config)
        if existing is not None:
            detail = " and is being removed" if existing.removing else ""
            raise APIError(
                409, f"backend {url} already exists (id {existing.id}){detail}"
            )
        backend = self.group.add(config, awaitCheck=True, reason=f"added by {peer}")
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
        return backendJSON(backend)

    def removeBackend(self, backendID: str, peer: str) -> None:
        backend = self._backend(backendID)
        if backend.removing:
            return
        before = _snapshot(backend)
        inFlight = backend.active
        self.group.retire(backend, f"removed by {peer}")
        self.log.info(
            "admin {peer}: removing backend {id} {url} once its {n} requests in "
            "flight end: {before} -> removed",
            peer=peer,
            id=backend.id,
            url=backend.url,
            n=inFlight,
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

    def status(self) -> Dict[str, Any]:
        now = self.clock.seconds()
        backends = list(self.group)
        service = self.service
        listeners: List[Dict[str, Any]] = []
        admin = None
        inFlight = None
        config = None
        if service is not None:
            for listener in service.listeners:
                listeners.append(
                    {"description": listener.description, "address": listener.address()}
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
                "in_flight": inFlight,
                "retries": self.group.retries,
                "requests_per_second": round(
                    sum(b.stats.requestsPerSecond() for b in backends), 3
                ),
                "responses": responses,
            },
        }


def _hostname(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def _isLoopbackName(host: str) -> bool:
    host = host.lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminResource(Resource):
    """
    The admin listener's only resource: checks the token, routes, and turns
    answers and L{APIError}s into JSON.

    @param token: the admin token, or None when none is needed.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, api: AdminAPI, metrics: Resource, token: Optional[bytes] = None) -> None:
        Resource.__init__(self)
        self.api = api
        self.metrics = metrics
        self._tokenDigest = hashlib.sha256(token).digest() if token is not None else None
        self.assets = {}
        for name, contentType in DASHBOARD_FILES.items():
            with open(os.path.join(DASHBOARD_DIR, name), "rb") as f:
                self.assets[name] = (f.read(), contentType)

    # -- guards -------------------------------------------------------------

    def _authorized(self, request) -> bool:
        """
        Compare the presented token with ours in constant time (as digests,
        so that not even its length shows).
        """
        if self._tokenDigest is None:
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
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._tokenDigest)

    def _refusal(self, request) -> Optional[Tuple[int, str]]:
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        # (No Host at all is no browser's request: HTTP/1.0 tools.)
        if self._tokenDigest is None and host and not _isLoopbackName(_hostname(host)):
            return (
                403,
                f"Host {host!r} is not a loopback name; without a token the admin "
                "API answers only requests to 127.0.0.1, [::1] or localhost",
            )
        if request.method not in (b"GET", b"HEAD"):
            origin = request.getHeader(b"origin")
            if origin is not None:
                origin = origin.decode("latin-1")
                if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                    return (403, f"cross-origin request from {origin} refused")
        return None

    # -- rendering ----------------------------------------------------------

    def render(self, request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"cache-control", b"no-store")
        # Routed on the path itself, whatever traversal the site does.
        segments = [
            s.decode("utf-8", "replace") for s in request.path.split(b"/") if s
        ]
        isPage = not segments or segments[0] not in ("api", "metrics")
        if not self._authorized(request):
            challenge = (
                b'Basic realm="rrbalancer admin", charset="UTF-8"'
                if isPage
                else b'Bearer realm="rrbalancer admin"'
            )
            request.setHeader(b"www-authenticate", challenge)
            return self._error(
                request, 401, "missing or wrong token: send Authorization: Bearer <token>"
            )
        refused = self._refusal(request)
        if refused is not None:
            return self._error(request, *refused)
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        try:
            if not segments:
                return self._asset(request, method, "index.html")
            if segments == ["metrics"]:
                self._allow(method, b"GET")
                return self.metrics.render_GET(request)
            if segments[0] == "api":
                return self._api(request, method, segments[1:])
            if len(segments) == 1 and segments[0] in self.assets:
                return self._asset(request, method, segments[0])
            raise APIError(404, f"no such page: /{'/'.join(segments)}")
        except APIError as e:
            if e.code == 405:
                request.setHeader(b"allow", e.allow)
            return self._error(request, e.code, e.message)

    def _allow(self, method: bytes, *allowed: bytes) -> None:
        if method not in allowed:
            error = APIError(405, f"method {method.decode('ascii', 'replace')} not allowed here")
            error.allow = b", ".join(allowed)
            raise error

    def _asset(self, request, method: bytes, name: str) -> bytes:
        self._allow(method, b"GET")
        body, contentType = self.assets[name]
        request.setHeader(b"content-type", contentType.encode("ascii"))
        request.setHeader(b"cache-control", b"no-cache")
        return body

    def _api(self, request, method: bytes, path: List[str]) -> bytes:
        api = self.api
        peer = describeAddress(request.getClientAddress()) or "unknown"
        if path == ["status"]:
            self._allow(method, b"GET")
            return self._json(request, 200, api.status())
        if path == ["reload"]:
            self._allow(method, b"POST")
            return self._json(request, 200, api.reload(peer))
        if path == ["backends"]:
            self._allow(method, b"GET", b"POST")
            if method == b"GET":
                return self._json(request, 200, api.listBackends())
            answer = api.addBackend(self._body(request), peer)
            request.setHeader(b"location", f"/api/backends/{answer['id']}".encode("ascii"))
            return self._json(request, 201, answer)
        if len(path) == 2 and path[0] == "backends":
            backendID = path[1]
            self._allow(method, b"GET", b"PATCH", b"DELETE")
            if method == b"GET":
                return self._json(request, 200, api.getBackend(backendID))
            if method == b"PATCH":
                # An unknown id is a 404 even when the body is bad too.
                api._backend(backendID)
                return self._json(
                    request, 200, api.changeBackend(backendID, self._body(request), peer)
                )
            api.removeBackend(backendID, peer)
            request.setResponseCode(204)
            return b""
        raise APIError(404, f"no such API endpoint: /api/{'/'.join(path)}")

    def _body(self, request) -> Any:
        content = request.content
        data = content.read(MAX_BODY + 1) if content is not None else b""
        if len(data) > MAX_BODY:
            raise APIError(413, f"request body over {MAX_BODY} bytes")
        if not data.strip():
            raise APIError(400, "request body is empty: expected a JSON object")
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "request body is not UTF-8") from None
        except ValueError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None

    def _json(self, request, code: int, value: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode("utf-8") + b"\n"

    def _error(self, request, code: int, message: str) -> bytes:
        return self._json(request, code, {"error": message})


def makeAdminSite(api: AdminAPI, registry, reactor, token: Optional[bytes] = None) -> Site:
    resource = AdminResource(api, MetricsResource(registry), token)
    site = BalancerSite(resource, reactor, maxBodySize=MAX_BODY)
    site.noisy = False
    return site
