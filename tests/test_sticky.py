"""
Tests for L{rrbalancer.sticky}: the cookie that sends a client back to its
backend, on the model and through a real balancer.
"""

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from rrbalancer.backends import DISABLED, DRAINING, BackendGroup
from rrbalancer.config import BackendConfig, ConfigError, HealthConfig, buildConfig
from rrbalancer.sticky import StickyCookie

from .support import Net, ScriptedBackend, exchange, get, ok, reply, startBalancer


class _Request:
    """
    What the cookie reads of a request.
    """

    def __init__(self, cookie=None, secure=False):
        self.cookies = {b"srv": cookie} if cookie is not None else {}
        self.secure = secure

    def getCookie(self, name):
        return self.cookies.get(name)

    def isSecure(self):
        return self.secure


class StickyCookieTests(SynchronousTestCase):
    def setUp(self):
        self.group = BackendGroup(HealthConfig(enabled=False), Clock())
        self.a = self.group.add(BackendConfig(url="http://127.0.0.1:8081"))
        self.b = self.group.add(BackendConfig(url="http://127.0.0.1:8082"))
        self.sticky = StickyCookie("srv", self.group)

    def cookieFor(self, backend, request):
        headers = Headers()
        self.sticky.stick(request, backend, headers)
        return headers.getRawHeaders(b"set-cookie")

    def test_opaqueAndStable(self):
        """
        The id is not the address, and another group (another balancer, or
        this one restarted) gives the same server the same id.
        """
        self.assertNotIn("8081", self.a.stickyID)
        self.assertNotIn("127.0.0.1", self.a.stickyID)
        self.assertNotEqual(self.a.stickyID, self.b.stickyID)
        other = BackendGroup(HealthConfig(enabled=False), Clock())
        other.add(BackendConfig(url="http://127.0.0.1:8082"))
        again = other.add(BackendConfig(url="http://127.0.0.1:8081/"))
        self.assertEqual(again.stickyID, self.a.stickyID)

    def test_setOnceAndAttributes(self):
        [cookie] = self.cookieFor(self.a, _Request())
        self.assertEqual(
            cookie, b"srv=" + self.a.stickyID.encode() + b"; Path=/; HttpOnly; SameSite=Lax"
        )
        [secure] = self.cookieFor(self.a, _Request(secure=True))
        self.assertTrue(secure.endswith(b"; Secure"))
        # Already stuck to it: nothing to set.
        self.assertIsNone(self.cookieFor(self.a, _Request(self.a.stickyID.encode())))
        # Stuck elsewhere: stuck again.
        self.assertIsNotNone(self.cookieFor(self.b, _Request(self.a.stickyID.encode())))

    def test_backendFor(self):
        request = _Request(self.b.stickyID.encode())
        self.assertIs(self.sticky.backendFor(request), self.b)
        self.assertIsNone(self.sticky.backendFor(request, exclude=[self.b]))
        self.assertIsNone(self.sticky.backendFor(_Request()))
        self.assertIsNone(self.sticky.backendFor(_Request(b"nonsense")))

    def test_unavailableBackendLetGo(self):
        request = _Request(self.b.stickyID.encode())
        for state in (DRAINING, DISABLED):
            self.b.setAdminState(state, "test")
            self.assertIsNone(self.sticky.backendFor(request))
        self.b.setAdminState("up", "test")
        self.assertIs(self.sticky.backendFor(request), self.b)
        self.group.remove(self.b)
        self.assertIsNone(self.sticky.backendFor(request))

    def test_setting(self):
        config = buildConfig({"backend": ["http://a:1"], "sticky_cookie": "SERVERID"})
        self.assertEqual(config.stickyCookie, "SERVERID")
        e = self.assertRaises(
            ConfigError, buildConfig, {"backend": ["http://a:1"], "sticky_cookie": "a;b"}
        )
        self.assertEqual(str(e), "sticky_cookie: 'a;b' is not a cookie name")


class ThroughTheBalancerTests(TestCase):
    def setUp(self):
        self.net = Net(self)

    def cookie(self, response):
        [value] = response.header(b"set-cookie")
        return value.split(b";", 1)[0]

    @inlineCallbacks
    def test_stuck(self):
        """
        The first answer sets the cookie; with it, every request goes to
        the same backend while plain requests still rotate; when that
        backend drains, the client is stuck to another.
        """
        backends = [ScriptedBackend(self.net, reply(ok(name))) for name in (b"one", b"two")]
        balancer = yield startBalancer(
            self.net, [b.url for b in backends], stickyCookie="srv"
        )
        first = yield exchange(self.net, balancer.port, get())
        cookie = self.cookie(first)
        bodies = []
        for _ in range(4):
            response = yield exchange(self.net, balancer.port, get(extra=b"Cookie: " + cookie + b"\r\n"))
            self.assertEqual(response.header(b"set-cookie"), [])
            bodies.append(response.body)
        self.assertEqual(bodies, [first.body] * 4)
        plain = yield exchange(self.net, balancer.port, get())
        self.assertNotEqual(plain.body, first.body)

        [stuckTo] = [b for b in balancer.group if b.stickyID.encode() == cookie.split(b"=")[1]]
        stuckTo.setAdminState(DRAINING, "test")
        moved = yield exchange(self.net, balancer.port, get(extra=b"Cookie: " + cookie + b"\r\n"))
        self.assertNotEqual(moved.body, first.body)
        self.assertNotEqual(self.cookie(moved), cookie)

    @inlineCallbacks
    def test_off(self):
        backend = ScriptedBackend(self.net, reply(ok()))
        balancer = yield startBalancer(self.net, [backend.url])
        response = yield exchange(self.net, balancer.port, get())
        self.assertEqual(response.header(b"set-cookie"), [])
