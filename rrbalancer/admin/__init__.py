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
    GET    /api/discovery           the discovery sources and how they do

What the endpoints do is L{AdminAPI} (in C{_api}), who may call them is
C{_guards}, and the web face that routes to them is L{AdminResource} (in
C{_resource}).
"""

from ._api import AdminAPI, APIError, backendJSON
from ._resource import AdminResource, makeAdminSite

__all__ = ["APIError", "AdminAPI", "AdminResource", "backendJSON", "makeAdminSite"]
