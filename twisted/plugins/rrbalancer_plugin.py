from twisted.application.service import ServiceMaker

rrbalancer = ServiceMaker(
    "rrbalancer",
    "rrbalancer.tap",
    "A round-robin HTTP load balancer",
    "rrbalancer",
)
