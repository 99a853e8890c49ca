"""
Every core: C{--workers N} runs N balancer processes on the same listening
sockets.

The parent binds each listening port once, stops accepting on it, and
hands the sockets to its workers, which adopt them
(L{IReactorSocket.adoptStreamPort}) and accept connections in turn, as the
kernel spreads them.  Each worker is a whole balancer with its own health
view.  The parent restarts a worker that dies, passes SIGHUP and SIGUSR1
on to every worker (L{WorkerPool.signalAll}, wired in L{rrbalancer.service}),
and on SIGTERM stops its workers gracefully before exiting.

Each worker runs L{rrbalancer._worker}, which reads its L{Config} and the
sockets' description from the environment.  Each is also handed one end of
a UNIX socket pair, its channel to the parent (L{rrbalancer._channel}):
over it the parent's admin listener reads and changes every worker's
backends.  A worker started again gets a new channel.
"""

import base64
import os
import pickle
import socket
import sys
from typing import Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger

from .config import Config, ConfigError
from .listeners import cannotStart, describeAddress

ENVIRONMENT_KEY = "RRBALANCER_WORKER"
FIRST_SOCKET_FD = 3
RESTART_DELAY = 1.0


def _kind(description: str) -> Tuple[bool, str]:
    """
    Whether a port description asks for the PROXY protocol, and its
    transport (C{tcp}, C{tcp6}, C{unix}).

    @raise ConfigError: a kind of port that workers cannot share (TLS is
        set up per process, and an adopted socket carries none).
    """
    proxied = description.startswith("haproxy:")
    inner = description[len("haproxy:") :] if proxied else description
    kind = inner.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix"):
        raise ConfigError(
            f"port: {description!r} cannot be shared by several workers "
            "(use tcp:, tcp6:, unix: or haproxy: over those, or --workers 1)"
        )
    return proxied, kind


def checkShareable(config: Config) -> None:
    for description in config.ports:
        _kind(description)


class _NoConnections(Factory):
    """
    The parent's own factory on the shared ports: it never accepts.
    """

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover - the parent never reads
        return None


class _ChannelFactory(Factory):
    """
    The parent's end of one worker's channel.
    """

    noisy = False

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index

    def buildProtocol(self, addr):
        from ._channel import ParentChannel

        return ParentChannel(self.pool, self.index)


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.pool.log.info(
                "worker {index}: {line}",
                index=self.index,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason) -> None:
        self.pool._ended(self, reason)


class WorkerPool(Service):
    """
    The parent of C{count} workers.

    @ivar channels: each connected worker's channel (an L{amp.AMP}), by
        index.
    @ivar channelChanged: called with (index, channel) when a worker's
        channel connects, and (index, None) when it is lost.
    """

    log = Logger()

    def __init__(self, config: Config, reactor, count: int) -> None:
        checkShareable(config)
        self.config = config
        self._reactor = reactor
        self.count = count
        self._ports: List = []
        self._sockets: List[Tuple[str, bool, int, int]] = []
        self.workers: Dict[int, _WorkerProtocol] = {}
        self.channels: Dict[int, object] = {}
        self.channelChanged = lambda index, channel: None
        self._stopping = False
        self._stopped: Optional[Deferred] = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self._ports:
            return
        for description in self.config.ports:
            proxied, kind = _kind(description)
            inner = description[len("haproxy:") :] if proxied else description
            d = serverFromString(self._reactor, inner).listen(_NoConnections())
            result = []
            d.addBoth(result.append)
            outcome = result[0]
            if not hasattr(outcome, "fileno"):
                reason = outcome.value
                reason = getattr(getattr(reason, "socketError", None), "strerror", None) or reason
                raise cannotStart(f"cannot listen on {description}: {reason}")
            outcome.stopReading()
            self._ports.append(outcome)
            family = socket.AF_UNIX if kind == "unix" else (
                socket.AF_INET6 if ":" in outcome.getHost().host else socket.AF_INET
            )
            self._sockets.append((description, proxied, int(family), outcome.fileno()))

    def startService(self) -> None:
        self.privilegedStartService()
        Service.startService(self)
        for index in range(1, self.count + 1):
            self._spawn(index)

    def addresses(self) -> List[Tuple[str, Optional[str]]]:
        """
        The shared ports: (description, where it listens) pairs.
        """
        return [
            (description, describeAddress(port.getHost()))
            for (description, _, _, _), port in zip(self._sockets, self._ports)
        ]

    def pid(self, index: int) -> Optional[int]:
        worker = self.workers.get(index)
        return worker.transport.pid if worker is not None else None

    def _channelUp(self, index: int, channel) -> None:
        self.channels[index] = channel
        self.channelChanged(index, channel)

    def _channelDown(self, index: int, channel) -> None:
        if self.channels.get(index) is channel:
            del self.channels[index]
            self.channelChanged(index, None)

    def signalAll(self, name: str) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)
            except Exception:
                pass

    def _spawn(self, index: int) -> None:
        protocol = _WorkerProtocol(self, index)
        sockets = [
            (description, proxied, family, FIRST_SOCKET_FD + n)
            for n, (description, proxied, family, _) in enumerate(self._sockets)
        ]
        channelFD = FIRST_SOCKET_FD + len(sockets)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._reactor.adoptStreamConnection(
                ours.fileno(), socket.AF_UNIX, _ChannelFactory(self, index)
            )
        finally:
            ours.close()
        payload = base64.b64encode(pickle.dumps((self.config, index, sockets, channelFD)))
        env = dict(os.environ)
        env[ENVIRONMENT_KEY] = payload.decode("ascii")
        # The parent speaks for the whole balancer to systemd.
        env.pop("NOTIFY_SOCKET", None)
        # The workers run the very code the parent runs: its folder first,
        # before the working directory "-m" or "-c" would put there (where
        # another checkout may be).
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        start = (
            f"import sys; sys.path[0] = {here!r}; "
            "from rrbalancer._worker import main; main()"
        )
        childFDs = {0: "w", 1: "r", 2: "r"}
        for n, (_, _, _, fd) in enumerate(self._sockets):
            childFDs[FIRST_SOCKET_FD + n] = fd
        childFDs[channelFD] = theirs.fileno()
        try:
            self._reactor.spawnProcess(
                protocol,
                sys.executable,
                [sys.executable, "-c", start],
                env=env,
                childFDs=childFDs,
            )
        finally:
            theirs.close()
        self.workers[index] = protocol
        self.log.info("started worker {index} (pid {pid})", index=index, pid=protocol.transport.pid)

    def _ended(self, protocol: _WorkerProtocol, reason) -> None:
        if self.workers.get(protocol.index) is protocol:
            del self.workers[protocol.index]
        if self._stopping:
            if not self.workers and self._stopped is not None:
                d, self._stopped = self._stopped, None
                d.callback(None)
            return
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        self.log.warn(
            "worker {index} {how}; restarting it in {delay}s",
            index=protocol.index,
            how=how,
            delay=RESTART_DELAY,
        )
        self._reactor.callLater(RESTART_DELAY, self._restart, protocol.index)

    def _restart(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self):
        Service.stopService(self)
        self._stopping = True
        for port in self._ports:
            port.stopListening()
        self._ports = []
        if not self.workers:
            return None
        self._stopped = Deferred()
        self.signalAll("TERM")
        grace = self.config.shutdownGrace + 5
        killer = self._reactor.callLater(grace, self.signalAll, "KILL")

        def done(result):
            if killer.active():
                killer.cancel()
            return result

        return self._stopped.addBoth(done)
