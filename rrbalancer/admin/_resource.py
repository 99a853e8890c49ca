"""
The admin listener's web face: routes each request to the API, the
metrics or the dashboard's files, and turns answers and L{APIError}s into
JSON.
"""

import csv
import io
import json
import os
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..listeners import describeAddress
from ..metrics import MetricsResource
from ..site import BalancerSite
from ..interfaces import IAdminAPI
from ._api import DEFAULT_PAGE, APIError
from ._guards import TokenCheck, refusal

DASHBOARD_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard"
)
DASHBOARD_FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Bodies of admin requests are JSON objects; a bulk change of tens of
# thousands of backends is the largest.
MAX_BODY = 8 * 1024 * 1024
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


class AdminResource(Resource):
    """
    The admin listener's only resource: checks the token, routes, and turns
    answers and L{APIError}s into JSON.

    @param token: the admin token, or None when none is needed.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, api: IAdminAPI, metrics: Resource, token: Optional[bytes] = None) -> None:
        Resource.__init__(self)
        self.api = api
        self.metrics = metrics
        self._token = TokenCheck(token)
        self.assets = {}
        for name, contentType in DASHBOARD_FILES.items():
            with open(os.path.join(DASHBOARD_DIR, name), "rb") as f:
                self.assets[name] = (f.read(), contentType)
        # (path pattern, {method: handler}); "{id}" matches one segment,
        # given to the handler.
        self._routes = [
            (("api", "status"), {b"GET": self._status}),
            (("api", "reload"), {b"POST": self._reload}),
            (("api", "discovery"), {b"GET": self._discovery}),
            (("api", "backends"), {b"GET": self._listBackends, b"POST": self._addBackend}),
            (("api", "backends", "bulk"), {b"POST": self._bulk}),
            (
                ("api", "backends", "{id}"),
                {
                    b"GET": self._getBackend,
                    b"PATCH": self._changeBackend,
                    b"DELETE": self._removeBackend,
                },
            ),
            (("metrics",), {b"GET": lambda request: self.metrics.render_GET(request)}),
        ]

    def render(self, request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"cache-control", b"no-store")
        # Routed on the path itself, whatever traversal the site does.
        segments = [
            s.decode("utf-8", "replace") for s in request.path.split(b"/") if s
        ]
        isPage = not segments or segments[0] not in ("api", "metrics")
        if not self._token.authorized(request):
            challenge = (
                b'Basic realm="rrbalancer admin", charset="UTF-8"'
                if isPage
                else b'Bearer realm="rrbalancer admin"'
            )
            request.setHeader(b"www-authenticate", challenge)
            return self._error(
                request, 401, "missing or wrong token: send Authorization: Bearer <token>"
            )
        refused = refusal(request, self._token.required)
        if refused is not None:
            return self._error(request, *refused)
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        try:
            return self._route(request, method, segments)
        except APIError as e:
            if e.code == 405:
                request.setHeader(b"allow", e.allow)
            return self._error(request, e.code, e.message)

    def _route(self, request, method: bytes, segments: List[str]) -> bytes:
        if not segments:
            return self._asset(request, method, "index.html")
        if len(segments) == 1 and segments[0] in self.assets:
            return self._asset(request, method, segments[0])
        for pattern, handlers in self._routes:
            if len(pattern) != len(segments):
                continue
            args = []
            for part, segment in zip(pattern, segments):
                if part == "{id}":
                    args.append(segment)
                elif part != segment:
                    break
            else:
                self._allow(method, *handlers)
                return handlers[method](request, *args)
        if segments[0] == "api":
            raise APIError(404, f"no such API endpoint: /{'/'.join(segments)}")
        raise APIError(404, f"no such page: /{'/'.join(segments)}")

    # -- the API's endpoints ----------------------------------------------

    def _peer(self, request) -> str:
        return describeAddress(request.getClientAddress()) or "unknown"

    def _status(self, request) -> bytes:
        return self._respond(request, self.api.status(), lambda v: self._json(request, 200, v))

    def _discovery(self, request) -> bytes:
        sources = getattr(self.api, "discoverySources", None)
        if sources is not None:
            return self._json(request, 200, {"sources": sources(), "now": self.api.clock.seconds()})
        # The workers' API: what the status says of them.
        return self._respond(
            request,
            self.api.status(),
            lambda status: self._json(
                request, 200, {"sources": status.get("discovery", []), "now": status["now"]}
            ),
        )

    def _reload(self, request) -> bytes:
        return self._respond(
            request, self.api.reload(self._peer(request)), lambda v: self._json(request, 200, v)
        )

    def _listBackends(self, request) -> bytes:
        args = request.args

        def arg(name: str) -> Optional[str]:
            values = args.get(name.encode("ascii"))
            return values[0].decode("utf-8", "replace") if values else None

        def number(name: str, default: int) -> int:
            value = arg(name)
            if value is None:
                return default
            try:
                return int(value)
            except ValueError:
                raise APIError(400, f"{name}: expected a whole number, got {value!r}") from None

        answer = self._api(request).listBackends(
            state=arg("state"),
            match=arg("q"),
            offset=number("offset", 0),
            limit=number("limit", DEFAULT_PAGE),
        )
        csvWanted = arg("format") == "csv"

        def write(answer) -> bytes:
            if csvWanted:
                request.setHeader(b"content-type", b"text/csv; charset=utf-8")
                request.setHeader(
                    b"content-disposition", b'attachment; filename="rrbalancer-backends.csv"'
                )
                return backendsCSV(answer["backends"])
            return self._json(request, 200, answer)

        return self._respond(request, answer, write)

    def _bulk(self, request) -> bytes:
        body = self._body(request)
        api = self._api(request, body)
        answer = api.bulk(body, self._peer(request))
        return self._respond(request, answer, lambda v: self._json(request, 200, v))

    def _addBackend(self, request) -> bytes:
        body = self._body(request)
        api = self._api(request, body)
        pool = getattr(api, "poolName", None)

        def write(answer) -> bytes:
            location = f"/api/backends/{answer['id']}"
            if pool:
                location += f"?pool={pool}"
            request.setHeader(b"location", location.encode("ascii"))
            return self._json(request, 201, answer)

        return self._respond(request, api.addBackend(body, self._peer(request)), write)

    def _getBackend(self, request, backendID: str) -> bytes:
        return self._respond(
            request, self._api(request).getBackend(backendID), lambda v: self._json(request, 200, v)
        )

    def _changeBackend(self, request, backendID: str) -> bytes:
        # An unknown id is a 404 even when the body is bad too.
        api = self._api(request)
        found = api.getBackend(backendID)

        def change(_):
            body = self._body(request)
            return api.changeBackend(backendID, body, self._peer(request))

        if isinstance(found, Deferred):
            answer = found.addCallback(change)
        else:
            answer = change(found)
        return self._respond(request, answer, lambda v: self._json(request, 200, v))

    def _removeBackend(self, request, backendID: str) -> bytes:
        def write(_) -> bytes:
            request.setResponseCode(204)
            return b""

        return self._respond(
            request, self._api(request).removeBackend(backendID, self._peer(request)), write
        )

    def _api(self, request, body: Any = None):
        """
        The API over the pool a request names: C{?pool=NAME}, or a
        C{"pool"} field of its JSON object (taken out of it); the default
        pool's without either.
        """
        values = request.args.get(b"pool")
        name = values[0].decode("utf-8", "replace") if values else None
        if isinstance(body, dict) and "pool" in body:
            name = body.pop("pool")
        inPool = getattr(self.api, "inPool", None)
        if inPool is None:
            # The workers' API fronts the default pool only.
            if name not in (None, "default"):
                raise APIError(400, f"pool {name!r}: with --workers the API manages the default pool only")
            return self.api
        return inPool(name)

    # -- answers -------------------------------------------------------------

    def _respond(self, request, answer, write) -> bytes:
        """
        C{write(answer)} now, or once a L{Deferred} answer has come (from
        the workers, in the parent of several), as JSON errors if it fails.
        """
        if not isinstance(answer, Deferred):
            return write(answer)
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def failed(failure):
            if failure.check(APIError):
                error = failure.value
                return self._error(request, error.code, error.message)
            self.log.failure("admin request {uri} failed", failure,
                             uri=request.uri.decode("ascii", "replace"))
            return self._error(request, 500, "internal error: see the balancer's log")

        def finish(body: bytes) -> None:
            if gone:
                return
            request.write(body)
            request.finish()

        answer.addCallback(write).addErrback(failed).addCallback(finish)
        answer.addErrback(lambda f: self.log.failure("admin answer not sent", f))
        return NOT_DONE_YET

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

    def _body(self, request) -> Any:
        # Only JSON: a page on another site can send text/plain or a form
        # without asking first (no CORS preflight), never application/json.
        contentType = (request.getHeader(b"content-type") or b"").split(b";", 1)[0]
        if contentType.strip().lower() != b"application/json":
            raise APIError(415, "expected a body of Content-Type: application/json")
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


CSV_COLUMNS = (
    "id", "url", "weight", "backup", "state", "healthy", "active", "peak_active", "tunnels",
    "requests", "failures", "protocol_errors", "bytes_in", "bytes_out",
    "requests_per_second", "error_rate", "times_down", "downtime",
    "last_check", "last_check_code", "last_check_ms", "last_error",
    "last_change", "last_change_reason",
)


def backendsCSV(backends) -> bytes:
    """
    The backends as a spreadsheet reads them: one row each, the columns of
    L{CSV_COLUMNS}, responses by class and latency spread into columns.
    """
    out = io.StringIO()
    classes = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS + tuple(f"responses_{c}" for c in classes) + ("p50_ms", "p99_ms"))
    for b in backends:
        writer.writerow(
            [b[c] for c in CSV_COLUMNS]
            + [b["responses"].get(c, 0) for c in classes]
            + [b["latency_ms"]["p50"], b["latency_ms"]["p99"]]
        )
    return out.getvalue().encode("utf-8")


def makeAdminSite(api: IAdminAPI, metrics, reactor, token: Optional[bytes] = None) -> Site:
    resource = AdminResource(api, MetricsResource(metrics), token)
    site = BalancerSite(resource, reactor, maxBodySize=MAX_BODY)
    site.noisy = False
    return site
