"""
Signals, as daemons receive them: from the service manager (SIGTERM),
the terminal (SIGINT), logrotate and C{systemctl reload} (SIGHUP, SIGUSR1).

Handlers are installed only in the main thread (where Python delivers
signals), the previous ones are put back when the service stops, and the
work itself runs in the reactor's thread, between events, never inside
the signal handler.
"""

import signal
import threading
from typing import Callable, Dict, Mapping

from twisted.application.service import Service
from twisted.logger import Logger


def _signum(name: str):
    return getattr(signal, name, None)


class SignalHandlers(Service):
    """
    While running, call C{handlers[name]()} when the signal C{name}
    (C{"SIGHUP"}) arrives.

    @ivar install: install the handlers at all (tests that build a whole
        service turn this off, so that the test runner keeps its own).
    """

    log = Logger()
    install = True

    def __init__(self, reactor, handlers: Mapping[str, Callable[[], None]]) -> None:
        self._reactor = reactor
        self.handlers = dict(handlers)
        self._previous: Dict[int, object] = {}

    def privilegedStartService(self) -> None:
        # As early as the listeners bind: once a listener says where it
        # listens, a signal must find the handlers installed.
        Service.privilegedStartService(self)
        self._install()

    def startService(self) -> None:
        Service.startService(self)
        self._install()

    def _install(self) -> None:
        if self._previous or not self.install:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.handlers:
            signum = _signum(name)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._received)

    def stopService(self) -> None:
        Service.stopService(self)
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _received(self, signum, frame) -> None:
        self._reactor.callFromThread(self.deliver, signal.Signals(signum).name)

    def deliver(self, name: str) -> None:
        """
        Handle the signal C{name} now; a handler that fails is logged, and
        the process goes on.
        """
        try:
            self.handlers[name]()
        except Exception:
            self.log.failure("handling {signal} failed", signal=name)


def exitCleanlyOnSignals(reactor) -> None:
    """
    Make SIGTERM and SIGINT stop the balancer gracefully and then exit with
    status 0, as the README promises.

    twistd's own handlers stop the reactor too, but then make the process
    kill itself with the same signal (status 143, or -15 to a parent), so
    that a clean, drained stop looks like a crash to service managers.
    The handlers are replaced once the reactor runs (it installs its own as
    it starts).
    """
    log = Logger(namespace="rrbalancer")
    stopping = []

    def stop(name: str) -> None:
        if stopping:
            log.info("Received {signal} again; already stopping.", signal=name)
            return
        stopping.append(name)
        log.info("Received {signal}, shutting down.", signal=name)
        if reactor.running:
            reactor.stop()

    handlers = SignalHandlers(
        reactor, {"SIGTERM": lambda: stop("SIGTERM"), "SIGINT": lambda: stop("SIGINT")}
    )
    reactor.callWhenRunning(handlers.startService)
