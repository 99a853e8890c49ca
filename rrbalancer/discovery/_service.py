"""
What discovery does with an answer: the backends a source lists are
added, changed and removed in the balancer's one group, by the same path a
reload takes, each source owning what it lists.
"""

from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import Logger

from ..backends import DISABLED, UP, Backend, BackendGroup
from ..logs import changesInBrief
from ..values import BackendConfig
from . import IDiscoverySource


class SourceFeed:
    """
    Applies one source's sets of backends to the group, as their owner
    (the source's URL).

    A backend the set gains is added and checked at once, taking traffic
    once its first check passes; one it loses is released, and drained and
    removed once no other owner (the config file, the API, another
    source) lists it.  The source sets the weight and role of the backends
    it adds, and of those whose description it changes, never of a backend
    it merely lists as well (an operator's change through the API then
    stands until the source changes its mind).  So with the state a source
    may give (an etcd value's C{state}): up, draining or disabled, applied
    when it is first given and each time it changes.

    @ivar described: the source's last set, by server (see
        L{BackendConfig.server}).
    """

    log = Logger()

    def __init__(
        self,
        source: IDiscoverySource,
        group: BackendGroup,
        onAdded: Callable[[Backend], None] = lambda backend: None,
    ) -> None:
        self.source = source
        self.group = group
        self.onAdded = onAdded
        self.owner = source.config.url
        self.described: Dict[Tuple[str, str, int], BackendConfig] = {}

    def apply(self, backends: FrozenSet[BackendConfig]) -> Dict[str, List[str]]:
        """
        Make the group hold C{backends} for this source.

        @return: the URLs C{added}, C{removed} (draining on their way out)
            and C{changed}.
        """
        group, owner = self.group, self.owner
        reason = f"discovery {owner}"
        wanted = {b.server: b for b in backends}
        added: List[str] = []
        removed: List[str] = []
        changed: List[str] = []
        for server, config in sorted(wanted.items()):
            backend = group.byServer(config)
            state = getattr(config, "state", None)
            if backend is None:
                backend = group.add(config, awaitCheck=True, reason=reason, owner=owner)
                added.append(backend.url)
                if state is not None and state != UP:
                    backend.setAdminState(state, reason)
                self.onAdded(backend)
                continue
            group.claim(backend, owner)
            kept = backend.removing
            if kept:
                group.keep(backend, reason)
                changed.append(backend.url)
            before = self.described.get(server)
            if before is not None and (before.weight, before.backup) != (
                config.weight,
                config.backup,
            ):
                group.reconfigure(backend, config.weight, config.backup)
                if backend.url not in changed:
                    changed.append(backend.url)
            if (kept or state != getattr(before, "state", None)) and (
                backend.adminState != (state or UP)
            ):
                self._setState(backend, state or UP, reason)
                if backend.url not in changed:
                    changed.append(backend.url)
        for server, config in sorted(self.described.items()):
            if server in wanted:
                continue
            backend = group.byServer(config)
            if backend is not None and group.release(
                backend, owner, f"{reason}: no longer in its answer"
            ):
                removed.append(backend.url)
        self.described = wanted
        if added or removed or changed:
            self.log.info(
                "discovery {url}: {n} backends; added {added}, removed {removed}, "
                "changed {changed}",
                url=owner,
                n=len(wanted),
                **changesInBrief(added, removed, changed),
            )
        return {"added": added, "removed": removed, "changed": changed}


    def _setState(self, backend: Backend, state: str, reason: str) -> None:
        wasDisabled = backend.adminState == DISABLED
        backend.setAdminState(state, reason)
        if wasDisabled and state != DISABLED:
            # Unchecked while disabled: checked at once, as the API does.
            self.onAdded(backend)


class Discovery(Service):
    """
    Runs the discovery sources while the balancer runs, each feeding the
    group.

    @param cleanups: called once every source has stopped (the resolver
        they share is closed so); each may return a Deferred.
    @ivar feeds: a L{SourceFeed} per source, in the order given.
    """

    def __init__(
        self,
        group: BackendGroup,
        sources: Iterable[IDiscoverySource],
        onAdded: Callable[[Backend], None] = lambda backend: None,
        cleanups: Iterable[Callable[[], object]] = (),
    ) -> None:
        self.feeds = [SourceFeed(source, group, onAdded) for source in sources]
        self._cleanups = list(cleanups)

    @property
    def sources(self) -> List[IDiscoverySource]:
        return [feed.source for feed in self.feeds]

    def startService(self) -> None:
        Service.startService(self)
        for feed in self.feeds:
            feed.source.start(feed.apply)

    def stopService(self):
        Service.stopService(self)
        stopped = DeferredList(
            [maybeDeferred(feed.source.stop) for feed in self.feeds], consumeErrors=True
        )

        def cleanUp(_):
            return DeferredList(
                [maybeDeferred(cleanup) for cleanup in self._cleanups], consumeErrors=True
            )

        return stopped.addCallback(cleanUp)

    def share(self, backend: Backend, state: Optional[str], weight: Optional[int]) -> None:
        """
        An operator changed C{backend}'s state or weight here: each source
        listing it that can take the change back (an etcd prefix) does, so
        that every balancer watching it makes the change too.
        """
        for feed in self.feeds:
            share = getattr(feed.source, "share", None)
            if share is not None and feed.owner in backend.owners:
                share(backend, state, weight)

    def status(self) -> List[dict]:
        """
        Each source as the admin API shows it.
        """
        return [
            dict({"url": feed.owner, "kind": feed.source.config.scheme},
                 **feed.source.status.asDict())
            for feed in self.feeds
        ]
