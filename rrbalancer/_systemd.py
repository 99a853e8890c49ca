"""
What systemd gives a service and expects of it: sockets it opened for us
(socket activation), and word of our state (C{Type=notify}).

Twisted's C{systemd:} endpoint takes a socket by index or by name, but
only when systemd named every socket (C{LISTEN_FDNAMES}, systemd 227 and
newer); C{systemd-socket-activate} without C{--fdname} names none, and
Twisted then finds no socket at all.  systemd's own rule for a socket
without a name is the name C{unknown} (sd_listen_fds_with_names(3)), so
that is given here, before Twisted reads the environment.
"""

import os
import socket
import time
from typing import MutableMapping, Optional

from twisted.application.service import Service
from twisted.logger import Logger


def nameInheritedSockets(environ: MutableMapping[str, str] = os.environ) -> None:
    """
    Give sockets passed to this process without names systemd's default
    name, so that Twisted's C{systemd:} endpoint finds them.
    """
    if environ.get("LISTEN_PID") != str(os.getpid()) or "LISTEN_FDNAMES" in environ:
        return
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return
    environ["LISTEN_FDNAMES"] = ":".join(["unknown"] * count)


def notify(state: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """
    Tell the service manager our state (C{READY=1}, C{RELOADING=1},
    C{STOPPING=1}, C{STATUS=...}), as sd_notify(3) does.

    @return: whether there was a manager to tell.
    """
    address: Optional[str] = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode("utf-8"), address)
        except OSError:
            return False
    return True


class ReadyNotifier(Service):
    """
    Says C{READY=1} once the services started before it are up (every
    listener bound) and the reactor runs, and C{STOPPING=1} when the stop
    begins: the last child of a service starts last and stops first.

    The ready line is logged then too: from that moment SIGTERM stops the
    balancer cleanly (the handlers that make it so are installed when the
    reactor starts, before this).
    """

    log = Logger()

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        Service.startService(self)
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self.log.info("ready")
            notify("READY=1")

    def stopService(self) -> None:
        Service.stopService(self)
        notify("STOPPING=1")


def reloading(clock_gettime=time.clock_gettime) -> None:
    """
    Say a reload has begun (C{READY=1} says it is over).
    """
    usec = int(clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
    notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
