"""
Backends from etcd: C{etcd://HOST:PORT/PREFIX/}.

Every key under the prefix is a backend; its value is the backend's URL,
or a JSON object C{{"url": ..., "weight": N, "backup": true, "state":
"draining"}}.  The source reads the prefix whole once, then watches it
from the next revision on, so that a change reaches the balancer as etcd
makes it, without polling.

etcd going away (or the network to it) changes nothing the balancer
serves: the source keeps the last set it had, says so once in the log and
in its status, and tries again, half a second after the first failure,
twice as long after each next one, never longer than 30 s, each wait
shortened by a random part of its half so that a fleet of balancers does
not come back at the same instant.  It resumes its watch from the revision
after the last it saw, so that nothing written meanwhile is missed; if
etcd has compacted that revision away, or the store is not the one it was
(a restore, another cluster), it reads the prefix whole again.

A watch that stays open on a connection nobody answers any more (etcd
hung, a network partition that sends no reset) would never say so: while
watching, the source asks etcd for its status every 10 s, and one that
gets no answer within 5 s counts as a failure of the watch.

A value that is not a backend is logged (once per value) and skipped;
the other keys still count.
"""

import json
import random
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from zope.interface import implementer

from ..backends import ADMIN_STATES
from ..values import BackendConfig, ConfigError, boolean, integer, parseBackendURL
from . import Handover, IDiscoverySource, SourceConfig, SourceStatus
from ._etcdclient import Compacted, EtcdClient, decode, revisionOf

FIRST_RETRY = 0.5
MAX_RETRY = 30.0
# While watching: how often etcd is asked whether it is there, and how long
# its answer may take.
PROBE_INTERVAL = 10.0
PROBE_TIMEOUT = 5.0
VALUE_KEYS = ("url", "weight", "backup", "state")


@dataclass(frozen=True)
class EtcdBackend(BackendConfig):
    """
    A backend as a key under an etcd prefix describes it.

    @ivar state: what its value asks of it (C{up}, C{draining},
        C{disabled}), or None where it says nothing (the operator of each
        balancer decides).
    @ivar key: the key, which a change made through one balancer's admin
        API is written back to.
    """

    state: Optional[str] = None
    key: bytes = b""


def parseValue(key: bytes, value: bytes) -> EtcdBackend:
    """
    A key's value as a backend.

    @raise ValueError: it is not one; the message says why.
    """
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
    else:
        spec = {"url": text}
    if "url" not in spec:
        raise ValueError('no "url"')
    try:
        url = parseBackendURL(spec["url"], "url")
        weight = integer(spec.get("weight", 1), "weight", minimum=1)
        backup = boolean(spec.get("backup", False), "backup")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    state = spec.get("state")
    if state is not None and state not in ADMIN_STATES:
        raise ValueError(f"state: expected one of {', '.join(ADMIN_STATES)}, got {state!r}")
    return EtcdBackend(url, weight, backup, state, key)


def formatValue(backend: BackendConfig, state: Optional[str]) -> bytes:
    """
    The value that describes C{backend} in C{state} (None: leave it out).
    """
    spec: Dict[str, object] = {"url": backend.url}
    if backend.weight != 1:
        spec["weight"] = backend.weight
    if backend.backup:
        spec["backup"] = True
    if state is not None:
        spec["state"] = state
    return json.dumps(spec, sort_keys=True).encode("utf-8")


def etcdURLs(config: SourceConfig) -> List[str]:
    """
    The client URL of each member an C{etcd://} URL names.
    """
    return [
        f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        for host, port in config.members
    ]


@implementer(IDiscoverySource)
class EtcdSource:
    """
    One C{etcd://} URL: a read of its prefix, then a watch.

    @param client: an L{EtcdClient} on the source's etcd.
    @param random: a number in [0, 1) for each retry's jitter.
    @param probe: (interval, timeout) of the checks that etcd still answers
        while the source watches.
    @ivar revision: the last revision of the prefix the source has seen.
    """

    log = Logger()

    def __init__(
        self,
        config: SourceConfig,
        client: EtcdClient,
        clock: IReactorTime,
        random: Callable[[], float] = random.random,
        probe: Tuple[float, float] = (PROBE_INTERVAL, PROBE_TIMEOUT),
    ) -> None:
        self.config = config
        self.client = client
        self._clock = clock
        self._random = random
        self._probeInterval, self._probeTimeout = probe
        self._probeCall = None
        self._probing: Optional[Deferred] = None
        self._prefix = config.name.encode("utf-8")
        self.status = SourceStatus(clock.seconds())
        self.running = False
        self.revision = 0
        self._cluster: Optional[str] = None
        self._values: Dict[bytes, Optional[EtcdBackend]] = {}
        self._skipped: Dict[bytes, bytes] = {}
        self._handover = Handover(self)
        self._reading: Optional[Deferred] = None
        self._watch = None
        self._call = None
        self._failuresInRow = 0

    def __repr__(self) -> str:
        return f"<EtcdSource {self.config.url} {self.status.state}>"

    # -- IDiscoverySource ------------------------------------------------------

    def start(self, onChange: Callable[[FrozenSet[BackendConfig]], None]) -> None:
        if self.running:
            return
        self._handover.onChange = onChange
        self.running = True
        self._read()

    def stop(self) -> Deferred:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._stopProbing()
        self.status.nextLookup = None
        if self._reading is not None:
            self._reading.cancel()
        watch, self._watch = self._watch, None
        if watch is not None:
            done = watch.done
            watch.stop()
            return done
        return succeed(None)

    # -- what the keys say -------------------------------------------------------

    def keyOf(self, backend) -> Optional[bytes]:
        """
        The key that lists C{backend} (a L{rrbalancer.backends.Backend}),
        or None if none under the prefix does.
        """
        for key, described in sorted(self._values.items()):
            if described is not None and described.server == backend.config.server:
                return key
        return None

    def share(self, backend, state: Optional[str], weight: Optional[int]) -> Deferred:
        """
        Write an operator's change of C{backend} (its state, its weight;
        None for no change) back to its key, for every balancer watching
        the prefix to apply.  A failure is logged: the change stands here.
        """
        key = self.keyOf(backend)
        if key is None:
            return succeed(None)
        described = self._values[key]
        assert described is not None
        config = BackendConfig(
            described.url, described.weight if weight is None else weight, described.backup
        )
        value = formatValue(config, described.state if state is None else state)
        where = key.decode("utf-8", "replace")

        def written(_):
            self.log.info(
                "discovery {url}: {key} = {value}", url=self.config.url, key=where,
                value=value.decode("utf-8"),
            )

        def failed(failure):
            self.log.warn(
                "discovery {url}: could not write {key}: {reason}; the change holds "
                "on this balancer only",
                url=self.config.url, key=where, reason=_describe(failure),
            )

        return self.client.put(key, value, keepLease=True).addCallbacks(written, failed)

    def _set(self, key: bytes, value: bytes) -> None:
        try:
            self._values[key] = parseValue(key, value)
        except ValueError as e:
            self._values[key] = None
            if self._skipped.get(key) != value:
                self.log.warn(
                    "discovery {url}: key {key} skipped: {reason}",
                    url=self.config.url,
                    key=key.decode("utf-8", "replace"),
                    reason=e,
                )
            self._skipped[key] = value
        else:
            self._skipped.pop(key, None)

    def _delete(self, key: bytes) -> None:
        self._values.pop(key, None)
        self._skipped.pop(key, None)

    def _backends(self) -> FrozenSet[BackendConfig]:
        # One server under two keys: the first key's description counts.
        byServer: Dict[object, BackendConfig] = {}
        for key, backend in sorted(self._values.items()):
            if backend is not None:
                byServer.setdefault(backend.server, backend)
        return frozenset(byServer.values())

    def _publish(self) -> None:
        backends = self._backends()
        previous = self.status.answered(self._clock.seconds(), len(backends))
        self._failuresInRow = 0
        self.status.nextLookup = None
        if previous == SourceStatus.FAILING:
            self.log.info(
                "discovery {url}: etcd {member} answers again ({n} backends)",
                url=self.config.url,
                member=self.client.base,
                n=len(backends),
            )
        self._handover.give(backends)

    # -- reading and watching ------------------------------------------------------

    def _read(self) -> None:
        self._call = None
        d = self._reading = self.client.range(self._prefix)

        def read(answer):
            self._reading = None
            revision, pairs = answer
            if not self.running:
                return
            self._values.clear()
            seen = set()
            for key, value in pairs:
                seen.add(key)
                self._set(key, value)
            for key in set(self._skipped) - seen:
                del self._skipped[key]
            self.revision = revision
            self._cluster = None
            self._publish()
            self._startWatch()

        def failed(failure):
            self._reading = None
            self._failed(failure, "reading")

        d.addCallbacks(read, failed).addErrback(self._broken)

    def _startWatch(self) -> None:
        self._call = None
        watch = self._watch = self.client.watch(self._prefix, self.revision + 1, self._result)
        watch.done.addCallbacks(self._watchEnded, self._watchBroke, (watch,), None, (watch,))
        watch.done.addErrback(self._broken)

    def _result(self, result) -> None:
        header = result.get("header", {})
        if result.get("created"):
            cluster = str(header.get("cluster_id", ""))
            if (self._cluster is not None and cluster != self._cluster) or (
                revisionOf(result) < self.revision
            ):
                # Not the store the revision belongs to: read it whole.
                self.log.info(
                    "discovery {url}: etcd is not the store it was (revision {now}, "
                    "was {then}); reading the prefix again",
                    url=self.config.url,
                    now=revisionOf(result),
                    then=self.revision,
                )
                raise Compacted(revisionOf(result))
            self._cluster = cluster
            self._publish()
            self._scheduleProbe()
            return
        events = result.get("events") or []
        for event in events:
            kv = event.get("kv", {})
            key = decode(kv.get("key"))
            if event.get("type") == "DELETE":
                self._delete(key)
            else:
                self._set(key, decode(kv.get("value")))
            self.revision = max(self.revision, int(kv.get("mod_revision", 0)))
        if not events:
            # A progress report: nothing under the prefix changed until then.
            self.revision = max(self.revision, revisionOf(result))
        self._publish()

    def _scheduleProbe(self) -> None:
        self._stopProbing()
        self._probeCall = self._clock.callLater(self._probeInterval, self._checkAlive)

    def _stopProbing(self) -> None:
        call, self._probeCall = self._probeCall, None
        if call is not None and call.active():
            call.cancel()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    def _checkAlive(self) -> None:
        self._probeCall = None
        watch = self._watch
        d = self._probing = self.client.status().addTimeout(self._probeTimeout, self._clock)

        def answered(_):
            if self._probing is d:
                self._probing = None
                self._scheduleProbe()

        def silent(failure):
            if self._probing is not d:
                # Called off (the watch ended or the source stopped).
                return
            self._probing = None
            if self._watch is watch and watch is not None and self.running:
                self._watch = None
                watch.stop()
                self._failed(failure, "watching")

        d.addCallbacks(answered, silent).addErrback(self._broken)

    def _watchEnded(self, _, watch) -> None:
        if self._watch is watch and self.running:
            self._watch = None
            self._failed(None, "watching")

    def _watchBroke(self, failure, watch) -> None:
        if self._watch is not watch or not self.running:
            return
        self._watch = None
        if failure.check(Compacted):
            self.log.info(
                "discovery {url}: {why}; reading the prefix again",
                url=self.config.url,
                why=failure.getErrorMessage(),
            )
            self._read()
            return
        self._failed(failure, "watching")

    def retryDelay(self) -> float:
        """
        The wait before trying again after the failures in a row so far.
        """
        exponent = min(self._failuresInRow - 1, 32)
        delay = min(FIRST_RETRY * 2.0**exponent, MAX_RETRY)
        return delay * (1.0 - self._random() / 2)

    def _failed(self, failure, doing: str) -> None:
        if not self.running:
            return
        self._stopProbing()
        self._failuresInRow += 1
        reason = "etcd ended the watch" if failure is None else _describe(failure)
        member = self.client.base
        # The next try goes to the next member given, if any.
        self.client.rotate()
        wasFailing = self.status.state == SourceStatus.FAILING
        self.status.failed(self._clock.seconds(), f"{doing} {member}: {reason}")
        if not wasFailing:
            if self._handover.current is None:
                kept = "no backends from it yet"
            else:
                kept = f"keeping its {len(self._handover.current)} backends"
            self.log.warn(
                "discovery {url}: etcd {member} failed {doing}: {reason}; {kept}; "
                "trying again, every {most:g}s at most",
                url=self.config.url,
                member=member,
                doing=doing,
                reason=reason,
                kept=kept,
                most=MAX_RETRY,
            )
        delay = self.retryDelay()
        self.status.nextLookup = self._clock.seconds() + delay
        # Resumed where it was, once the prefix has been read.
        again = self._startWatch if self.revision else self._read
        self._call = self._clock.callLater(delay, again)

    def _broken(self, failure) -> None:
        # A bug, not an etcd failure: said once, and the source goes on.
        self.log.failure("discovery {url}: broke", failure, url=self.config.url)
        if self.running and (self._call is None or not self._call.active()):
            self._watch = None
            self._call = self._clock.callLater(MAX_RETRY, self._read)


def _describe(failure) -> str:
    if failure.check(CancelledError, TimeoutError):
        return "no answer in time"
    if failure.check(ResponseFailed):
        reasons = failure.value.reasons
        if reasons:
            return reasons[0].getErrorMessage() or reasons[0].type.__name__
    return failure.getErrorMessage() or failure.type.__name__
