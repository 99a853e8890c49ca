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
forgotten once its last request in flight has ended and its last tunnel has
closed, so that no request is cut.  Tunnels may last for hours: those still
open after the group's C{tunnelGrace} are closed.

Two judges of health are kept apart, as Envoy keeps them: the active checks
(rise/fall, see L{Backend.recordCheck}) and the failures client requests
meet (L{Ejection}: a backend failing them in a row is set aside for a while,
whatever its checks say).

Backends come from several places at once: the config file, the admin
API, each discovery source.  Each backend knows which of them list it (its
C{owners}), so that one place dropping a backend another still lists does
not remove it (L{BackendGroup.release}).

What lives where:
 - here, the backends and the group: adding, finding and removing them,
   their owners, the candidates a pick chooses from (kept up to date by
   C{BackendGroup._place} as backends change, see L{rrbalancer.selection}),
   the panic threshold, which picks from other candidates, and the hookup
   to the C{max_conns} queue (L{rrbalancer.queue});
 - L{rrbalancer._slowstart}: the ramp of a backend that comes up;
 - L{rrbalancer._ejection}: outlier ejection, and its settings
   (L{Ejection}, also importable from here);
 - L{rrbalancer.policies}: how a pick chooses among the candidates.
"""

import hashlib
from typing import Callable, Collection, Dict, Iterator, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._ejection import MAX_EJECTION, Ejection, Ejector
from ._slowstart import SlowStart
from ._unread import UnreadAnswers
from .client import PacedCloser
from .config import BackendConfig, HealthConfig
from .interfaces import IPicker, IUpstream
from .policies import RoundRobin
from .queue import RequestQueue
from .selection import Candidates
from .stats import BackendStats
from .tunnel import TunnelCounts

__all__ = [
    "ADMIN_STATES",
    "API",
    "CONFIG",
    "DEMO",
    "DISABLED",
    "DOWN",
    "DRAINING",
    "EJECTED",
    "MAX_EJECTION",
    "STATES",
    "UP",
    "Backend",
    "BackendGroup",
    "Ejection",
]

UP = "up"
DOWN = "down"
DRAINING = "draining"
DISABLED = "disabled"
EJECTED = "ejected"
ADMIN_STATES = (UP, DRAINING, DISABLED)
STATES = (UP, DOWN, EJECTED, DRAINING, DISABLED)

# Who may list a backend, besides each discovery source (named by its URL).
CONFIG = "config"
API = "api"
DEMO = "demo"

class Backend:
    """
    One server behind the balancer.

    Health follows HAProxy's rise/fall rule: C{fall} failures in a row take a
    healthy backend out, C{rise} passes in a row bring it back, and a
    failure or pass resets the other count.  Only active checks feed those
    counts; failures on client requests lead to an ejection instead (see
    L{Ejection}).  A backend added at run time waits for its first passing
    check (see L{BackendGroup.add}).

    @ivar upstream: the way to it (an L{IUpstream}: the
        L{rrbalancer.proxy.BackendProxyResource} that forwards requests to
        it over its connection pool), or None for a backend that is only a
        model (in tests of the model).
    @ivar active: requests in flight on it; the proxy counts them.
    @ivar tunnels: the tunnels (upgraded connections) to it: how many are
        open, and what they carried.
    @ivar removing: it is draining on its way out of the group.
    @ivar stickyID: names it in a sticky-session cookie: stable across
        restarts and balancers, and not its address.
    @ivar ejectedUntil: while it is ejected, when it comes back.
    @ivar rampStart: while its weight ramps up (slow start), since when.

    @ivar owners: who lists it, in the order they came: L{CONFIG}, L{API},
        L{DEMO} or a discovery source's URL; none for a backend a program
        added to the group without saying (the first to claim it then owns
        it).
    """

    log = Logger()

    # Ten thousand of them are held for the life of the process: a dict of
    # their 47 attributes was 1.6 KB each, and filling it a fifth of a
    # bulk addition's time.
    __slots__ = (
        "id", "config", "url", "_weight", "_backup", "_group", "upstream",
        "_health", "_clock", "_healthy", "_adminState", "_active",
        "_idleWaiters", "_openTunnels", "_closingTunnels", "removing",
        "owners", "requests", "failures", "protocolErrors", "peakActive",
        "timesDown", "downSince", "_downtime", "lastCheckCode",
        "lastCheckDuration", "checksPassed", "checksFailed", "lastCheck",
        "lastError", "lastChange", "lastChangeReason", "stats", "tunnels",
        "_passes", "_fails", "_awaitingFirstPass", "stickyID",
        "consecutiveFailures", "ejections", "ejectedUntil", "_ejectionEnded",
        "_readmission", "rampStart", "_full", "_placed", "_rampOnJoin",
    )

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
        # Its open tunnels (a set made when the first opens), and the call
        # that closes them when it is being removed.
        self._openTunnels: Optional[Set] = None
        self._closingTunnels = None
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
        # The tunnels (upgraded connections) to it, and what they carried.
        self.tunnels = TunnelCounts()
        self._passes = 0
        self._fails = 0
        self._awaitingFirstPass = False
        self.stickyID = hashlib.sha256(
            b"rrbalancer-backend:" + repr(config.server).encode("utf-8")
        ).hexdigest()[:16]
        # Failures on client requests, apart from the active checks: kept
        # here, judged by the group's Ejector (rrbalancer._ejection).
        self.consecutiveFailures = 0
        self.ejections = 0
        self.ejectedUntil: Optional[float] = None
        self._ejectionEnded: Optional[float] = None
        self._readmission = None
        # Whether it is among the candidates now, and whether joining them
        # ramps its weight up (not for the backends a balancer starts
        # with); the ramp is the group's SlowStart (rrbalancer._slowstart).
        self.rampStart: Optional[float] = None
        self._full = False
        self._placed = False
        self._rampOnJoin = False

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
        tunnels = len(self._openTunnels) if self._openTunnels else 0
        old, self._active = self._active, value
        if value > self.peakActive:
            self.peakActive = value
        self._loadChanged(old + tunnels, value + tunnels)
        if value <= 0 and self._idleWaiters:
            self._maybeIdle()

    def _loadChanged(self, old: int, new: int) -> None:
        group = self._group
        if group is not None and group.maxConns:
            limit = group.maxConns
            if (old >= limit) != (new >= limit):
                group._place(self)
                if new < limit:
                    group._roomMade()

    @property
    def load(self) -> int:
        """
        The requests in flight and the tunnels open: what the load-aware
        policies weigh and C{max_conns} bounds.  A tunnel holds a
        connection to the backend, and a session's work there, for as long
        as it lasts: a backend holding 500 WebSockets is not idle (NGINX's
        C{max_conns} and HAProxy's C{leastconn} and C{maxconn} count an
        upgraded connection so).  C{active} stays the requests alone, for
        the figures.
        """
        return self._active + (len(self._openTunnels) if self._openTunnels else 0)

    @property
    def unanswered(self) -> int:
        """
        The load less the requests whose answer has reached this host and
        waits to be read: what the backend itself has yet to answer, free
        of the balancer's own delay in reading, as of the pick under way
        (see L{rrbalancer._unread}).
        Known while the policy times answers (see
        L{rrbalancer.policies.IBalancingPolicy}); the load otherwise.
        """
        load = self.load
        pool = self.pool
        unread = pool.unread if pool is not None else None
        if unread is None or not load:
            return load
        return load - unread.waiting(pool)

    @property
    def idle(self) -> bool:
        """
        No request in flight on it, and no tunnel open to it.
        """
        return self._active <= 0 and not self._openTunnels

    def _maybeIdle(self) -> None:
        if self._idleWaiters and self.idle:
            waiters, self._idleWaiters = self._idleWaiters, None
            for d in waiters:
                d.callback(self)

    def tunnelOpened(self, tunnel) -> None:
        """
        Keep C{tunnel} (a L{rrbalancer.tunnel.Tunnel} to this backend) until
        both its connections are gone: removing this backend waits for it,
        and may close it.
        """
        if self._openTunnels is None:
            self._openTunnels = set()
        if tunnel not in self._openTunnels:
            before = self.load
            self._openTunnels.add(tunnel)
            self._loadChanged(before, before + 1)
        tunnel.whenDone(self._tunnelClosed)

    def _tunnelClosed(self, tunnel) -> None:
        tunnels = self._openTunnels
        if tunnels is not None and tunnel in tunnels:
            before = self.load
            tunnels.discard(tunnel)
            if not tunnels:
                self._openTunnels = None
            self._loadChanged(before, before - 1)
            if not tunnels:
                self._maybeIdle()

    def closeTunnels(self) -> int:
        """
        Close the tunnels open to this backend (each once what is buffered
        for it is written; see L{rrbalancer.tunnel.Tunnel.close}).

        @return: how many were open.
        """
        tunnels = list(self._openTunnels or ())
        for tunnel in tunnels:
            tunnel.close()
        return len(tunnels)

    def whenIdle(self) -> Deferred:
        """
        Fires (with this backend) once no request is in flight on it and no
        tunnel is open to it.
        """
        if self.idle:
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
        if not self._healthy:
            return DOWN
        return UP if self.ejectedUntil is None else EJECTED

    @property
    def available(self) -> bool:
        """
        May this backend take a new request?
        """
        return self._healthy and self._adminState == UP and self.ejectedUntil is None

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

    def setAdminState(self, state: str, reason: str, log: bool = True) -> None:
        """
        Drain, disable or enable this backend.

        @param log: log the change (a caller that logs it its own way
            does not).
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
        if not log:
            return
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
        self, code: int, seconds: float, bytesIn: int, bytesOut: int,
        latency: Optional[float] = None,
    ) -> None:
        """
        A response from this backend reached the client whole.

        @param code: its status; C{0} for an exchange that failed after the
            response had started.
        @param seconds: from the request's arrival at this backend's turn to
            the response's end.
        @param bytesIn: request body bytes sent to the backend.
        @param bytesOut: response body bytes sent to the client.
        @param latency: from the same start to the response's first bytes
            reaching the balancer, for the balancing policy; C{seconds}
            when not given.
        """
        group = self._group
        if group is not None:
            group.policy.finished(
                self, seconds if latency is None else latency, not 100 <= code < 500
            )
            if code == 0 or (code >= 500 and group.ejection.on5xx):
                group._ejector.requestFailed(
                    self, f"answered {code}" if code else "response cut short"
                )
            else:
                self.consecutiveFailures = 0
        self.stats.recordResponse(code, seconds, bytesIn, bytesOut)

    def recordPassiveFailure(self, reason: str) -> None:
        """
        The proxy could not use this backend (no connection, a reset, a
        timeout before the response): a failure towards an ejection.
        """
        self.failures += 1
        self.stats.recordFailure()
        self.lastError = reason
        group = self._group
        if group is not None:
            group.policy.finished(self, 0.0, True)
            group._ejector.requestFailed(self, reason)

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
    @param ejection: when failures on client requests set a backend aside.
    @param slowStart: seconds over which a backend that comes up ramps from
        a tenth of its weight to all of it; 0 is off.
    @param panicThreshold: percent of the enabled primaries below which,
        with no backup up, every enabled primary is picked whatever its
        health; 0 is off.
    @param maxConns: requests in flight and tunnels open that make a
        backend full (no policy picks it); 0 is no limit.  Requests that find every backend
        full wait in C{requestQueue} (of C{queueSize}, for C{queueTimeout}
        seconds).
    @param tunnelGrace: seconds the tunnels of a backend being removed may
        run on before they are closed (as a stopping balancer lets them run
        for C{--shutdown-grace}).
    @ivar retries: requests that moved on to another backend after one
        failed them.
    @ivar panicking: the panic threshold is crossed now.
    @ivar panics: times it was crossed.
    """

    log = Logger()

    def __init__(
        self,
        health: HealthConfig,
        clock: IReactorTime,
        upstream: Optional[Callable[[BackendConfig], IUpstream]] = None,
        policy=None,
        ejection: Ejection = Ejection(),
        slowStart: float = 0.0,
        panicThreshold: int = 0,
        maxConns: int = 0,
        queueSize: int = 100,
        queueTimeout: float = 5.0,
        tunnelGrace: float = 10.0,
    ) -> None:
        self.health = health
        self.tunnelGrace = tunnelGrace
        self.policy = policy if policy is not None else RoundRobin()
        self.panicThreshold = panicThreshold
        self.maxConns = maxConns
        self.requestQueue = RequestQueue(queueSize, queueTimeout, clock) if maxConns else None
        # Backends that are up but have their maxConns in flight.
        self.full = 0
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
        self._bySticky: Dict[str, Backend] = {}
        self.retries = 0
        self._slowStart = SlowStart(clock, slowStart, self._place)
        self._ejector = Ejector(clock, ejection, self._place, self.__len__, self.log)
        # Every enabled primary, whatever its health: the candidates while
        # panicking (kept only when a threshold is set).
        self._enabledPrimaries: Candidates[Backend] = Candidates(_addedOrder)
        self.panicking = False
        self.panics = 0
        # Answers waiting unread, counted at each pick while the policy
        # times answers.
        self._unread: Optional[UnreadAnswers] = None
        # Closes removed backends' kept connections.
        self._closer = PacedCloser(clock)

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

    def byStickyID(self, stickyID: str) -> Optional[Backend]:
        """
        The backend a sticky-session cookie names, if it is still here.
        """
        return self._bySticky.get(stickyID)

    # -- adding -----------------------------------------------------------

    def add(
        self,
        config: BackendConfig,
        awaitCheck: bool = False,
        reason: Optional[str] = None,
        owner: Optional[str] = None,
        backendID: Optional[str] = None,
    ) -> Backend:
        """
        Add a backend.

        @param awaitCheck: (for a backend added at run time) with health
            checks on, it takes no traffic until its first check passes.
        @param reason: why it was added, as its last state change.
        @param owner: who lists it (see L{Backend.owners}).
        @param backendID: the id to give it (a worker made to match the
            others), rather than the next one.
        """
        if config.server in self._byServer:
            raise ValueError(f"backend {config.url} is already in the group")
        if backendID is None:
            backendID = str(self._nextID)
            self._nextID += 1
        elif backendID in self._backends:
            raise ValueError(f"backend id {backendID} is taken")
        else:
            self._nextID = max(self._nextID, int(backendID) + 1)
        upstream = self._upstream(config) if self._upstream is not None else None
        backend = Backend(backendID, config, self.health, self._clock, upstream)
        self._timeArrivals(backend)
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
        self._bySticky[backend.stickyID] = backend
        backend._group = self
        # A backend the balancer starts with takes its full weight at once;
        # one added at run time ramps up like a recovered one.
        backend._rampOnJoin = awaitCheck
        self._place(backend)
        backend._rampOnJoin = True
        for callback in list(self._onAdd):
            callback(backend)
        return backend

    def _timeArrivals(self, backend: Backend) -> None:
        """
        Have C{backend}'s new connections stamp arrivals, and be watched
        for answers waiting unread, when the policy times answers (see
        L{rrbalancer.policies.IBalancingPolicy}).
        """
        pool = backend.pool
        if pool is not None:
            timed = bool(getattr(self.policy, "timesLatency", False))
            if timed and self._unread is None:
                self._unread = UnreadAnswers()
            pool.stampArrivals = timed
            pool.unread = self._unread if timed else None

    @property
    def nextID(self) -> int:
        return self._nextID

    def continueIDsFrom(self, nextID: int) -> None:
        """
        Number the backends added from now on from C{nextID}: workers
        applying the same change give the new backends the same ids.

        @raise ValueError: a backend has that id or a later one already.
        """
        if any(int(backendID) >= nextID for backendID in self._backends):
            raise ValueError(f"backend ids up to {nextID} are taken already")
        self._nextID = nextID

    def watchAdditions(self, callback: Callable[[Backend], None]) -> None:
        """
        Call C{callback} with each backend added from now on (the health
        checker schedules its checks so, without looking at the others).
        """
        self._onAdd.append(callback)

    def unwatchAdditions(self, callback: Callable[[Backend], None]) -> None:
        if callback in self._onAdd:
            self._onAdd.remove(callback)

    # -- choosing: the candidates and the pick ----------------------------

    def pick(self, exclude: Collection[Backend] = (), request=None) -> Optional[Backend]:
        """
        The next backend for a request, skipping those already tried.

        Its cost does not grow with the number of backends: the candidates
        are kept up to date as backends change (see L{_place}).
        """
        policy = self.policy
        if self._unread is not None:
            self._unread.refresh()
        if self.panicking:
            choice = policy.pick(self._enabledPrimaries, exclude, request)
        else:
            choice = policy.pick(self._primaries, exclude, request)
        if choice is None:
            # No primary is up, or every one already failed this request
            # (NGINX moves on to the backups in both cases).
            choice = policy.pick(self._backups, exclude, request)
        if choice is not None and exclude:
            self.retries += 1
        return choice

    def availableCount(self) -> int:
        """
        Backends that may take a new request, primaries and backups.
        """
        return len(self._primaries) + len(self._backups)

    def _place(self, backend: Backend) -> None:
        """
        Put C{backend} among the candidates it belongs to now (primaries,
        backups, or none), with its current weight (ramped, in slow start).
        """
        if backend._group is not self:
            return
        primaries, backups = self._primaries, self._backups
        available = (
            backend._healthy and backend._adminState == UP and backend.ejectedUntil is None
        )
        full = available and self.maxConns and backend.load >= self.maxConns
        if full != backend._full:
            backend._full = full
            self.full += 1 if full else -1
        if available and not full:
            weight = backend._weight
            if not backend._placed:
                backend._placed = True
                if self._slowStart.seconds and backend._rampOnJoin:
                    self._slowStart.begin(backend)
            if backend.rampStart is not None:
                weight = self._slowStart.weight(backend, weight)
            here, there = (backups, primaries) if backend._backup else (primaries, backups)
            there.remove(backend)
            here.add(backend, weight)
        else:
            if not available:
                # Full, it stays where it is on its ramp; down, it starts
                # again when it comes back.
                backend._placed = False
                if backend.rampStart is not None:
                    self._slowStart.end(backend)
            primaries.remove(backend)
            backups.remove(backend)
        if self.panicThreshold:
            if backend._adminState == UP and not backend._backup:
                self._enabledPrimaries.add(backend, backend._weight)
            else:
                self._enabledPrimaries.remove(backend)
            self._judgePanic()

    # -- panic ------------------------------------------------------------
    #
    # Kept with the placement rather than in a module of its own: its state
    # is a third set of candidates that _place keeps beside the other two,
    # its verdict comes from their sizes, and pick reads that verdict at
    # every request (a plain attribute here, not one on another object).

    def _judgePanic(self) -> None:
        enabled = len(self._enabledPrimaries)
        panicking = (
            self.panicThreshold > 0
            and enabled > 0
            and not len(self._backups)
            and len(self._primaries) * 100 < self.panicThreshold * enabled
        )
        if panicking == self.panicking:
            return
        self.panicking = panicking
        if panicking:
            self.panics += 1
            self.log.warn(
                "panic: {up} of {enabled} primaries up, under {threshold}%; "
                "balancing over all of them whatever their health",
                up=len(self._primaries), enabled=enabled, threshold=self.panicThreshold,
            )
        else:
            self.log.info(
                "panic over: {up} of {enabled} primaries up",
                up=len(self._primaries), enabled=enabled,
            )

    # -- slow start and ejection (rrbalancer._slowstart, _ejection) -------

    @property
    def slowStart(self) -> float:
        return self._slowStart.seconds

    @slowStart.setter
    def slowStart(self, seconds: float) -> None:
        self._slowStart.seconds = seconds

    def rampFraction(self, backend: Backend) -> float:
        """
        The share of its weight C{backend} takes now: 1 unless it ramps up.
        """
        return self._slowStart.fraction(backend)

    @property
    def ejection(self) -> Ejection:
        return self._ejector.settings

    @ejection.setter
    def ejection(self, settings: Ejection) -> None:
        self._ejector.settings = settings

    @property
    def ejected(self) -> int:
        """
        How many backends failures on client requests set aside now.
        """
        return self._ejector.ejected

    # -- the max_conns queue (see rrbalancer.queue) -----------------------

    def _roomMade(self) -> None:
        """
        A full backend finished a request: the oldest waiting request's
        turn, once the exchange that freed the room has ended.
        """
        queue = self.requestQueue
        if queue is not None and len(queue):
            self._clock.callLater(0, queue.serve)

    def mustWait(self, served: bool) -> bool:
        """
        Should a request wait in the queue rather than be picked a backend
        now?  Yes while others wait before it, so that the queue is served
        in order.

        @param served: its turn in the queue has come.
        """
        queue = self.requestQueue
        return queue is not None and not served and len(queue) > 0

    def mayWait(self) -> bool:
        """
        No backend could take a request: is it because they are full (so
        that it may wait for room)?
        """
        return self.requestQueue is not None and self.full > 0

    # -- owners and removal -----------------------------------------------

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

    def retire(self, backend: Backend, reason: str) -> Deferred:
        """
        Drain C{backend}, then forget it once no request is in flight on it
        and no tunnel open to it; the tunnels still open after
        C{tunnelGrace} seconds are closed.

        @return: fires when it is forgotten.
        """
        if not backend.removing:
            backend.removing = True
            if backend.adminState != DRAINING:
                # Said by the line its removal logs: one line a backend, and
                # not three, when thousands are removed in one call.
                backend.setAdminState(DRAINING, reason, log=False)
            if not backend.idle:
                self.log.info(
                    "backend {url} is being removed ({n} in flight, {t} tunnels): {reason}",
                    url=backend.url,
                    n=backend.active,
                    t=backend.tunnels.open,
                    reason=reason,
                )
                # A request in flight may still become a tunnel: whatever is
                # open when the grace is over is closed.
                backend._closingTunnels = self._clock.callLater(
                    self.tunnelGrace, self._closeTunnels, backend
                )

        def forget(_):
            if backend.removing and self._backends.get(backend.id) is backend:
                self.remove(backend)
                self.log.info("backend {url} removed: {reason}", url=backend.url, reason=reason)
            return backend

        return backend.whenIdle().addCallback(forget)

    def keep(self, backend: Backend, reason: str) -> None:
        """
        Call off a pending removal: the backend takes traffic again.
        """
        if backend.removing:
            backend.removing = False
            self._stopClosingTunnels(backend)
            backend.setAdminState(UP, reason)

    def remove(self, backend: Backend) -> None:
        del self._backends[backend.id]
        if self._byServer.get(backend.config.server) is backend:
            del self._byServer[backend.config.server]
        if self._bySticky.get(backend.stickyID) is backend:
            del self._bySticky[backend.stickyID]
        self._ejector.forget(backend)
        self._stopClosingTunnels(backend)
        if backend._full:
            backend._full = False
            self.full -= 1
        backend._group = None
        self._primaries.remove(backend)
        self._backups.remove(backend)
        self._slowStart.end(backend)
        if self.panicThreshold:
            self._enabledPrimaries.remove(backend)
            self._judgePanic()
        self.policy.forget(backend)
        if backend.pool is not None:
            backend.pool.retire(self._closer.close)

    def _closeTunnels(self, backend: Backend) -> None:
        backend._closingTunnels = None
        n = backend.closeTunnels()
        if n:
            self.log.info(
                "backend {url} is being removed: closing its {n} tunnels still open"
                " after {grace:g}s",
                url=backend.url,
                n=n,
                grace=self.tunnelGrace,
            )

    def _stopClosingTunnels(self, backend: Backend) -> None:
        call, backend._closingTunnels = backend._closingTunnels, None
        if call is not None and call.active():
            call.cancel()

    # -- settings, and stopping -------------------------------------------

    def reconfigure(self, backend: Backend, weight: int, backup: bool) -> None:
        """
        Change a backend's weight or backup role; it keeps its connections
        and its requests in flight.
        """
        backend.weight = weight
        backend.backup = backup
        backend.config = BackendConfig(url=backend.url, weight=weight, backup=backup)

    def rebalance(self, policy, ejection: Ejection, slowStart: float, panicThreshold: int) -> None:
        """
        Take new balancing settings (a reload): what the old policy learnt
        is dropped, ejections and ramps under way run their course.
        """
        self.policy = policy
        if not getattr(policy, "timesLatency", False) and self._unread is not None:
            self._unread.close()
            self._unread = None
        for backend in self._backends.values():
            self._timeArrivals(backend)
            if backend.pool is not None:
                backend.pool.readAsAsked()
        self._ejector.settings = ejection
        self._slowStart.seconds = slowStart
        if panicThreshold != self.panicThreshold:
            self.panicThreshold = panicThreshold
            self._enabledPrimaries = Candidates(_addedOrder)
            if panicThreshold:
                for backend in self._backends.values():
                    self._place(backend)
            else:
                self._judgePanic()

    def stop(self) -> None:
        """
        Cancel the timers the group runs (ramps, ejections), as the
        balancer stops.
        """
        self._slowStart.stop()
        if self.requestQueue is not None:
            self.requestQueue.clear()
        if self._unread is not None:
            self._unread.close()
            self._unread = None
        self._ejector.stop(self._backends.values())
        for backend in self._backends.values():
            self._stopClosingTunnels(backend)
        self._closer.closeAll()


def _addedOrder(backend: Backend) -> int:
    """
    The order backends were added in, which NGINX's algorithm uses to break
    ties among a few weighted backends.
    """
    return int(backend.id)
