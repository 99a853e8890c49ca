"""
The twistd plugin's two halves: L{Options} parses and validates the command
line (and the config file it names) into one L{Config}; L{makeService}
builds the service from it.

A user's mistake ends here with one line on standard error and exit status
1, before anything listens: never a traceback, never the whole usage text.
"""

import os
import sys

from twisted.python import usage

from . import __version__
from .config import ConfigError, buildConfig, loadConfig


def _fail(message: str) -> SystemExit:
    return SystemExit(f"rrbalancer: {message}")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A round-robin HTTP load balancer. Example: twistd -n rrbalancer "
        "--port 8000 --backend http://127.0.0.1:8081 --backend http://127.0.0.1:8082"
    )

    optFlags = [
        ["no-health-checks", None, "Do not check backends; every backend is always up."],
        ["demo", None, "Start three demo backends on loopback ports and balance over them."],
    ]
    optParameters = [
        ["config", "c", None, "A TOML file with the same settings; flags override it."],
        ["health-path", None, None, "Path of the health check request [default: /]."],
        ["health-interval", None, None, "Seconds between health checks [default: 2]."],
        ["health-timeout", None, None, "Seconds a health check may take [default: 1]."],
        ["rise", None, None, "Passing checks that bring a backend up [default: 2]."],
        ["fall", None, None, "Failing checks that take a backend down [default: 3]."],
        ["backend-ca", None, None, "A PEM bundle of CAs trusted for https backends, "
                                    "besides the system's."],
        ["backend-timeout", None, None, "Seconds to wait for a backend's response "
                                         "[default: 30]."],
        ["connect-timeout", None, None, "Seconds to wait for a backend connection "
                                         "[default: 5]."],
        ["host-header", None, None, "Host sent to backends: 'client' (the client's, "
                                     "default) or 'backend'."],
        ["access-log", None, None, "Write an NCSA combined access log here ('-': stdout)."],
        ["shutdown-grace", None, None, "Seconds in-flight requests get to finish on "
                                        "SIGTERM [default: 10]."],
        ["client-timeout", None, None, "Seconds an idle client connection is kept "
                                        "[default: 60]."],
        ["header-timeout", None, None, "Seconds a client gets to send a whole request "
                                        "head [default: 10]."],
        ["body-timeout", None, None, "Seconds a request body may pause between two "
                                      "reads [default: 60]."],
        ["max-body-size", None, None, "Largest request body in bytes, 0 for no limit "
                                       "[default: 104857600]."],
        ["max-connections", None, None, "Most connections open to one backend; 0 for no "
                                         "limit [default: 0]."],
        ["queue-size", None, None, "Requests that may wait for a connection to a "
                                    "backend at its limit [default: 100]."],
        ["queue-timeout", None, None, "Seconds a request may wait in that queue "
                                       "[default: 5]."],
        ["workers", None, None, "Processes sharing the listening ports; 'auto' is one "
                                 "per CPU [default: 1]."],
        ["admin", None, None, "The admin API, dashboard and metrics listen here: an "
                               "endpoint description, or 'none' "
                               "[default: tcp:8001:interface=127.0.0.1]."],
        ["admin-token-file", None, None, "Every admin request must then carry "
                                          "'Authorization: Bearer <this file's token>'."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["backend"] = []

    def opt_port(self, value: str) -> None:
        """
        Listen here: a port number or a Twisted server endpoint description
        (tcp:8000:interface=127.0.0.1, ssl:8443:..., unix:/path,
        haproxy:tcp:8000). Repeatable [default: 8000].
        """
        self["port"].append(value)

    opt_p = opt_port

    def opt_backend(self, value: str) -> None:
        """
        A backend: URL[,weight=N][,backup]. Repeatable.
        """
        self["backend"].append(value)

    opt_b = opt_backend

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"rrbalancer {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options=None) -> None:
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            raise _fail(f"{e} (see --help)") from None

    def settings(self) -> dict:
        """
        The settings given on the command line, in the config file's shape.
        File names are made absolute here, relative to the working directory.
        """
        settings = {}
        health = {}
        if self["port"]:
            settings["port"] = list(self["port"])
        if self["backend"]:
            settings["backend"] = list(self["backend"])
        if self["demo"]:
            settings["demo"] = True
        if self["no-health-checks"]:
            health["enabled"] = False
        for flag, key in [
            ("health-path", "path"),
            ("health-interval", "interval"),
            ("health-timeout", "timeout"),
            ("rise", "rise"),
            ("fall", "fall"),
        ]:
            if self[flag] is not None:
                health[key] = self[flag]
        if health:
            settings["health"] = health
        for flag in [
            "backend-timeout",
            "connect-timeout",
            "host-header",
            "shutdown-grace",
            "client-timeout",
            "header-timeout",
            "body-timeout",
            "max-body-size",
            "max-connections",
            "queue-size",
            "queue-timeout",
            "workers",
            "admin",
        ]:
            if self[flag] is not None:
                settings[flag.replace("-", "_")] = self[flag]
        for flag in ["backend-ca", "access-log", "admin-token-file"]:
            value = self[flag]
            if value is not None:
                if value != "-":
                    value = os.path.abspath(os.path.expanduser(value))
                settings[flag.replace("-", "_")] = value
        return settings

    def postOptions(self) -> None:
        try:
            if self["config"] is not None:
                self.config = loadConfig(self["config"], self.settings())
            else:
                self.config = buildConfig(self.settings())
        except ConfigError as e:
            raise _fail(str(e)) from None


def makeService(options: Options):
    """
    twistd's entry point; the reactor is chosen by twistd, so it is taken
    from there here, and only here.
    """
    from twisted.internet import reactor

    from .service import makeService as build

    try:
        service = build(options.config, reactor)
    except ConfigError as e:
        print(f"rrbalancer: {e}", file=sys.stderr)
        raise SystemExit(1)
    exitCleanlyOnSignals(reactor)
    return service


def exitCleanlyOnSignals(reactor) -> None:
    """
    Make SIGTERM and SIGINT stop the balancer gracefully and then exit with
    status 0, as the README promises.

    twistd's own handlers stop the reactor too, but then make the process
    kill itself with the same signal (status 143, or -15 to a parent), so
    that a clean, drained stop looks like a crash to service managers.
    The handlers are replaced once the reactor runs (it installs its own as
    it starts); they only ask the reactor to stop: stopping, and its
    logging, happen in the reactor's thread, not in the signal handler.
    """
    import signal

    from twisted.logger import Logger

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

    def handler(signum, frame) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    def install() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave twistd's alone
                return

    reactor.callWhenRunning(install)
