"""
C{rrbalancer-register}: run beside a backend, it lists the backend in etcd
for as long as it runs, so that every balancer watching the prefix
(C{--discover etcd://HOST:PORT/PREFIX/}) sends it traffic.

    rrbalancer-register --etcd http://127.0.0.1:2379 --prefix /services/web/ \\
        --url http://127.0.0.1:8081 [--weight N] [--ttl 10]

C{--etcd} may list several members, comma-separated: the calls go to the
next one when one fails.
The key (the prefix and the backend's host:port) is put under a lease of
C{--ttl} seconds, renewed every third of it.  SIGTERM or SIGINT deletes the
key and revokes the lease, and the process exits 0; if the process dies
instead, the lease runs out and the balancers drop the backend within the
TTL.  If etcd is away for longer than the TTL, the lease has expired when
it is back: the key is put again under a new one.
"""

import argparse
import sys
from typing import List, Optional
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogBeginner,
)

from .discovery._etcd import formatValue
from .discovery._etcdclient import EtcdClient, TreqClient
from .values import BackendConfig, ConfigError, parseBackendURL

__all__ = ["Registrar", "main", "parseArguments"]

# The shortest lease etcd grants is about this long.
MIN_TTL = 2


class Registration:
    """
    The checked command line.
    """

    def __init__(
        self, etcd: List[str], prefix: str, backend: BackendConfig, ttl: int
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.backend = backend
        self.ttl = ttl
        host = backend.host
        if ":" in host:
            host = f"[{host}]"
        self.key = f"{prefix}{host}:{backend.port}".encode("utf-8")
        self.value = formatValue(backend, None)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parseArguments(argv: List[str]) -> Registration:
    """
    @raise ConfigError: a mistake, told in one line.
    """
    parser = _Parser(prog="rrbalancer-register", description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", required=True, metavar="URL[,URL...]",
                        help="etcd's client URL, such as http://127.0.0.1:2379 "
                        "(or those of several members)")
    parser.add_argument("--prefix", required=True,
                        help="the key prefix the balancers watch, such as /services/web/")
    parser.add_argument("--url", required=True, help="this backend's URL")
    parser.add_argument("--weight", default="1", metavar="N")
    parser.add_argument("--ttl", default="10", metavar="S",
                        help="seconds the key outlives this process (default 10)")
    args = parser.parse_args(argv)
    members = [_member(url.strip()) for url in args.etcd.split(",")]
    if not args.prefix.startswith("/") or not args.prefix.endswith("/"):
        raise ConfigError(f"--prefix: expected /PREFIX/ (a / at each end), got {args.prefix!r}")
    url = parseBackendURL(args.url, "--url")
    try:
        weight = int(args.weight)
        ttl = int(args.ttl)
    except ValueError:
        raise ConfigError("--weight and --ttl: expected whole numbers") from None
    if weight < 1:
        raise ConfigError(f"--weight: must be at least 1, got {weight}")
    if ttl < MIN_TTL:
        raise ConfigError(f"--ttl: must be at least {MIN_TTL}, got {ttl}")
    return Registration(members, args.prefix, BackendConfig(url, weight), ttl)


def _member(url: str) -> str:
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError as e:
        raise ConfigError(f"--etcd: {url!r}: {e}") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"--etcd: expected http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


class Registrar:
    """
    Keeps one key in etcd under a lease while it runs.

    @ivar lease: the lease the key is under, or None before it is put.
    """

    log = Logger()

    def __init__(self, registration: Registration, client: EtcdClient, clock) -> None:
        self.registration = registration
        self.client = client
        self.clock = clock
        self.lease: Optional[str] = None
        self._call = None
        self._failing = False
        self._stopped = False

    def start(self) -> None:
        self._tick()

    def _tick(self) -> None:
        self._call = None
        d = self._renew() if self.lease is not None else self._register()
        d.addCallbacks(self._succeeded, self._failed)
        d.addBoth(self._next)

    def _register(self) -> Deferred:
        r = self.registration

        @inlineCallbacks
        def register():
            lease, ttl = yield self.client.grant(r.ttl)
            yield self.client.put(r.key, r.value, lease)
            self.lease = lease
            self.log.info(
                "{key} = {value} (lease {lease}, {ttl}s)",
                key=r.key.decode("utf-8"), value=r.value.decode("utf-8"), lease=lease, ttl=ttl,
            )

        return register()

    def _renew(self) -> Deferred:
        def renewed(ttl):
            if ttl <= 0:
                self.log.warn("lease {lease} expired; registering again", lease=self.lease)
                self.lease = None
                return self._register()

        return self.client.keepAlive(self.lease).addCallback(renewed)

    def _succeeded(self, _) -> None:
        if self._failing:
            self._failing = False
            self.log.info("etcd {etcd} answers again", etcd=self.client.base)

    def _failed(self, failure) -> None:
        member = self.client.base
        self.client.rotate()
        if not self._failing:
            self._failing = True
            self.log.warn(
                "etcd {etcd}: {reason}; trying again every {every:g}s",
                etcd=member, reason=failure.getErrorMessage(), every=self.interval,
            )

    @property
    def interval(self) -> float:
        return self.registration.ttl / 3.0

    def _next(self, _) -> None:
        if not self._stopped:
            self._call = self.clock.callLater(self.interval, self._tick)

    @inlineCallbacks
    def stop(self):
        """
        Delete the key and revoke the lease (each tried once).
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.lease is None:
            return
        r = self.registration
        try:
            yield self.client.delete(r.key)
            yield self.client.revoke(self.lease)
        except Exception as e:
            self.log.warn("could not delete {key}: {e}; it goes with its lease",
                          key=r.key.decode("utf-8"), e=e)
        else:
            self.log.info("{key} deleted", key=r.key.decode("utf-8"))


def _printer(stream):
    def observe(event):
        if not event.get("log_namespace", "").startswith("rrbalancer"):
            return
        text = formatEvent(event)
        if text:
            stream.write(f"rrbalancer-register: {text}\n")
            stream.flush()

    return FilteringLogObserver(
        observe, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )


def run(reactor, registration: Registration) -> Deferred:
    http = TreqClient(reactor)
    registrar = Registrar(registration, EtcdClient(http, registration.etcd, reactor), reactor)
    reactor.addSystemEventTrigger("before", "shutdown", registrar.stop)
    registrar.start()
    # Runs until a signal stops the reactor (react then exits 0).
    return Deferred()


def main(argv: Optional[List[str]] = None) -> None:
    try:
        registration = parseArguments(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        sys.stderr.write(f"rrbalancer-register: {e}\n")
        sys.exit(2)
    globalLogBeginner.beginLoggingTo([_printer(sys.stderr)], redirectStandardIO=False)
    react(run, (registration,))


if __name__ == "__main__":
    # Imported again by its name, so that the log's namespaces are ours.
    from rrbalancer.register import main as _main

    _main()
