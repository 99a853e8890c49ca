"""
Listening ports as services, shared by the client listeners and the admin
listener: a port that cannot listen stops the start with one line, and a
port that listens says where (useful with port 0).
"""

import sys
from typing import Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger


def cannotStart(message: str) -> SystemExit:
    """
    Say why the balancer cannot start, in one line, where the operator will
    see it: once twistd runs the services, C{sys.stderr} goes to its log,
    and the terminal is only C{sys.__stderr__}.
    """
    print(f"rrbalancer: {message}", file=sys.__stderr__, flush=True)
    return SystemExit(1)


def describeAddress(address) -> Optional[str]:
    """
    C{127.0.0.1:8000}, C{[::1]:8000} or C{unix:/path}.
    """
    if address is None:
        return None
    host = getattr(address, "host", None)
    if host is not None:
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{address.port}"
    name = getattr(address, "name", None)
    if name is not None:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}"
    return str(address)


class _RecordingEndpoint:
    """
    Passes C{listen} on, and hands the port it gives to the listener.
    """

    def __init__(self, endpoint, listener: "Listener") -> None:
        self._endpoint = endpoint
        self._listener = listener

    def listen(self, factory) -> Deferred:
        def listening(port):
            self._listener._listening(port)
            return port

        return self._endpoint.listen(factory).addCallback(listening)


class Listener(StreamServerEndpointService):
    """
    One listening port.

    @ivar description: the endpoint description, as the operator wrote it.
    @ivar role: C{client} or C{admin}, for the operator's eyes.
    @ivar serverEndpoint: the endpoint it listens on.
    @ivar port: the listening port, once it listens.
    """

    _raiseSynchronously = True
    port = None
    log = Logger()

    def __init__(self, description: str, endpoint, factory, role: str = "client") -> None:
        StreamServerEndpointService.__init__(
            self, _RecordingEndpoint(endpoint, self), factory
        )
        self.serverEndpoint = endpoint
        self.description = description
        self.role = role
        self._label = f"--{role} {description}" if role != "client" else description
        self.setName(f"{role} listener {description}")

    def _listening(self, port) -> None:
        self.port = port
        self.log.info(
            "{role} listener on {address} ({description})",
            role=self.role,
            address=self.address(),
            description=self.description,
        )

    def privilegedStartService(self):
        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            reason = e.socketError
            reason = getattr(reason, "strerror", None) or str(reason)
            raise cannotStart(f"cannot listen on {self._label}: {reason}")
        except Exception as e:
            raise cannotStart(f"cannot listen on {self._label}: {e}")

    def stopService(self):
        self.port = None
        return StreamServerEndpointService.stopService(self)

    def address(self) -> Optional[str]:
        """
        Where it listens, or None when it does not.
        """
        return describeAddress(self.port.getHost()) if self.port is not None else None
