"""
Backends and the group they belong to.

A L{Backend} keeps what the balancer knows of one server: whether checks
think it is healthy, what the operator wants of it, and its counters.  The
L{BackendGroup} owns the backends and answers the one question the proxy
asks per request: which backend next?
"""

from typing import Callable, Collection, Dict, Iterator, List, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import BackendConfig, HealthConfig
from .selection import SmoothWeightedRoundRobin

UP = "up"
DOWN = "down"
DRAINING = "draining"
DISABLED = "disabled"


class Backend:
    """
    One server behind the balancer.

    Health follows HAProxy's rise/fall rule: C{fall} failures in a row take a
    healthy backend out, C{rise} passes in a row bring it back, and a
    failure or pass resets the other count.  Active checks and passive
    failures (a connection the proxy could not open) feed the same counts.

    @ivar pool: the connections to this backend, kept alive between
        requests (see L{rrbalancer.client.ConnectionPool}).
    @ivar resource: the L{rrbalancer.proxy.BackendProxyResource} that
        forwards requests to it.
    """

    log = Logger()

    def __init__(
        self,
        backendID: str,
        config: BackendConfig,
        health: HealthConfig,
        clock: IReactorTime,
    ) -> None:
        self.id = backendID
        self.config = config
        self.url = config.url
        self.weight = config.weight
        self.backup = config.backup
        self.pool = None
        self.resource = None
        self._health = health
        self._clock = clock
        self.healthy = True
        self.adminState = UP
        self.active = 0
        self.requests = 0
        self.failures = 0
        self.lastCheck: Optional[float] = None
        self.lastError: Optional[str] = None
        self.lastChange = clock.seconds()
        self.lastChangeReason = "configured"
        self._passes = 0
        self._fails = 0

    def __repr__(self) -> str:
        return f"<Backend {self.id} {self.url} {self.state}>"

    @property
    def state(self) -> str:
        if self.adminState != UP:
            return self.adminState
        return UP if self.healthy else DOWN

    @property
    def available(self) -> bool:
        """
        May this backend take a new request?
        """
        return self.healthy and self.adminState == UP

    def recordCheck(self, ok: bool, reason: str) -> None:
        """
        Count one check result, and change state when the rise or fall
        threshold is reached.
        """
        self.lastCheck = self._clock.seconds()
        if ok:
            self._fails = 0
            self._passes += 1
            if not self.healthy and self._passes >= self._health.rise:
                self._setHealthy(True, reason)
        else:
            self.lastError = reason
            self._passes = 0
            self._fails += 1
            if self.healthy and self._fails >= self._health.fall:
                self._setHealthy(False, reason)

    def recordResponse(
        self, code: int, seconds: float, bytesIn: int, bytesOut: int
    ) -> None:
        """
        A response from this backend reached the client whole.

        @param code: its status; C{0} for an exchange that failed after the
            response had started.
        @param seconds: from the request's arrival at this backend's turn to
            the response's end.
        @param bytesIn: request body bytes sent to the backend.
        @param bytesOut: response body bytes sent to the client.
        """

    def recordPassiveFailure(self, reason: str) -> None:
        """
        The proxy could not use this backend; with health checks on, that
        counts as a failed check (with them off nothing would ever bring the
        backend back, so it only counts as a failure).
        """
        self.failures += 1
        if self._health.enabled:
            self.recordCheck(False, reason)
        else:
            self.lastError = reason

    def _setHealthy(self, healthy: bool, reason: str) -> None:
        self.healthy = healthy
        self.lastChange = self._clock.seconds()
        self.lastChangeReason = reason
        if healthy:
            self.log.info(
                "backend {url} is up: {reason}", url=self.url, reason=reason
            )
        else:
            self.log.warn(
                "backend {url} is down: {reason}", url=self.url, reason=reason
            )


class BackendGroup:
    """
    The backends, and the round-robin choice among those that are up.

    Backup backends are chosen only while no primary backend is available,
    as in NGINX and HAProxy.

    @param prepare: called with each new backend before it takes traffic, to
        give it its connection pool and proxy resource.
    """

    def __init__(
        self,
        health: HealthConfig,
        clock: IReactorTime,
        prepare: Callable[[Backend], None] = lambda backend: None,
    ) -> None:
        self.health = health
        self._clock = clock
        self._prepare = prepare
        self._backends: Dict[str, Backend] = {}
        self._selector: SmoothWeightedRoundRobin[Backend] = SmoothWeightedRoundRobin(
            lambda backend: backend.weight
        )
        self._nextID = 1

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, backendID: str) -> Optional[Backend]:
        return self._backends.get(backendID)

    def byURL(self, url: str) -> Optional[Backend]:
        for backend in self._backends.values():
            if backend.url == url:
                return backend
        return None

    def add(self, config: BackendConfig) -> Backend:
        if self.byURL(config.url) is not None:
            raise ValueError(f"backend {config.url} is already in the group")
        backendID = str(self._nextID)
        self._nextID += 1
        backend = Backend(backendID, config, self.health, self._clock)
        self._prepare(backend)
        self._backends[backendID] = backend
        return backend

    def remove(self, backend: Backend) -> None:
        del self._backends[backend.id]
        self._selector.forget(backend)
        if backend.pool is not None:
            backend.pool.closeIdle()

    def pick(self, exclude: Collection[Backend] = ()) -> Optional[Backend]:
        """
        The next backend for a request, skipping those already tried.
        """
        backends = self._backends.values()
        primaries: List[Backend] = [
            b for b in backends if not b.backup and b.available
        ]
        choice = self._selector.pick(primaries, exclude)
        if choice is None and not primaries:
            backups = [b for b in backends if b.backup and b.available]
            choice = self._selector.pick(backups, exclude)
        return choice

    def anyAvailable(self) -> bool:
        return any(b.available for b in self._backends.values())
