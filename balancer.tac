# twistd -ny balancer.tac
#
# Runs the balancer described by the TOML file that RRBALANCER_CONFIG names
# (default: balancer.toml beside this file).
import os

from twisted.application.service import Application
from twisted.internet import reactor

from rrbalancer.config import ConfigError, loadConfig
from rrbalancer.service import makeService
from rrbalancer.signals import exitCleanlyOnSignals

path = os.environ.get(
    "RRBALANCER_CONFIG",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "balancer.toml"),
)
try:
    service = makeService(loadConfig(path), reactor)
except ConfigError as e:
    raise SystemExit(f"rrbalancer: {e}")
# SIGTERM/SIGINT: stop gracefully, then exit 0 (not by the signal).
exitCleanlyOnSignals(reactor)

application = Application("rrbalancer")
service.setServiceParent(application)
