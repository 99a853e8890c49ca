"""
Config reload: SIGHUP (or C{POST /api/reload}) re-reads the C{--config}
file and applies its backends to the running group (the signal is wired in
L{rrbalancer.service}).

The backends change, and so do the balancing settings (the policy and its
parameters, slow start, ejection, the panic threshold), the pools and the
routes (L{rrbalancer.pools.Pools.reload}).  Backends the file
lists are added (taking traffic
once their first health check passes), changed in place (weight, backup:
their connections and requests in flight stay), or, when the file no longer
lists them, drained and removed without cutting a request.  Backends that
did not come from the file (added through the API, found by discovery, the
demo ones) are left alone, and so is one the file drops while the API or a
discovery source still lists it.  Every other setting needs a restart; a change to one is
reported and not applied.  A file that does not validate changes nothing.
"""

from dataclasses import fields, replace
from typing import Callable, Dict, List, Optional, Tuple

from twisted.logger import Logger

from .backends import CONFIG, Backend, BackendGroup, Ejection
from .config import RELOADABLE, Config, ConfigError, loadConfig
from .logs import changesInBrief
from .policies import policyFor
from .settings import isMadeVia

# The settings that make the group's balancing: a change to any of them
# gives the group a new policy and parameters.
BALANCING = (
    "balance", "hashKey", "hashBalance", "ewmaDecay", "slowStart", "panicThreshold",
    "ejectAfter", "ejectTime", "ejectOn5xx", "maxEjectedPercent",
)

# The settings L{rrbalancer.pools.Pools.reload} applies.
POOLED = ("pools", "routes", "mirrorMaxBody", "mirrorMaxInflight")


class Reloader:
    """
    Applies a config file's backends to a running L{BackendGroup}.

    @param load: builds the new L{Config}; by default the file the running
        one came from, with the same command-line settings over it.
    @param onAdded: called with each backend a reload adds (to check it at
        once rather than at the next health check).
    Backends the file lists are owned by L{CONFIG}; one that another
    owner (the API, a discovery source) lists too stays when the file drops
    it.
    @param pools: the L{rrbalancer.pools.Pools}, to which a reload brings
        the file's pools, routes and mirrors (L{rrbalancer.pools.Pools.reload});
        or None.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        group: BackendGroup,
        load: Optional[Callable[[], Config]] = None,
        onAdded: Callable[[Backend], None] = lambda backend: None,
        pools=None,
    ) -> None:
        self.config = config
        self.pools = pools
        self.group = group
        self._load = load
        self.onAdded = onAdded
        for backendConfig in config.backends:
            backend = group.byServer(backendConfig)
            if backend is not None:
                group.claim(backend, CONFIG)

    @property
    def canReload(self) -> bool:
        return self._load is not None or self.config.configPath is not None

    def load(self) -> Config:
        if self._load is not None:
            return self._load()
        if self.config.configPath is None:
            raise ConfigError(
                "reload: the balancer was started without --config, so there "
                "is no file to read again"
            )
        return loadConfig(self.config.configPath, self.config.configOverrides)

    def reload(self, who: str = "SIGHUP") -> Dict[str, List]:
        """
        Read the file again and apply its backends.

        @return: what changed: C{added}, C{removed} and C{changed} URLs, and
            the C{ignored} settings that need a restart.
        @raise ConfigError: the file does not validate; nothing changed.
        """
        try:
            new = self.load()
        except ConfigError as e:
            self.log.error(
                "reload ({who}) failed, the running configuration stays: {error}",
                who=who,
                error=str(e),
            )
            raise
        result = self.apply(new, who)
        self.log.info(
            "reload ({who}): added {added}, removed {removed}, changed "
            "{changed}{ignored}",
            who=who,
            **changesInBrief(result["added"], result["removed"], result["changed"]),
            ignored=(
                "; needs a restart, not applied: " + ", ".join(result["ignored"])
                if result["ignored"]
                else ""
            ),
        )
        return result

    def apply(self, new: Config, who: str = "reload") -> Dict[str, List]:
        if new.via == "auto" and isMadeVia(self.config.via):
            # The name auto stood for when the balancer started stays.
            new = replace(new, via=self.config.via)
        group = self.group
        reason = f"reload ({who})"
        added, removed, changed = applyBackends(group, new.backends, reason, self.onAdded)
        if any(getattr(new, name) != getattr(self.config, name) for name in BALANCING):
            group.rebalance(
                policyFor(new, group._clock),
                Ejection.fromConfig(new),
                new.slowStart,
                new.panicThreshold,
            )
            changed.append("balancing")
        ignored = [
            f.name
            for f in fields(Config)
            if f.name not in RELOADABLE
            and getattr(new, f.name) != getattr(self.config, f.name)
        ]
        if self.pools is None:
            # Nothing here to apply them to.
            ignored.extend(
                name for name in POOLED if getattr(new, name) != getattr(self.config, name)
            )
        else:
            result = self.pools.reload(new, reason)
            added.extend(result["added"])
            removed.extend(result["removed"])
            changed.extend(result["changed"])
            ignored.extend(result["ignored"])
        self.config = new
        return {"added": added, "removed": removed, "changed": changed, "ignored": ignored}


def applyBackends(
    group: BackendGroup,
    backends,
    reason: str,
    onAdded: Callable[[Backend], None],
    label: Callable[[str], str] = lambda url: url,
) -> Tuple[List[str], List[str], List[str]]:
    """
    Make the backends of C{group} that the file owns (L{CONFIG}) those of
    C{backends}: add the new ones (each checked before it takes traffic),
    change weights and backups in place, and drain and remove the ones the
    file no longer lists, unless another owner still does.

    @param label: how a backend's URL is reported.
    @return: the (added, removed, changed) backends, as C{label} names them.
    """
    added, removed, changed = [], [], []
    wanted = set()
    for backendConfig in backends:
        wanted.add(backendConfig.server)
        backend = group.byServer(backendConfig)
        if backend is None:
            backend = group.add(backendConfig, awaitCheck=True, reason=reason, owner=CONFIG)
            added.append(label(backend.url))
            onAdded(backend)
            continue
        group.claim(backend, CONFIG)
        if backend.removing:
            group.keep(backend, reason)
            changed.append(label(backend.url))
        if (backend.weight, backend.backup) != (backendConfig.weight, backendConfig.backup):
            group.reconfigure(backend, backendConfig.weight, backendConfig.backup)
            if label(backend.url) not in changed:
                changed.append(label(backend.url))
    for backend in group:
        if backend.config.server not in wanted and group.release(
            backend, CONFIG, f"{reason}: no longer in the file"
        ):
            removed.append(label(backend.url))
    return added, removed, changed
