"""
Balancing policies of other packages: a module here holding an object that
provides L{rrbalancer.policies.IBalancingPolicyFactory} is offered to
C{--balance} by its name (Twisted's plugin system finds it, as C{twistd}
finds its plugins in C{twisted.plugins}).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__ = []
