"""
rrbalancer: a round-robin HTTP load balancer that runs as a twistd plugin.
"""

__version__ = "0.1.0"
