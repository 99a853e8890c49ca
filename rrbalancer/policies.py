"""
Balancing policies: how the group chooses among the backends that may take
a request.

Every policy sees the same candidates (the primaries that are up, or the
backups when none is or all were tried, as the group decides) and the
backends this request already tried; it picks one.  Load-aware policies
also hear how each response went.  Each is small, and a policy of one's
own is a class providing L{IBalancingPolicy}, offered to C{--balance}
through a Twisted plugin in the C{rrbalancer.plugins} package (see
L{IBalancingPolicyFactory}).

The cost of a pick is bounded whatever the number of backends, except
C{least-conn}'s, which looks at every candidate as NGINX's C{least_conn}
does, and C{hash}'s, which adds up the load on them.
"""

import bisect
import hashlib
import math
import random as _random
from typing import Callable, Collection, Dict, List, Optional, Tuple

from twisted.plugin import getPlugins
from zope.interface import Attribute, Interface, implementer

from .selection import Candidates


class IBalancingPolicy(Interface):
    """
    A way to choose a backend.

    A policy whose choices follow the backends' latency says so with a
    true C{timesLatency} attribute (optional): the balancer then times
    each answer by the kernel's stamp of its arrival, which costs a few
    per cent of a request, rather than by when it was read; and a
    backend's C{unanswered} leaves out, at each pick, the requests whose
    answers wait unread.
    """

    def pick(candidates, exclude, request):
        """
        A member of C{candidates} (a L{Candidates}) not in C{exclude}, or
        None when there is none.

        @param request: the request to place (a
            L{twisted.web.server.Request}), for a policy that looks at it;
            None when there is none (a pick outside a request).
        """

    def finished(backend, seconds, failed):
        """
        A request on C{backend} ended; C{failed} when it got no good
        answer (no connection, a broken exchange, a 5xx).  C{seconds} is
        the backend's latency: from the request's start to its answer's
        first bytes reaching the balancer (on Linux, as the kernel stamped
        their arrival, so that a busy balancer's own delay in reading them
        is not counted against the backend).
        """

    def forget(backend):
        """
        C{backend} left the group: drop what is kept about it.
        """

    def figures(backend):
        """
        What the policy knows of C{backend}, for the admin API and the
        dashboard: a small dict of names to numbers (empty when it keeps
        nothing).  Optional: a policy without it shows nothing.
        """


class IBalancingPolicyFactory(Interface):
    """
    A policy offered to C{--balance NAME} by a Twisted plugin: an object
    providing this (and L{twisted.plugin.IPlugin}) in a module of the
    C{rrbalancer.plugins} package.
    """

    name = Attribute("The name C{--balance} takes.")

    def build(config, clock):
        """
        The policy for a balancer's settings (a L{rrbalancer.config.Config})
        on C{clock}.
        """


@implementer(IBalancingPolicy)
class RoundRobin:
    """
    NGINX's smooth weighted round robin (the default).
    """

    name = "round-robin"

    def pick(self, candidates: Candidates, exclude: Collection, request=None) -> Optional[object]:
        return candidates.pick(exclude)

    def finished(self, backend, seconds: float, failed: bool) -> None:
        pass

    def forget(self, backend) -> None:
        pass

    def figures(self, backend) -> Dict[str, float]:
        return {}


@implementer(IBalancingPolicy)
class LeastConnections:
    """
    Fewest requests in flight and tunnels open for its weight (see
    L{rrbalancer.backends.Backend.load}); ties go round in turn, so that
    idle backends still share the requests.
    """

    name = "least-conn"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Candidates, exclude: Collection, request=None) -> Optional[object]:
        members = list(candidates)
        n = len(members)
        if not n:
            return None
        self._turn = (self._turn + 1) % n
        best = None
        bestLoad = math.inf
        for i in range(n):
            backend = members[(self._turn + i) % n]
            if backend in exclude:
                continue
            load = backend.load / candidates.weightOf(backend)
            if load < bestLoad:
                best, bestLoad = backend, load
        return best

    def finished(self, backend, seconds: float, failed: bool) -> None:
        pass

    def forget(self, backend) -> None:
        pass

    def figures(self, backend) -> Dict[str, float]:
        return {}


def _randomPick(candidates: Candidates, exclude: Collection, random, weighted: bool):
    """
    A member at random (by weight when C{weighted}), in constant expected
    time: a uniform draw kept with a chance of its weight over the largest
    weight.  After a few draws that all met excluded members, a scan.
    """
    top = candidates.maxWeight
    for _ in range(16):
        backend = candidates.randomMember(random)
        if backend is None:
            return None
        if backend in exclude:
            continue
        if not weighted or random() * top < candidates.weightOf(backend):
            return backend
    rest = [b for b in candidates if b not in exclude]
    return rest[int(random() * len(rest))] if rest else None


@implementer(IBalancingPolicy)
class WeightedRandom:
    """
    A backend at random, each as likely as its weight.
    """

    name = "random"

    def __init__(self, random: Callable[[], float] = _random.random) -> None:
        self._random = random

    def pick(self, candidates: Candidates, exclude: Collection, request=None) -> Optional[object]:
        return _randomPick(candidates, exclude, self._random, weighted=True)

    def finished(self, backend, seconds: float, failed: bool) -> None:
        pass

    def forget(self, backend) -> None:
        pass

    def figures(self, backend) -> Dict[str, float]:
        return {}


@implementer(IBalancingPolicy)
class PowerOfTwoChoices:
    """
    Two backends at random, and the one with the lower cost: its EWMA
    latency times its load (requests in flight and tunnels open) plus one
    (as Finagle and Linkerd do, without their peak rule).  The load leaves
    out the requests whose answer already waits unread
    (L{rrbalancer.backends.Backend.unanswered}): the backend is done with
    them, and counted in, they make the backends look alike by as many as
    the balancer is slow to read.  The average weighs the answers by time,
    with C{decay} seconds' time constant, so that a backend that got slow
    gets less traffic while it is slow, and some still, to learn when it is
    fast again; but each answer moves it at least a C{SAMPLE_WEIGHT} of the
    way, so that under load it follows the last few dozen answers.  A
    failure counts as a response as slow as C{penalty} seconds.  A tunnel
    weighs in the load while it is open, but its life is no answer's
    latency: only its handshake's answer (the C{101}) is a sample.

    Finagle's peak rule (an answer slower than the average replaces it)
    makes the average, under load, the slowest answer of the last
    C{decay} seconds: a busy balancer's own delays, which every backend's
    answers share, then hide how much slower one backend is than another.

    The cost is divided by the weight, so that a heavier backend looks
    cheaper.
    """

    name = "p2c"
    timesLatency = True
    # A backend not heard from yet costs as little as a fast one.
    INITIAL = 0.001
    # The least share of the average each answer has.
    SAMPLE_WEIGHT = 1 / 16

    def __init__(
        self, clock, decay: float = 10.0, random: Callable[[], float] = _random.random,
        penalty: float = 1.0,
    ) -> None:
        self._clock = clock
        self.decay = decay
        self._random = random
        self.penalty = penalty
        self._ewma: Dict[object, float] = {}
        self._updated: Dict[object, float] = {}

    def cost(self, backend, weight: int) -> float:
        latency = self.latency(backend)
        return latency * (backend.unanswered + 1) / weight

    def latency(self, backend) -> float:
        """
        The backend's EWMA latency now (decayed since it was last updated).
        """
        ewma = self._ewma.get(backend)
        if ewma is None:
            return self.INITIAL
        elapsed = self._clock.seconds() - self._updated[backend]
        return ewma * math.exp(-elapsed / self.decay) if elapsed > 0 else ewma

    def pick(self, candidates: Candidates, exclude: Collection, request=None) -> Optional[object]:
        first = _randomPick(candidates, exclude, self._random, weighted=False)
        if first is None:
            return None
        second = _randomPick(candidates, set(exclude) | {first}, self._random, weighted=False)
        if second is None:
            return first
        if self.cost(second, candidates.weightOf(second)) < self.cost(
            first, candidates.weightOf(first)
        ):
            return second
        return first

    def finished(self, backend, seconds: float, failed: bool) -> None:
        sample = max(seconds, self.penalty) if failed else seconds
        now = self._clock.seconds()
        ewma = self._ewma.get(backend)
        if ewma is None:
            value = sample
        else:
            elapsed = max(0.0, now - self._updated[backend])
            keep = min(math.exp(-elapsed / self.decay), 1 - self.SAMPLE_WEIGHT)
            value = ewma * keep + sample * (1 - keep)
        self._ewma[backend] = value
        self._updated[backend] = now

    def forget(self, backend) -> None:
        self._ewma.pop(backend, None)
        self._updated.pop(backend, None)

    def figures(self, backend) -> Dict[str, float]:
        """
        The latency the policy sees (decayed to now), and the cost it
        compares (for a weight of 1).
        """
        return {
            "ewma_ms": round(self.latency(backend) * 1000, 3),
            "cost": round(self.cost(backend, 1), 6),
        }


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def requestKey(spec: str) -> Callable[[object], Optional[bytes]]:
    """
    What C{--hash-key} names, read from a request: None when the request
    has none (it is then balanced round robin, so that every request
    without the header does not land on one backend).
    """
    if spec == "client-ip":
        def key(request):
            host = getattr(request.getClientAddress(), "host", None)
            return host.encode("ascii") if host else None
    elif spec == "path":
        def key(request):
            return request.path
    else:
        kind, _, name = spec.partition(":")
        field = name.encode("ascii")
        if kind == "header":
            def key(request):
                values = request.requestHeaders.getRawHeaders(field)
                return b",".join(values) if values else None
        else:
            def key(request):
                return request.getCookie(field) or None
    return key


@implementer(IBalancingPolicy)
class ConsistentHash:
    """
    Consistent hashing with bounded loads (Mirrokni, Thorup and
    Zadimoghaddam, 2018): a key goes to the first backend clockwise from it
    on a ring of points, unless that backend already has more than
    C{balance} times the mean load (requests in flight and tunnels open,
    for its weight);
    then to the next one round the ring that has not.

    The ring holds every backend the policy has met, up or not: a backend
    that goes down keeps its points, and its keys go on to the next ones
    while it is down and come back when it is up, so that only its own keys
    ever move.  Each backend gets C{points} points per unit of weight.

    @param key: reads the key from a request (see L{requestKey}).
    """

    name = "hash"

    def __init__(
        self, key: Callable[[object], Optional[bytes]], balance: float = 1.25, points: int = 64
    ) -> None:
        self._key = key
        self.balance = balance
        self.points = points
        self._ring: List[Tuple[int, int]] = []
        self._owners: Dict[int, object] = {}
        self._known: Dict[object, int] = {}
        self._serial = 0
        # The version of each set of candidates last met.
        self._met: Dict[int, int] = {}

    def _meet(self, candidates: Candidates) -> None:
        """
        Put on the ring any candidate it lacks: a cost paid when the
        candidates change, not at every pick.
        """
        self._met[id(candidates)] = candidates.version
        new = []
        for backend in candidates:
            if backend in self._known:
                continue
            self._serial += 1
            serial = self._serial
            self._known[backend] = serial
            self._owners[serial] = backend
            seed = getattr(backend, "stickyID", repr(backend)).encode("ascii", "replace")
            for i in range(self.points * max(1, int(getattr(backend, "weight", 1)))):
                new.append((_digest(seed + b"#%d" % (i,)), serial))
        if new:
            new.sort()
            # Two sorted runs: the sort merges them in linear time.
            self._ring.extend(new)
            self._ring.sort()

    def pick(self, candidates: Candidates, exclude: Collection, request=None) -> Optional[object]:
        key = self._key(request) if request is not None else None
        if key is None or not len(candidates):
            return candidates.pick(exclude)
        if self._met.get(id(candidates)) != candidates.version:
            self._meet(candidates)
        ring, owners = self._ring, self._owners
        load = 0
        for backend in candidates:
            load += backend.load
        # Every candidate may take up to this share of the load (plus one,
        # the request being placed), for its weight.
        bound = self.balance * (load + 1) / candidates.totalWeight
        start = bisect.bisect(ring, (_digest(key), 0))
        seen = set()
        fallback = None
        n = len(ring)
        for i in range(n):
            backend = owners[ring[(start + i) % n][1]]
            if backend in seen:
                continue
            seen.add(backend)
            if backend not in candidates or backend in exclude:
                continue
            if backend.load < bound * candidates.weightOf(backend):
                return backend
            if fallback is None:
                fallback = backend
            if len(seen) >= len(self._known):
                break
        return fallback

    def finished(self, backend, seconds: float, failed: bool) -> None:
        pass

    def forget(self, backend) -> None:
        serial = self._known.pop(backend, None)
        if serial is not None:
            del self._owners[serial]
            self._ring = [point for point in self._ring if point[1] != serial]

    def figures(self, backend) -> Dict[str, float]:
        return {}


BUILT_IN = {
    "round-robin": lambda config, clock: RoundRobin(),
    "least-conn": lambda config, clock: LeastConnections(),
    "random": lambda config, clock: WeightedRandom(),
    "p2c": lambda config, clock: PowerOfTwoChoices(clock, config.ewmaDecay),
    "hash": lambda config, clock: ConsistentHash(requestKey(config.hashKey), config.hashBalance),
}


def plugins() -> Dict[str, IBalancingPolicyFactory]:
    """
    The policies other packages offer, by name.
    """
    from . import plugins as package

    return {p.name: p for p in getPlugins(IBalancingPolicyFactory, package)}


def policyNames():
    return sorted(set(BUILT_IN) | set(plugins()))


def policyFor(config, clock) -> IBalancingPolicy:
    """
    The policy C{config.balance} names.
    """
    build = BUILT_IN.get(config.balance)
    if build is not None:
        return build(config, clock)
    return plugins()[config.balance].build(config, clock)
