"""
Backends and the group they belong to.

A L{Backend} keeps what the balancer knows of one server: whether checks
think it is healthy, what the operator wants of it, and its counters.  The
L{BackendGroup} owns the backends and answers the one question the proxy
asks per request: which backend next?

What the operator wants (C{adminState}):
 - C{up}: takes traffic while healthy;
 - C{draining}: takes no new request, the ones in flight finish; still
   checked, so that its health is known when it comes back;
 - C{disabled}: no traffic and no health checks.

Removing a backend (L{BackendGroup.retire}) drains it first: it is
forgotten once its last request in flight has ended, so that no request is
cut.

Backends come from several places at once: the config file, the admin
API, each discovery source.  Each backend knows which of them list it (its
C{owners}), so that one place dropping a backend another still lists does
not remove it (L{BackendGroup.release}).
"""

from typing import Callable, Collection, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .config import BackendConfig, HealthConfig
from .interfaces import IPicker, IUpstream
from .policies import RoundRobin
from .selection import Candidates
from .stats import BackendStats

UP = "up"
DOWN = "down"
DRAINING = "draining"
DISABLED = "disabled"
ADMIN_STATES = (UP, DRAINING, DISABLED)

# Who may list a backend, besides each discovery source (named by its URL).
CONFIG = "config"
API = "api"
DEMO = "demo"

class Backend:
    """
    One server behind the balancer.

    Health follows HAProxy's rise/fall rule: C{fall} failures in a row take a
    healthy backend out, C{rise} passes in a row bring it back, and a
    failure or pass resets the other count.  Active checks and passive
    failures (a connection the proxy could not open) feed the same counts.
    A backend added at run time waits for its first passing check instead
    (see L{BackendGroup.add}).

    @ivar upstream: the way to it (an L{IUpstream}: the
        L{rrbalancer.proxy.BackendProxyResource} that forwards requests to
        it over its connection pool), or None for a backend that is only a
        model (in tests of the model).
    @ivar active: requests in flight on it; the proxy counts them.
    @ivar removing: it is draining on its way out of the group.
    @ivar owners: who lists it, in the order they came: L{CONFIG}, L{API},
        L{DEMO} or a discovery source's URL; none for a backend a program
        added to the group without saying (the first to claim it then owns
        it).
    """

    log = Logger()

    def __init__(
        self,
        backendID: str,
        config: BackendConfig,
        health: HealthConfig,
        clock: IReactorTime,
        upstream: Optional[IUpstream] = None,
    ) -> None:
        self.id = backendID
        self.config = config
        self.url = config.url
        self._weight = config.weight
        self._backup = config.backup
        self._group: Optional["BackendGroup"] = None
        self.upstream = upstream
        self._health = health
        self._clock = clock
        self._healthy = True
        self._adminState = UP
        self._active = 0
        self._idleWaiters: Optional[List[Deferred]] = None
        self.removing = False
        self.owners: Tuple[str, ...] = ()
        self.requests = 0
        self.failures = 0
        # Responses that broke HTTP (bad framing, oversized head).
        self.protocolErrors = 0
        self.peakActive = 0
        # How often and how long health took it out, as HAProxy's stats.
        self.timesDown = 0
        self.downSince: Optional[float] = None
        self._downtime = 0.0
        # The last active check: its HTTP status (None without one) and
        # how long it took, in seconds.
        self.lastCheckCode: Optional[int] = None
        self.lastCheckDuration: Optional[float] = None
        self.checksPassed = 0
        self.checksFailed = 0
        self.lastCheck: Optional[float] = None
        self.lastError: Optional[str] = None
        self.lastChange = clock.seconds()
        self.lastChangeReason = "configured"
        self.stats = BackendStats(clock)
        self._passes = 0
        self._fails = 0
        self._awaitingFirstPass = False

    def __repr__(self) -> str:
        return f"<Backend {self.id} {self.url} {self.state}>"

    # Whatever changes whether or how this backend can be picked tells its
    # group, which keeps the candidates for a pick up to date as they
    # change instead of looking at every backend at every pick.

    def _placeInGroup(self) -> None:
        if self._group is not None:
            self._group._place(self)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = value
        self._placeInGroup()

    @property
    def adminState(self) -> str:
        return self._adminState

    @adminState.setter
    def adminState(self, value: str) -> None:
        self._adminState = value
        self._placeInGroup()

    @property
    def weight(self) -> int:
        return self._weight

    @weight.setter
    def weight(self, value: int) -> None:
        self._weight = value
        self._placeInGroup()

    @property
    def backup(self) -> bool:
        return self._backup

    @backup.setter
    def backup(self, value: bool) -> None:
        self._backup = value
        self._placeInGroup()

    @property
    def pool(self):
        """
        The connections to this backend, kept alive between requests (see
        L{rrbalancer.client.ConnectionPool}).
        """
        return self.upstream.pool if self.upstream is not None else None

    @property
    def active(self) -> int:
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        if value > self.peakActive:
            self.peakActive = value
        if value <= 0 and self._idleWaiters:
            waiters, self._idleWaiters = self._idleWaiters, None
            for d in waiters:
                d.callback(self)

    def whenIdle(self) -> Deferred:
        """
        Fires (with this backend) once no request is in flight on it.
        """
        if self._active <= 0:
            return succeed(self)
        d = Deferred()
        if self._idleWaiters is None:
            self._idleWaiters = []
        self._idleWaiters.append(d)
        return d

    @property
    def state(self) -> str:
        if self._adminState != UP:
            return self._adminState
        return UP if self._healthy else DOWN

    @property
    def available(self) -> bool:
        """
        May this backend take a new request?
        """
        return self._healthy and self._adminState == UP

    def awaitFirstCheck(self, reason: str) -> None:
        """
        Take no traffic until a health check passes; one passing check is
        enough (not C{rise}), so that a new backend is used at once.
        """
        self.healthy = False
        self._passes = 0
        self._fails = 0
        self._awaitingFirstPass = True
        self._changed(reason)

    def setAdminState(self, state: str, reason: str) -> None:
        """
        Drain, disable or enable this backend.
        """
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown state {state!r}")
        if state == self.adminState:
            return
        previous, self.adminState = self.adminState, state
        if (
            previous == DISABLED
            and state != DISABLED
            and self._health.enabled
            and self.healthy
        ):
            # Unchecked while disabled: its health is a guess until checked.
            self.awaitFirstCheck(reason)
        else:
            self._changed(reason)
        self.log.info(
            "backend {url} is {state} (was {previous}): {reason}",
            url=self.url,
            state=self.state,
            previous=previous,
            reason=reason,
        )

    def _changed(self, reason: str) -> None:
        self.lastChange = self._clock.seconds()
        self.lastChangeReason = reason

    def recordCheck(
        self, ok: bool, reason: str, code: Optional[int] = None, duration: Optional[float] = None
    ) -> None:
        """
        Count one active check's result, and change state when the rise or
        fall threshold is reached.

        @param code: the check's HTTP status, if it got one.
        @param duration: how long the check took, in seconds.
        """
        self.lastCheckCode = code
        self.lastCheckDuration = duration
        if ok:
            self.checksPassed += 1
        else:
            self.checksFailed += 1
        self._count(ok, reason)

    def _count(self, ok: bool, reason: str) -> None:
        self.lastCheck = self._clock.seconds()
        if ok:
            self._fails = 0
            self._passes += 1
            if not self.healthy and (
                self._awaitingFirstPass or self._passes >= self._health.rise
            ):
                self._setHealthy(True, reason)
        else:
            self.lastError = reason
            self._passes = 0
            self._fails += 1
            if self._awaitingFirstPass:
                # Its first check failed: from now on the usual rule applies.
                self._awaitingFirstPass = False
                self._changed(f"first health check failed: {reason}")
                self.log.warn(
                    "backend {url} failed its first check: {reason}",
                    url=self.url,
                    reason=reason,
                )
            elif self.healthy and self._fails >= self._health.fall:
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
        if self._group is not None:
            self._group.policy.finished(self, seconds, not 100 <= code < 500)
        self.stats.recordResponse(code, seconds, bytesIn, bytesOut)

    def recordPassiveFailure(self, reason: str) -> None:
        """
        The proxy could not use this backend; with health checks on, that
        counts as a failed check (with them off nothing would ever bring the
        backend back, so it only counts as a failure).
        """
        if self._group is not None:
            self._group.policy.finished(self, 0.0, True)
        self.failures += 1
        self.stats.recordFailure()
        if self._health.enabled:
            self._count(False, reason)
        else:
            self.lastError = reason

    def downtime(self) -> float:
        """
        Seconds it has spent down since it was added, the current spell
        included.
        """
        current = self._clock.seconds() - self.downSince if self.downSince is not None else 0.0
        return self._downtime + current

    def _setHealthy(self, healthy: bool, reason: str) -> None:
        self.healthy = healthy
        self._awaitingFirstPass = False
        self._changed(reason)
        now = self._clock.seconds()
        if healthy and self.downSince is not None:
            self._downtime += now - self.downSince
            self.downSince = None
        elif not healthy and self.downSince is None:
            self.timesDown += 1
            self.downSince = now
        if healthy:
            self.log.info(
                "backend {url} is up: {reason}", url=self.url, reason=reason
            )
        else:
            self.log.warn(
                "backend {url} is down: {reason}", url=self.url, reason=reason
            )


@implementer(IPicker)
class BackendGroup:
    """
    The backends, and the round-robin choice among those that are up.

    Backup backends are chosen only while no primary backend is available,
    as in NGINX and HAProxy.

    @param upstream: makes the way to each new backend (its connection pool
        and proxy resource) from its config, before it takes traffic;
        without it the group is a model of servers only.
    @param policy: how a backend is chosen among the candidates (an
        L{IBalancingPolicy}); round robin by default.
    @ivar retries: requests that moved on to another backend after one
        failed them.
    """

    log = Logger()

    def __init__(
        self,
        health: HealthConfig,
        clock: IReactorTime,
        upstream: Optional[Callable[[BackendConfig], IUpstream]] = None,
        policy=None,
    ) -> None:
        self.health = health
        self.policy = policy if policy is not None else RoundRobin()
        self._clock = clock
        self._upstream = upstream
        self._backends: Dict[str, Backend] = {}
        # By what is dialled (BackendConfig.server): http://a and
        # http://a:80 are one backend, found without a scan.
        self._byServer: Dict[tuple, Backend] = {}
        # The backends a pick may choose, kept up to date by _place.
        self._primaries: Candidates[Backend] = Candidates(_addedOrder)
        self._backups: Candidates[Backend] = Candidates(_addedOrder)
        self._nextID = 1
        self._onAdd: List[Callable[[Backend], None]] = []
        self.retries = 0

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def get(self, backendID: str) -> Optional[Backend]:
        return self._backends.get(backendID)

    def byServer(self, config: BackendConfig) -> Optional[Backend]:
        """
        The backend that dials the server C{config} names, if any.
        """
        return self._byServer.get(config.server)

    def byURL(self, url: str) -> Optional[Backend]:
        return self.byServer(BackendConfig(url=url))

    def add(
        self,
        config: BackendConfig,
        awaitCheck: bool = False,
        reason: Optional[str] = None,
        owner: Optional[str] = None,
    ) -> Backend:
        """
        Add a backend.

        @param awaitCheck: (for a backend added at run time) with health
            checks on, it takes no traffic until its first check passes.
        @param reason: why it was added, as its last state change.
        @param owner: who lists it (see L{Backend.owners}).
        """
        if config.server in self._byServer:
            raise ValueError(f"backend {config.url} is already in the group")
        backendID = str(self._nextID)
        self._nextID += 1
        upstream = self._upstream(config) if self._upstream is not None else None
        backend = Backend(backendID, config, self.health, self._clock, upstream)
        if owner is not None:
            backend.owners = (owner,)
        if awaitCheck and self.health.enabled:
            backend.awaitFirstCheck(
                f"{reason or 'added'}; waiting for its first health check"
            )
        elif reason is not None:
            backend._changed(reason)
        self._backends[backendID] = backend
        self._byServer[config.server] = backend
        backend._group = self
        self._place(backend)
        for callback in list(self._onAdd):
            callback(backend)
        return backend

    def watchAdditions(self, callback: Callable[[Backend], None]) -> None:
        """
        Call C{callback} with each backend added from now on (the health
        checker schedules its checks so, without looking at the others).
        """
        self._onAdd.append(callback)

    def unwatchAdditions(self, callback: Callable[[Backend], None]) -> None:
        if callback in self._onAdd:
            self._onAdd.remove(callback)

    def _place(self, backend: Backend) -> None:
        """
        Put C{backend} among the candidates it belongs to now (primaries,
        backups, or none), with its current weight.
        """
        if backend._group is not self:
            return
        primaries, backups = self._primaries, self._backups
        if backend._healthy and backend._adminState == UP:
            here, there = (backups, primaries) if backend._backup else (primaries, backups)
            there.remove(backend)
            here.add(backend, backend._weight)
        else:
            primaries.remove(backend)
            backups.remove(backend)

    def reconfigure(self, backend: Backend, weight: int, backup: bool) -> None:
        """
        Change a backend's weight or backup role; it keeps its connections
        and its requests in flight.
        """
        backend.weight = weight
        backend.backup = backup
        backend.config = BackendConfig(url=backend.url, weight=weight, backup=backup)

    def retire(self, backend: Backend, reason: str) -> Deferred:
        """
        Drain C{backend}, then forget it once no request is in flight on it.

        @return: fires when it is forgotten.
        """
        if not backend.removing:
            backend.removing = True
            if backend.adminState != DRAINING:
                backend.setAdminState(DRAINING, reason)
            self.log.info(
                "backend {url} is being removed ({n} in flight): {reason}",
                url=backend.url,
                n=backend.active,
                reason=reason,
            )

        def forget(_):
            if backend.removing and self._backends.get(backend.id) is backend:
                self.remove(backend)
                self.log.info("backend {url} removed", url=backend.url)
            return backend

        return backend.whenIdle().addCallback(forget)

    def claim(self, backend: Backend, owner: str) -> None:
        """
        C{owner} lists C{backend} too (it stays while any owner does).
        """
        if owner not in backend.owners:
            backend.owners += (owner,)

    def release(self, backend: Backend, owner: str, reason: str) -> bool:
        """
        C{owner} no longer lists C{backend}: once no owner does, it is
        drained and removed (L{retire}).

        @return: whether this release set off its removal.
        """
        if owner not in backend.owners:
            return False
        backend.owners = tuple(o for o in backend.owners if o != owner)
        if backend.owners or backend.removing:
            return False
        self.retire(backend, reason)
        return True

    def keep(self, backend: Backend, reason: str) -> None:
        """
        Call off a pending removal: the backend takes traffic again.
        """
        if backend.removing:
            backend.removing = False
            backend.setAdminState(UP, reason)

    def remove(self, backend: Backend) -> None:
        del self._backends[backend.id]
        if self._byServer.get(backend.config.server) is backend:
            del self._byServer[backend.config.server]
        backend._group = None
        self._primaries.remove(backend)
        self._backups.remove(backend)
        self.policy.forget(backend)
        if backend.pool is not None:
            backend.pool.closeIdle()

    def pick(self, exclude: Collection[Backend] = ()) -> Optional[Backend]:
        """
        The next backend for a request, skipping those already tried.

        Its cost does not grow with the number of backends: the candidates
        are kept up to date as backends change (see L{_place}).
        """
        policy = self.policy
        choice = policy.pick(self._primaries, exclude)
        if choice is None:
            # No primary is up, or every one already failed this request
            # (NGINX moves on to the backups in both cases).
            choice = policy.pick(self._backups, exclude)
        if choice is not None and exclude:
            self.retries += 1
        return choice

    def availableCount(self) -> int:
        """
        Backends that may take a new request, primaries and backups.
        """
        return len(self._primaries) + len(self._backups)


def _addedOrder(backend: Backend) -> int:
    """
    The order backends were added in, which NGINX's algorithm uses to break
    ties among a few weighted backends.
    """
    return int(backend.id)
