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
from .service import makeService as build
from .service import serverEndpoint
from .settings import SETTINGS, Setting
from .signals import exitCleanlyOnSignals


def _fail(message: str) -> SystemExit:
    # One line, even when it quotes an argument that holds a line break.
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    return SystemExit(f"rrbalancer: {message}")


def _helpText(setting: Setting) -> str:
    shown = setting.shown()
    if shown and setting.switch is None:
        return f"{setting.help} [default: {shown}]"
    return setting.help


class Options(usage.Options):
    """
    The command line: one flag per setting of L{SETTINGS}, plus C{--config}
    and C{--version}.  Flags are kept as given (strings) and validated with
    the config file's values by L{buildConfig}, so that both are checked by
    the same rules and a flag fixes a bad file value.
    """

    synopsis = "[options]"
    longdesc = (
        "A round-robin HTTP load balancer. Example: twistd -n rrbalancer "
        "--port 8000 --backend http://127.0.0.1:8081 --backend http://127.0.0.1:8082"
    )

    optFlags = [
        ["check", None, "Check the options and the config file as a start would, "
                        "bind nothing, say whether they are valid, and exit."]
    ] + [
        [s.longFlag, s.short, _helpText(s)]
        for s in SETTINGS
        if s.longFlag and s.switch is not None
    ]
    optParameters = [
        ["config", "c", None, "A TOML file with the same settings; flags override it."]
    ] + [
        [s.longFlag, s.short, None, _helpText(s)]
        for s in SETTINGS
        if s.longFlag and s.switch is None and not s.repeatable
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        for setting in _REPEATABLE:
            self[setting.longFlag] = []

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
        settings: dict = {}
        for setting in SETTINGS:
            flag = setting.longFlag
            if flag is None:
                continue
            value = self[flag]
            if setting.switch is not None:
                if not value:
                    continue
                value = setting.switch
            elif setting.repeatable:
                if not value:
                    continue
                value = list(value)
            elif value is None:
                continue
            if setting.path and value != "-":
                value = os.path.abspath(os.path.expanduser(value))
            if setting.table is None:
                settings[setting.name] = value
            else:
                settings.setdefault(setting.table, {})[setting.name] = value
        return settings

    def postOptions(self) -> None:
        try:
            if self["config"] is not None:
                self.config = loadConfig(self["config"], self.settings())
            else:
                self.config = buildConfig(self.settings())
        except ConfigError as e:
            raise _fail(str(e)) from None
        if self["check"]:
            check(self.config)


def check(config) -> None:
    """
    C{--check}: build everything a start builds (endpoints parsed, token
    and CA files read), start nothing, and exit 0 with a line saying what
    was found, or 1 with the line saying what is wrong.
    """
    from twisted.internet import reactor

    try:
        build(config, reactor)
        if config.workers > 1:
            # The workers' parent parses its ports only when it binds them.
            for description in config.ports:
                serverEndpoint(reactor, description)
    except ConfigError as e:
        raise _fail(str(e)) from None
    listeners = len(config.ports) + (config.admin is not None)
    backends = len(config.backends)
    sources = len(config.discover)
    found = f"{sources} discovery source{'s' * (sources != 1)}, " if sources else ""
    routing = ""
    if config.pools or config.routes:
        pools, routes = len(config.pools), len(config.routes)
        routing = (
            f", {pools} more pool{'s' * (pools != 1)}, {routes} route{'s' * (routes != 1)}"
        )
    print(
        f"rrbalancer: configuration OK ({backends} backend{'s' * (backends != 1)}, "
        f"{found}{listeners} listener{'s' * (listeners != 1)}{routing})"
    )
    raise SystemExit(0)


_REPEATABLE = [s for s in SETTINGS if s.longFlag and s.repeatable]


def _repeatable(setting: Setting):
    def opt(self, value: str) -> None:
        self[setting.longFlag].append(value)

    opt.__doc__ = _helpText(setting)
    return opt


for _setting in _REPEATABLE:
    _method = _repeatable(_setting)
    setattr(Options, "opt_" + _setting.longFlag.replace("-", "_"), _method)
    if _setting.short:
        setattr(Options, "opt_" + _setting.short, _method)
del _setting, _method


def makeService(options: Options):
    """
    twistd's entry point; the reactor is chosen by twistd, so it is taken
    from there here, and only here.
    """
    from twisted.internet import reactor

    try:
        service = build(options.config, reactor)
    except ConfigError as e:
        print(f"rrbalancer: {e}", file=sys.stderr)
        raise SystemExit(1)
    exitCleanlyOnSignals(reactor)
    return service
