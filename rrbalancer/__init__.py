"""
rrbalancer: a round-robin HTTP load balancer that runs as a twistd plugin,
or inside any Twisted program's own web site (L{Balancer}).
"""

__version__ = "0.1.0"

# Before anything imports twisted.internet.endpoints (see _systemd).
from ._systemd import nameInheritedSockets  # noqa: E402

nameInheritedSockets()

from .balancer import Balancer  # noqa: E402 - after the version setup.cfg reads
from .proxy import BackendProxyResource  # noqa: E402

__all__ = ["Balancer", "BackendProxyResource", "__version__"]
